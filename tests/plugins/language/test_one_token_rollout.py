"""one_token_rollout: the surrogate on given rollouts against a per-token loop; the Monte Carlo
gradient against the closed form -(1 + beta) grad pi(y); greedy rollouts on a model that is right
everywhere give SFT's token NLL exactly; the rollout draws from softmax(z / tau); masked
positions never count; the tiny causal transformer learns with it."""

import functools
import math

import pytest
import torch

import sdk
from plugins.language.one_token_rollout import otr_token_loss, rollout
from sdk import keys
from sdk.types import Batch, Views


def _inputs(b=2, t=4, v=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g, dtype=torch.float64).requires_grad_()
    ids = torch.randint(0, v, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, 2] = False
    return logits, Batch(extras={keys.TOKEN_IDS: ids, keys.TOKEN_MASK: mask})


def test_defaults():
    obj = sdk.create("objective", "one_token_rollout")
    assert (obj.num_samples, obj.beta, obj.temperature) == (16, 0.1, 1.0)


def test_value_equals_a_per_token_loop_on_the_same_rollouts():
    logits, batch = _inputs()
    obj = sdk.create("objective", "one_token_rollout", num_samples=7, beta=0.3)
    torch.manual_seed(3)
    value = obj(Views(logits=logits), batch).value
    torch.manual_seed(3)
    samples = rollout(logits[:, :-1], 7)
    ids, mask = batch.extras[keys.TOKEN_IDS], batch.extras[keys.TOKEN_MASK]
    terms = []
    for b in range(2):
        for t in range(1, 4):
            if not mask[b, t]:
                continue
            logp = torch.log_softmax(logits[b, t - 1], 0)
            terms.append(-sum((1.0 if a == ids[b, t] else -0.3) * logp[a]
                              for a in samples[b, t - 1].tolist()) / 7)
    assert torch.allclose(value.double(), sum(terms) / len(terms), rtol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_monte_carlo_gradient_matches_the_closed_form(beta):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4, 6, generator=g, dtype=torch.float64).requires_grad_()
    y = torch.tensor([0, 3, 5, 2])
    torch.manual_seed(0)
    samples = rollout(z, 20000)
    loss = otr_token_loss(torch.log_softmax(z, -1), y, samples, beta).sum()
    (mc,) = torch.autograd.grad(loss, z)
    (exact,) = torch.autograd.grad(-(1 + beta) * torch.softmax(z, -1).gather(1, y[:, None]).sum(), z)
    cos = torch.nn.functional.cosine_similarity(mc.flatten(), exact.flatten(), dim=0)
    assert cos > 0.995 and abs(mc.norm() / exact.norm() - 1) < 0.03


def test_greedy_rollout_on_a_model_right_everywhere_is_sft_token_nll():
    logits, batch = _inputs()
    ids = batch.extras[keys.TOKEN_IDS]
    logits = logits.detach().clone()
    logits[:, :-1].scatter_add_(-1, ids[:, 1:, None], torch.full((2, 3, 1), 4.0, dtype=torch.float64))
    logits.requires_grad_()
    value = sdk.create("objective", "one_token_rollout", temperature=0.0, beta=0.7)(
        Views(logits=logits), batch).value
    mask = batch.extras[keys.TOKEN_MASK]
    nll = [-torch.log_softmax(logits[b, t - 1], 0)[ids[b, t]] for b in range(2) for t in range(1, 4)
           if mask[b, t]]
    assert torch.allclose(value.double(), sum(nll) / len(nll), rtol=1e-7)
    assert value > 0.01  # the NLL, not a degenerate zero


def test_rollout_draws_from_the_tempered_policy():
    z = torch.tensor([[1.0, 0.0, -1.0, 0.5]])
    torch.manual_seed(0)
    draws = rollout(z, 40000, temperature=0.5)[0]
    freq = torch.bincount(draws, minlength=4).double() / 40000
    assert torch.allclose(freq, torch.softmax(z[0].double() / 0.5, 0), atol=0.01)
    assert torch.equal(rollout(z, 3, temperature=0.0), torch.zeros(1, 3, dtype=torch.long))


def test_masked_positions_never_count_and_errors():
    logits, batch = _inputs()
    obj = sdk.create("objective", "one_token_rollout")
    torch.manual_seed(0)
    base = obj(Views(logits=logits), batch).value
    spoiled = logits.detach().clone()
    spoiled[0, 1] = float("nan")  # predicts token 2 of row 0, which is masked
    torch.manual_seed(0)
    assert torch.equal(obj(Views(logits=spoiled), batch).value, base.detach())
    with pytest.raises(sdk.ShapeError, match=r"one_token_rollout.*token_mask.*\[2, 4\], got \[4, 2\]"):
        obj(Views(logits=logits), Batch(extras={**batch.extras, keys.TOKEN_MASK: torch.ones(4, 2)}))
    with pytest.raises(sdk.ConfigError, match="num_samples"):
        sdk.create("objective", "one_token_rollout", num_samples=0)


def test_the_tiny_causal_transformer_learns_with_it():
    """x_{t+1} = x_t + 1 (mod V): from chance, OTR alone reaches near-perfect next-token accuracy."""
    torch.manual_seed(0)
    vocab, t = 10, 8
    ids = (torch.randint(0, vocab, (32, 1)) + torch.arange(t)) % vocab
    batch = Batch(extras={keys.TOKEN_IDS: ids})
    enc = sdk.create("encoder", "causal_lm", vocab_size=vocab, max_len=t, embed_dim=16, depth=1)
    obj = sdk.create("objective", "one_token_rollout")
    opt = functools.partial(torch.optim.Adam, lr=2e-2)(enc.parameters())
    for _ in range(20):
        loss = obj(Views(logits=enc(ids)), batch)
        opt.zero_grad()
        loss.value.backward()
        opt.step()
    with torch.no_grad():
        logits = enc(ids)
    acc = (logits[:, :-1].argmax(-1) == ids[:, 1:]).float().mean()
    nll = -torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).mean()
    assert acc > 0.95 and nll < 0.5 * math.log(vocab)
