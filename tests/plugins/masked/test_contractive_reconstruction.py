"""contractive_reconstruction: the Jacobian norm against a per-sample autograd Jacobian (value and
gradient), Hutchinson's estimate, the analytic minimiser of the linear case and its score, the
denoising criterion's equivalence, and the penalty's effect through the Trainer on digits."""

import functools

import pytest
import torch

import sdk
from plugins.masked.contractive_reconstruction import contractive_loss, jacobian_frobenius
from sdk import keys


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _net(d_in=5, d_out=5, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d_in, 7), torch.nn.Tanh(),
                               torch.nn.Linear(7, d_out)).double()


def test_jacobian_norm_equals_the_per_sample_jacobian_value_and_gradient():
    net = _net()
    x = torch.randn(4, 5, generator=_g(), dtype=torch.float64).requires_grad_()
    got = jacobian_frobenius(net(x), x)
    slow = torch.stack([torch.autograd.functional.jacobian(net, x[i].detach(), create_graph=True)
                        .pow(2).sum() for i in range(4)])
    torch.testing.assert_close(got.double(), slow, rtol=1e-5, atol=1e-8)
    w = net[0].weight
    g, = torch.autograd.grad(got.sum(), w)
    g_slow, = torch.autograd.grad(slow.sum(), w)
    torch.testing.assert_close(g.double(), g_slow, rtol=1e-5, atol=1e-8)
    # the whole loss: squared error summed over values plus sigma^2 times the norm
    per_sample, rec, jac = contractive_loss(net(x), x, 0.3)
    torch.testing.assert_close(rec.double(), (net(x) - x).pow(2).sum(1), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(per_sample.double(), rec.double() + 0.09 * slow, rtol=1e-5, atol=1e-8)


def test_hutchinson_estimate_is_unbiased_within_its_standard_error():
    """One Gaussian probe has mean ||J||_F^2 and variance 2 tr((J J^T)^2)."""
    net = _net(seed=1)
    x = torch.randn(3, 5, generator=_g(1), dtype=torch.float64).requires_grad_()
    exact = jacobian_frobenius(net(x), x)
    jac = torch.stack([torch.autograd.functional.jacobian(net, x[i].detach()) for i in range(3)])
    jjt = jac @ jac.transpose(1, 2)
    stderr = (2 * (jjt @ jjt).diagonal(dim1=1, dim2=2).sum(1) / 2000).sqrt()
    torch.manual_seed(0)
    est = jacobian_frobenius(net(x), x, probes=2000)
    assert ((est - exact).abs() < 4 * stderr).all(), (est, exact, stderr)
    assert (stderr / exact).max() < 0.05
    one = jacobian_frobenius(net(x), x, probes=1)
    assert not torch.allclose(one, exact, rtol=0.02)  # one probe is an estimate, not the value


def _linear_objective(d, sigma, **kw):
    obj = sdk.create("objective", "contractive_reconstruction", in_dim=d, embed_dim=d,
                     sigma=sigma, **kw).double()
    return obj


def _gaussian(n=400, d=4, seed=0):
    g = _g(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ a + torch.arange(d).double()


def _loss(obj, x):
    leaf, batch = obj.inputs(x, sdk.Batch(index=torch.arange(len(x))))
    return obj(sdk.Views(embeddings=(leaf,)), batch)  # identity encoder: r(x) = W x + b


def test_linear_minimiser_is_the_analytic_one_and_its_score_is_the_gaussians():
    """r(x) = A x + b on data of mean m and covariance C: the criterion is minimised by
    A* = C (C + sigma^2 I)^-1, b* = (I - A*) m, so (r(x) - x) / sigma^2 = -(C + sigma^2 I)^-1 (x - m)."""
    x = _gaussian()
    sigma, d = 0.5, 4
    m = x.mean(0)
    c = (x - m).T @ (x - m) / len(x)
    a_star = c @ torch.linalg.inv(c + sigma ** 2 * torch.eye(d, dtype=torch.float64))
    obj = _linear_objective(d, sigma)
    dec = obj.decoder[0]
    with torch.no_grad():
        dec.weight.copy_(a_star)
        dec.bias.copy_((torch.eye(d, dtype=torch.float64) - a_star) @ m)
    loss = _loss(obj, x)
    gw, gb = torch.autograd.grad(loss.value, [dec.weight, dec.bias])
    assert gw.abs().max() < 1e-9 and gb.abs().max() < 1e-9
    torch.testing.assert_close(loss.logs["jacobian"], (a_star ** 2).sum())
    score = obj.score(obj.reconstruct(x), x)
    torch.testing.assert_close(score, -(x - m) @ torch.linalg.inv(c + sigma ** 2 * torch.eye(d)).T.double())
    # away from it the gradient is not zero, and the loss is larger
    with torch.no_grad():
        dec.weight.add_(0.01)
    moved = _loss(obj, x)
    assert moved.value > loss.value
    assert torch.autograd.grad(moved.value, dec.weight)[0].abs().max() > 1e-4


def test_denoising_criterion_averages_to_the_contractive_one_for_a_linear_reconstruction():
    """For r linear, E_eps ||r(x + eps) - x||^2 = ||r(x) - x||^2 + sigma^2 ||A||_F^2 exactly."""
    x = _gaussian(n=50)
    cae = _linear_objective(4, 0.3)
    dae = _linear_objective(4, 0.3, denoising=True)
    dae.decoder.load_state_dict(cae.decoder.state_dict())
    target = _loss(cae, x).value.detach()
    torch.manual_seed(0)
    mean = torch.stack([_loss(dae, x).value.detach() for _ in range(4000)]).mean()
    assert abs(mean / target - 1) < 0.01, (mean, target)
    fed, batch = dae.inputs(x, sdk.Batch())
    assert torch.equal(batch.extras[keys.INPUT], x) and not torch.equal(fed, x)
    assert abs((fed - x).std() - 0.3) < 0.03


def test_the_penalty_contracts_the_reconstruction_of_digits_through_the_trainer():
    x = sdk.data.load("digits").train.tensors[0][:512].float()  # pixels in [0, 1]

    def train(sigma):
        torch.manual_seed(0)
        enc = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh())
        obj = sdk.create("objective", "contractive_reconstruction", embed_dim=32, sigma=sigma,
                         probes=2)  # Hutchinson: an exact 64 x 64 Jacobian per step is slow here
        loader = torch.utils.data.DataLoader(sdk.data.IndexedDataset(x, torch.zeros(len(x)).long()),
                                             batch_size=64, shuffle=True)
        sdk.Trainer(enc, obj, functools.partial(torch.optim.Adam, lr=0.01), transforms=obj.inputs,
                    max_steps=60, progress=False, device="cpu").fit(loader)
        leaf = x[:128].clone().requires_grad_()
        r = obj.reconstruct(enc(leaf))
        return (float(jacobian_frobenius(r, leaf).mean().detach()),
                float((r - x[:128]).pow(2).sum(1).mean().detach()))

    jac_free, rec_free = train(1e-3)
    jac_cae, rec_cae = train(1.0)
    assert jac_cae < 0.5 * jac_free, (jac_cae, jac_free)
    assert rec_free < rec_cae  # the penalty trades reconstruction for contraction


def test_defaults_are_the_catalogues_and_probes_follow_the_width():
    obj = sdk.create("objective", "contractive_reconstruction")
    assert obj.sigma == 0.1 and obj.denoising is False and obj.in_dim == 64
    assert obj.probes is None  # exact for 64 values
    assert sdk.create("objective", "contractive_reconstruction", in_dim=65).probes == 1
    assert sdk.create("objective", "contractive_reconstruction", in_dim=65, probes=4).probes == 4
    assert obj.batch_coupled is False


def test_validation_without_grad_is_the_reconstruction_alone():
    x = _gaussian(n=8)
    obj = _linear_objective(4, 0.5)
    with torch.no_grad():
        loss = _loss(obj, x)
    torch.testing.assert_close(loss.value, (obj.reconstruct(x) - x).pow(2).sum(1).mean())


def test_errors_name_the_plugin_and_the_field():
    obj = sdk.create("objective", "contractive_reconstruction", in_dim=4, embed_dim=3)
    z = torch.randn(5, 3)
    with pytest.raises(sdk.RequirementError, match="'contractive_reconstruction' needs extras\\['input'\\]"):
        obj(sdk.Views(embeddings=(z,)), sdk.Batch(index=torch.arange(5)))
    with pytest.raises(sdk.ShapeError, match="'contractive_reconstruction'.*input.*5 rows of 4 values"):
        obj(sdk.Views(embeddings=(z,)), sdk.Batch(extras={keys.INPUT: torch.randn(5, 6)}))
    with pytest.raises(sdk.ShapeError, match="'contractive_reconstruction'.*embeddings.*\\[B, 3\\]"):
        obj(sdk.Views(embeddings=(torch.randn(5, 2),)), sdk.Batch(extras={keys.INPUT: torch.randn(5, 4)}))
    with pytest.raises(sdk.ConfigError, match="contractive_reconstruction: sigma must be > 0"):
        sdk.create("objective", "contractive_reconstruction", sigma=0.0)
    with pytest.raises(sdk.ConfigError, match="contractive_reconstruction: probes.*denoising"):
        sdk.create("objective", "contractive_reconstruction", denoising=True, probes=2)
    with pytest.raises(sdk.ShapeError, match="'contractive_inputs': x must be floating"):
        obj.inputs(torch.ones(5, 4, dtype=torch.long), sdk.Batch())
