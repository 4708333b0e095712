"""sdk.sequence: the shifted targets and their log-probabilities against a per-token loop, masked
positions never counting, clear errors; [B, T, V] logits through sdk.Trainer."""

import functools
import math

import pytest
import torch

import sdk
from sdk import keys, sequence
from sdk.interfaces import Callback, Objective
from sdk.types import Batch, Loss, Views


def test_token_logprobs_and_reductions_equal_a_per_token_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 7, (3, 5), generator=g)
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 0, 1, 1, 0], [1, 0, 0, 0, 0]])
    tok = sequence.read("objective 'x'", Views(logits=logits),
                        Batch(extras={keys.TOKEN_IDS: ids, keys.TOKEN_MASK: mask}))
    sums, counts = [0.0] * 3, [0] * 3
    for b in range(3):
        for t in range(1, 5):
            row = logits[b, t - 1]
            lp = float(row[ids[b, t]] - torch.logsumexp(row, 0))
            assert math.isclose(float(tok.logprobs[b, t - 1]), lp, rel_tol=1e-5)
            if mask[b, t]:
                sums[b] += lp
                counts[b] += 1
    assert torch.allclose(tok.sum(tok.logprobs), torch.tensor(sums, dtype=torch.float32), atol=1e-5)
    assert torch.allclose(tok.mean(tok.logprobs), torch.tensor(
        [s / max(c, 1) for s, c in zip(sums, counts)], dtype=torch.float32), atol=1e-5)
    assert math.isclose(float(tok.token_mean(tok.logprobs)), sum(sums) / sum(counts), rel_tol=1e-5)
    assert tok.mean(tok.logprobs)[2] == 0  # nothing counts in row 2 (token 0 is never a target)


def test_masked_positions_never_count_even_when_not_finite():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 5, generator=g).requires_grad_()
    ids = torch.randint(0, 5, (2, 4), generator=g)
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)
    batch = Batch(extras={keys.TOKEN_IDS: ids, keys.TOKEN_MASK: mask})
    value = sequence.read("o", Views(logits=logits), batch)
    value = value.token_mean(value.logprobs)
    (grad,) = torch.autograd.grad(value, logits)
    # logits[:, t - 1] predicts token t: masked targets t leave their row without gradient
    hidden = ~mask[:, 1:]
    assert (grad[:, :-1][hidden] == 0).all() and (grad[:, :-1][~hidden] != 0).any()
    assert (grad[:, -1] == 0).all()
    spoiled = logits.detach().clone()
    spoiled[:, :-1][hidden] = float("nan")
    again = sequence.read("o", Views(logits=spoiled), batch)
    assert torch.equal(again.token_mean(again.logprobs), value.detach())


def test_errors_name_the_plugin_the_field_and_the_shapes():
    logits, ids = torch.randn(2, 4, 5), torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(sdk.ShapeError, match=r"objective 'asft'.*token_mask.*\[2, 4\], got \[2, 3\]"):
        sequence.read("objective 'asft'", Views(logits=logits),
                      Batch(extras={keys.TOKEN_IDS: ids, keys.TOKEN_MASK: torch.ones(2, 3)}))
    with pytest.raises(sdk.ShapeError, match=r"objective 'o'.*token_ids.*\[2, 4\].*got torch.int64 \[2, 5\]"):
        sequence.read("objective 'o'", Views(logits=logits),
                      Batch(extras={keys.TOKEN_IDS: torch.zeros(2, 5, dtype=torch.long)}))
    with pytest.raises(sdk.RequirementError, match=r"objective 'o'.*token_ids"):
        sequence.read("objective 'o'", Views(logits=logits), Batch())
    with pytest.raises(sdk.ShapeError, match=r"objective 'o'.*\[B, T, V\], got \[2, 5\]"):
        sequence.read("objective 'o'", Views(logits=torch.randn(2, 5)), Batch(extras={keys.TOKEN_IDS: ids}))
    with pytest.raises(sdk.ShapeError, match=r"objective 'o'.*ids in \[0, 5\), got ids in \[0, 9\]"):
        sequence.read("objective 'o'", Views(logits=logits),
                      Batch(extras={keys.TOKEN_IDS: torch.tensor([[0, 9, 1, 1], [0, 0, 0, 0]])}))
    with pytest.raises(sdk.ShapeError, match=r"objective 'o'.*even number of sequences, got 3"):
        sequence.pairs("objective 'o'", torch.zeros(3))
    with pytest.raises(sdk.ShapeError, match=r"Views.logits: expected shape \[B, C\] \(or a sequence's"):
        Views(logits=torch.zeros(2, 3, 4, 5))


