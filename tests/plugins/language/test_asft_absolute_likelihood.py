"""asft_absolute_likelihood: against a slow per-token, per-pair loop in the paper's log-odds form
(value and gradient); lam = 0 is SFT's token NLL; the gradient in probability space the paper
derives; on the tiny causal transformer it lowers the rejected responses below what SFT does."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F

import sdk
from sdk import keys
from sdk.types import Batch, Views


def _pairs(p=3, t=6, v=7, seed=0, equal_lengths=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * p, t, v, generator=g, dtype=torch.float64).requires_grad_()
    ids = torch.randint(0, v, (2 * p, t), generator=g)
    mask = torch.ones(2 * p, t, dtype=torch.bool)
    mask[:, :2] = False  # the prompt
    if not equal_lengths:
        mask[1, -2:] = False
        mask[4, -1] = False
    return logits, Batch(extras={keys.TOKEN_IDS: ids, keys.TOKEN_MASK: mask})


def _slow(logits, batch, lam):
    """Per token and per pair, in the log-odds form of the paper."""
    ids, mask = batch.extras[keys.TOKEN_IDS], batch.extras[keys.TOKEN_MASK]
    ell = []
    for b in range(ids.shape[0]):
        terms = [torch.log_softmax(logits[b, t - 1], 0)[ids[b, t]] for t in range(1, ids.shape[1])
                 if mask[b, t]]
        ell.append(sum(terms) / len(terms))
    total = 0
    for i in range(0, len(ell), 2):
        lw, ll = ell[i], ell[i + 1]
        odds_w = lw - torch.log1p(-torch.exp(lw))
        odds_l = ll - torch.log1p(-torch.exp(ll))
        total = total - lw + lam * (-F.logsigmoid(odds_w) - F.logsigmoid(-odds_l))
    return total / (len(ell) // 2)


@pytest.mark.parametrize("lam", [0.1, 2.0])
def test_value_and_gradient_equal_the_slow_log_odds_form(lam):
    logits, batch = _pairs()
    obj = sdk.create("objective", "asft_absolute_likelihood", lam=lam)
    loss = obj(Views(logits=logits), batch)
    want = _slow(logits, batch, lam)
    assert torch.allclose(loss.value.double(), want, rtol=1e-5)
    (g1,) = torch.autograd.grad(loss.value, logits)
    (g2,) = torch.autograd.grad(want, logits)
    assert torch.allclose(g1.double(), g2, rtol=1e-4, atol=1e-7)
    assert loss.per_sample.shape == (6,) and torch.allclose(loss.per_sample.mean(), loss.value)


def test_default_lam_and_lam_zero_is_sft_token_nll():
    assert sdk.create("objective", "asft_absolute_likelihood").lam == 0.1
    logits, batch = _pairs(equal_lengths=True)
    value = sdk.create("objective", "asft_absolute_likelihood", lam=0.0)(Views(logits=logits), batch).value
    ids, mask = batch.extras[keys.TOKEN_IDS], batch.extras[keys.TOKEN_MASK]
    nll = [-torch.log_softmax(logits[b, t - 1], 0)[ids[b, t]]
           for b in range(0, 6, 2) for t in range(1, 6) if mask[b, t]]
    assert torch.allclose(value.double(), sum(nll) / len(nll), rtol=1e-6)


def test_gradient_in_probability_space_stays_bounded():
    """dL_align/dl_w = -1, dL_align/dl_l = p_l / (1 - p_l): the ratio |dL/dp_l| / |dL/dp_w| is
    p_w / (1 - p_l), bounded as p_l -> 0 (DPO's p_w / p_l is not)."""
    from plugins.language.asft_absolute_likelihood import asft_loss

    lw = torch.tensor([-0.3, -2.0], dtype=torch.float64, requires_grad=True)
    ll = torch.tensor([-5.0, -0.1], dtype=torch.float64, requires_grad=True)
    align = asft_loss(lw, ll, 1.0) - asft_loss(lw, ll, 0.0)
    gw, gl = torch.autograd.grad(align.sum(), (lw, ll))
    pl, pw = ll.detach().exp(), lw.detach().exp()
    assert torch.allclose(gw, -torch.ones(2, dtype=torch.float64))
    assert torch.allclose(gl, pl / (1 - pl))
    ratio = (gl / pl) / (gw.abs() / pw)  # d/dp = d/dl / p
    assert torch.allclose(ratio, pw / (1 - pl))


def test_masked_positions_and_errors():
    logits, batch = _pairs()
    obj = sdk.create("objective", "asft_absolute_likelihood")
    base = obj(Views(logits=logits), batch).value
    spoiled = logits.detach().clone()
    spoiled[:, 0] = float("nan")  # predicts token 1, a prompt token: never counts
    assert torch.equal(obj(Views(logits=spoiled), batch).value, base.detach())
    with pytest.raises(sdk.ShapeError, match=r"asft_absolute_likelihood.*even number of sequences, got 5"):
        obj(Views(logits=logits[:5]), Batch(extras={keys.TOKEN_IDS: batch.extras[keys.TOKEN_IDS][:5]}))
    bad = Batch(extras={**batch.extras, keys.TOKEN_MASK: torch.ones(6, 5)})
    with pytest.raises(sdk.ShapeError, match=r"asft_absolute_likelihood.*token_mask.*\[6, 6\], got \[6, 5\]"):
        obj(Views(logits=logits), bad)
    with pytest.raises(sdk.ConfigError, match="lam"):
        sdk.create("objective", "asft_absolute_likelihood", lam=-1.0)


def _train(lam, steps=20, vocab=10, t=8):
    """Chosen: x_{t+1} = x_t + 1; rejected: x_{t+1} = x_t - 1 (mod V), from the same start."""
    torch.manual_seed(0)
    start = torch.randint(0, vocab, (16, 1))
    up, down = (start + torch.arange(t)) % vocab, (start - torch.arange(t)) % vocab
    ids = torch.stack([up, down], 1).reshape(32, t)
    mask = torch.ones(32, t, dtype=torch.bool)
    mask[:, 0] = False
    batch = Batch(extras={keys.TOKEN_IDS: ids, keys.TOKEN_MASK: mask})
    enc = sdk.create("encoder", "causal_lm", vocab_size=vocab, max_len=t, embed_dim=16, depth=1)
    obj = sdk.create("objective", "asft_absolute_likelihood", lam=lam)
    opt = torch.optim.Adam(enc.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = obj(Views(logits=enc(ids)), batch)
        opt.zero_grad()
        loss.value.backward()
        opt.step()
    return float(loss.logs["chosen_logp"]), float(loss.logs["rejected_logp"])


def test_on_the_tiny_transformer_rejected_responses_fall_below_sft():
    sft_w, sft_l = _train(0.0)
    asft_w, asft_l = _train(1.0)
    # measured: SFT (-0.26, -4.28), ASFT lam=1 (-0.22, -4.53) as (chosen, rejected) mean log p
    assert asft_w > math.log(0.7) and sft_w > math.log(0.7)  # both learn the chosen responses
    assert asft_l < sft_l - 0.1  # ASFT pushes the rejected ones down further


def test_through_the_trainer_with_one_pair_per_dataset_item():
    """Each item is a pair [2, T]; the collate_fn flattens a batch of P items into 2P rows
    (chosen, rejected, chosen, ...), as sdk.sequence lays pairs out."""
    torch.manual_seed(0)
    vocab, t = 10, 8
    start = torch.randint(0, vocab, (16, 1))
    up, down = (start + torch.arange(t)) % vocab, (start - torch.arange(t)) % vocab
    items = list(torch.stack([up, down], 1))

    def collate(pairs):
        ids = torch.stack(pairs).reshape(-1, t)
        return {"x": ids, keys.TOKEN_IDS: ids}

    loader = torch.utils.data.DataLoader(items, batch_size=4, shuffle=True, collate_fn=collate)
    enc = sdk.create("encoder", "causal_lm", vocab_size=vocab, max_len=t, embed_dim=16, depth=1)
    trainer = sdk.Trainer(enc, sdk.create("objective", "asft_absolute_likelihood"),
                          functools.partial(torch.optim.Adam, lr=1e-2), max_steps=15, progress=False)
    before = trainer.evaluate(loader)["loss"]
    trainer.fit(loader)
    assert trainer.evaluate(loader)["loss"] < 0.7 * before
