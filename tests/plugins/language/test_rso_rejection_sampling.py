"""rso_rejection_sampling: the acceptance probability equals exp((r - r_max) / beta) on a toy
reward; accepted samples follow pi_sft exp(r / beta) / Z and beta -> inf recovers pi_sft; the
fitting loss against a slow per-token, per-pair loop (sigmoid and hinge); a tiny causal
transformer fitted on RSO pairs ends closer to pi* than one fitted on pairs drawn from pi_sft."""

import math

import pytest
import torch

import sdk
from plugins.language.rso_rejection_sampling import (
    acceptance_probability,
    rank_pairs,
    statistical_rejection_sampling,
)
from sdk import keys, sequence
from sdk.types import Batch, Views


def test_defaults():
    obj = sdk.create("objective", "rso_rejection_sampling")
    assert (obj.gamma, obj.loss) == (0.05, "sigmoid")
    import inspect

    sig = inspect.signature(statistical_rejection_sampling).parameters
    assert (sig["num_accept"].default, sig["beta"].default) == (8, 0.5)


def test_first_acceptance_probability_is_the_closed_form():
    """Candidates (low, high) in that order, M = 1: low is accepted first exactly when the first
    round accepts it, with probability exp((r_low - r_high) / beta)."""
    n, beta = 40000, 0.5
    rewards = torch.tensor([[0.3, 1.0]]).expand(n, 2)
    first = statistical_rejection_sampling(rewards, num_accept=1, beta=beta,
                                           generator=torch.Generator().manual_seed(0))[:, 0]
    q = float(acceptance_probability(torch.tensor([0.3, 1.0]), beta)[0])
    assert abs(q - torch.exp(torch.tensor(-0.7 / beta)).item()) < 1e-7
    freq = (first == 0).double().mean().item()
    assert abs(freq - q) < 4 * (q * (1 - q) / n) ** 0.5


def test_later_rounds_compare_with_the_best_remaining_candidate():
    """Candidates (low, mid, high): the order (high, mid, low) needs round 1 to accept neither
    low nor mid, and round 2, whose best remaining is mid, not to accept low:
    (1 - q(l, h)) (1 - q(m, h)) (1 - q(l, m)), q(a, b) = exp((r_a - r_b) / beta)."""
    n, beta, r = 40000, 0.5, torch.tensor([0.0, 0.1, 1.0])
    order = statistical_rejection_sampling(r.expand(n, 3), num_accept=3, beta=beta,
                                           generator=torch.Generator().manual_seed(2))
    q = lambda a, b: torch.exp((r[a] - r[b]) / beta).item()  # noqa: E731
    want = (1 - q(0, 2)) * (1 - q(1, 2)) * (1 - q(0, 1))
    freq = (order == torch.tensor([2, 1, 0])).all(1).double().mean().item()
    assert abs(freq - want) < 4 * (want * (1 - want) / n) ** 0.5 and want > 0.05
    assert (order.sort(1).values == torch.arange(3)).all()  # M = N: every candidate, once


def test_accepted_samples_follow_the_optimal_policy_and_beta_to_infinity_is_sft():
    g = torch.Generator().manual_seed(1)
    k, prompts, n, beta = 12, 3000, 64, 0.5
    pi_sft = torch.softmax(0.7 * torch.randn(k, generator=g, dtype=torch.float64), 0)
    reward = torch.rand(k, generator=g, dtype=torch.float64)
    draws = torch.multinomial(pi_sft, prompts * n, replacement=True, generator=g).reshape(prompts, n)
    star = pi_sft * torch.exp(reward / beta)
    star /= star.sum()
    for b, target in ((beta, star), (1e9, pi_sft)):
        idx = statistical_rejection_sampling(reward[draws], num_accept=8, beta=b, generator=g)
        assert idx.shape == (prompts, 8) and (idx.sort(1).values.diff(1) > 0).all()  # no repeats
        freq = torch.bincount(draws.gather(1, idx).flatten(), minlength=k).double() / idx.numel()
        assert (freq - target).abs().sum() < 0.04, (freq, target)
    assert (star - pi_sft).abs().sum() > 0.4  # the two targets are far apart (measured: 0.48)


def test_rank_pairs_puts_the_higher_reward_first():
    rewards = torch.tensor([[0.1, 0.9, 0.5, 0.2]])
    chosen, rejected = rank_pairs(torch.tensor([[0, 1, 3, 2]]), rewards)
    assert chosen.tolist() == [[1, 2]] and rejected.tolist() == [[0, 3]]


def _pairs(seed=0):
    g = torch.Generator().manual_seed(seed)
    b, t, v = 4, 5, 6
    logits = torch.randn(b, t, v, generator=g, dtype=torch.float64).requires_grad_()
    ids = torch.randint(0, v, (b, t), generator=g)
    ref = 2 * torch.randn(b, t, generator=g, dtype=torch.float64) - 2
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[:, :2] = False
    mask[3, -1] = False
    return logits, Batch(extras={keys.TOKEN_IDS: ids, keys.TOKEN_MASK: mask,
                                 keys.REFERENCE_LOGPROBS: ref})


