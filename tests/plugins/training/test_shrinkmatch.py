"""shrinkmatch against the authors' per-sample loop (iterative class removal), value and
gradient; the shrunk space's edge cases; it equals fixmatch when every sample is confident."""

import math

import pytest
import torch

import sdk
from sdk import keys


def slow_shrink(weak, strong, tau):
    """For each uncertain sample: drop ranks 1..c-1 for c = 2, 3, ... until the top-1 class's
    confidence among the rest reaches tau (or c = C-1); conf * CE there, 0 if tau is never met."""
    u, c = weak.shape
    total = 0.0
    for i in range(u):
        w = [float(v) for v in weak[i].detach()]
        order = sorted(range(c), key=lambda k: -w[k])
        conf = max(math.exp(v) for v in w) / sum(math.exp(v) for v in w)
        if conf >= tau:
            continue
        for cut in range(2, c):
            kept = [order[0]] + order[cut:]
            sub = math.exp(w[order[0]]) / sum(math.exp(w[k]) for k in kept)
            if sub >= tau or cut == c - 1:
                if sub >= tau:
                    s = strong[i, kept]
                    total = total + conf * (torch.log(torch.exp(s).sum()) - s[0])
                break
    return total / u


def fixmatch_part(weak, strong, tau):
    p = weak.softmax(-1)
    conf, q = p.max(-1)
    ce = torch.nn.functional.cross_entropy(strong, q, reduction="none")
    return (ce * (conf >= tau)).mean()


def data(u=40, c=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    weak = torch.randn(u, c, generator=g, dtype=torch.float64) * torch.linspace(0.5, 6, u,
                                                                                 dtype=torch.float64)[:, None]
    strong = torch.randn(u, c, generator=g, dtype=torch.float64)
    logits = torch.randn(3, c, generator=g, dtype=torch.float64)
    return logits, torch.tensor([0, 1, 2]), weak, strong


@pytest.mark.parametrize("tau, lam", [(0.95, 1.0), (0.99, 0.5)])
def test_matches_the_authors_loop_value_and_gradient(tau, lam):
    logits, y, weak, strong = data()
    obj = sdk.create("objective", "shrinkmatch", threshold=tau, shrink_weight=lam)
    s = strong.clone().requires_grad_()
    w = weak.clone().requires_grad_()
    loss = obj(sdk.Views(logits=logits, extras={keys.UNLABELED: (w, s)}), sdk.Batch(targets=y))
    s2 = strong.clone().requires_grad_()
    want = (torch.nn.functional.cross_entropy(logits, y) + fixmatch_part(weak, s2, tau)
            + lam * slow_shrink(weak, s2, tau))
    assert 0 < loss.logs["shrunk_rate"].item() < 1 - loss.logs["mask_rate"].item()  # some never reach tau
    assert loss.value.item() == pytest.approx(want.item(), rel=1e-12)
    got_s, got_w = torch.autograd.grad(loss.value, [s, w], allow_unused=True)
    assert torch.allclose(got_s, torch.autograd.grad(want, s2)[0], rtol=1e-10)
    assert got_w is None or not got_w.any()


def test_two_classes_have_no_shrunk_space_and_confident_batches_are_fixmatch():
    from plugins.training.shrinkmatch import shrunk_space_loss

    weak = torch.tensor([[0.1, 0.0], [2.0, -1.0]], dtype=torch.float64)
    strong = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    value, reached = shrunk_space_loss(weak, strong, 0.95)
    assert not reached.any() and not value.any()
    logits, y, weak, strong = data()
    weak = 20.0 * torch.nn.functional.one_hot(weak.argmax(-1), weak.shape[1]).double()  # all confident
    views = sdk.Views(logits=logits, extras={keys.UNLABELED: (weak, strong)})
    a = sdk.create("objective", "shrinkmatch")(views, sdk.Batch(targets=y)).value
    b = sdk.create("objective", "fixmatch")(views, sdk.Batch(targets=y)).value
    assert a.item() == b.item()


def test_a_threshold_met_exactly_in_the_shrunk_space_counts():
    from plugins.training.shrinkmatch import shrunk_space_loss

    # ranks: 0 (logit log 3), two confusers, one class of logit 0: among {top, last} the top-1
    # confidence is 3 / (3 + 1) = 0.75, up to rounding: tau is set to its computed value
    top = torch.tensor(math.log(3), dtype=torch.float64)
    weak = torch.stack([top, top - 0.01, top - 0.02, torch.zeros((), dtype=torch.float64)])[None]
    tau = float(torch.exp(top - torch.logaddexp(top, torch.zeros((), dtype=torch.float64))))
    assert tau == pytest.approx(0.75)
    strong = torch.zeros(1, 4, dtype=torch.float64)
    _, reached = shrunk_space_loss(weak, strong, tau)
    assert reached.all()
    _, reached = shrunk_space_loss(weak, strong, math.nextafter(tau, 1))
    assert not reached.any()
