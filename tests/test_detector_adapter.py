"""The Detector and Adapter interfaces and their conformance checks, exercised by test-local
plugins (a class-conditional Mahalanobis detector fitted from sufficient statistics, a
maximum-softmax detector, an entropy-minimisation adapter) and broken variants of them."""

import pytest
import torch
from torch import nn

import sdk
from sdk.interfaces import Adapter, Detector
from sdk.registry import Registry
from sdk.state import ResizableBuffers
from sdk.testing import check_plugin


class MinMahalanobis(ResizableBuffers, Detector):
    """``min_c (x - mu_c)^T S^-1 (x - mu_c)`` with a shared covariance, fitted from sufficient
    statistics (per-class counts and sums, the total scatter ``sum x x^T``), so data of any size
    streams through ``update`` in memory ``C x D + D x D``."""

    needs_labels = True
    resizable_buffers = ("sums", "scatter", "means", "precision")

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("counts", torch.zeros(num_classes, dtype=torch.float64))
        for name in self.resizable_buffers:
            self.register_buffer(name, torch.zeros(0, dtype=torch.float64))

    def accumulate(self, x, labels):
        sdk.types.check_ids(f"detector {self.name!r}", "labels", labels, self.num_classes)
        x = x.double()
        if self.sums.numel() == 0:
            self.sums = x.new_zeros(self.num_classes, x.shape[1])
            self.scatter = x.new_zeros(x.shape[1], x.shape[1])
        self.counts += torch.bincount(labels, minlength=self.num_classes).double()
        self.sums.index_add_(0, labels, x)
        self.scatter += x.T @ x

    def summarize(self):
        self.means = self.sums / self.counts.clamp_min(1)[:, None]
        within = self.scatter - (self.counts[:, None] * self.means).T @ self.means
        cov = within / self.counts.sum() + 1e-6 * torch.eye(within.shape[0], dtype=within.dtype)
        self.precision = torch.linalg.inv(cov)

    def forward(self, x):
        d = x.double()[:, None, :] - self.means[None]
        return torch.einsum("ncd,de,nce->nc", d, self.precision, d).min(1).values.float()


class MaxSoftmax(Detector):
    """``-max_c softmax(z)_c`` (no fit)."""

    inputs = "logits"

    def forward(self, x):
        return -x.float().softmax(-1).max(-1).values


class EntropyStep(Adapter):
    """One SGD step on the mean prediction entropy of the batch, over all of the model's
    parameters, then the adapted model's logits."""

    def __init__(self, lr: float = 0.1):
        super().__init__()
        self.lr = lr

    def step_size(self):
        return self.lr

    def forward(self, model, x, batch):
        with torch.enable_grad():
            p = model(x).softmax(-1)
            entropy = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
            grads = torch.autograd.grad(entropy, list(model.parameters()))
        with torch.no_grad():
            for param, g in zip(model.parameters(), grads):
                param -= self.step_size() * g
            return model(x)


def registry(**plugins):
    reg = Registry()
    for name, (kind, factory) in plugins.items():
        reg.add(factory, card=sdk.Card(name=name, kind=kind, title="t", summary="s"))
    return reg


