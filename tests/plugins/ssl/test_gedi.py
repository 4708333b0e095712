"""gedi: the three terms against explicit loops (value and gradient), their analytic values at
collapse and at a uniform marginal, the invariance of the clustering terms to a per-sample
shift of the logits (which moves the energy alone), one SGLD step by hand, the engine's SGLD
negatives, and the clusters it learns on digits."""

import math

import pytest
import torch

import sdk
from plugins.ssl.gedi import NEGATIVES, energy, gedi_terms, sgld


def slow(logits, negatives, wg, wi, wp):
    n, (b, c) = len(logits), logits[0].shape

    def softmax(row):
        m = max(float(r.detach()) for r in row)
        e = [torch.exp(r - m) for r in row]
        s = sum(e)
        return [x / s for x in e]

    def lse(row):
        m = max(float(r.detach()) for r in row)
        return m + torch.log(sum(torch.exp(r - m) for r in row))

    p = [[softmax(x[i]) for i in range(b)] for x in logits]
    inv, pairs = 0, 0
    for w in range(n):
        for v in range(n):
            if v == w:
                continue
            inv = inv + sum(-sum(p[w][i][k] * torch.log(p[v][i][k]) for k in range(c))
                            for i in range(b)) / b
            pairs += 1
    inv = inv / pairs
    pbar = [sum(p[v][i][k] for v in range(n) for i in range(b)) / (n * b) for k in range(c)]
    prior = sum(q * torch.log(c * q) for q in pbar)
    e_data = sum(-lse(x[i]) for x in logits for i in range(b)) / (n * b)
    e_neg = sum(-lse(negatives[j]) for j in range(negatives.shape[0])) / negatives.shape[0]
    return wg * (e_data - e_neg) + wi * inv + wp * prior


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0), (0.5, 2.0, 0.3)])
def test_value_and_gradient_match_the_loop(weights):
    g = torch.Generator().manual_seed(0)
    logits = tuple(torch.randn(4, 3, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    neg = torch.randn(5, 3, generator=g, dtype=torch.float64).requires_grad_()
    wg, wi, wp = weights
    obj = sdk.create("objective", "gedi", gen_weight=wg, inv_weight=wi, prior_weight=wp)
    got = obj(sdk.Views(embeddings=logits, extras={NEGATIVES: neg})).value
    want = slow(logits, neg, wg, wi, wp)
    assert got.item() == pytest.approx(want.item(), rel=1e-10)
    for a, b in zip(torch.autograd.grad(got, [*logits, neg]), torch.autograd.grad(want, [*logits, neg])):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_analytic_values_at_collapse_and_at_a_uniform_marginal():
    c = 4
    collapsed = [torch.full((6, c), -30.0, dtype=torch.float64) for _ in range(2)]
    for x in collapsed:
        x[:, 0] = 30.0
    gen, inv, prior = gedi_terms(collapsed)
    assert prior.item() == pytest.approx(math.log(c), abs=1e-9)  # every sample in one cluster
    assert inv.item() == pytest.approx(0.0, abs=1e-9) and gen.item() == 0.0
    # confident, consistent and balanced: both clustering terms vanish
    eye = 30.0 * (2 * torch.eye(c, dtype=torch.float64) - 1)
    _, inv, prior = gedi_terms([eye, eye.clone()])
    assert inv.item() == pytest.approx(0.0, abs=1e-9) and prior.item() == pytest.approx(0.0, abs=1e-9)
    # disagreeing views cost log-odds: a swap of the clusters between the views
    _, inv, _ = gedi_terms([eye, eye.flip(0)])
    assert inv.item() > 50


def test_a_per_sample_shift_of_the_logits_moves_the_energy_alone():
    g = torch.Generator().manual_seed(1)
    logits = [torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    neg = torch.randn(4, 3, generator=g, dtype=torch.float64)
    shift = torch.randn(5, 1, generator=g, dtype=torch.float64)
    gen, inv, prior = gedi_terms(logits, neg)
    gen2, inv2, prior2 = gedi_terms([x + shift for x in logits], neg)
    torch.testing.assert_close(inv2, inv)
    torch.testing.assert_close(prior2, prior)
    torch.testing.assert_close(gen2, gen - shift.mean())  # E(x) = -logsumexp: down by the shift
    torch.testing.assert_close(energy(logits[0] + shift), energy(logits[0]) - shift[:, 0])


def test_one_sgld_step_is_the_langevin_update_by_hand():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4).double()
    torch.manual_seed(5)
    got = sgld(model, (6, 3), steps=1, step_size=0.4, noise=0.1, low=-2.0, high=2.0,
               dtype=torch.float64)
    torch.manual_seed(5)
    x0 = torch.empty(6, 3, dtype=torch.float64).uniform_(-2.0, 2.0)
    eps = torch.randn(6, 3, dtype=torch.float64)
    w, b = model.weight.detach(), model.bias.detach()
    grad = -torch.softmax(x0 @ w.T + b, dim=1) @ w  # grad_x of -logsumexp(W x + b)
    torch.testing.assert_close(got, x0 - 0.2 * grad + 0.1 * eps)
    assert model.weight.grad is None  # the sampler leaves the parameters' gradients alone
    # many noiseless steps descend the energy
    x = sgld(model, (64, 3), steps=30, step_size=0.5, noise=0.0, dtype=torch.float64)
    start = torch.empty(64, 3, dtype=torch.float64).uniform_(-1.0, 1.0)
    with torch.no_grad():
        assert energy(model(x)).mean() < energy(model(start)).mean()


def test_defaults_and_bad_input():
    obj = sdk.create("objective", "gedi")
    assert (obj.gen_weight, obj.inv_weight, obj.prior_weight) == (1.0, 1.0, 1.0)
    assert (obj.sgld_steps, obj.sgld_step_size, obj.sgld_noise) == (20, 1.0, 0.01)
    assert (obj.init_low, obj.init_high, obj.num_negatives) == (-1.0, 1.0, None)
    with pytest.raises(sdk.ConfigError, match="gedi: sgld_steps must be >= 1"):
        sdk.create("objective", "gedi", sgld_steps=0)
    with pytest.raises(sdk.ConfigError, match="init_high"):
        sdk.create("objective", "gedi", init_low=1.0, init_high=0.0)
    z = (torch.randn(4, 3), torch.randn(4, 3))
    with pytest.raises(sdk.ShapeError, match=r"gedi.*gedi_negatives.*\[M, 3\]"):
        obj(sdk.Views(embeddings=z, extras={NEGATIVES: torch.randn(5, 2)}))


def _digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 8.0 - 1.0, dtype=torch.float32)  # in [-1, 1], SGLD's start range
    return x, torch.tensor(y)


def test_engine_adds_sgld_negatives_whose_energy_is_pushed_up():
    x, y = _digits()
    torch.manual_seed(0)
    enc = sdk.create("encoder", "mlp", in_dim=64, out_dim=10, hidden_dims=(32,))
    seen = {}

    class Spy(sdk.interfaces.Callback):
        def after_loss(self, state):
            seen["neg"] = state.views.extras[NEGATIVES].detach()
            seen["logs"] = {k: float(v) for k, v in state.loss.logs.items()}

    obj = sdk.create("objective", "gedi", sgld_steps=5, num_negatives=16)
    loader = torch.utils.data.DataLoader(sdk.data.IndexedDataset(x[:256], y[:256]), batch_size=64)
    sdk.Trainer(enc, obj, torch.optim.Adam, transforms=[sdk.data.GaussianNoise(0.1)] * 2,
                callbacks=[Spy()], max_steps=4, progress=False, device="cpu").fit(loader)
    assert seen["neg"].shape == (16, 10)
    assert seen["logs"]["generative"] != 0.0


def _nmi(a, b):
    from sklearn.metrics import normalized_mutual_info_score

    return normalized_mutual_info_score(a.numpy(), b.numpy())


def test_on_digits_the_clusters_match_the_classes_and_all_are_used():
    x, y = _digits()
    torch.manual_seed(0)
    enc = sdk.create("encoder", "mlp", in_dim=64, out_dim=10, hidden_dims=(128,))
    with torch.no_grad():
        before = _nmi(enc(x).argmax(1), y)
    aug = [sdk.data.Compose([sdk.data.GaussianNoise(0.2), sdk.data.RandomMask(0.2)]) for _ in range(2)]
    loader = torch.utils.data.DataLoader(sdk.data.IndexedDataset(x, y), batch_size=256, shuffle=True)
    obj = sdk.create("objective", "gedi", gen_weight=0.1, sgld_steps=5, num_negatives=64)
    sdk.Trainer(enc, obj, torch.optim.Adam, transforms=aug, max_steps=150, progress=False,
                device="cpu").fit(loader)
    with torch.no_grad():
        clusters = enc(x).argmax(1)
    after = _nmi(clusters, y)
    # measured: NMI 0.223 -> 0.572 with all 10 clusters used (k-means on the raw pixels: 0.741)
    assert after > before + 0.2
    assert clusters.unique().numel() >= 8
