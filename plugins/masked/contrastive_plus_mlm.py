"""w2v-BERT: at every masked position, identify the quantised target among the sample's other
masked targets (wav2vec 2.0's contrastive task, with its codebook diversity loss) and predict the
target's code id (masked language modelling on the discretised input), jointly.

Chung et al., "W2v-BERT: Combining Contrastive Learning and Masked Language Modeling for
Self-Supervised Speech Pre-Training", ASRU 2021 (arXiv:2108.06209); the quantiser, contrastive
and diversity losses are wav2vec 2.0's (Baevski et al., NeurIPS 2020, arXiv:2006.11477).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt
from torch import Tensor, nn

from sdk import keys
from sdk.card import Card
from sdk.distributed import Gather, gather_with_grad, resolve_gather, world_size
from sdk.errors import ConfigError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.masking import gather_tokens, hidden_ids, random_mask
from sdk.transformer import MaskedDecoder, masked_tokens, transformer_blocks
from sdk.types import Batch, Loss, Views


def quantize(logits: Tensor, codebook: Tensor, *, tau: float | None) -> tuple[Tensor, Tensor]:
    """``(q, ids)`` for code logits ``[..., V]`` and a codebook ``[V, D]``: with ``tau`` (training)
    the hard Gumbel-softmax choice ``one_hot(argmax(logits + g))`` with the gradient of the soft
    ``softmax((logits + g) / tau)`` (straight-through), ``g`` Gumbel noise; with ``tau=None``
    (evaluation) ``one_hot(argmax(logits))``. ``q = choice @ codebook``; ``ids`` the chosen
    codes."""
    if tau is None:
        choice = F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    else:
        choice = F.gumbel_softmax(logits, tau=tau, hard=True)
    return choice @ codebook.to(choice.dtype), choice.argmax(-1)


def diversity_loss(probs: Tensor) -> Tensor:
    """wav2vec 2.0's codebook diversity ``(V - exp(H(p_bar))) / V`` of the code probabilities
    ``probs [N, V]`` (softmax of the logits without noise), ``p_bar`` their mean over rows."""
    p_bar = probs.mean(0)
    perplexity = torch.exp(-(p_bar * torch.log(p_bar.clamp_min(1e-12))).sum())
    return (probs.shape[1] - perplexity) / probs.shape[1]


def contrastive_mlm_terms(c: Tensor, q: Tensor, mlm_logits: Tensor, ids: Tensor,
                          temperature: float = 0.1) -> tuple[Tensor, Tensor, Tensor]:
    """``(contrastive, mlm, accuracy)``, each ``[B]``, over the ``M`` masked positions of each
    sample: context vectors ``c [B, M, D]``, quantised targets ``q [B, M, D]``, MLM logits
    ``[B, M, V]`` and the targets' code ids ``[B, M]``. Contrastive: ``-(1/M) sum_t log
    softmax_t'(cos(c_t, q_t') / temperature)[t]`` (the distractors are the sample's other masked
    targets); MLM: ``(1/M) sum_t CE(mlm_logits_t, ids_t)``; accuracy of the contrastive choice."""
    dtype = torch.promote_types(c.dtype, torch.float32)
    sim = F.normalize(c.to(dtype), dim=-1) @ F.normalize(q.to(dtype), dim=-1).transpose(1, 2)
    logits = sim / temperature  # [B, M, M]: context t, target t'
    own = torch.arange(logits.shape[1], device=logits.device).expand(logits.shape[0], -1)
    contrastive = F.cross_entropy(logits.transpose(1, 2), own, reduction="none").mean(1)
    mlm = F.cross_entropy(mlm_logits.to(dtype).transpose(1, 2), ids, reduction="none").mean(1)
    accuracy = (logits.argmax(2) == own).to(dtype).mean(1)
    return contrastive, mlm, accuracy


class ContrastivePlusMLM(Objective):
    """A token encoder's visible tokens (``Views.extras[keys.FEATURES]`` ``[B, 1 + K,
    embed_dim]``, masked by ``patch_masking``; ``sequence_transformer`` over frames, or ``vit``)
    go through this objective's :class:`sdk.transformer.MaskedDecoder` (mask tokens at the hidden
    positions) to context vectors ``c_t`` (the contrastive module's output), and through
    ``mlm_depth`` further transformer blocks and a linear layer to MLM logits over the codebook
    (the MLM module). The raw patches :data:`~sdk.keys.RECONSTRUCTION_TARGET` at the hidden
    positions are quantised (a linear layer to ``codebook_size`` logits, :func:`quantize`, one
    codebook of ``code_dim`` vectors) into targets ``q_t`` and code ids. Loss per sample:
    ``contrastive + diversity_weight * diversity + mlm_weight * mlm``
    (:func:`contrastive_mlm_terms`, :func:`diversity_loss`), the diversity taken over every hidden
    position of the (gathered, under DDP) batch. Each sample needs at least two hidden
    positions."""

    requires = {"views": 1, "extras": (keys.FEATURES, keys.MASK, keys.IDS_RESTORE,
                                       keys.RECONSTRUCTION_TARGET)}
    batch_coupled = True

    def __init__(self, num_tokens: Annotated[int, Ge(2)] = 16,
                 grid: tuple[int, ...] | list[int] = (4, 4), patch_dim: Annotated[int, Ge(1)] = 4,
                 embed_dim: Annotated[int, Ge(1)] = 64, code_dim: Annotated[int, Ge(1)] = 16,
                 codebook_size: Annotated[int, Ge(2)] = 64,
                 temperature: Annotated[float, Gt(0)] = 0.1,
                 gumbel_temperature: Annotated[float, Gt(0)] = 2.0,
                 diversity_weight: Annotated[float, Ge(0)] = 0.1,
                 mlm_weight: Annotated[float, Ge(0)] = 1.0,
                 decoder_dim: Annotated[int, Ge(4)] = 32, decoder_depth: Annotated[int, Ge(1)] = 1,
                 mlm_depth: Annotated[int, Ge(1)] = 1, decoder_heads: Annotated[int, Ge(1)] = 4,
                 gather: Gather = "auto"):
        super().__init__()
        grid = tuple(int(s) for s in grid)
        if not grid or min(grid) < 1 or torch.Size(grid).numel() != num_tokens:
            raise ConfigError(f"contrastive_plus_mlm: grid {grid} does not hold "
                              f"num_tokens={num_tokens} tokens", param="grid")
        self.num_tokens, self.patch_dim, self.embed_dim = num_tokens, patch_dim, embed_dim
        self.temperature, self.gumbel_temperature = temperature, gumbel_temperature
        self.diversity_weight, self.mlm_weight, self.gather = diversity_weight, mlm_weight, gather
        self.decoder = MaskedDecoder(embed_dim, decoder_dim, grid, dim=decoder_dim,
                                     depth=decoder_depth, heads=decoder_heads)
        self.project = nn.Linear(decoder_dim, code_dim)
        self.mlm_blocks = transformer_blocks(decoder_dim, mlm_depth, decoder_heads, 4.0)
        self.mlm_head = nn.Linear(decoder_dim, codebook_size)
        self.code_logits = nn.Linear(patch_dim, codebook_size)
        self.codebook = nn.Parameter(torch.empty(codebook_size, code_dim).uniform_())

    def forward(self, views: Views, batch: Batch) -> Loss:
        owner = "objective 'contrastive_plus_mlm'"
        tokens, ids_restore, mask, patches = masked_tokens(
            owner, views, batch, width=self.embed_dim, length=self.num_tokens,
            target_dim=self.patch_dim)
        n_visible = tokens.shape[1] - 1
        if self.num_tokens - n_visible < 2:
            raise ShapeError(f"{owner}: {self.num_tokens - n_visible} hidden position per sample; "
                             "the contrastive term picks each target among the others, so at "
                             "least 2 must be hidden")
        if not torch.is_autocast_enabled(tokens.device.type):
            tokens = tokens.to(self.decoder.embed.weight.dtype)
        h = self.decoder(tokens, ids_restore)  # [B, L, decoder_dim]: the context
        hidden = hidden_ids(ids_restore, n_visible)
        c = self.project(gather_tokens(h, hidden))
        mlm_logits = gather_tokens(self.mlm_head(self.mlm_blocks(h)), hidden)
        logits = self.code_logits(gather_tokens(patches.to(h.dtype), hidden))  # [B, M, V]
        q, ids = quantize(logits, self.codebook,
                          tau=self.gumbel_temperature if self.training else None)
        contrastive, mlm, acc = contrastive_mlm_terms(c, q, mlm_logits, ids, self.temperature)
        # [B, V]: each sample's mean code probability
        probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(-1).mean(1)
        if resolve_gather(self.gather) and world_size() > 1:
            probs = gather_with_grad(probs)
        diversity = diversity_loss(probs)
        per_sample = contrastive + self.mlm_weight * mlm + self.diversity_weight * diversity
        return Loss(value=per_sample.mean(), per_sample=per_sample,
                    logs={"contrastive": contrastive.mean().detach(), "mlm": mlm.mean().detach(),
                          "diversity": diversity.detach(), "accuracy": acc.mean().detach()})

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        m = random_mask(batch_size, self.num_tokens, 0.5, generator=generator)
        tokens = torch.randn(batch_size, 1 + m.ids_keep.shape[1], self.embed_dim,
                             generator=generator).requires_grad_()
        views = Views(embeddings=(tokens[:, 0].detach(),), extras={keys.FEATURES: (tokens,)})
        batch = Batch(index=torch.arange(batch_size), extras={
            keys.MASK: m.mask, keys.IDS_RESTORE: m.ids_restore,
            keys.RECONSTRUCTION_TARGET: torch.rand(batch_size, self.num_tokens, self.patch_dim,
                                                   generator=generator)})
        return views, batch


CARD = Card(
    name="contrastive_plus_mlm", kind="objective",
    title="W2v-BERT: Combining Contrastive Learning and Masked Language Modeling for "
          "Self-Supervised Speech Pre-Training",
    paper="arXiv:2108.06209",
    summary="Masked prediction with two chained tasks: the contrastive module's context vectors "
            "identify each masked position's quantised target among the sample's other masked "
            "targets (wav2vec 2.0, with its codebook diversity loss), and the MLM module on top "
            "predicts the targets' discrete code ids (cross-entropy).",
    formula="q_t, k_t = Quantize(W x_t) (hard Gumbel-softmax, one codebook); "
            "L_c = -(1/M) sum_t log(exp(cos(c_t, q_t)/k) / sum_t' exp(cos(c_t, q_t')/k)), k = 0.1; "
            "L_d = (V - exp(H(mean softmax(W x)))) / V; L_m = (1/M) sum_t CE(MLM(c)_t, k_t); "
            "L = L_c + 0.1 L_d + L_m",
    left_out="The conformer feature encoder and modules, speech (LibriLight) and fine-tuning "
             "are not here: a token encoder over patches, a transformer decoder (mask tokens "
             "restored, MAE style, where w2v-BERT's encoder sees the masked frames) as the "
             "contrastive module and transformer blocks as the MLM module. wav2vec 2.0 samples "
             "100 distractors from the utterance's masked frames; here every other masked "
             "position of the sample is a distractor. The quantiser reads the raw patches and "
             "chooses a code by the argmax of learned logits (hard Gumbel-softmax in training), "
             "not by nearest codeword as the catalogue said; its codebook of 64 (w2v-BERT: 1024) "
             "and the fixed Gumbel temperature 2 (wav2vec 2.0 anneals 2 -> 0.5) are this "
             "module's defaults; the MLM targets come from the same quantiser, as in the paper, "
             "with loss weights 1 and the diversity weight 0.1 of wav2vec 2.0.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(ContrastivePlusMLM, card=CARD)