@pytest.mark.parametrize("loss", ["sigmoid", "hinge"])
def test_loss_equals_a_slow_per_token_loop(loss):
    logits, batch = _pairs()
    gamma = 0.7
    value = sdk.create("objective", "rso_rejection_sampling", gamma=gamma, loss=loss)(
        Views(logits=logits), batch).value
    ids, mask = batch.extras[keys.TOKEN_IDS], batch.extras[keys.TOKEN_MASK]
    ref = batch.extras[keys.REFERENCE_LOGPROBS]
    ratio = []
    for b in range(4):
        ratio.append(sum(torch.log_softmax(logits[b, t - 1], 0)[ids[b, t]] - ref[b, t]
                         for t in range(1, 5) if mask[b, t]))
    total = 0
    for p in range(2):
        h = gamma * (ratio[2 * p] - ratio[2 * p + 1])
        total = total + (-torch.log(torch.sigmoid(h)) if loss == "sigmoid" else torch.clamp(1 - h, min=0.0))
    want = total / 2
    assert torch.allclose(value.double(), torch.as_tensor(want, dtype=torch.float64), rtol=1e-6)
    g1 = torch.autograd.grad(value, logits)[0]
    g2 = torch.autograd.grad(want, logits)[0]
    assert torch.allclose(g1.double(), g2, rtol=1e-4, atol=1e-8)


def test_hinge_is_zero_past_the_margin_and_the_policy_equal_to_the_reference_costs_log_2():
    logits, batch = _pairs()
    tok = sequence.read("t", Views(logits=logits), batch)
    ref = torch.cat([torch.zeros(4, 1, dtype=torch.float64), tok.logprobs.detach().double()], 1)
    same = batch.evolve(extras={**batch.extras, keys.REFERENCE_LOGPROBS: ref})
    value = sdk.create("objective", "rso_rejection_sampling")(Views(logits=logits), same).value
    assert torch.allclose(value.double(), torch.log(torch.tensor(2.0, dtype=torch.float64)))
    hinge = sdk.create("objective", "rso_rejection_sampling", loss="hinge")(Views(logits=logits), same)
    assert torch.allclose(hinge.value.double(), torch.tensor(1.0, dtype=torch.float64))  # h = 0
    shifted = ref.clone()
    shifted[1::2, 2:] += 10.0  # rejected responses far likelier under pi_sft: h >> 1
    hinge = sdk.create("objective", "rso_rejection_sampling", gamma=1.0, loss="hinge")
    out = hinge(Views(logits=logits), batch.evolve(extras={**batch.extras, keys.REFERENCE_LOGPROBS: shifted}))
    assert out.value == 0 and torch.autograd.grad(out.value, logits)[0].abs().sum() == 0


def test_errors():
    logits, batch = _pairs()
    obj = sdk.create("objective", "rso_rejection_sampling")
    bad = batch.evolve(extras={**batch.extras, keys.REFERENCE_LOGPROBS: torch.zeros(4, 4)})
    with pytest.raises(sdk.ShapeError, match=r"rso_rejection_sampling.*reference_logprobs.*\[4, 5\], got torch.float32 \[4, 4\]"):
        obj(Views(logits=logits), bad)
    with pytest.raises(sdk.ConfigError, match="loss"):
        sdk.create("objective", "rso_rejection_sampling", loss="ipo")
    with pytest.raises(sdk.ConfigError, match=r"num_accept=5 must lie in \[1, N=4\]"):
        statistical_rejection_sampling(torch.zeros(2, 4), num_accept=5)
    with pytest.raises(sdk.ShapeError, match=r"rewards must be floating \[P, N\]"):
        statistical_rejection_sampling(torch.zeros(4), num_accept=1)


def test_a_tiny_transformer_fitted_on_rso_pairs_moves_towards_higher_rewards():
    """One prompt token, one response token: pi_sft is the model's initial next-token
    distribution over 8 tokens, the reward favours high token ids; RSO pairs from 64 prompts x 64
    candidates, fitted for 20 steps (Adam, lr 1e-3) with gamma = 1."""
    torch.manual_seed(0)
    vocab, beta = 8, 0.5
    model = sdk.create("encoder", "causal_lm", vocab_size=vocab, max_len=2, embed_dim=16, depth=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(5)  # a non-uniform pi_sft

    def policy():
        with torch.no_grad():
            return torch.softmax(model(torch.zeros(1, 1, dtype=torch.long))[0, 0], -1)

    pi_sft = policy()
    reward = torch.linspace(0, 2, vocab)
    g = torch.Generator().manual_seed(0)
    draws = torch.multinomial(pi_sft, 64 * 64, replacement=True, generator=g).reshape(64, 64)
    idx = statistical_rejection_sampling(reward[draws], num_accept=8, beta=beta, generator=g)
    chosen, rejected = rank_pairs(idx, reward[draws])
    y = torch.stack([draws.gather(1, chosen), draws.gather(1, rejected)], -1).reshape(-1)
    ids = torch.stack([torch.zeros_like(y), y], 1)
    ref = torch.cat([torch.zeros(len(y), 1), torch.log(pi_sft)[y][:, None]], 1)
    batch = Batch(extras={keys.TOKEN_IDS: ids, keys.REFERENCE_LOGPROBS: ref})
    obj = sdk.create("objective", "rso_rejection_sampling", gamma=1.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    first = None
    for _ in range(20):
        loss = obj(Views(logits=model(ids)), batch)
        first = float(loss.value.detach()) if first is None else first
        opt.zero_grad()
        loss.value.backward()
        opt.step()
    assert abs(first - math.log(2)) < 1e-6  # pi = pi_sft at the start: h = 0
    gain = float((policy() - pi_sft) @ reward)  # measured: loss 0.40, expected reward +0.53
    assert float(loss.value.detach()) < 0.6 and gain > 0.25
