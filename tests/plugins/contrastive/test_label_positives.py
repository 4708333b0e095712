"""label_positives masks against a slow loop."""

import pytest
import torch

import sdk


def test_masks_match_loop():
    y = torch.tensor([0, 1, 0, 2])
    views = sdk.Views(embeddings=(torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(4, 2)))
    pairs = sdk.create("sampler", "label_positives").pairs(views, sdk.Batch(targets=y))
    rows = [int(y[r % 4]) for r in range(12)]
    for r in range(12):
        for c in range(12):
            assert bool(pairs.positive[r, c]) == (rows[r] == rows[c])
            assert bool(pairs.negative[r, c]) == (rows[r] != rows[c])


def test_needs_targets():
    views = sdk.Views(embeddings=(torch.zeros(4, 2), torch.zeros(4, 2)))
    with pytest.raises(sdk.RequirementError, match="label_positives' needs Batch.targets"):
        sdk.create("sampler", "label_positives").pairs(views, sdk.Batch())