class TokenNLL(Objective):
    """SFT's token-level NLL through sdk.sequence; records what it was given."""

    requires = {"logits": True, "extras": (keys.TOKEN_IDS,)}
    batch_coupled = False
    seen: list

    def forward(self, views, batch):
        self.seen = [views.embeddings, tuple(views.logits.shape)]
        tok = sequence.read(f"objective {self.name!r}", views, batch)
        return Loss(value=-tok.token_mean(tok.logprobs))


def _successor_data(n=64, t=10, vocab=12, seed=0):
    """x_{t+1} = x_t + 1 (mod V) from a random start: the next token is a function of the last."""
    g = torch.Generator().manual_seed(seed)
    ids = (torch.randint(0, vocab, (n, 1), generator=g) + torch.arange(t)) % vocab
    return [{"x": row, keys.TOKEN_IDS: row, keys.TOKEN_MASK: torch.ones(t, dtype=torch.bool)}
            for row in ids]


def test_trainer_passes_sequence_logits_and_the_causal_lm_learns():
    torch.manual_seed(0)
    vocab = 12
    enc = sdk.create("encoder", "causal_lm", vocab_size=vocab, max_len=16, embed_dim=16, depth=1)
    obj = TokenNLL()
    loader = torch.utils.data.DataLoader(_successor_data(n=32, vocab=vocab), batch_size=16, shuffle=True)
    trainer = sdk.Trainer(enc, obj, functools.partial(torch.optim.Adam, lr=2e-2), max_steps=25,
                          progress=False)
    before = trainer.evaluate(loader)
    trainer.fit(loader)
    assert obj.seen == [(), (16, 10, vocab)]  # logits only: [B, T, V] is no [B, D] embedding
    after = trainer.evaluate(loader)
    assert set(after) == {"loss"}  # no class accuracy of per-token scores
    assert before["loss"] > 0.9 * math.log(vocab) and after["loss"] < 0.1
    ids = torch.stack([item["x"] for item in _successor_data(n=8, vocab=vocab, seed=1)])
    pred = trainer.predict([{"x": ids}]).argmax(-1)
    assert pred.shape == (8, 10) and torch.equal(pred[:, :-1], ids[:, 1:])


class SeenViews(Callback):
    def __init__(self):
        self.seen = []

    def after_forward(self, state):  # a per-step listener: the Trainer's general loop
        self.seen.append((state.views.embeddings, tuple(state.views.logits.shape)))


def test_the_general_loop_passes_sequence_logits_too():
    enc = sdk.create("encoder", "causal_lm", vocab_size=12, max_len=16, embed_dim=16, depth=1)
    rec = SeenViews()
    loader = torch.utils.data.DataLoader(_successor_data(n=8), batch_size=4)
    sdk.Trainer(enc, TokenNLL(), callbacks=[rec], max_steps=2, progress=False).fit(loader)
    assert rec.seen == [((), (4, 10, 12))] * 2


def test_causal_lm_is_causal_and_checks_its_input():
    torch.manual_seed(0)
    enc = sdk.create("encoder", "causal_lm", vocab_size=9, max_len=8).eval()
    x = torch.randint(0, 9, (3, 8))
    y = x.clone()
    y[:, 5] = (y[:, 5] + 1) % 9
    a, b = enc(x), enc(y)
    assert torch.equal(a[:, :5], b[:, :5]) and not torch.allclose(a[:, 5:], b[:, 5:])
    with pytest.raises(sdk.ShapeError, match=r"causal_lm.*integer token ids \[B, T\], got torch.float32"):
        enc(x.float())
    with pytest.raises(sdk.ShapeError, match=r"causal_lm.*9 tokens per sequence.*max_len=8"):
        enc(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(sdk.ShapeError, match=r"causal_lm.*ids in \[0, 9\), got ids in \[0, 9\]"):
        enc(torch.tensor([[0, 9]]))


class MeanEmbedding(Objective):
    batch_coupled = False

    def forward(self, views, batch):
        return Loss(value=views.embeddings[0].mean())


def test_sequence_output_without_a_logits_objective_is_a_clear_error():
    enc = sdk.create("encoder", "causal_lm", vocab_size=5, max_len=4)
    trainer = sdk.Trainer(enc, MeanEmbedding(), progress=False, max_steps=1)
    ids = torch.randint(0, 5, (4, 4))
    with pytest.raises(Exception, match=r"embeddings\[0\]: expected shape \[B, D\], got \[4, 4, 5\]"):
        trainer.fit([{"x": ids}])
