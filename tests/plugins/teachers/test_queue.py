"""queue teacher (MoCo): FIFO ring against a list model, momentum update, detached keys,
exact state round trip, and nt_xent's InfoNCE whose denominator includes the queue."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sdk
from plugins.teachers.queue import QueueTeacher
from sdk import contrastive
from sdk.contrastive import NTXent


def slow_ring(pushes, size):
    """MoCo's dequeue/enqueue as a Python list: key number n of the stream sits in slot n % K."""
    slots = [None] * size
    owners = [-1] * size
    count = 0
    for keys, index in pushes:
        for k, i in zip(keys, index):
            slots[count % size] = F.normalize(k.double(), dim=0)
            owners[count % size] = int(i)
            count += 1
    return slots, owners, count


@pytest.mark.parametrize("sizes", [[3, 2, 4], [5, 5, 5], [11], [1, 1, 1, 1, 1, 1, 1], [2, 9, 3]])
def test_fifo_order_and_wrap_around_match_a_list_model(sizes):
    g = torch.Generator().manual_seed(len(sizes))
    size = 7
    queue = QueueTeacher(size=size)
    pushes, start = [], 0
    for b in sizes:
        keys = torch.randn(b, 4, generator=g)
        index = torch.arange(start, start + b)
        start += b
        pushes.append((keys, index))
        queue.push(keys, index)
    slots, owners, count = slow_ring(pushes, size)
    filled = min(count, size)
    assert int(queue.filled) == filled and int(queue.ptr) == count % size
    memory = queue.memory()
    valid = memory[contrastive.NEGATIVES_MASK]
    assert valid.tolist() == [s is not None for s in slots]
    for slot in range(filled):
        assert torch.allclose(memory[contrastive.NEGATIVES][slot].double(), slots[slot], atol=1e-6)
    assert memory[contrastive.NEGATIVES_INDEX][:filled].tolist() == owners[:filled]
    # the oldest key is the next to go: one more push overwrites slot ptr
    oldest = int(queue.ptr)
    before = queue.keys.clone()
    queue.push(torch.ones(1, 4), torch.tensor([99]))
    changed = (queue.keys != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [oldest] and queue.key_index[oldest] == 99


def test_empty_queue_publishes_nothing_and_keys_are_unit_vectors():
    queue = QueueTeacher(size=4)
    assert queue.memory() == {}
    queue.push(torch.randn(3, 5) * 7)
    assert torch.allclose(queue.keys[:3].norm(dim=1), torch.ones(3))
    assert queue.key_index[:3].tolist() == [-1, -1, -1]  # no Batch.index: never masked


def test_momentum_update_and_enqueued_keys_are_the_teachers_last_view():
    student = nn.Linear(3, 2)
    queue = QueueTeacher(student=student, size=8, momentum=0.9, final_momentum=0.9)
    before = [p.clone() for p in queue.target.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    x = torch.randn(4, 3)
    k1, k2 = queue(x), queue(x + 1)
    views = sdk.Views(embeddings=(student(x), student(x + 1)), extras={"teacher": (k1, k2)})
    queue.update(student=student, views=views, batch=sdk.Batch(index=torch.arange(4)), step=0,
                 max_steps=10)
    for t, old, s in zip(queue.target.parameters(), before, student.parameters()):
        assert torch.allclose(t, 0.9 * old + 0.1 * s)  # theta_k <- m theta_k + (1 - m) theta_q
        assert not t.requires_grad
    assert torch.allclose(queue.keys[:4], F.normalize(k2, dim=1))
    assert queue.key_index[:4].tolist() == [0, 1, 2, 3]


def test_observe_enqueues_without_momentum_and_update_without_views_only_moves_the_target():
    """With gradient accumulation the engine observes every micro-batch, then updates once."""
    student = nn.Linear(3, 2)
    queue = QueueTeacher(student=student, size=8, momentum=0.9, final_momentum=0.9)
    before = [p.clone() for p in queue.target.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    a, b = torch.randn(2, 4, 2).unbind(0)
    queue.observe(views=sdk.Views(embeddings=(a,)), batch=sdk.Batch(index=torch.arange(4)))
    queue.observe(views=sdk.Views(embeddings=(b,)), batch=sdk.Batch(index=torch.arange(4, 8)))
    assert all(torch.equal(t, old) for t, old in zip(queue.target.parameters(), before))
    assert torch.allclose(queue.keys, F.normalize(torch.cat([a, b]), dim=1))
    assert queue.key_index.tolist() == list(range(8)) and int(queue.filled) == 8
    keys = queue.keys.clone()
    queue.update(student=student, step=0, max_steps=10)
    assert torch.equal(queue.keys, keys) and int(queue.ptr) == 0  # nothing enqueued
    for t, old, s in zip(queue.target.parameters(), before, student.parameters()):
        assert torch.allclose(t, 0.9 * old + 0.1 * s)


def test_keys_are_detached():
    z = torch.randn(4, 6, requires_grad=True)
    queue = QueueTeacher(size=8)
    queue.push(z * 2, torch.arange(4))
    assert not queue.keys.requires_grad and queue.keys.grad_fn is None
    # negatives handed in with a graph still get no gradient through the objective
    memory = torch.randn(5, 6, requires_grad=True)
    z1, z2 = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    NTXent()(sdk.Views(embeddings=(z1, z2), extras={"negatives": memory})).value.backward()
    assert memory.grad is None and z1.grad is not None


def test_state_dict_round_trip_restores_exactly():
    g = torch.Generator().manual_seed(0)
    student = nn.Linear(3, 5)
    queue = QueueTeacher(student=student, size=6, momentum=0.5, final_momentum=0.5)
    for step in range(3):
        with torch.no_grad():
            student.weight.add_(torch.randn(5, 3, generator=g))
        queue.update(student=student, views=sdk.Views(embeddings=(torch.randn(4, 5, generator=g),)),
                     batch=sdk.Batch(index=torch.arange(4) + 4 * step), step=step)
    state = copy.deepcopy(queue.state_dict())
    fresh = QueueTeacher(student=nn.Linear(3, 5), size=6, momentum=0.5, final_momentum=0.5)
    assert fresh.keys.shape == (6, 0)  # lazily sized: the load gives it the stored shape
    fresh.load_state_dict(state)
    for key, value in queue.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    # and both continue identically
    z, idx = torch.randn(3, 5, generator=g), torch.tensor([40, 41, 42])
    queue.update(student=student, views=sdk.Views(embeddings=(z,)), batch=sdk.Batch(index=idx))
    fresh.update(student=student, views=sdk.Views(embeddings=(z,)), batch=sdk.Batch(index=idx))
    for key, value in queue.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


@pytest.mark.parametrize("with_sampler", [False, True])
def test_nt_xent_with_queue_equals_info_nce_with_queue_in_denominator(with_sampler,
                                                                        slow_info_nce_with_memory):
    g = torch.Generator().manual_seed(3)
    queue = QueueTeacher(size=9)
    queue.push(torch.randn(5, 4, generator=g), torch.tensor([10, 2, 11, 12, 0]))  # 2 and 0 recur
    z1, z2 = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    index = torch.tensor([0, 1, 2, 3, 4, 5])
    views = sdk.Views(embeddings=(z1, z2), extras=queue.memory())
    sampler = sdk.create("sampler", "same_index") if with_sampler else None
    got = NTXent(temperature=0.3, sampler=sampler)(views, sdk.Batch(index=index)).value
    m = queue.memory()
    expected = slow_info_nce_with_memory(
        [z1, z2], index, m["negatives"], m["negatives_index"].tolist(), m["negatives_mask"].tolist(), 0.3)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    without = NTXent(temperature=0.3)(sdk.Views(embeddings=(z1, z2)), sdk.Batch(index=index)).value
    assert got.item() > without.item()  # the queue's negatives enlarge every denominator


def test_bad_parameters_name_the_field():
    with pytest.raises(sdk.ConfigError, match="size"):
        QueueTeacher(size=0)
    with pytest.raises(sdk.ConfigError, match="momentum"):
        QueueTeacher(momentum=1.5)


def test_engine_checkpoints_the_queue_and_resume_continues_it(tmp_path):
    runs = sdk.testing.check_resume(  # mid-epoch (5 batches per epoch); last checkpoint: 4
        objective=NTXent, teacher=lambda: QueueTeacher(size=24, momentum=0.9, final_momentum=0.9),
        steps=7, kill_at=5, tmp_dir=tmp_path)
    # the killed step's keys were enqueued after its backward, before the kill
    assert int(runs.killed.teacher.ptr) == 40 % 24
    assert int(runs.straight.teacher.ptr) == int(runs.resumed.teacher.ptr) == 56 % 24
