"""sdk.multimodal: tower marks, the paired-view transform, paired data, the profiles of an image
and cross-modal recall against a loop."""

import pytest
import torch

import sdk
from sdk import keys
from sdk.multimodal import (
    PairedDataset,
    TowerView,
    cross_modal_recall,
    for_tower,
    intensity_profiles,
    split_tower,
)


def test_marks_share_the_data_and_vanish_under_operations():
    x = torch.randn(3, 2)
    marked = for_tower(x, 1)
    assert split_tower(marked)[1] == 1 and marked.data_ptr() == x.data_ptr()
    assert split_tower(marked * 2)[1] is None and split_tower(x) == (x, None)
    with pytest.raises(sdk.ShapeError, match="for_tower"):
        for_tower(x, -1)


def test_tower_view_reads_the_paired_modality_and_augments_it():
    x, p = torch.randn(4, 6), torch.randn(4, 3)
    batch = sdk.Batch(index=torch.arange(4), extras={keys.PAIRED_INPUT: p})
    out, same = TowerView(1, paired=True, augment=sdk.data.augmentation(scale=0.5))(x, batch)
    plain, tower = split_tower(out)
    ratio = plain / p
    assert tower == 1 and same is batch and not torch.equal(plain, p)
    torch.testing.assert_close(ratio, ratio[:, :1].expand(-1, 3))  # one factor per sample
    out, _ = TowerView(0)(x, batch)
    assert split_tower(out)[1] == 0 and torch.equal(split_tower(out)[0], x)
    view = TowerView(1, paired=True)
    with pytest.raises(sdk.RequirementError, match="paired_input"):
        view(x, sdk.Batch())
    with pytest.raises(sdk.ShapeError, match="paired_input.*4 rows"):
        view(x, sdk.Batch(index=torch.arange(4), extras={keys.PAIRED_INPUT: torch.randn(2, 3)}))


def test_paired_dataset_items_reach_batch_extras():
    ds = PairedDataset(torch.randn(5, 2), torch.randn(5, 3), torch.arange(5))
    item = ds[3]
    assert torch.equal(item[keys.PAIRED_INPUT], ds.paired[3]) and int(item["index"]) == 3
    with pytest.raises(sdk.ShapeError, match="PairedDataset"):
        PairedDataset(torch.randn(5, 2), torch.randn(4, 3), torch.arange(5))


def test_profiles_are_the_row_and_column_means():
    image = torch.arange(64.0).reshape(1, 64)
    profile = intensity_profiles(image, (8, 8))
    grid = image.reshape(8, 8)
    assert torch.equal(profile[0, :8], grid.mean(1)) and torch.equal(profile[0, 8:], grid.mean(0))
    with pytest.raises(sdk.ShapeError, match="intensity_profiles"):
        intensity_profiles(torch.randn(2, 60), (8, 8))


def test_cross_modal_recall_against_a_loop():
    g = torch.Generator().manual_seed(1)
    za, zb = torch.randn(9, 3, generator=g), torch.randn(9, 3, generator=g)
    zn, wn = (torch.nn.functional.normalize(z, dim=1) for z in (za, zb))
    for k in (1, 3):
        hits = 0
        for s in (zn @ wn.T, wn @ zn.T):
            for i in range(9):
                hits += sum(float(s[i, j]) >= float(s[i, i]) for j in range(9)) <= k
        assert cross_modal_recall(za, zb, k=k) == pytest.approx(hits / 18)
    assert cross_modal_recall(za, za) == 1.0
    assert cross_modal_recall(torch.ones(4, 2), torch.ones(4, 2)) == 0.0  # ties count against
    with pytest.raises(sdk.ShapeError, match="cross_modal_recall"):
        cross_modal_recall(za, zb[:5])
