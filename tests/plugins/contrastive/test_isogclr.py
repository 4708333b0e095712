"""isogclr (iSogCLR, Qiu et al. 2023): the per-step updates of Algorithm 1 (moving average s with
gamma, temperature gradient with rho, momentum u with beta, projection of tau) against a slow
per-anchor loop over several steps, the loss value and its gradient, state keyed by
Batch.index, and the state round trip."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import sdk
from plugins.contrastive.isogclr import ISogCLR

HP = dict(gamma=0.7, rho=0.35, eta=0.4, beta=0.6, tau_min=0.08, tau_max=0.5, temperature=0.2)


class SlowISogCLR:
    """Per-sample dictionaries and per-anchor Python loops, in float64."""

    def __init__(self, gamma, rho, eta, beta, tau_min, tau_max, temperature, grad_clip=3.0):
        self.gamma, self.rho, self.eta, self.beta = gamma, rho, eta, beta
        self.tau_min, self.tau_max, self.clip = tau_min, tau_max, grad_clip
        self.tau0 = temperature
        self.s, self.tau, self.u = {}, {}, {}
        self.clipped = self.projected = False

    def step(self, z1, z2, index):
        """Loss value and the surrogate whose gradient is G(w); updates the state."""
        z = [F.normalize(z1.double(), dim=1), F.normalize(z2.double(), dim=1)]
        b = z1.shape[0]
        rows = [(v, i) for v in range(2) for i in range(b)]
        values, surrogates, new_s, grads = [], [], {}, {}
        for v, i in rows:
            key = int(index[i])
            tau = self.tau.get(key, self.tau0)
            za = z[v][i]
            pos = za @ z[1 - v][i]
            negs = [za @ z[w][j] for w in range(2) for j in range(b) if j != i]
            g = sum(math.exp(s.item() / tau) for s in negs) / len(negs)
            s_new = g if key not in self.s else (1 - self.gamma) * self.s[key] + self.gamma * g
            p = [math.exp(s.item() / tau) / s_new for s in negs]
            values.append(tau * math.log(s_new) - pos.item() + self.rho * tau)
            surrogates.append(sum(pj * s for pj, s in zip(p, negs)) / len(negs) - pos)
            d_tau = math.log(s_new) + self.rho - sum(pj * s.item() / tau for pj, s in zip(p, negs)) / len(negs)
            new_s.setdefault(key, []).append(s_new)
            grads.setdefault(key, []).append(d_tau)
        for key in new_s:
            self.s[key] = sum(new_s[key]) / len(new_s[key])
            raw = sum(grads[key]) / len(grads[key])
            grad = max(-self.clip, min(self.clip, raw))
            self.u[key] = (1 - self.beta) * self.u.get(key, 0.0) + self.beta * grad
            tau = self.tau.get(key, self.tau0) - self.eta * self.u[key]
            self.tau[key] = min(self.tau_max, max(self.tau_min, tau))
            self.clipped |= grad != raw
            self.projected |= self.tau[key] != tau
        return sum(values) / len(values), sum(surrogates) / len(surrogates)


STEPS = ([0, 1, 2, 3], [2, 0, 4, 1], [3, 4, 0, 2])


@pytest.mark.parametrize("grad_clip", [3.0, 0.05])
def test_three_steps_match_a_slow_loop_of_algorithm_1(grad_clip):
    g = torch.Generator().manual_seed(0)
    obj = ISogCLR(num_samples=6, grad_clip=grad_clip, **HP)
    slow = SlowISogCLR(grad_clip=grad_clip, **HP)
    for index in STEPS:
        z1 = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
        z2 = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
        index = torch.tensor(index)
        loss = obj(sdk.Views(embeddings=(z1.float(), z2.float())), sdk.Batch(index=index)).value
        grads = torch.autograd.grad(loss, (z1, z2))
        value, surrogate = slow.step(z1, z2, index)
        slow_grads = torch.autograd.grad(surrogate, (z1, z2))
        assert loss.item() == pytest.approx(value, rel=1e-5)
        for got, want in zip(grads, slow_grads):
            assert torch.allclose(got, want, atol=1e-5)
        for key in slow.s:
            assert obj.log_s[key].exp().item() == pytest.approx(slow.s[key], rel=1e-5)
            assert obj.u[key].item() == pytest.approx(slow.u[key], rel=1e-4, abs=1e-6)
            assert obj.tau[key].item() == pytest.approx(slow.tau[key], rel=1e-5)
    assert obj.tau[5] == HP["temperature"] and not obj.seen[5]  # never in a batch: untouched
    taus = torch.tensor([slow.tau[k] for k in range(5)])
    assert taus.unique().numel() > 1  # individualised
    # the clip of the temperature gradient, and the projection onto [tau_min, tau_max], were exercised
    assert slow.clipped if grad_clip < 1 else slow.projected


def test_temperature_bounds_are_projections():
    g = torch.Generator().manual_seed(1)
    obj = ISogCLR(num_samples=4, temperature=0.1, tau_min=0.1, tau_max=0.1000001, eta=10.0)
    z = (torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g))
    obj(sdk.Views(embeddings=z), sdk.Batch(index=torch.arange(4)))
    assert ((obj.tau >= 0.1) & (obj.tau <= 0.1000001)).all()
    assert obj.u.abs().min() > 0  # the momentum moved, the projection held tau


def test_fixed_temperature_without_moving_average_is_the_global_contrastive_loss():
    """gamma = 1, eta = 0: mean_a tau log mean_j exp((s_aj - s_a+)/tau) + rho tau (DRO dual value)."""
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    tau, rho = 0.3, 0.2
    obj = ISogCLR(num_samples=5, temperature=tau, gamma=1.0, eta=0.0, rho=rho)
    for _ in range(2):  # the second step sees state, which gamma = 1 ignores
        got = obj(sdk.Views(embeddings=(z1, z2)), sdk.Batch(index=torch.arange(5))).value
    z = [F.normalize(v.double(), dim=1) for v in (z1, z2)]
    total = 0.0
    for v in range(2):
        for i in range(5):
            pos = float(z[v][i] @ z[1 - v][i])
            h = [float(z[v][i] @ z[w][j]) - pos for w in range(2) for j in range(5) if j != i]
            total += tau * math.log(sum(math.exp(x / tau) for x in h) / len(h)) + rho * tau
    assert got.item() == pytest.approx(total / 10, rel=1e-5)
    assert torch.allclose(obj.tau, torch.full((5,), tau))


def test_state_is_keyed_by_index_permuting_the_batch_permutes_nothing_else():
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    index = torch.tensor([7, 2, 9, 0, 4, 5])
    perm = torch.randperm(6, generator=g)
    a, b = ISogCLR(num_samples=10, **HP), ISogCLR(num_samples=10, **HP)
    for _ in range(2):
        la = a(sdk.Views(embeddings=(z1, z2)), sdk.Batch(index=index))
        lb = b(sdk.Views(embeddings=(z1[perm], z2[perm])), sdk.Batch(index=index[perm]))
        assert torch.allclose(la.per_sample[perm], lb.per_sample, atol=1e-6)
    for name in ("tau", "log_s", "u", "seen"):
        assert torch.allclose(getattr(a, name).float(), getattr(b, name).float(), atol=1e-6), name
    assert a.seen.nonzero().flatten().tolist() == sorted(index.tolist())


def test_state_dict_round_trip_and_eval_does_not_update():
    g = torch.Generator().manual_seed(4)
    obj = ISogCLR(num_samples=8, **HP)
    views = sdk.Views(embeddings=(torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)))
    batch = sdk.Batch(index=torch.tensor([1, 3, 5, 7]))
    obj(views, batch)
    fresh = ISogCLR(num_samples=8, **HP)
    fresh.load_state_dict(copy.deepcopy(obj.state_dict()))
    for key, value in obj.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert torch.equal(obj(views, batch).value, fresh(views, batch).value)
    assert torch.equal(obj.tau, fresh.tau)
    state = copy.deepcopy(obj.state_dict())
    obj.eval()
    obj(views, batch)
    with torch.no_grad():
        obj.train()(views, batch)
    for key, value in state.items():
        assert torch.equal(obj.state_dict()[key], value), key


def test_bad_parameters_and_inputs_name_the_field():
    for name, value in (("num_samples", 0), ("gamma", 0.0), ("rho", -1.0), ("eta", -0.1),
                        ("beta", 1.5), ("grad_clip", 0.0), ("temperature", 0.9)):
        with pytest.raises(sdk.ConfigError, match=name):
            ISogCLR(**{name: value})
    with pytest.raises(sdk.RequirementError, match="index"):
        ISogCLR()(sdk.Views(embeddings=(torch.randn(3, 2), torch.randn(3, 2))), sdk.Batch())


def test_engine_resume_after_a_kill_restores_tau_and_u_exactly(tmp_path):
    runs = sdk.testing.check_resume(objective=lambda: ISogCLR(num_samples=40, **HP), steps=7, kill_at=5,
                                    tmp_dir=tmp_path)  # mid-epoch 1; the last checkpoint is step 4
    obj = runs.resumed.objective
    assert bool(obj.seen.all())  # every sample's tau and u moved, so the check compares real state
    assert not torch.allclose(obj.tau, torch.full_like(obj.tau, HP["temperature"]))
