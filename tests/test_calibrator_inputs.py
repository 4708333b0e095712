"""Calibrators declare the scores they take (``inputs``): typed sdk.Logits / sdk.Probabilities
of the other kind raise naming the calibrator, plain tensors keep working, and the recipe's
calibration step feeds each calibrator what it declares."""

import pytest
import torch
import torch.nn.functional as F

import sdk
from sdk.cli_run import calibrate
from sdk.interfaces import Calibrator
from sdk.registry import Registry
from sdk.testing import check_plugin


class PowerScaling(Calibrator):
    """``p^a`` renormalised, ``a`` the NLL-best of a grid: a calibrator of probabilities."""

    inputs = "probabilities"

    def __init__(self):
        super().__init__()
        self.register_buffer("power", torch.ones(()))

    def fit(self, probs, labels, **extra):
        grid = torch.linspace(0.1, 3, 59)
        nll = torch.stack([F.nll_loss(self._scale(probs, a).log(), labels) for a in grid])
        self.power.fill_(float(grid[nll.argmin()]))
        return self

    @staticmethod
    def _scale(probs, a):
        q = probs.clamp_min(1e-12) ** a
        return q / q.sum(-1, keepdim=True)

    def forward(self, probs):
        return self._scale(probs, self.power)


def logits_and_labels(seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (300,), generator=g)
    return 6 * F.one_hot(labels, 4) + 3 * torch.randn(300, 4, generator=g), labels


def test_probabilities_given_to_a_logit_calibrator_raise_naming_it():
    z, y = logits_and_labels()
    cal = sdk.create("calibrator", "temperature_scaling")
    with pytest.raises(TypeError, match=r"calibrator 'temperature_scaling' takes logits \(inputs = "
                                        r"'logits'\), but fit's scores is sdk.Probabilities"):
        cal.fit(sdk.Probabilities(z.softmax(-1)), y)
    cal.fit(sdk.Logits(z), y)
    with pytest.raises(TypeError, match="'temperature_scaling' takes logits.*its input is sdk.Probabilities"):
        cal.predict_proba(sdk.Probabilities(z.softmax(-1)))


def test_typed_and_plain_logits_calibrate_alike():
    z, y = logits_and_labels()
    typed = sdk.create("calibrator", "temperature_scaling").fit(sdk.Logits(z), y)
    plain = sdk.create("calibrator", "temperature_scaling").fit(z, y)
    assert typed.temperature == plain.temperature != 1.0
    out = typed(sdk.Logits(z))
    assert type(out) is torch.Tensor and torch.equal(out, plain(z))


def test_a_calibrator_of_probabilities_rejects_logits_and_returns_probabilities():
    z, y = logits_and_labels()
    cal = PowerScaling()
    with pytest.raises(TypeError, match="'power_scaling' takes probabilities .* is sdk.Logits"):
        cal.fit(sdk.Logits(z), y)
    p = cal.fit(sdk.Probabilities(z.softmax(-1)), y).predict_proba(z.softmax(-1))
    assert float(cal.power) != 1.0
    assert torch.allclose(p, PowerScaling._scale(z.softmax(-1), cal.power))  # no second softmax


def test_typed_scores_are_checked_when_wrapped():
    with pytest.raises(ValueError, match=r"sdk.Probabilities: values must lie in \[0, 1\]"):
        sdk.Probabilities(torch.tensor([[2.0, -1.0]]))
    with pytest.raises(sdk.ShapeError, match="sdk.Logits: expected a floating-point tensor"):
        sdk.Logits(torch.tensor([1, 2]))
    z = torch.randn(3, 2, requires_grad=True)
    sdk.Logits(z).as_subclass(torch.Tensor).sum().backward()  # the graph is kept
    assert torch.equal(z.grad, torch.ones(3, 2))
    assert type(sdk.Logits(z) * 2) is torch.Tensor  # results of operations are plain tensors


@pytest.mark.parametrize("factory", [PowerScaling, lambda: sdk.create("calibrator", "temperature_scaling")])
def test_the_recipe_step_feeds_each_calibrator_what_it_declares(factory):
    z, y = logits_and_labels()
    zt, yt = logits_and_labels(seed=1)
    cal = factory()
    probs = calibrate(cal, z, y, zt)
    expected = cal(zt).softmax(-1) if cal.inputs == "logits" else cal(zt.softmax(-1))
    assert torch.allclose(probs, expected)
    assert F.nll_loss(probs.log(), yt) < F.nll_loss(zt.log_softmax(-1), yt)  # it calibrated


class Unchecked(PowerScaling):
    def __call__(self, scores):  # bypasses the input check
        return self.forward(scores.as_subclass(torch.Tensor))


def test_the_kit_checks_calibrator_inputs():
    reg = Registry()
    for name, factory in (("power_scaling", PowerScaling), ("unchecked", Unchecked)):
        reg.add(factory, card=sdk.Card(name=name, kind="calibrator", title="t", summary="s"))
    check_plugin("calibrator", "power_scaling", registry=reg)
    with pytest.raises(AssertionError, match=r"\[calibrator unchecked\] inputs: accepted sdk.Logits"):
        check_plugin("calibrator", "unchecked", registry=reg)


class DomainMeans(Calibrator):
    """Logits ``-|x - m_c|^2`` from class means of features, fitted on rows of domain 0 only:
    a features calibrator that declares ``fit_requires = {"domains"}``."""

    inputs = "features"
    fit_requires = frozenset({"domains"})

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("means", torch.zeros(num_classes, 2))

    def fit(self, x, labels, *, domains, **extra):
        keep = domains == 0
        self.means = torch.stack([x[keep & (labels == c)].mean(0) for c in range(self.num_classes)])
        return self

    def forward(self, x):
        return -torch.cdist(x, self.means).pow(2)


def test_declared_input_types_check_their_labels_and_extras():
    cal = DomainMeans()
    x, y, d = torch.randn(30, 2), torch.arange(30) % 3, torch.arange(30) % 2
    assert cal.fit(x, y, domains=d)(x).shape == (30, 3)
    assert cal.predict_proba(x).sum(1).allclose(torch.ones(30))
    with pytest.raises(sdk.RequirementError, match="'domain_means': fit needs domains="):
        DomainMeans().fit(x, y)
    with pytest.raises(sdk.ShapeError, match=r"'domain_means': domains must be domain ids .* \[30\]"):
        DomainMeans().fit(x, y, domains=d.float())
    with pytest.raises(sdk.ShapeError, match=r"'domain_means': labels must lie in \[0, 3\)"):
        DomainMeans().fit(x, y + 1, domains=d)
    with pytest.raises(TypeError, match="'domain_means' takes features"):
        cal(sdk.Logits(x))


def test_unknown_input_types_and_extras_fail_at_class_definition():
    with pytest.raises(TypeError, match="inputs: 'ranks' is not one of"):
        type("Ranks", (Calibrator,), {"inputs": "ranks"})
    with pytest.raises(TypeError, match=r"fit_requires: \['groups'\] are not among \['domains'\]"):
        type("Groups", (Calibrator,), {"fit_requires": frozenset({"groups"})})
