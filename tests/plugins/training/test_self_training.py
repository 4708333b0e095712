"""self_training: its pseudo-label loss against a loop (value, gradient), rounds of pseudo-labels
keyed by the unlabelled index (refreshed only at round ends), exact kill-and-resume."""

import pytest
import torch
from torch.utils.data import DataLoader

import sdk
from sdk import keys
from sdk.errors import RequirementError
from sdk.events import State
from sdk.testing import check_resume


def test_pseudo_label_loss_matches_a_loop():
    from plugins.training.self_training import pseudo_label_loss

    g = torch.Generator().manual_seed(0)
    z = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([2, -1, 0, 3, -1, 1, 1])
    value = pseudo_label_loss(z, labels)
    want = sum(torch.logsumexp(z[i], 0) - z[i, labels[i]] for i in range(7) if labels[i] >= 0) / 7
    assert value.item() == pytest.approx(want.item(), rel=1e-12)
    assert torch.allclose(torch.autograd.grad(value, z)[0], torch.autograd.grad(want, z)[0])


class _Trainer:
    unlabeled_loader = DataLoader(list(range(10)))
    device = torch.device("cpu")


def state_with(z, index, step=0):
    state = State(trainer=_Trainer(), model=None)
    state.views = sdk.Views(logits=torch.zeros(2, 3), extras={keys.UNLABELED: (z,),
                                                               keys.UNLABELED_INDEX: index})
    state.loss = sdk.Loss(value=torch.tensor(1.0))
    state.step = step
    return state


def test_rounds_of_pseudo_labels_keyed_by_index():
    cb = sdk.create("callback", "self_training", threshold=0.9, refresh_every=2, weight=2.0)
    cb.on_fit_start(state_with(None, None))
    z = torch.tensor([[5.0, 0, 0], [0, 0, 5.0], [0.1, 0, 0]])  # two confident rows, one not
    index = torch.tensor([7, 2, 4])
    first = state_with(z, index)
    cb.after_loss(first)
    assert first.loss.value.item() == 1.0  # no pseudo-labels in the first round
    assert cb.pending.tolist() == [-1, -1, 2, -1, -1, -1, -1, 0, -1, -1]
    assert (cb.labels == -1).all()
    cb.after_optimizer_step(state_with(z, index, step=1))
    assert (cb.labels == -1).all()  # mid-round
    cb.after_optimizer_step(state_with(z, index, step=2))
    assert cb.labels.tolist() == cb.pending.tolist()
    second = state_with(z.clone().requires_grad_(), index)
    cb.after_loss(second)
    ce = torch.nn.functional.cross_entropy(z[:2], torch.tensor([0, 2]), reduction="sum") / 3
    assert second.loss.value.item() == pytest.approx(1.0 + 2.0 * ce.item(), rel=1e-6)
    fresh = sdk.create("callback", "self_training")
    fresh.load_state_dict(cb.state_dict())
    assert fresh.labels.tolist() == cb.labels.tolist()


def test_needs_the_unlabelled_loader():
    model = sdk.create("encoder", "mlp", in_dim=6, out_dim=3, hidden_dims=(4,))
    data = torch.utils.data.TensorDataset(torch.randn(8, 6), torch.arange(8) % 3, torch.arange(8))
    trainer = sdk.Trainer(model, sdk.create("objective", "cross_entropy"),
                          callbacks=[sdk.create("callback", "self_training")], max_steps=1,
                          progress=False, device="cpu")
    with pytest.raises(RequirementError, match="self_training.*unlabeled"):
        trainer.fit(DataLoader(data, batch_size=4))


def test_resumes_bit_for_bit(tmp_path):
    runs = check_resume(objective=lambda: sdk.create("objective", "cross_entropy"), tmp_dir=tmp_path,
                        callbacks=lambda: [sdk.create("callback", "self_training", threshold=0.3,
                                                      refresh_every=2)], mu=7)
    assert (runs.resumed.callbacks[0].labels >= 0).any()


def test_a_round_keeps_its_pseudo_labels_and_the_threshold_is_inclusive():
    cb = sdk.create("callback", "self_training", threshold=0.5, refresh_every=1)
    cb.on_fit_start(state_with(None, None))
    index = torch.tensor([0, 1])
    z = torch.tensor([[0.0, 0.0], [0.0, 3.0]])  # confidence exactly 0.5, then a confident 1
    cb.after_loss(state_with(z, index))
    assert cb.pending[:2].tolist() == [0, 1]
    cb.after_optimizer_step(state_with(z, index, step=1))
    flipped = torch.tensor([[3.0, 0.0], [3.0, 0.0]])  # new predictions: pending only
    for _ in range(2):
        state = state_with(flipped, index)
        cb.after_loss(state)
    want = torch.nn.functional.cross_entropy(flipped, torch.tensor([0, 1]))
    assert state.loss.value.item() == pytest.approx(1.0 + want.item(), rel=1e-6)
