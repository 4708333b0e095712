"""A tiny causal transformer language model: token ids ``[B, T]`` -> next-token scores ``[B, T, V]``.

Radford et al., "Language Models are Unsupervised Multitask Learners" (GPT-2), 2019: token and
learned position embeddings, pre-norm transformer blocks under a causal mask, a final LayerNorm
and a linear map to the vocabulary. The body of the language-model objectives' tests
(:mod:`sdk.sequence`).
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge, Interval
from torch import Tensor, nn

from sdk.card import Card
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Encoder
from sdk.transformer import transformer_blocks


class CausalLM(Encoder):
    """``logits[:, t] = W LN(h_t)``, ``h`` the blocks' output on ``E[x] + P[:T]`` with every
    position attending to itself and the positions before it only, so ``logits[:, t]`` depends
    on ``x[:, :t + 1]`` alone. ``features(x)`` is ``LN(h)`` ``[B, T, embed_dim]``."""

    sequence = True

    def __init__(self, vocab_size: Annotated[int, Ge(2)] = 32, max_len: Annotated[int, Ge(1)] = 64,
                 embed_dim: Annotated[int, Ge(2)] = 32, depth: Annotated[int, Ge(1)] = 2,
                 heads: Annotated[int, Ge(1)] = 4, mlp_ratio: Annotated[float, Interval(gt=0)] = 2.0,
                 dropout: Annotated[float, Interval(ge=0, lt=1)] = 0.0):
        super().__init__()
        self.vocab_size, self.max_len, self.out_dim = vocab_size, max_len, vocab_size
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.pos = nn.Parameter(torch.zeros(1, max_len, embed_dim))
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = transformer_blocks(embed_dim, depth, heads, mlp_ratio, dropout)
        self.norm = nn.LayerNorm(embed_dim)
        self.lm_head = nn.Linear(embed_dim, vocab_size, bias=False)

    def _check(self, x: Tensor) -> None:
        if x.dim() != 2 or x.is_floating_point() or x.dtype == torch.bool or x.is_complex():
            raise ShapeError(f"encoder 'causal_lm': x must be integer token ids [B, T], got "
                             f"{x.dtype} {list(x.shape)}")
        if not 1 <= x.shape[1] <= self.max_len:
            raise ShapeError(f"encoder 'causal_lm': x holds {x.shape[1]} tokens per sequence, "
                             f"expected 1 to max_len={self.max_len}")

    def features(self, x: Tensor) -> Tensor:
        self._check(x)
        t = x.shape[1]
        try:
            h = self.embed(x)
        except IndexError:  # torch's CPU message does not say which input; say it (a sync, once)
            low, high = (int(v) for v in torch.aminmax(x))
            raise ShapeError(f"encoder 'causal_lm': x must hold token ids in [0, {self.vocab_size}), "
                             f"got ids in [{low}, {high}]") from None
        causal = nn.Transformer.generate_square_subsequent_mask(t, device=x.device, dtype=h.dtype)
        h = self.blocks(h + self.pos[:, :t].to(h.dtype), mask=causal, is_causal=True)
        return self.norm(h)

    def forward(self, x: Tensor) -> Tensor:
        return self.lm_head(self.features(x))


CARD = Card(
    name="causal_lm", kind="encoder", title="Language Models are Unsupervised Multitask Learners (GPT-2)",
    paper="https://cdn.openai.com/better-language-models/language_models_are_unsupervised_multitask_learners.pdf",
    summary="A tiny causal transformer language model: token ids [B, T] to next-token scores "
            "[B, T, V] (logits[:, t] scores token t + 1 and sees tokens up to t only); the model "
            "the language-model objectives (sdk.sequence) are trained and tested on.",
    formula="h_0 = E[x] + P[:T]; h_l = h_{l-1} + MSA_causal(LN(h_{l-1})) + MLP(LN(.)); "
            "logits = W LN(h_L) (position t attends to positions <= t)",
    left_out="GPT-2's scale (tiny defaults: 2 blocks of width 32, 4 heads, 32 tokens, 64 "
             "positions), its byte-pair tokenizer, weight tying of the output layer to the token "
             "embedding, the residual-projection initialisation and generation utilities "
             "(sampling, caching).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(CausalLM, card=CARD)
