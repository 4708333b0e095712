"""DirectPred against a hand eigen-decomposition (numpy, float64), its moving average over
steps and micro-batches, the weights it writes, its loss against BYOL's with the same linear
predictor, and a killed-and-resumed run."""

import types

import numpy as np
import pytest
import torch

import sdk
from plugins.ssl.directpred import DirectPred, directpred_weight
from sdk import keys
from sdk.testing import check_resume


def slow_weight(f, eps):
    s, u = np.linalg.eigh(np.asarray(f, dtype=np.float64))
    s = np.maximum(s, 0)
    p = np.sqrt(s / s.max()) + eps
    return sum(p[j] * np.outer(u[:, j], u[:, j]) for j in range(len(p)))


def test_weight_is_eq_18_of_a_hand_eigendecomposition():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, generator=g, dtype=torch.float64)
    f = a @ a.T
    w = directpred_weight(f, eps=0.1)
    np.testing.assert_allclose(w.numpy(), slow_weight(f.numpy(), 0.1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w, w.T)  # symmetric
    assert torch.linalg.eigvalsh(w).min() >= 0.1 - 1e-10  # PSD, every direction >= eps
    torch.testing.assert_close(w @ f, f @ w)  # shares F's eigenvectors
    s, u = torch.linalg.eigh(f)
    assert (u[:, -1] @ w @ u[:, -1]).item() == pytest.approx(1.1, rel=1e-10)  # top: 1 + eps
    # a negative eigenvalue (a non-PSD estimate) is clamped to 0: that direction gets eps
    bent = (u * torch.cat([-s[:1], s[1:]])) @ u.T
    assert (u[:, 0] @ directpred_weight(bent, 0.1) @ u[:, 0]).item() == pytest.approx(0.1, rel=1e-8)


def _state(views, step):
    return types.SimpleNamespace(views=views, step=step)


def test_moving_average_over_steps_and_micro_batches_and_the_weights_it_sets():
    obj = DirectPred(dim=3, rho=0.3, eps=0.05, freq=2)
    g = torch.Generator().manual_seed(1)
    corr_hat = None
    for step in (1, 2, 3):
        micro = [tuple(torch.randn(4, 3, generator=g) for _ in range(2)) for _ in range(2)]
        before = obj.predictor.weight.detach().clone()
        for views in micro:  # two micro-batches in one step
            obj.after_forward(_state(sdk.Views(embeddings=views), step - 1))
        obj.after_optimizer_step(_state(None, step))
        rows = torch.cat([z for views in micro for z in views]).double()
        f = (rows.T @ rows / rows.shape[0]).numpy()  # E[f f^T] over views and micro-batches
        corr_hat = f if corr_hat is None else 0.3 * corr_hat + 0.7 * f
        np.testing.assert_allclose(obj.corr.numpy(), corr_hat, rtol=1e-12)
        if step in (1, 3):  # every freq=2 steps, the first included
            np.testing.assert_allclose(obj.predictor.weight.detach().numpy(),
                                       slow_weight(corr_hat, 0.05), rtol=1e-5, atol=1e-6)
        else:
            torch.testing.assert_close(obj.predictor.weight.detach(), before)


def test_zero_mean_subtracts_the_moving_average_mean():
    obj = DirectPred(dim=2, zero_mean=True, eps=0.0)
    z = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 1.0], [2.0, -1.0]])
    obj.after_forward(_state(sdk.Views(embeddings=(z, z)), 0))
    obj.after_optimizer_step(_state(None, 1))
    # the centred covariance is diag(0.5, 0.5): W = identity (uncentred it would not be)
    torch.testing.assert_close(obj.predictor.weight.detach(), torch.eye(2))


def test_the_loss_is_byols_with_the_same_linear_predictor():
    torch.manual_seed(0)
    obj = DirectPred(dim=4).double()
    byol = sdk.create("objective", "byol", dim=4, hidden_dim=None).double()
    byol.predictor.load_state_dict(obj.predictor.state_dict())
    g = torch.Generator().manual_seed(2)
    z = tuple(torch.randn(6, 4, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    t = tuple(torch.randn(6, 4, generator=g, dtype=torch.float64) for _ in range(2))
    views = sdk.Views(embeddings=z, extras={keys.TEACHER: t})
    got, want = obj(views), byol(views)
    torch.testing.assert_close(got.per_sample, want.per_sample)
    for a, b in zip(torch.autograd.grad(got.value, z), torch.autograd.grad(want.value, z)):
        torch.testing.assert_close(a, b)
    assert [type(m).__name__ for m in byol.predictor.net] == ["Linear"]
    assert byol.predictor.net[0].bias is None


def test_defaults_are_the_authors_published_command():
    obj = sdk.create("objective", "directpred")
    assert (obj.predictor.dim, obj.rho, obj.eps, obj.freq, obj.zero_mean) == (256, 0.3, 0.01, 1, False)


def test_sets_the_weights_in_a_run_and_resumes_exactly(tmp_path):
    runs = check_resume(objective=lambda: DirectPred(dim=4), teacher=lambda: sdk.create("teacher", "ema"),
                        tmp_dir=tmp_path)
    obj = runs.straight.objective
    assert obj.steps.item() == 6
    # after the last step W_p is eq. 18 of the objective's own moving average
    torch.testing.assert_close(obj.predictor.weight.detach(),
                               directpred_weight(obj.corr, obj.eps).float())
