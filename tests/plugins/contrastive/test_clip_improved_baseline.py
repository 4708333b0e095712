"""clip_improved_baseline against CLIP's symmetric InfoNCE and its label-smoothed form written
out as loops in float64 (value and the gradients of both views and of the learned temperature),
the paper's defaults (temperature 0.07, scale clipped at 100, smoothing 0.1), the pair of views
it contrasts, and its errors."""

import math

import pytest
import torch

import sdk


def slow_clip(za, zb, log_scale, eps):
    """1/(2B) sum_i sum_j q_ij [-log softmax_j(s cos(a_i, b_j)) - log softmax_j(s cos(b_i, a_j))],
    q_ij = (1 - eps) [i == j] + eps / B, one row and one entry at a time."""
    b = za.shape[0]
    s = log_scale.exp()
    a = [za[i] / za[i].norm() for i in range(b)]
    t = [zb[i] / zb[i].norm() for i in range(b)]
    total = 0.0
    for left, right in ((a, t), (t, a)):
        for i in range(b):
            logits = [s * (left[i] @ right[j]) for j in range(b)]
            log_den = torch.logsumexp(torch.stack(logits), dim=0)
            for j in range(b):
                q = (1 - eps) * (i == j) + eps / b
                total = total - q * (logits[j] - log_den)
    return total / (2 * b)


def _inputs(seed, b=6, d=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.35])
def test_value_and_gradients_equal_the_loop(eps):
    za, zb, _ = _inputs(int(eps * 100))
    obj = sdk.create("objective", "clip_improved_baseline", temperature=0.2, label_smoothing=eps)
    obj.double()
    got = obj(sdk.Views(embeddings=(za, zb))).value
    ref_scale = obj.log_scale.detach().clone().requires_grad_()
    want = slow_clip(za, zb, ref_scale, eps)
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-6)
    g_got = torch.autograd.grad(got, (za, zb, obj.log_scale))
    g_want = torch.autograd.grad(want, (za, zb, ref_scale))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-6)
    assert g_got[2].abs() > 1e-4  # the temperature learns


def test_label_smoothing_adds_eps_times_the_uniform_cross_entropy():
    """CE_eps = (1 - eps) CE + eps * mean_j(-log p_j): linear in eps, per the smoothed target."""
    za, zb, _ = _inputs(7)
    losses = [sdk.create("objective", "clip_improved_baseline", label_smoothing=e)(
        sdk.Views(embeddings=(za, zb))).value.double() for e in (0.0, 0.1, 0.2)]
    torch.testing.assert_close(losses[1] - losses[0], losses[2] - losses[1], rtol=1e-4, atol=1e-7)
    assert not torch.allclose(losses[0], losses[1])


def test_paper_defaults_and_the_clamp():
    obj = sdk.create("objective", "clip_improved_baseline")
    assert obj.label_smoothing == 0.1 and obj.max_scale == 100.0 and obj.pair == (0, 1)
    assert isinstance(obj.log_scale, torch.nn.Parameter)
    assert float(obj.log_scale.detach().exp()) == pytest.approx(1 / 0.07)
    with torch.no_grad():
        obj.log_scale.fill_(7.0)
    obj.after_optimizer_step(None)
    assert float(obj.log_scale) == pytest.approx(math.log(100))
    with torch.no_grad():
        obj.log_scale.fill_(-1.0)
    obj.after_optimizer_step(None)
    assert float(obj.log_scale) == 0.0
    fixed = sdk.create("objective", "clip_improved_baseline", learn_temperature=False, temperature=0.5)
    assert not isinstance(fixed.log_scale, torch.nn.Parameter) and list(fixed.parameters()) == []
    assert "log_scale" in fixed.state_dict()


def test_trainer_learns_the_temperature_and_keeps_it_clipped(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g)
    obj = sdk.create("objective", "clip_improved_baseline", temperature=0.0102,
                     label_smoothing=0.0)  # scale 98
    trainer = sdk.Trainer(torch.nn.Linear(5, 4), obj, lambda ps: torch.optim.Adam(ps, lr=0.1),
                          transforms=[sdk.data.augmentation(noise=0.01)] * 2, max_steps=3,
                          run_dir=tmp_path, progress=False, device="cpu")
    trainer.fit(torch.utils.data.DataLoader(x, batch_size=32))
    # near-identical views: the loss falls as the scale grows, which the clamp stops at 100
    assert float(obj.log_scale.detach()) == pytest.approx(math.log(100), abs=1e-6)


def test_pair_selects_the_views():
    za, zb, zc = _inputs(3)
    obj = sdk.create("objective", "clip_improved_baseline", pair=(2, 0), label_smoothing=0.0)
    got = obj(sdk.Views(embeddings=(za, zb, zc))).value
    torch.testing.assert_close(got.double(), slow_clip(zc, za, obj.log_scale.detach(), 0.0),
                               rtol=1e-5, atol=1e-6)


def test_errors_name_the_plugin_and_field():
    with pytest.raises(sdk.ConfigError, match="clip_improved_baseline.*max_scale"):
        sdk.create("objective", "clip_improved_baseline", temperature=0.005)
    with pytest.raises(sdk.ConfigError, match="clip_improved_baseline.*pair"):
        sdk.create("objective", "clip_improved_baseline", pair=(1, 1))
    with pytest.raises(sdk.ConfigError, match="label_smoothing"):
        sdk.create("objective", "clip_improved_baseline", label_smoothing=1.0)
    obj = sdk.create("objective", "clip_improved_baseline", pair=(0, 2))
    with pytest.raises(sdk.RequirementError, match="clip_improved_baseline.*views"):
        obj(sdk.Views(embeddings=(torch.randn(4, 3), torch.randn(4, 3))))
