"""score_two_turn_rl: on a tabular two-attempt policy the surrogate's Monte Carlo gradient matches
the exact gradient of each stage's objective, enumerated over every (y1, y2) with the exact KL;
the returns against their formulas; errors; on-policy training of the tiny causal transformer
raises the second attempt's accuracy."""

import pytest
import torch

import sdk
from plugins.language.score_two_turn_rl import score_returns
from sdk import keys
from sdk.types import Batch, Views

K, CORRECT = 4, 2


def _tables(seed=0):
    g = torch.Generator().manual_seed(seed)
    theta1 = torch.randn(K, generator=g, dtype=torch.float64).requires_grad_()
    theta2 = torch.randn(K, K, generator=g, dtype=torch.float64).requires_grad_()
    ref1 = torch.log_softmax(torch.randn(K, generator=g, dtype=torch.float64), 0)
    ref2 = torch.log_softmax(torch.randn(K, K, generator=g, dtype=torch.float64), 1)
    return theta1, theta2, ref1, ref2


def _exact(theta1, theta2, ref1, ref2, stage, alpha, beta1, beta2):
    lp1, lp2 = torch.log_softmax(theta1, 0), torch.log_softmax(theta2, 1)
    r = (torch.arange(K) == CORRECT).double()
    total = 0
    for y1 in range(K):
        for y2 in range(K):
            p = lp1[y1].exp() * lp2[y1, y2].exp()
            kl1, kl2 = lp1[y1] - ref1[y1], lp2[y1, y2] - ref2[y1, y2]
            if stage == 1:
                value = r[y2] - beta2 * kl1
            else:
                value = r[y1] - beta1 * kl1 + r[y2] + alpha * (r[y2] - r[y1]) - beta1 * kl2
            total = total + p * value
    return total


