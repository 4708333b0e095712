"""discriminative_finetune: against a slow per-token loop; on a categorical toy the REINFORCE
estimator's expected gradient equals the exact gradient of the expected retrieval reward (times
1 - 1/B for the batch-mean baseline); equal rewards give no gradient with the baseline; errors."""

import pytest
import torch

import sdk
from plugins.language.discriminative_finetune import retrieval_reward
from sdk import keys
from sdk.types import Batch, Views


def _inputs(b=4, t=4, v=6, m=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g, dtype=torch.float64).requires_grad_()
    ids = torch.randint(0, v, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[2, 3] = False
    scores = 2 * torch.randn(b, m, generator=g, dtype=torch.float64)
    return logits, Batch(targets=torch.tensor([0, 2, 1, 0]),
                         extras={keys.TOKEN_IDS: ids, keys.TOKEN_MASK: mask, keys.RETRIEVAL_SCORES: scores})


@pytest.mark.parametrize("baseline", ["mean", "none"])
def test_value_and_gradient_equal_a_slow_loop(baseline):
    logits, batch = _inputs()
    obj = sdk.create("objective", "discriminative_finetune", baseline=baseline)
    loss = obj(Views(logits=logits), batch).value
    ids, mask = batch.extras[keys.TOKEN_IDS], batch.extras[keys.TOKEN_MASK]
    s, y = batch.extras[keys.RETRIEVAL_SCORES], batch.targets
    rewards = [float(s[i, y[i]] - torch.logsumexp(s[i], 0)) for i in range(4)]
    base = sum(rewards) / 4 if baseline == "mean" else 0.0
    want = 0
    for i in range(4):
        logp = sum(torch.log_softmax(logits[i, t - 1], 0)[ids[i, t]] for t in range(1, 4) if mask[i, t])
        want = want - (rewards[i] - base) * logp
    want = want / 4
    assert torch.allclose(loss.double(), want, rtol=1e-6)
    assert torch.allclose(torch.autograd.grad(loss, logits)[0].double(),
                          torch.autograd.grad(want, logits)[0], rtol=1e-5, atol=1e-9)


def test_default_and_expected_gradient_on_a_categorical_toy():
    """Items i = 0..2, one-token captions c in 0..4 with pi(c | i) = softmax(theta_i); the
    retriever's scores S[c] [3] are fixed. J = mean_i E_c log softmax(S[c])[i]."""
    assert sdk.create("objective", "discriminative_finetune").baseline == "mean"
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(3, 5, generator=g, dtype=torch.float64).requires_grad_()
    table = 2 * torch.randn(5, 3, generator=g, dtype=torch.float64)
    logr = torch.log_softmax(table, 1)  # [caption, item]
    exact = -(torch.softmax(theta, 1) * logr.T).sum(1).mean()
    (want,) = torch.autograd.grad(exact, theta)
    n = 60_000
    items = torch.arange(n) % 3
    with torch.no_grad():
        c = torch.multinomial(torch.softmax(theta, 1)[items], 1, generator=g)[:, 0]
    logits = torch.stack([theta[items], torch.zeros(n, 5, dtype=torch.float64)], 1)
    batch = Batch(targets=items, extras={keys.TOKEN_IDS: torch.stack([torch.zeros_like(c), c], 1),
                                         keys.RETRIEVAL_SCORES: table[c]})
    loss = sdk.create("objective", "discriminative_finetune")(Views(logits=logits), batch).value
    (mc,) = torch.autograd.grad(loss, theta)
    # E[grad] = -(1 - 1/n) mean_i grad J_i: the loss averages n samples, n / 3 per item
    cos = torch.nn.functional.cosine_similarity(mc.flatten(), want.flatten(), dim=0)
    assert cos > 0.99 and abs(mc.norm() / want.norm() - 1) < 0.05, (float(cos), float(mc.norm() / want.norm()))


def test_equal_rewards_give_no_gradient_with_the_baseline():
    logits, batch = _inputs()
    flat = batch.evolve(extras={**batch.extras, keys.RETRIEVAL_SCORES: torch.zeros(4, 3, dtype=torch.float64)})
    loss = sdk.create("objective", "discriminative_finetune")(Views(logits=logits), flat).value
    assert torch.autograd.grad(loss, logits)[0].abs().max() == 0
    assert torch.allclose(retrieval_reward(torch.zeros(2, 4), torch.tensor([0, 3])), torch.log(torch.tensor(0.25)))


def test_errors():
    logits, batch = _inputs()
    obj = sdk.create("objective", "discriminative_finetune")
    with pytest.raises(sdk.ShapeError, match=r"discriminative_finetune.*retrieval_scores.*\[4, M\], got \[3, 3\]"):
        obj(Views(logits=logits), batch.evolve(extras={**batch.extras, keys.RETRIEVAL_SCORES: torch.zeros(3, 3)}))
    with pytest.raises(sdk.ShapeError, match=r"discriminative_finetune.*Batch.targets must lie in \[0, 3\)"):
        obj(Views(logits=logits), batch.evolve(targets=torch.tensor([0, 3, 1, 0])))
    with pytest.raises(sdk.ConfigError, match="baseline"):
        sdk.create("objective", "discriminative_finetune", baseline="ema")
