"""CTVIS's momentum memory and contrastive items against the authors' per-instance tracklet
loop (value and gradient), the memory's fusion weights, and its limits."""

import pytest
import torch

import sdk
from plugins.ssl.ctvis_momentum_memory import CtvisMomentumMemory, similarity_guided_memory


def _cos(a, b):
    return (a * b).sum() / torch.sqrt((a * a).sum() * (b * b).sum())


def slow_memory(frames):
    """The authors' TrainTracklet.update for one instance per row: the first sighting sets the
    memory, later ones fuse with beta = max(0, sum of cosines to the history / frames so far)."""
    t_count, b = len(frames), frames[0].shape[0]
    out = [[None] * b for _ in range(t_count)]
    for i in range(b):
        mem = None
        for t in range(t_count):
            e = frames[t][i]
            if t == 0:
                mem = e
            else:
                sim = sum(_cos(frames[s][i], e) for s in range(t)) / t
                beta = torch.clamp(sim, min=0)
                mem = (1 - beta) * mem + beta * e
            out[t][i] = mem
    return out


def slow_loss(frames, positive="memory", reid_weight=2.0, aux_weight=3.0):
    """IDOL's loss_reid over the contrastive items (frames 1..T-1, every instance)."""
    mem = slow_memory(frames)
    b = frames[0].shape[0]
    reid, aux, items = 0, 0, 0
    for t in range(1, len(frames)):
        for i in range(b):
            v = frames[t][i]
            kp = mem[t - 1][i] if positive == "memory" else frames[t - 1][i]
            negs = [frames[t - 1][j] for j in range(b) if j != i]
            terms = [torch.zeros((), dtype=v.dtype)] + [(v * kn).sum() - (v * kp).sum() for kn in negs]
            reid = reid + torch.logsumexp(torch.stack(terms), 0)
            sq = [(_cos(v, kp) - 1) ** 2] + [_cos(v, kn) ** 2 for kn in negs]
            aux = aux + sum(sq) / len(sq)
            items += 1
    return reid_weight * reid / items + aux_weight * aux / items


def _frames(t=4, b=5, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(b, d, generator=g, dtype=torch.float64)
    return [(base + 0.7 * torch.randn(b, d, generator=g, dtype=torch.float64)).requires_grad_()
            for _ in range(t)]


def test_memory_matches_the_authors_tracklet_update():
    frames = _frames()
    memory, beta = similarity_guided_memory(frames)
    want = slow_memory(frames)
    for t in range(4):
        torch.testing.assert_close(memory[t], torch.stack(want[t]))
    assert torch.all(beta[0] == 1) and torch.all((beta >= 0) & (beta <= 1))


def test_a_frame_disagreeing_with_the_history_leaves_the_memory_unchanged():
    e0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    memory, beta = similarity_guided_memory([e0, -e0, 2 * e0])
    assert beta[1].tolist() == [0.0, 0.0]  # cos = -1: beta clipped at 0
    torch.testing.assert_close(memory[1], e0)
    assert beta[2].tolist() == [0.0, 0.0]  # mean of cos(e0, 2e0) = 1 and cos(-e0, 2e0) = -1
    torch.testing.assert_close(memory[2], e0)


@pytest.mark.parametrize("prob,positive", [(1.0, "memory"), (0.0, "last")])
def test_loss_and_gradient_match_the_authors_items(prob, positive):
    frames = _frames()
    loss = CtvisMomentumMemory(memory_prob=prob)(sdk.Views(embeddings=tuple(frames)))
    want = slow_loss(frames, positive)
    assert loss.value.item() == pytest.approx(want.item(), rel=1e-10)
    got, ref = torch.autograd.grad(loss.value, frames), torch.autograd.grad(want, frames)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-12)


def test_the_default_is_the_expectation_of_the_authors_coin_flip():
    frames = _frames(seed=2)
    obj = sdk.create("objective", "ctvis_momentum_memory")
    assert (obj.memory_prob, obj.reid_weight, obj.aux_weight) == (0.5, 2.0, 3.0)
    got = obj(sdk.Views(embeddings=tuple(frames))).value
    want = 0.5 * slow_loss(frames, "memory") + 0.5 * slow_loss(frames, "last")
    assert got.item() == pytest.approx(want.item(), rel=1e-10)


def test_the_memory_positive_differs_from_one_reference_frame():
    frames = _frames(seed=3)
    a = CtvisMomentumMemory(memory_prob=1.0)(sdk.Views(embeddings=tuple(frames))).value
    b = CtvisMomentumMemory(memory_prob=0.0)(sdk.Views(embeddings=tuple(frames))).value
    assert abs(a.item() - b.item()) > 1e-3
    # two frames: the memory after frame 0 is frame 0 itself, so both coincide
    two = frames[:2]
    a2 = CtvisMomentumMemory(memory_prob=1.0)(sdk.Views(embeddings=tuple(two))).value
    b2 = CtvisMomentumMemory(memory_prob=0.0)(sdk.Views(embeddings=tuple(two))).value
    assert a2.item() == pytest.approx(b2.item(), rel=1e-12)


def test_bad_inputs_are_named():
    frames = _frames()
    with pytest.raises(sdk.RequirementError, match="ctvis_momentum_memory.*2 views"):
        CtvisMomentumMemory()(sdk.Views(embeddings=(frames[0],)))
    with pytest.raises(sdk.ConfigError, match="memory_prob"):
        sdk.create("objective", "ctvis_momentum_memory", memory_prob=1.5)


def test_trains_and_resumes_exactly(tmp_path):
    from sdk.testing import check_resume

    runs = check_resume(objective=CtvisMomentumMemory, tmp_dir=tmp_path)
    assert runs.straight.loss.logs["reid"] > 0
