"""memory_bank teacher (InstDisc): the momentum update against a per-sample loop, the sample's
own entry masked out of its negatives, uniform draws among filled entries, exact state round
trip and engine resume."""

import copy

import pytest
import torch
import torch.nn.functional as F

import sdk
from plugins.teachers.memory_bank import MemoryBank
from sdk import contrastive
from sdk.contrastive import NTXent


def slow_bank(steps, momentum):
    """Per-sample dictionary: v_i <- normalize(m v_i + (1 - m) z_i), z_i the normalised mean of
    the sample's normalised views; a first visit stores z_i."""
    bank = {}
    for views, index in steps:
        for b, i in enumerate(index.tolist()):
            z = sum(F.normalize(v[b].double(), dim=0) for v in views)
            z = z / z.norm()
            bank[i] = z if i not in bank else F.normalize(momentum * bank[i] + (1 - momentum) * z, dim=0)
    return bank


@pytest.mark.parametrize("momentum", [0.5, 0.8, 0.0])
def test_momentum_update_matches_a_per_sample_loop(momentum):
    g = torch.Generator().manual_seed(0)
    bank = MemoryBank(num_samples=10, momentum=momentum)
    steps = []
    for index in ([0, 3, 5], [5, 1, 3, 9], [3, 0], [7, 5]):
        views = [torch.randn(len(index), 4, generator=g) * 3 for _ in range(2)]
        index = torch.tensor(index)
        steps.append((views, index))
        bank.update(views=sdk.Views(embeddings=tuple(views)), batch=sdk.Batch(index=index))
    expected = slow_bank(steps, momentum)
    assert bank.filled.nonzero().flatten().tolist() == sorted(expected)
    for i, v in expected.items():
        assert torch.allclose(bank.lookup(torch.tensor([i]))[0].double(), v, atol=1e-6)
    unvisited = [i for i in range(10) if i not in expected]
    assert (bank.bank[unvisited] == 0).all()  # untouched, and never published as negatives


def test_observed_micro_batches_match_the_loop_and_update_without_views_keeps_the_bank():
    """With gradient accumulation the engine observes every micro-batch, then updates once."""
    g = torch.Generator().manual_seed(1)
    bank = MemoryBank(num_samples=10, momentum=0.5)
    steps = []
    for micro in (([0, 3, 5], [5, 1]), ([3, 0, 9], [7, 5])):
        for index in micro:
            views = [torch.randn(len(index), 4, generator=g) for _ in range(2)]
            index = torch.tensor(index)
            steps.append((views, index))
            bank.observe(views=sdk.Views(embeddings=tuple(views)), batch=sdk.Batch(index=index))
        stored = bank.bank.clone()
        bank.update(step=len(steps))
        assert torch.equal(bank.bank, stored)
    expected = slow_bank(steps, 0.5)
    assert bank.filled.nonzero().flatten().tolist() == sorted(expected)
    for i, v in expected.items():
        assert torch.allclose(bank.lookup(torch.tensor([i]))[0].double(), v, atol=1e-6)


def test_own_entry_is_masked_out_of_the_samples_negatives(slow_info_nce_with_memory):
    g = torch.Generator().manual_seed(1)
    bank = MemoryBank(num_samples=12, num_negatives=12)  # publishes the whole bank
    seen = torch.tensor([0, 2, 3, 5, 8, 11])
    bank.update(views=sdk.Views(embeddings=(torch.randn(6, 4, generator=g),)), batch=sdk.Batch(index=seen))
    memory = bank.memory()
    assert memory[contrastive.NEGATIVES_INDEX].tolist() == list(range(12))
    assert memory[contrastive.NEGATIVES_MASK].tolist() == [i in seen.tolist() for i in range(12)]
    index = torch.tensor([2, 5, 7, 11])  # 2, 5 and 11 have entries: their own must not count
    z1, z2 = torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g)
    got = NTXent(temperature=0.2)(sdk.Views(embeddings=(z1, z2), extras=memory), sdk.Batch(index=index))
    expected = slow_info_nce_with_memory([z1, z2], index, memory["negatives"],
                                         list(range(12)), memory["negatives_mask"].tolist(), 0.2)
    assert got.value.item() == pytest.approx(expected, rel=1e-5)
    # the mask is what sdk.contrastive.memory_mask computes: own entry and unfilled ones out
    mask = contrastive.memory_mask(memory, index, 4)
    assert mask.sum(1).tolist() == [5, 5, 6, 5]
    assert not mask[0, 2] and not mask[3, 11] and mask[2, 2]


def test_drawn_negatives_are_uniform_among_filled_entries():
    bank = MemoryBank(num_samples=5000, num_negatives=4000)  # fewer draws than entries
    filled = torch.tensor([1, 4, 6, 13, 4999])
    bank.update(views=sdk.Views(embeddings=(torch.randn(5, 3),)), batch=sdk.Batch(index=filled))
    torch.manual_seed(0)
    memory = bank.memory()
    drawn = memory[contrastive.NEGATIVES_INDEX]
    assert memory[contrastive.NEGATIVES_MASK].all()
    counts = torch.bincount(drawn, minlength=5000)
    assert counts.nonzero().flatten().tolist() == filled.tolist()
    assert ((counts[filled] - 800).abs() < 120).all()  # ~4.7 sigma of Binomial(4000, 1/5)
    assert torch.equal(memory[contrastive.NEGATIVES], bank.bank[drawn])


def test_state_dict_round_trip_restores_exactly():
    g = torch.Generator().manual_seed(2)
    bank = MemoryBank(num_samples=8, momentum=0.7)
    for index in ([0, 1, 2], [2, 5]):
        bank.update(views=sdk.Views(embeddings=(torch.randn(len(index), 3, generator=g),)),
                    batch=sdk.Batch(index=torch.tensor(index)))
    state = copy.deepcopy(bank.state_dict())
    fresh = MemoryBank(num_samples=8, momentum=0.7)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.bank, bank.bank) and torch.equal(fresh.filled, bank.filled)
    views, batch = sdk.Views(embeddings=(torch.randn(2, 3, generator=g),)), sdk.Batch(index=torch.tensor([5, 6]))
    bank.update(views=views, batch=batch)
    fresh.update(views=views, batch=batch)
    assert torch.equal(fresh.bank, bank.bank) and torch.equal(fresh.filled, bank.filled)


def test_engine_checkpoints_the_bank_and_resume_continues_it(tmp_path):
    runs = sdk.testing.check_resume(  # mid-epoch; the last checkpoint is step 2
        objective=NTXent, teacher=lambda: MemoryBank(num_samples=40, num_negatives=16),
        steps=5, kill_at=4, tmp_dir=tmp_path)
    # check_resume compared bank and filled bitwise; the killed step's batch was observed after
    # its backward, before the kill
    assert int(runs.killed.teacher.filled.sum()) == 32 and int(runs.straight.teacher.filled.sum()) == 40
    assert torch.equal(runs.resumed.teacher.filled, runs.straight.teacher.filled)


def test_bad_parameters_and_inputs_name_the_field():
    for name, value in (("num_samples", 0), ("momentum", 1.0), ("num_negatives", 0)):
        with pytest.raises(sdk.ConfigError, match=name):
            MemoryBank(**{name: value})
    with pytest.raises(sdk.RequirementError, match="Batch.index"):
        MemoryBank().update(views=sdk.Views(embeddings=(torch.randn(2, 3),)), batch=sdk.Batch())
