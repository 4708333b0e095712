"""data_mixing_agent: the domain weights against a loop (and the mixture objective they reduce
to), the policy's rollout over the history of windows against a hand-written MLP, checkpointed
state, the defaults and bad input."""

import pytest
import torch

import sdk
from plugins.training.data_mixing_agent import domain_mixture_weights
from sdk.errors import ConfigError, ShapeError


def test_weights_match_a_loop_and_reduce_to_the_mixture_objective():
    g = torch.Generator().manual_seed(0)
    domain = torch.tensor([0, 2, 2, 0, 0, 2, 1, 2])
    mixture = torch.tensor([0.5, 0.2, 0.3], dtype=torch.float64)
    w = domain_mixture_weights(domain, mixture)
    for i in range(8):
        n = sum(int(d == domain[i]) for d in domain)
        assert w[i].item() == pytest.approx(mixture[domain[i]].item() / n)
    rw = sdk.create("reweighter", "data_mixing_agent", num_domains=3)
    rw.mixture = mixture.float()
    l = torch.rand(8, generator=g, dtype=torch.float64)
    value = rw.reduce(sdk.Loss(value=l.mean(), per_sample=l), sdk.Batch(domain=domain)).value
    want = sum(mixture[k] * l[domain == k].mean() for k in range(3))
    assert value.item() == pytest.approx(want.item(), rel=1e-6)
    # a batch without domain 1: renormalised over the domains present
    l2, d2 = l[:6], domain[:6]
    value = rw.reduce(sdk.Loss(value=l2.mean(), per_sample=l2), sdk.Batch(domain=d2)).value
    want = (0.5 * l2[d2 == 0].mean() + 0.3 * l2[d2 == 2].mean()) / 0.8
    assert value.item() == pytest.approx(want.item(), rel=1e-6)


def test_observe_rolls_the_history_through_the_policy():
    torch.manual_seed(0)
    rw = sdk.create("reweighter", "data_mixing_agent", num_domains=2, history=3, hidden=5)
    lin1, lin2 = rw.policy.net[0], rw.policy.net[2]

    def mlp(s):
        return torch.softmax(lin2.weight @ torch.relu(lin1.weight @ s + lin1.bias) + lin2.bias, 0)

    assert rw.mixture.tolist() == [0.5, 0.5]
    windows = []
    mix = torch.tensor([0.5, 0.5])
    for losses in ([1.0, 2.0], [0.5, 1.5], [0.7, 0.2], [0.1, 0.9]):
        windows.append(torch.cat([mix, torch.tensor(losses)]))
        state = torch.cat([torch.zeros(4)] * max(0, 3 - len(windows)) + windows[-3:])
        mix = mlp(state)
        got = rw.observe(torch.tensor(losses))
        assert torch.allclose(got, mix, atol=1e-6)
    assert torch.allclose(rw.weights(torch.ones(2), sdk.Batch(domain=torch.tensor([0, 1]))),
                          mix / 1.0, atol=1e-6)
    fresh = sdk.create("reweighter", "data_mixing_agent", num_domains=2, history=3, hidden=5)
    fresh.load_state_dict(rw.state_dict())
    assert torch.equal(fresh.mixture, rw.mixture) and torch.equal(fresh.state, rw.state)
    assert not any(p.requires_grad for p in rw.policy.parameters())  # the agent is frozen


def test_defaults_and_bad_input():
    rw = sdk.create("reweighter", "data_mixing_agent")
    assert (rw.num_domains, rw.history, rw.policy.net[0].out_features) == (2, 3, 64)
    assert rw.policy.net[0].in_features == 3 * 2 * 2
    with pytest.raises(ConfigError, match="num_domains"):
        sdk.create("reweighter", "data_mixing_agent", num_domains=1)
    with pytest.raises(ShapeError, match="data_mixing_agent.*eval_losses"):
        rw.observe(torch.ones(3))
    with pytest.raises(ShapeError, match="data_mixing_agent.*finite"):
        rw.observe(torch.tensor([1.0, float("nan")]))
    assert rw.mixture.tolist() == [0.5, 0.5]  # a rejected window changes nothing
    with pytest.raises(ShapeError, match="data_mixing_agent.*Batch.domain"):
        rw.weights(torch.ones(4), sdk.Batch(targets=torch.zeros(4, dtype=torch.long)))
    with pytest.raises(ShapeError, match="data_mixing_agent.*Batch.domain"):
        rw.weights(torch.ones(2), sdk.Batch(domain=torch.tensor([0, 5])))


def test_resumes_bit_for_bit(tmp_path):
    from sdk.testing import check_resume

    check_resume(objective=lambda: sdk.create("objective", "cross_entropy"), tmp_dir=tmp_path,
                 reweighter=lambda: sdk.create("reweighter", "data_mixing_agent"))
