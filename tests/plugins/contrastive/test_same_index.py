"""same_index masks: positives are exactly the other views of the same sample."""

import torch

import sdk


def test_masks_match_loop():
    views = sdk.Views(embeddings=(torch.zeros(3, 2), torch.zeros(3, 2)))
    pairs = sdk.create("sampler", "same_index").pairs(views, sdk.Batch())
    for r in range(6):
        for c in range(6):
            assert bool(pairs.positive[r, c]) == (r % 3 == c % 3)
            assert bool(pairs.negative[r, c]) == (r % 3 != c % 3)