def data(n=300, d=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = 3 * torch.randn(classes, d, generator=g)
    labels = torch.arange(n) % classes
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    return means[labels] + torch.randn(n, d, generator=g) @ mix, labels


# detector -----------------------------------------------------------------------------------
def test_mahalanobis_from_streamed_statistics_matches_the_direct_formula():
    x, y = data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    det = MinMahalanobis(num_classes=3).fit(loader)  # (x, labels) batches, streamed
    means = torch.stack([x[y == c].double().mean(0) for c in range(3)])
    centred = x.double() - means[y]
    precision = torch.linalg.inv(centred.T @ centred / len(x) + 1e-6 * torch.eye(6, dtype=torch.float64))
    q = torch.randn(7, 6)
    slow = torch.tensor([min(float((r.double() - m) @ precision @ (r.double() - m)) for m in means)
                         for r in q], dtype=torch.float64)
    assert torch.allclose(det.score(q).double(), slow, rtol=1e-5)
    assert int(det.num_seen) == 300 and int(det.in_dim) == 6


def test_score_before_fit_and_wrong_inputs_raise_naming_the_detector():
    det = MinMahalanobis(num_classes=3)
    with pytest.raises(sdk.NotFittedError, match=r"detector 'min_mahalanobis': score\(\) before fit"):
        det.score(torch.randn(4, 6))
    with pytest.raises(sdk.NotFittedError, match=r"finalize\(\) before any update"):
        det.finalize()
    with pytest.raises(sdk.RequirementError, match="'min_mahalanobis' needs labels"):
        det.update(torch.randn(4, 6))
    with pytest.raises(sdk.ShapeError, match=r"labels must be integer class ids \[4\]"):
        det.update(torch.randn(4, 6), torch.zeros(3, dtype=torch.long))
    x, y = data()
    det.fit(x, y)
    with pytest.raises(sdk.ShapeError, match="width 7, but it was fitted on width 6"):
        det.score(torch.randn(2, 7))
    with pytest.raises(sdk.ShapeError, match=r"expects floating features \[N, D\]"):
        det.score(torch.randn(6))
    with pytest.raises(TypeError, match="'min_mahalanobis' takes features .* is sdk.Logits"):
        det.score(sdk.Logits(torch.randn(2, 6)))
    with pytest.raises(RuntimeError, match="fit\\(\\) on a detector that has seen data"):
        det.fit(x, y)


def test_update_after_finalize_adds_data_and_needs_finalize_again():
    x, y = data()
    det = MinMahalanobis(num_classes=3).fit(x[:150], y[:150])
    det.update(x[150:], y[150:])
    with pytest.raises(sdk.NotFittedError):
        det.score(x[:2])
    assert torch.allclose(det.finalize().score(x[:20]), MinMahalanobis(num_classes=3).fit(x, y).score(x[:20]))


def test_a_detector_without_statistics_scores_unfitted_and_checks_its_input_kind():
    assert MaxSoftmax.needs_fit is False and MinMahalanobis.needs_fit is True
    z = torch.tensor([[5.0, 0.0, 0.0], [0.1, 0.0, 0.0]])
    assert torch.allclose(MaxSoftmax().score(sdk.Logits(z)), -z.softmax(-1).max(-1).values)
    with pytest.raises(TypeError, match="'max_softmax' takes logits .* is sdk.Probabilities"):
        MaxSoftmax().score(sdk.Probabilities(z.softmax(-1)))


def test_the_kit_passes_the_test_detectors():
    reg = registry(min_mahalanobis=("detector", MinMahalanobis), max_softmax=("detector", MaxSoftmax))
    check_plugin("detector", "min_mahalanobis", registry=reg)
    check_plugin("detector", "max_softmax", registry=reg)


class Reversed(MinMahalanobis):
    def forward(self, x):
        return -super().forward(x)


class LastBatchOnly(MinMahalanobis):
    def accumulate(self, x, labels):
        self.counts.zero_()
        self.sums = self.scatter = torch.zeros(0, dtype=torch.float64)
        super().accumulate(x, labels)


class Unchecked(MinMahalanobis):
    def __call__(self, x):  # keeps the fit check, skips the shape checks (truncates columns)
        if not bool(self.is_fitted):
            raise sdk.NotFittedError("unfitted")
        x = x if x.dim() == 2 else x[None]
        return self.forward(x[:, : self.means.shape[1]])


@pytest.mark.parametrize(("factory", "message"), [
    (Reversed, r"direction: out-of-distribution rows score .* higher must mean more anomalous"),
    (LastBatchOnly, "streaming: fitted batch by batch it scores differently"),
    (Unchecked, "errors: scored one column too many"),
])
def test_the_kit_catches_broken_detectors(factory, message):
    reg = registry(broken=("detector", factory))
    with pytest.raises(AssertionError, match=r"\[detector broken\] " + message):
        check_plugin("detector", "broken", registry=reg)


# adapter ------------------------------------------------------------------------------------
def model_and_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    return model, torch.randn(16, 4)


def test_adapt_changes_the_model_and_reset_restores_weights_modes_and_flags():
    model, x = model_and_batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = EntropyStep(lr=0.5)
    out = adapter.adapt(model, x)
    assert not torch.equal(model[0].weight, before["0.weight"])
    assert torch.allclose(out, model(x))  # the outputs are the adapted model's
    model.train()
    model[3].weight.requires_grad_(False)
    adapter.reset()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training and model[3].weight.requires_grad


def test_adapting_another_model_without_reset_and_bad_batches_raise():
    model, x = model_and_batch()
    adapter = EntropyStep()
    adapter.adapt(model, x)
    with pytest.raises(RuntimeError, match="'entropy_step' is adapting another model"):
        adapter.adapt(model_and_batch()[0], x)
    adapter.reset()
    adapter.adapt(model_and_batch()[0], x)  # fine after a reset
    with pytest.raises(sdk.ShapeError, match="Batch size 3 does not match x's 16"):
        adapter.adapt(model, x, sdk.Batch(index=torch.arange(3)))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        EntropyStep().adapt(lambda t: t, x)


class Forgetful(EntropyStep):
    """Grows its step size with every batch, in a plain attribute reset() knows nothing about."""

    def __init__(self, lr: float = 0.1):
        super().__init__(lr)
        self.calls = 0

    def step_size(self):
        self.calls += 1
        return self.lr * self.calls


def test_the_kit_passes_the_test_adapter_and_catches_state_that_reset_misses():
    reg = registry(entropy_step=("adapter", EntropyStep), forgetful=("adapter", Forgetful))
    check_plugin("adapter", "entropy_step", registry=reg)
    with pytest.raises(AssertionError, match=r"\[adapter forgetful\] reset: after reset\(\) adapting "
                                             "the same batch gives different outputs"):
        check_plugin("adapter", "forgetful", registry=reg)
