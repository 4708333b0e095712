"""Patches, masks and masked reconstruction: the bookkeeping of masked modelling.

* **Patches.** :func:`patchify` / :func:`unpatchify` turn images ``[B, C, H, W]`` into
  ``[B, L, p*p*C]`` patch vectors (row-major over the ``H/p x W/p`` grid, each patch ordered
  ``(row, column, channel)`` as MAE's and lightly's ``patchify``) and back;
  :func:`patchify_sequence` / :func:`unpatchify_sequence` do the same for sequences
  ``[B, T, D]`` (spectrogram frames, EEG channels, tokens) in runs of ``p`` steps.
* **Masks.** A :class:`Mask` holds ``ids_keep [B, K]`` (the visible tokens, in the order the
  encoder sees them), ``ids_restore [B, L]`` (where each token sits in ``[visible..., masked...]``,
  so gathering by it restores the original order) and ``mask [B, L]`` (1 = masked, in the
  original order). :func:`random_mask` is MAE's per-sample masking (argsort of uniform noise),
  :func:`block_mask` masks rectangles of patches (BEiT's block-wise masking, drawn in parallel),
  :func:`score_mask` masks the highest-scoring patches (hard-patch mining). Every one masks
  exactly ``round(L * ratio)`` tokens of every sample, so the visible tokens form one dense
  ``[B, K, D]`` tensor, and none reads a value on the host.
* **The encoder's view of a mask.** :class:`Visible` marks an input tensor with the ids of the
  tokens an encoder should see (``vit``, ``sequence_transformer``); a masking transform
  (``patch_masking``) returns it and writes the mask and the reconstruction target into
  ``Batch.extras`` (:data:`sdk.keys.MASK`, :data:`sdk.keys.IDS_RESTORE`,
  :data:`sdk.keys.RECONSTRUCTION_TARGET`).
* **Tokens.** :func:`gather_tokens` keeps the visible tokens; :func:`restore_tokens` appends a
  mask token for every hidden one and puts all back in the original order.
* **Targets and loss.** :func:`normalized_patches` is MAE's ``norm_pix_loss`` target (each
  patch standardised by its own mean and unbiased variance); :func:`masked_mse` averages the
  squared error over masked positions only, :func:`masked_mean` any per-token error.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import Tensor

from sdk.errors import ConfigError, ShapeError


def _shape(x: Tensor) -> list[int]:
    return list(x.shape)


# patches ------------------------------------------------------------------------------------
def patchify(images: Tensor, patch: int) -> Tensor:
    """``[B, C, H, W] -> [B, (H/p)(W/p), p*p*C]``; ``H`` and ``W`` must be multiples of ``p``."""
    if images.dim() != 4:
        raise ShapeError(f"patchify: images must be [B, C, H, W], got {_shape(images)}")
    b, c, h, w = images.shape
    if patch < 1 or h % patch or w % patch:
        raise ShapeError(f"patchify: the image's {h}x{w} pixels are not a multiple of the patch "
                         f"size {patch}")
    gh, gw = h // patch, w // patch
    x = images.reshape(b, c, gh, patch, gw, patch).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, gh * gw, patch * patch * c)


def unpatchify(patches: Tensor, patch: int, image_shape: tuple[int, int, int]) -> Tensor:
    """The inverse of :func:`patchify`: ``[B, L, p*p*C] -> [B, C, H, W]`` for ``image_shape =
    (C, H, W)``."""
    c, h, w = image_shape
    if patches.dim() != 3 or h % patch or w % patch or patches.shape[1:] != (
            (h // patch) * (w // patch), patch * patch * c):
        raise ShapeError(f"unpatchify: patches of {patch}x{patch} pixels of a {c}x{h}x{w} image "
                         f"must be [B, {(h // patch) * (w // patch)}, {patch * patch * c}], got "
                         f"{_shape(patches)}")
    b = patches.shape[0]
    x = patches.reshape(b, h // patch, w // patch, patch, patch, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, h, w)


def patchify_sequence(x: Tensor, patch: int) -> Tensor:
    """``[B, T, D] -> [B, T/p, p*D]``: runs of ``p`` consecutive steps (``T`` a multiple of ``p``)."""
    if x.dim() != 3 or patch < 1 or x.shape[1] % patch:
        raise ShapeError(f"patchify_sequence: x must be [B, T, D] with T a multiple of {patch}, "
                         f"got {_shape(x)}")
    b, t, d = x.shape
    return x.reshape(b, t // patch, patch * d)


def unpatchify_sequence(patches: Tensor, patch: int) -> Tensor:
    """The inverse of :func:`patchify_sequence`: ``[B, L, p*D] -> [B, L*p, D]``."""
    if patches.dim() != 3 or patch < 1 or patches.shape[2] % patch:
        raise ShapeError(f"unpatchify_sequence: patches must be [B, L, {patch}*D], got "
                         f"{_shape(patches)}")
    b, n, pd = patches.shape
    return patches.reshape(b, n * patch, pd // patch)


# masks ------------------------------------------------------------------------------------
@attrs.frozen
class Mask:
    """Which tokens of each sample are visible: ``ids_keep [B, K]``, ``ids_restore [B, L]``,
    ``mask [B, L]`` (1.0 where masked, original order)."""

    ids_keep: Tensor
    ids_restore: Tensor
    mask: Tensor

    @property
    def length(self) -> int:
        return self.ids_restore.shape[1]


def n_masked(length: int, ratio: float) -> int:
    """How many of ``length`` tokens a ratio masks: ``round(length * ratio)``, leaving at least one
    visible (MAE: ``len_keep = int(L (1 - ratio))``; the two agree whenever ``L * ratio`` is whole)."""
    if not 0 <= ratio < 1:
        raise ConfigError(f"masking: mask ratio must be in [0, 1), got {ratio}", param="mask_ratio")
    return min(int(round(length * ratio)), length - 1)


def mask_from_keys(keys: Tensor, n_mask: int) -> Mask:
    """The mask that hides the ``n_mask`` tokens of largest ``keys [B, L]`` in each row (ties in
    index order): the one sort every masking strategy ends in."""
    ids_shuffle = torch.argsort(keys, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    n_keep = keys.shape[1] - n_mask
    mask = (ids_restore >= n_keep).to(keys.dtype if keys.is_floating_point() else torch.float32)
    return Mask(ids_keep=ids_shuffle[:, :n_keep], ids_restore=ids_restore, mask=mask)


def _noise(batch: int, length: int, generator: torch.Generator | None,
           device: torch.device | str | None) -> Tensor:
    if generator is not None:
        return torch.rand(batch, length, generator=generator,
                          device=generator.device).to(device or generator.device)
    return torch.rand(batch, length, device=device)


def random_mask(batch: int, length: int, ratio: float, *, generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> Mask:
    """MAE's per-sample random masking: each sample hides ``n_masked(length, ratio)`` tokens
    chosen uniformly (argsort of uniform noise)."""
    return mask_from_keys(_noise(batch, length, generator, device), n_masked(length, ratio))


def block_mask(batch: int, grid: tuple[int, int], ratio: float, *, blocks: int = 4,
               min_side: float = 0.2, max_side: float = 0.6,
               generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> Mask:
    """Block-wise masking over a ``grid = (rows, columns)`` of patches (BEiT's, drawn in parallel):
    ``blocks`` rectangles per sample, each side a uniform fraction in ``[min_side, max_side]``
    of the grid's, at uniform positions; patches covered by more rectangles are masked first,
    ties broken at random, so exactly ``n_masked(rows * columns, ratio)`` are masked (BEiT adds
    rectangles one at a time until the count is reached; here the count is met by ranking)."""
    gh, gw = grid
    if not 0 < min_side <= max_side <= 1:
        raise ConfigError(f"block_mask: need 0 < min_side <= max_side <= 1, got {min_side}, "
                          f"{max_side}", param="min_side")
    u = _noise(batch, 4 * blocks + gh * gw, generator, device)
    sides, starts, ties = u[:, :2 * blocks], u[:, 2 * blocks:4 * blocks], u[:, 4 * blocks:]
    frac = min_side + (max_side - min_side) * sides.view(batch, blocks, 2)
    size = torch.stack([frac[..., 0] * gh, frac[..., 1] * gw], -1).ceil()  # [B, n, 2] rows, cols
    extent = torch.tensor([gh, gw], device=u.device, dtype=u.dtype)
    top_left = ((extent - size + 1) * starts.view(batch, blocks, 2)).floor()
    rows = torch.arange(gh, device=u.device, dtype=u.dtype).view(1, 1, gh, 1)
    cols = torch.arange(gw, device=u.device, dtype=u.dtype).view(1, 1, 1, gw)
    r0, c0 = top_left[..., 0, None, None], top_left[..., 1, None, None]
    inside = ((rows >= r0) & (rows < r0 + size[..., 0, None, None])
              & (cols >= c0) & (cols < c0 + size[..., 1, None, None]))
    cover = inside.sum(1).flatten(1).to(u.dtype)  # [B, L] rectangles covering each patch
    return mask_from_keys(cover + ties, n_masked(gh * gw, ratio))


def score_mask(scores: Tensor, ratio: float, *, hard_fraction: float = 1.0,
               generator: torch.Generator | None = None) -> Mask:
    """Score-guided masking: of the ``n_masked(L, ratio)`` masked tokens of each row of
    ``scores [B, L]``, ``floor(hard_fraction * n)`` are those of highest score and the rest are
    drawn uniformly among the others (hard-patch mining's easy-to-hard mix). ``scores`` are
    detached."""
    if scores.dim() != 2 or not scores.is_floating_point():
        raise ShapeError(f"score_mask: scores must be floating [B, L], got {scores.dtype} "
                         f"{_shape(scores)}")
    if not 0 <= hard_fraction <= 1:
        raise ConfigError(f"score_mask: hard_fraction must be in [0, 1], got {hard_fraction}",
                          param="hard_fraction")
    b, length = scores.shape
    n = n_masked(length, ratio)
    n_hard = int(hard_fraction * n + 1e-9)  # HPM's int((L - len_keep) * keep_ratio)
    rank = torch.argsort(torch.argsort(scores.detach().float(), dim=1, descending=True), dim=1)
    hard = (rank < n_hard).float()  # the n_hard highest scores of each row
    return mask_from_keys(hard + _noise(b, length, generator, scores.device), n)


def pairwise_rank_loss(scores: Tensor, losses: Tensor) -> Tensor:
    """Per row ``[B]``: the relative loss by which HPM's loss predictor learns to rank patches. For
    every ordered pair ``(i, j)`` of a row with ``losses_i != losses_j``, the binary cross-entropy
    of ``sigmoid(scores_i - scores_j)`` against ``[losses_i > losses_j]``, averaged over the pairs
    (``losses`` are targets: detach them). In float32, through ``softplus`` (the authors add
    ``1e-6`` inside the logarithms instead)."""
    s, e = scores.float(), losses.float()
    diff = s[:, :, None] - s[:, None, :]  # [B, M, M]: s_i - s_j
    above = (e[:, :, None] > e[:, None, :]).float()
    below = (e[:, :, None] < e[:, None, :]).float()
    nll = above * torch.nn.functional.softplus(-diff) + below * torch.nn.functional.softplus(diff)
    return nll.sum((1, 2)) / (above + below).sum((1, 2)).clamp_min(1)


def hidden_ids(ids_restore: Tensor, n_visible: int) -> Tensor:
    """``[B, M]``: the ids of each row's hidden tokens (in the masking's shuffled order), from
    ``ids_restore [B, L]`` and the number ``K`` of visible tokens (``M = L - K``)."""
    return torch.argsort(ids_restore, dim=1)[:, n_visible:]


def check_mask(owner: str, ids_restore: Tensor, mask: Tensor, length: int | None = None) -> None:
    """Raise :class:`sdk.ShapeError` naming ``owner`` unless ``ids_restore`` is integer ``[B, L]``
    and ``mask`` ``[B, L]`` (``L == length`` when given). Metadata only."""
    if ids_restore.dim() != 2 or ids_restore.is_floating_point() or ids_restore.dtype == torch.bool:
        raise ShapeError(f"{owner}: ids_restore must be integer [B, L], got {ids_restore.dtype} "
                         f"{_shape(ids_restore)}")
    if mask.shape != ids_restore.shape:
        raise ShapeError(f"{owner}: mask {_shape(mask)} and ids_restore {_shape(ids_restore)} "
                         "must have one shape [B, L]")
    if length is not None and ids_restore.shape[1] != length:
        raise ShapeError(f"{owner}: the mask covers {ids_restore.shape[1]} tokens, expected {length}")


# the encoder's view -------------------------------------------------------------------------
class Visible(Tensor):
    """An input tensor marked with ``ids_keep [B, K]``: the tokens an encoder that takes a mask
    should see. It shares the data of the input; operations on it return plain tensors, so an
    encoder that ignores the mark sees the whole input. Make one with :func:`visible`; read it
    with :func:`split_visible`."""

    ids_keep: Tensor
    __torch_function__ = torch._C._disabled_torch_function_impl


def visible(x: Tensor, ids_keep: Tensor) -> Visible:
    """``x`` marked with the ids of its visible tokens ``ids_keep [B, K]``."""
    if ids_keep.dim() != 2 or ids_keep.shape[0] != x.shape[0] or ids_keep.is_floating_point():
        raise ShapeError(f"visible: ids_keep must be integer [{x.shape[0]}, K], got "
                         f"{ids_keep.dtype} {_shape(ids_keep)}")
    out = x.as_subclass(Visible)
    out.ids_keep = ids_keep
    return out


def split_visible(x: Tensor) -> tuple[Tensor, Tensor | None]:
    """``(plain tensor, ids_keep or None)``."""
    if isinstance(x, Visible):
        return x.as_subclass(Tensor), x.ids_keep
    return x, None


# tokens ------------------------------------------------------------------------------------
def gather_tokens(tokens: Tensor, ids: Tensor) -> Tensor:
    """``tokens [B, L, D]`` at ``ids [B, K]`` -> ``[B, K, D]``."""
    return torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def restore_tokens(visible_tokens: Tensor, mask_token: Tensor, ids_restore: Tensor) -> Tensor:
    """``[B, K, D]`` visible tokens (in ``ids_keep`` order) and a ``[D]`` mask token -> the full
    ``[B, L, D]`` sequence in the original order, the mask token at every hidden position (MAE's
    decoder input)."""
    b, k, d = visible_tokens.shape
    fill = mask_token.to(visible_tokens.dtype).expand(b, ids_restore.shape[1] - k, d)
    return gather_tokens(torch.cat([visible_tokens, fill], dim=1), ids_restore)


# positions ---------------------------------------------------------------------------------
def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """``[N] -> [N, dim]``: ``sin(p w_k), cos(p w_k)`` with ``w_k = 10000^(-k / (dim/2))``
    (the transformer's fixed positional encoding; ``dim`` even)."""
    if dim % 2:
        raise ConfigError(f"sine-cosine positions need an even width, got {dim}", param="embed_dim")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_2d(dim: int, grid: tuple[int, int]) -> Tensor:
    """``[rows * columns, dim]``: half the width encodes the row, half the column (MAE's fixed 2-D
    positions; ``dim`` a multiple of 4)."""
    if dim % 4:
        raise ConfigError(f"2-D sine-cosine positions need a width divisible by 4, got {dim}",
                          param="embed_dim")
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, rows.flatten()), sincos_1d(dim // 2, cols.flatten())], 1)


# targets and loss ---------------------------------------------------------------------------
def normalized_patches(patches: Tensor, eps: float = 1e-6) -> Tensor:
    """MAE's ``norm_pix_loss`` target: each patch minus its mean, over ``sqrt(var + eps)`` (the
    unbiased variance over the patch's values, as the authors' ``target.var(dim=-1)``)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


def masked_mse(prediction: Tensor, target: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(value, per_sample)``: the squared error averaged over each token's values, then over the
    masked tokens only (``mask [B, L]``, 1 = masked): ``per_sample_i = sum_l m_il e_il /
    sum_l m_il``; ``value = sum m e / sum m`` (MAE's, over the whole batch). Computed in
    float32 (bf16 inputs included)."""
    return masked_mean((prediction.float() - target.float()).pow(2).mean(dim=-1), mask)


def masked_mean(err: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(value, per_sample)`` of a per-token error ``err [B, L]`` over the masked tokens only
    (``mask [B, L]``, 1 = masked): ``per_sample_i = sum_l m_il e_il / sum_l m_il``; ``value = sum m
    e / sum m`` (over the whole batch)."""
    m = mask.to(err.dtype)
    counts = m.sum(1)
    per_sample = (err * m).sum(1) / counts.clamp_min(1)
    return (err * m).sum() / counts.sum().clamp_min(1), per_sample


def as_image(owner: str, x: Tensor, image_shape: tuple[int, int, int]) -> Tensor:
    """``x`` as images ``[B, C, H, W]``: a flat ``[B, C*H*W]`` batch (the digits' 64 features) is
    reshaped; anything else must already be ``[B, C, H, W]``."""
    c, h, w = image_shape
    if x.dim() == 2 and x.shape[1] == c * h * w:
        return x.reshape(x.shape[0], c, h, w)
    if x.dim() == 4 and tuple(x.shape[1:]) == (c, h, w):
        return x
    raise ShapeError(f"{owner}: x must be images [B, {c}, {h}, {w}] or flat [B, {c * h * w}], got "
                     f"{x.dtype} {_shape(x)}")


def image_grid(owner: str, image_shape: Any, patch: int) -> tuple[int, int]:
    """The patch grid of ``image_shape = (C, H, W)``; a :class:`~sdk.ConfigError` naming
    ``owner`` unless ``H`` and ``W`` are multiples of ``patch``."""
    if len(image_shape) != 3 or min(image_shape) < 1:
        raise ConfigError(f"{owner}: image_shape must be (C, H, W), got {tuple(image_shape)}",
                          param="image_shape")
    _, h, w = image_shape
    if h % patch or w % patch:
        raise ConfigError(f"{owner}: the {h}x{w} image is not a whole number of {patch}x{patch} "
                          "patches", param="patch_size")
    return h // patch, w // patch


def reconstruction_layout(owner: str, image_shape: Any, patch: int,
                          norm_pix_loss: bool) -> tuple[tuple[int, int], int, int]:
    """``(grid, L, P)`` of an image reconstruction objective: the patch grid, the number of
    patches and the values per patch; a :class:`~sdk.ConfigError` naming ``owner`` when
    ``norm_pix_loss`` would standardise patches of one value (their variance is undefined)."""
    grid = image_grid(owner, image_shape, patch)
    dim = patch * patch * int(image_shape[0])
    if norm_pix_loss and dim < 2:
        raise ConfigError(f"{owner}: norm_pix_loss standardises each patch by its variance, which "
                          f"a patch of {dim} value does not have; use larger patches or "
                          "norm_pix_loss=False", param="norm_pix_loss")
    return grid, grid[0] * grid[1], dim


__all__ = ["Mask", "Visible", "as_image", "block_mask", "check_mask", "gather_tokens",
           "hidden_ids", "image_grid", "mask_from_keys", "masked_mean", "masked_mse", "n_masked",
           "normalized_patches", "pairwise_rank_loss", "patchify", "patchify_sequence",
           "random_mask", "reconstruction_layout", "restore_tokens", "score_mask", "sincos_1d",
           "sincos_2d", "split_visible", "unpatchify", "unpatchify_sequence", "visible"]


def example_masked_inputs(batch_size: int, num_tokens: int, mask_ratio: float, embed_dim: int,
                          target_dim: int, *, generator: torch.Generator,
                          target: str = "uniform", shuffled_index: bool = False) -> tuple[Any, Any]:
    """Example inputs of a masked-token objective (its ``example_inputs`` for the conformance
    kit): the encoder's visible tokens ``[B, 1 + kept, embed_dim]`` (class token first, requiring
    grad) as ``Views.extras[FEATURES]`` beside the class token as the embedding, and a random
    mask, its ``ids_restore`` and a reconstruction target ``[B, num_tokens, target_dim]``
    (``"uniform"`` pixels in [0, 1) or ``"normal"`` features) in ``Batch.extras``;
    ``shuffled_index``: ``Batch.index`` is a permutation rather than ``arange``."""
    from sdk import keys
    from sdk.types import Batch, Views

    m = random_mask(batch_size, num_tokens, mask_ratio, generator=generator)
    tokens = torch.randn(batch_size, 1 + m.ids_keep.shape[1], embed_dim,
                         generator=generator).requires_grad_()
    views = Views(embeddings=(tokens[:, 0].detach(),), extras={keys.FEATURES: (tokens,)})
    index = (torch.randperm(batch_size, generator=generator) if shuffled_index
             else torch.arange(batch_size))
    draw = torch.rand if target == "uniform" else torch.randn
    batch = Batch(index=index, extras={
        keys.MASK: m.mask, keys.IDS_RESTORE: m.ids_restore,
        keys.RECONSTRUCTION_TARGET: draw(batch_size, num_tokens, target_dim, generator=generator)})
    return views, batch