def _episodes(theta1, theta2, ref1, ref2, n, seed=0):
    """n sampled episodes as sdk.sequence rows: [ctx, y1] and [y1, y2], logits from the tables."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        y1 = torch.multinomial(torch.softmax(theta1, 0), n, replacement=True, generator=g)
        y2 = torch.multinomial(torch.softmax(theta2, 1)[y1], 1, generator=g)[:, 0]
    first = torch.stack([theta1.expand(n, K), torch.zeros(n, K, dtype=torch.float64)], 1)
    second = torch.stack([theta2[y1], torch.zeros(n, K, dtype=torch.float64)], 1)
    logits = torch.stack([first, second], 1).reshape(2 * n, 2, K)
    ids = torch.stack([torch.stack([torch.zeros_like(y1), y1], 1), torch.stack([y1, y2], 1)], 1)
    ref = torch.stack([torch.stack([torch.zeros(n, dtype=torch.float64), ref1[y1]], 1),
                       torch.stack([torch.zeros(n, dtype=torch.float64), ref2[y1, y2]], 1)], 1)
    reward = torch.stack([(y1 == CORRECT).double(), (y2 == CORRECT).double()], 1)
    return Views(logits=logits), Batch(extras={keys.TOKEN_IDS: ids.reshape(2 * n, 2),
                                               keys.REFERENCE_LOGPROBS: ref.reshape(2 * n, 2),
                                               keys.REWARD: reward.reshape(2 * n)})


def test_defaults():
    obj = sdk.create("objective", "score_two_turn_rl")
    assert (obj.stage, obj.alpha, obj.beta1, obj.beta2) == (2, 10.0, 0.01, 0.1)
    assert obj.beta2 == 10 * obj.beta1


@pytest.mark.parametrize("params", [dict(stage=1, beta2=0.5), dict(stage=2, alpha=10.0, beta1=0.3)])
def test_monte_carlo_gradient_matches_the_enumerated_objective(params):
    full = dict(stage=2, alpha=10.0, beta1=0.01, beta2=0.1) | params
    theta1, theta2, ref1, ref2 = _tables()
    views, batch = _episodes(theta1, theta2, ref1, ref2, 100_000)
    loss = sdk.create("objective", "score_two_turn_rl", **params)(views, batch).value
    mc = torch.cat([g.flatten() for g in torch.autograd.grad(loss, (theta1, theta2))])
    exact = torch.cat([g.flatten() for g in torch.autograd.grad(
        -_exact(theta1, theta2, ref1, ref2, **full), (theta1, theta2))])
    cos = torch.nn.functional.cosine_similarity(mc, exact, dim=0)
    assert cos > 0.99 and abs(mc.norm() / exact.norm() - 1) < 0.05, (float(cos), float(mc.norm()),
                                                                     float(exact.norm()))


def test_returns_follow_the_formulas():
    r1, r2 = torch.tensor([0.0, 1.0, 1.0]), torch.tensor([1.0, 0.0, 1.0])
    kl1, kl2 = torch.tensor([0.2, -0.1, 0.0]), torch.tensor([0.5, 0.3, -0.2])
    g1, g2 = score_returns(r1, r2, kl1, kl2, stage=2, alpha=10.0, beta1=0.01)
    bonus = torch.tensor([10.0, -10.0, 0.0])  # wrong -> right rewarded, right -> wrong penalised
    assert torch.allclose(g2, r2 + bonus - 0.01 * kl2)
    assert torch.allclose(g1, r1 - 0.01 * kl1 + g2)
    g1, g2 = score_returns(r1, r2, kl1, kl2, stage=1, beta2=0.1)
    assert torch.allclose(g1, r2 - 0.1 * kl1) and torch.equal(g2, r2)


def test_errors():
    theta1, theta2, ref1, ref2 = _tables()
    views, batch = _episodes(theta1, theta2, ref1, ref2, 3)
    obj = sdk.create("objective", "score_two_turn_rl")
    with pytest.raises(sdk.ShapeError, match=r"score_two_turn_rl.*reward.*\[6\], got torch.float64 \[3\]"):
        obj(views, batch.evolve(extras={**batch.extras, keys.REWARD: torch.zeros(3, dtype=torch.float64)}))
    with pytest.raises(sdk.RequirementError, match=r"score_two_turn_rl.*reward"):
        obj(views, batch.evolve(extras={k: v for k, v in batch.extras.items() if k != keys.REWARD}))
    with pytest.raises(sdk.ConfigError, match="stage"):
        sdk.create("objective", "score_two_turn_rl", stage=3)


def test_on_policy_training_of_the_tiny_transformer_raises_second_attempt_accuracy():
    """Prompt token p in 0..3, the correct answer (p + 1) mod 4; the second attempt's row is
    [p, y1, y2]. 15 on-policy steps of stage II (64 episodes each) from the untrained model."""
    torch.manual_seed(0)
    vocab, n = 4, 64
    model = sdk.create("encoder", "causal_lm", vocab_size=vocab, max_len=3, embed_dim=16, depth=1)
    base = sdk.create("encoder", "causal_lm", vocab_size=vocab, max_len=3, embed_dim=16, depth=1)
    base.load_state_dict(model.state_dict())
    obj = sdk.create("objective", "score_two_turn_rl", alpha=1.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def episodes():
        p = torch.randint(0, vocab, (n,))
        with torch.no_grad():
            y1 = torch.multinomial(torch.softmax(model(p[:, None])[:, -1], -1), 1)[:, 0]
            y2 = torch.multinomial(torch.softmax(model(torch.stack([p, y1], 1))[:, -1], -1), 1)[:, 0]
        rows = torch.stack([torch.stack([p, y1, y1], 1), torch.stack([p, y1, y2], 1)], 1).reshape(2 * n, 3)
        mask = torch.zeros(2 * n, 3, dtype=torch.bool)
        mask[0::2, 1], mask[1::2, 2] = True, True
        with torch.no_grad():
            ref = torch.log_softmax(base(rows), -1)[:, :-1].gather(-1, rows[:, 1:, None])[..., 0]
        ref = torch.cat([torch.zeros(2 * n, 1), ref], 1)
        reward = torch.stack([y1 == (p + 1) % vocab, y2 == (p + 1) % vocab], 1).float().reshape(-1)
        return rows, Batch(extras={keys.TOKEN_IDS: rows, keys.TOKEN_MASK: mask,
                                   keys.REFERENCE_LOGPROBS: ref, keys.REWARD: reward})

    rows, batch = episodes()
    before = float(batch.extras[keys.REWARD][1::2].mean())
    for _ in range(15):
        rows, batch = episodes()
        loss = obj(Views(logits=model(rows)), batch)
        opt.zero_grad()
        loss.value.backward()
        opt.step()
    after = float(episodes()[1].extras[keys.REWARD][1::2].mean())
    assert before < 0.5 and after > 0.8, (before, after)


def test_the_shaping_bonus_favours_self_correction():
    """One gradient step from the same tabular policy and the same episodes: with alpha = 10 the
    exact net rate P(wrong -> right) - P(right -> wrong) rises more than with alpha = 0."""
    def net(theta1, theta2):
        p1, p2 = torch.softmax(theta1, 0), torch.softmax(theta2, 1)
        right = torch.arange(K) == CORRECT
        up = sum(p1[a] * p2[a, CORRECT] for a in range(K) if not right[a])
        down = p1[CORRECT] * (1 - p2[CORRECT, CORRECT])
        return float(up - down)

    theta1, theta2, ref1, ref2 = _tables(seed=3)
    start, moved = net(theta1.detach(), theta2.detach()), {}
    for alpha in (0.0, 10.0):
        views, batch = _episodes(theta1, theta2, ref1, ref2, 50_000, seed=1)  # the same episodes
        loss = sdk.create("objective", "score_two_turn_rl", alpha=alpha)(views, batch).value
        g1, g2 = torch.autograd.grad(loss, (theta1, theta2))
        step = 0.05 / torch.cat([g1.flatten(), g2.flatten()]).norm()  # equal step lengths
        moved[alpha] = net(theta1.detach() - step * g1, theta2.detach() - step * g2) - start
    # measured: alpha = 0 moves it by -0.004, alpha = 10 by +0.015
    assert moved[10.0] > 0 and moved[10.0] > moved[0.0] + 0.01
