"""T-JEPA: predict the latent of one subset of a table's features from the latent of another.

Thimonier, De Melo Costa, Popineau, Rimmel and Doan, "T-JEPA: Augmentation-Free Self-Supervised
Learning for Tabular Data", ICLR 2025 (arXiv:2410.05016).

Three pieces, registered under one name:

* the transform draws the context: per batch ``n_c = round(F c_min) + round((round(F c_max) -
  round(F c_min)) u)``, ``u ~ U(0, 1)``, then ``n_c`` features per sample uniformly; the input is
  marked with them (:func:`sdk.masking.visible`), so a token encoder (``sequence_transformer``
  with one feature per token) encodes the context only;
* the teacher is the target encoder: an EMA copy of the encoder (momentum 0.996 -> 1, linear)
  whose output on a view is its tokens ``[B, 1 + F, D]`` of the *whole* row;
* the objective draws ``num_targets`` target subsets of ``n_t`` features each (``n_t`` as
  ``n_c`` from the target shares) among the features outside the context, and regresses the
  target encoder's tokens of each subset from the context tokens through a transformer
  predictor (I-JEPA's: the context tokens with their positions, one mask token plus the
  position per target feature).
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge, Interval
from torch import Tensor, nn

from sdk import keys
from sdk.card import Card
from sdk.context import FromData
from sdk.errors import ConfigError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective, Transform
from sdk.masking import check_mask, gather_tokens, mask_from_keys, split_visible, visible
from sdk.momentum import EMATeacher, linear_momentum
from sdk.transformer import MaskedDecoder
from sdk.types import Batch, Loss, Views

Share = Annotated[float, Interval(gt=0, lt=1)]


def subset_size(num_features: int, low: float, high: float) -> int:
    """The authors' count of a subset: ``round(F low) + round((round(F high) - round(F low)) u)``
    with ``u ~ U(0, 1)`` drawn on the host (one count per batch, so every row's subset has it)."""
    lo, hi = round(num_features * low), round(num_features * high)
    return lo + round((hi - lo) * float(torch.rand(())))


def _check_shares(owner: str, num_features: int, low: float, high: float, what: str) -> None:
    if low > high:
        raise ConfigError(f"{owner}: min_{what}_share={low} exceeds max_{what}_share={high}",
                          param=f"min_{what}_share")
    if round(num_features * low) < 1:
        raise ConfigError(f"{owner}: min_{what}_share={low} of {num_features} features rounds to "
                          "an empty subset", param=f"min_{what}_share")


def draw_targets(mask: Tensor, num_targets: int, size: int) -> Tensor:
    """``[num_targets, B, size]`` feature ids: for each target subset and row, ``size`` of the
    row's hidden features (``mask [B, F]``, 1 = outside the context) drawn uniformly without
    replacement (subsets may overlap one another, as the authors')."""
    noise = torch.rand(num_targets, *mask.shape, device=mask.device)
    return torch.argsort(noise - 2 * mask.float(), dim=-1)[..., :size]


def t_jepa_loss(prediction: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """``(value, per_sample)``: the mean squared error of ``prediction`` against the detached
    ``target`` (both ``[T, B, n, D]``), averaged over the subsets, features and coordinates
    (``torch.nn.MSELoss``, the authors' loss), and per row."""
    err = (prediction.float() - target.detach().float()).pow(2)
    per_sample = err.mean(dim=(0, 2, 3))
    return per_sample.mean(), per_sample


class TJEPAMasking(Transform):
    """``(x, batch) -> (visible(x, context ids), batch + mask)``: rows ``[B, F]`` keep a context
    of ``n_c`` features (one count per batch, drawn from the shares, uniform features per row);
    ``Batch.extras`` gains :data:`sdk.keys.MASK` ``[B, F]`` (1 = outside the context) and
    :data:`sdk.keys.IDS_RESTORE`."""

    _plugin_name = "t_jepa"

    def __init__(self, num_features: Annotated[int, Ge(2), FromData("in_dim")] = 16,
                 min_context_share: Share = 0.2, max_context_share: Share = 0.4):
        super().__init__()
        _check_shares("t_jepa", num_features, min_context_share, max_context_share, "context")
        if round(num_features * max_context_share) >= num_features:
            raise ConfigError(f"t_jepa: max_context_share={max_context_share} leaves no feature of "
                              f"{num_features} to predict", param="max_context_share")
        self.num_features = num_features
        self.min_context_share, self.max_context_share = min_context_share, max_context_share

    def forward(self, x: Tensor, batch: Batch) -> tuple[Tensor, Batch]:
        x, _ = split_visible(x)
        if x.dim() != 2 or x.shape[1] != self.num_features or not x.is_floating_point():
            raise ShapeError(f"transform 't_jepa': x must be floating rows [B, {self.num_features}] "
                             f"(one value per feature), got {x.dtype} {list(x.shape)}")
        n_context = subset_size(self.num_features, self.min_context_share, self.max_context_share)
        m = mask_from_keys(torch.rand(x.shape[0], self.num_features, device=x.device),
                           self.num_features - n_context)
        extras = {**batch.extras, keys.MASK: m.mask, keys.IDS_RESTORE: m.ids_restore}
        return visible(x, m.ids_keep), batch.evolve(extras=extras)

    def example_inputs(self, batch_size: int, generator: torch.Generator):
        return (torch.randn(batch_size, self.num_features, generator=generator),
                Batch(index=torch.arange(batch_size)))


class TJEPATarget(EMATeacher):
    """T-JEPA's target encoder: an EMA copy of the encoder (momentum 0.996 -> 1 on the authors'
    *linear* schedule) whose output on a view is the copy's tokens ``features(x)`` of the whole
    row, ``[B, 1 + F, D]``: a context mark on the view is dropped, so it sees every feature (a
    module without ``features``: its output, which the objective refuses unless it is tokens)."""

    _plugin_name = "t_jepa"
    schedule = staticmethod(linear_momentum)

    def __init__(self, student: nn.Module | None = None,
                 momentum: Annotated[float, Interval(ge=0, le=1)] = 0.996,
                 final_momentum: Annotated[float, Interval(ge=0, le=1)] = 1.0):
        super().__init__(student=student, momentum=momentum, final_momentum=final_momentum)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        target = self._require_target()
        x, _ = split_visible(x)
        features = getattr(target, "features", None)
        return target(x) if features is None else features(x)


class TJEPA(Objective):
    """The T-JEPA objective and its predictor. Takes the context encoder's tokens
    ``Views.extras[keys.FEATURES]`` ``[B, 1 + K, embed_dim]`` (the class token, T-JEPA's
    regularisation token, first; the ``K`` context features in ``ids_keep`` order), the target
    encoder's tokens ``Views.extras[keys.TEACHER]`` ``[B, 1 + F, embed_dim]`` (the ``t_jepa``
    teacher) and the context mask from the ``t_jepa`` transform (``Batch.extras`` mask and
    ids_restore). For each of ``num_targets`` subsets of ``n_t`` features outside the context,
    the predictor (:class:`sdk.transformer.MaskedDecoder`'s embedding, sine-cosine positions,
    mask token, blocks, LayerNorm and output projection back to ``embed_dim``) reads the context
    tokens and one mask token per target feature, and its outputs there regress the target
    tokens: ``L = mean ||g(s_x, m_T) - sg(s_y[T])||^2``."""

    _plugin_name = "t_jepa"
    requires = {"views": 1, "extras": (keys.FEATURES, keys.TEACHER, keys.MASK, keys.IDS_RESTORE)}
    batch_coupled = False

    def __init__(self, num_features: Annotated[int, Ge(2), FromData("in_dim")] = 16,
                 embed_dim: Annotated[int, Ge(1)] = 64, num_targets: Annotated[int, Ge(1)] = 4,
                 min_target_share: Share = 0.2, max_target_share: Share = 0.4,
                 predictor_dim: Annotated[int, Ge(2)] = 64, predictor_depth: Annotated[int, Ge(1)] = 2,
                 predictor_heads: Annotated[int, Ge(1)] = 4,
                 mlp_ratio: Annotated[float, Interval(gt=0)] = 4.0):
        super().__init__()
        _check_shares("t_jepa", num_features, min_target_share, max_target_share, "target")
        self.num_features, self.embed_dim, self.num_targets = num_features, embed_dim, num_targets
        self.min_target_share, self.max_target_share = min_target_share, max_target_share
        self.predictor = MaskedDecoder(embed_dim, embed_dim, (num_features,), dim=predictor_dim,
                                       depth=predictor_depth, heads=predictor_heads,
                                       mlp_ratio=mlp_ratio)

    def predict(self, tokens: Tensor, ids_keep: Tensor, targets: Tensor) -> Tensor:
        """``[T, B, n, embed_dim]``: the predictor's outputs at the ``targets [T, B, n]`` feature
        ids from the context ``tokens [B, 1 + K, D]`` at ``ids_keep [B, K]``; each subset is its own
        sequence ``[reg; context; mask tokens]`` (context tokens of other subsets never mix)."""
        p = self.predictor
        pos = p.pos[0].to(tokens.dtype)  # [1 + F, P], the class token's position zero
        h = p.embed(tokens)
        b, k = ids_keep.shape
        reg = torch.zeros(b, 1, dtype=ids_keep.dtype, device=ids_keep.device)
        ctx = h + pos[torch.cat([reg, ids_keep + 1], dim=1)]
        queries = p.mask_token.to(h.dtype) + pos[targets + 1]  # [T, B, n, P]
        t, _, n = targets.shape
        seq = torch.cat([ctx.expand(t, -1, -1, -1), queries], dim=2).flatten(0, 1)
        return p.head(seq)[:, k:].reshape(t, b, n, -1)

    def forward(self, views: Views, batch: Batch) -> Loss:
        owner = "objective 't_jepa'"
        f, d = self.num_features, self.embed_dim
        tokens, target = (views.extras[key] for key in (keys.FEATURES, keys.TEACHER))
        tokens = tokens[0] if isinstance(tokens, (tuple, list)) else tokens
        target = target[0] if isinstance(target, (tuple, list)) else target
        mask, ids_restore = batch.extras[keys.MASK], batch.extras[keys.IDS_RESTORE]
        check_mask(owner, ids_restore, mask, f)
        b = ids_restore.shape[0]
        if not isinstance(target, Tensor) or target.shape != (b, 1 + f, d) \
                or not target.is_floating_point():
            shape = list(target.shape) if isinstance(target, Tensor) else type(target).__name__
            raise ShapeError(f"{owner}: Views.extras[{keys.TEACHER!r}] must be the target encoder's "
                             f"tokens of every feature, floating [{b}, {1 + f}, {d}] (the t_jepa "
                             f"teacher), got {shape}")
        if not isinstance(tokens, Tensor) or tokens.dim() != 3 or tokens.shape[0] != b \
                or tokens.shape[2] != d or not tokens.is_floating_point() or tokens.shape[1] > f:
            shape = list(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
            raise ShapeError(f"{owner}: Views.extras[{keys.FEATURES!r}] must be the context "
                             f"encoder's tokens, floating [{b}, 1 + K, {d}] with K < {f} context "
                             f"features (the t_jepa transform marks them), got {shape}")
        k = tokens.shape[1] - 1
        ids_keep = torch.argsort(ids_restore, dim=1)[:, :k]
        n_t = subset_size(f, self.min_target_share, self.max_target_share)
        if n_t > f - k:
            raise ShapeError(f"{owner}: {n_t} target features drawn but only {f - k} of {f} lie "
                             f"outside the context of {k}; lower max_target_share or the "
                             "transform's max_context_share")
        targets = draw_targets(mask, self.num_targets, n_t)
        if not torch.is_autocast_enabled(tokens.device.type):  # bf16 tokens, float32 predictor
            tokens = tokens.to(self.predictor.embed.weight.dtype)
        prediction = self.predict(tokens, ids_keep, targets)
        wanted = gather_tokens(target[:, 1:].expand(self.num_targets, -1, -1, -1).flatten(0, 1),
                               targets.flatten(0, 1)).view_as(prediction)
        value, per_sample = t_jepa_loss(prediction, wanted)
        return Loss(value=value, per_sample=per_sample)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        """Context tokens of ``round(0.3 F)`` features, the target tokens of all ``F``, the mask."""
        f = self.num_features
        m = mask_from_keys(torch.rand(batch_size, f, generator=generator), f - round(0.3 * f))
        tokens = torch.randn(batch_size, 1 + m.ids_keep.shape[1], self.embed_dim,
                             generator=generator).requires_grad_()
        target = torch.randn(batch_size, 1 + f, self.embed_dim, generator=generator)
        views = Views(embeddings=(tokens[:, 0].detach(),), extras={keys.FEATURES: (tokens,),
                                                          keys.TEACHER: (target,)})
        return views, Batch(index=torch.arange(batch_size),
                            extras={keys.MASK: m.mask, keys.IDS_RESTORE: m.ids_restore})


_TITLE = "T-JEPA: Augmentation-Free Self-Supervised Learning for Tabular Data"
_PAPER = "arXiv:2410.05016"
CARD = Card(
    name="t_jepa", kind="objective", title=_TITLE, paper=_PAPER,
    summary="Predict the target encoder's latent tokens of subsets of a row's features from the "
            "context encoder's tokens of another subset (no augmentations); with the t_jepa "
            "transform (context) and teacher (EMA target encoder).",
    formula="x -> context C (|C| = n_c) and subsets T_1..T_4 outside C (|T_j| = n_t), "
            "n = round(F s_min) + round((round(F s_max) - round(F s_min)) u); "
            "s_x = f_theta(x_C) (with the [REG] token), s_y = f_theta'(x) (all F); "
            "L = mean_j ||g_phi([s_x + p_C; m + p_{T_j}])_{T_j} - sg(s_y)_{T_j}||^2; "
            "theta' <- tau theta' + (1 - tau) theta, tau: 0.996 -> 1 linear",
    left_out="The encoder is sequence_transformer with one feature per token (seq_len = F, "
             "in_features = 1): its tokens are x_j w + b + p_j with one shared w, b and fixed "
             "positions (the authors' tokenizer has a weight and bias per feature, and embeddings "
             "for categorical columns: one-hot them into numerical ones here). Its class token is "
             "the one regularisation token (the authors' default n_cls_tokens = 1). The predictor "
             "uses pre-norm blocks without dropout (the authors' 0.1 dropout, post-norm). The "
             "authors' MLP predictor variant, the per-dataset tuned shares and depths, and "
             "the downstream models (MLP, ResNet, FT-Transformer, GBDT on the embeddings) are "
             "not here.",
)
TRANSFORM_CARD = Card(
    name="t_jepa", kind="transform", title=_TITLE, paper=_PAPER,
    summary="T-JEPA's context: each row keeps n_c of its F features (n_c drawn once per batch "
            "from the context shares 0.2-0.4) and is marked with them for a token encoder.",
    formula="n_c = round(0.2 F) + round((round(0.4 F) - round(0.2 F)) u); "
            "keep = argsort(U(0,1)^{B x F})[:, :n_c]; mask = 1 outside keep",
    left_out="Only numerical features (one value per column); one context subset (the authors' "
             "default num_encs = 1).",
)
TEACHER_CARD = Card(
    name="t_jepa", kind="teacher", title=_TITLE, paper=_PAPER,
    summary="T-JEPA's target encoder: an EMA copy of the encoder publishing its tokens of every "
            "feature of the whole row (the context mark dropped).",
    formula="theta' <- tau_k theta' + (1 - tau_k) theta, tau_k = 0.996 + (1 - 0.996) k / K; "
            "extras['teacher'][v] = features_theta'(x_v without its mark)",
    left_out="The momentum moves per optimizer step over the fit's steps (the authors' per "
             "iteration over epochs x iterations).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(TJEPA, card=CARD)
    registry.add(TJEPAMasking, card=TRANSFORM_CARD)
    registry.add(TJEPATarget, card=TEACHER_CARD)
