"""HPM: an auxiliary head learns which patches are hard to reconstruct, and the mask hides them.

Wang et al., "Hard Patches Mining for Masked Image Modeling", CVPR 2023.
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge, Interval

from sdk import keys
from sdk.card import Card
from sdk.distributed import gather_no_grad
from sdk.errors import ConfigError, RequirementError
from sdk.events import State
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective, Transform
from sdk.masking import (
    as_image,
    example_masked_inputs,
    masked_mse,
    normalized_patches,
    pairwise_rank_loss,
    patchify,
    reconstruction_layout,
    score_mask,
    visible,
)
from sdk.transformer import MaskedDecoder, masked_tokens, transformer_blocks
from sdk.types import Batch, Loss, Views, check_ids


def hard_fraction(step: int, max_steps: int | None, final: float) -> float:
    """HPM's easy-to-hard schedule: the share of the hidden patches chosen by predicted loss grows
    linearly from ``final / T`` to ``final`` over training (``(t + 1) / T * final``, T steps)."""
    if not max_steps:
        return final
    return min(1.0, (step + 1) / max_steps) * final


class HardPatchMining(Objective):
    """MAE's reconstruction plus HPM's loss predictor, and the memory of its predictions that
    :attr:`masking` (the ``hard_patch_masking`` transform bound to this objective) hides patches
    by.

    The decoder (:class:`sdk.transformer.MaskedDecoder`) predicts every patch; a second branch of
    ``predictor_depth`` blocks on the same decoder input predicts every patch's reconstruction
    loss ``s [B, L]``. Loss: MAE's masked MSE (normalised pixels) plus ``weight`` times the
    relative loss of the predictor (per image, for every pair of hidden patches with different
    losses, binary cross-entropy of ``sigmoid(s_i - s_j)`` against ``[e_i > e_j]``, the true losses
    ``e`` detached). After each call the predictions of the batch's samples are stored by
    ``Batch.index``; the next time a sample is drawn, ``masking`` hides the patches of highest
    stored prediction (a share of the hidden patches growing to ``hard_ratio``), the rest at
    random."""

    requires = {"views": 1, "index": True,
                "extras": (keys.FEATURES, keys.MASK, keys.IDS_RESTORE, keys.RECONSTRUCTION_TARGET)}
    batch_coupled = False

    def __init__(self, image_shape: tuple[int, int, int] | list[int] = (1, 8, 8),
                 patch_size: Annotated[int, Ge(1)] = 2, embed_dim: Annotated[int, Ge(1)] = 64,
                 mask_ratio: Annotated[float, Interval(ge=0, lt=1)] = 0.75,
                 hard_ratio: Annotated[float, Interval(ge=0, le=1)] = 0.5,
                 weight: Annotated[float, Ge(0)] = 1.0,
                 decoder_dim: Annotated[int, Ge(4)] = 32, decoder_depth: Annotated[int, Ge(1)] = 2,
                 predictor_depth: Annotated[int, Ge(1)] = 2, decoder_heads: Annotated[int, Ge(1)] = 4,
                 norm_pix_loss: bool = True, num_samples: Annotated[int, Ge(1)] = 65536):
        super().__init__()
        self.image_shape = tuple(int(s) for s in image_shape)
        grid, self.num_patches, self.patch_dim = reconstruction_layout(
            "hard_patch_mining", self.image_shape, patch_size, norm_pix_loss)
        self.patch_size, self.grid = patch_size, grid
        self.embed_dim, self.mask_ratio, self.hard_ratio = embed_dim, mask_ratio, hard_ratio
        self.weight, self.norm_pix_loss, self.num_samples = weight, norm_pix_loss, num_samples
        self.decoder = MaskedDecoder(embed_dim, self.patch_dim, grid, dim=decoder_dim,
                                     depth=decoder_depth, heads=decoder_heads)
        self.predictor = transformer_blocks(decoder_dim, predictor_depth, decoder_heads, 4.0)
        self.predictor_norm = torch.nn.LayerNorm(decoder_dim)
        self.predictor_out = torch.nn.Linear(decoder_dim, 1)
        self.register_buffer("predicted", torch.zeros(num_samples, self.num_patches))
        self.register_buffer("seen", torch.zeros(num_samples, dtype=torch.bool))
        self.hard_now = hard_ratio  # the schedule's share now (set_progress; full when untold)
        object.__setattr__(self, "_masking", None)

    @property
    def masking(self) -> HardPatchMasking:
        """The mask-choosing transform that reads this objective's predictions (one per objective)."""
        if self._masking is None:
            object.__setattr__(self, "_masking", HardPatchMasking(_objective=self))
        return self._masking

    def set_progress(self, step: int, max_steps: int | None) -> None:
        self.hard_now = hard_fraction(step, max_steps, self.hard_ratio)

    def on_fit_start(self, state: State) -> None:
        dataset = getattr(state.trainer.train_loader, "dataset", None)
        if dataset is not None and hasattr(dataset, "__len__") and len(dataset) > self.num_samples:
            raise ConfigError(f"hard_patch_mining: num_samples={self.num_samples} is smaller than the "
                              f"training set ({len(dataset)} samples)", param="num_samples")

    def forward(self, views: Views, batch: Batch) -> Loss:
        owner = "objective 'hard_patch_mining'"
        tokens, ids_restore, mask, patches = masked_tokens(
            owner, views, batch, width=self.embed_dim, length=self.num_patches,
            target_dim=self.patch_dim)
        check_ids(owner, "Batch.index", batch.index)
        if not torch.is_autocast_enabled(tokens.device.type):
            tokens = tokens.to(self.decoder.embed.weight.dtype)
        h = self.decoder.inputs(tokens, ids_restore)
        prediction = self.decoder.head(h)
        scores = self.predictor_out(self.predictor_norm(self.predictor(h)))[:, 1:, 0].float()
        target = normalized_patches(patches.float()) if self.norm_pix_loss else patches.float()
        recon, per_sample = masked_mse(prediction, target, mask)
        errors = (prediction.float() - target).pow(2).mean(-1).detach()  # [B, L]
        hidden = torch.argsort(ids_restore, dim=1)[:, tokens.shape[1] - 1:]  # the masked ids
        rank = pairwise_rank_loss(scores.gather(1, hidden), errors.gather(1, hidden))
        self.remember(batch.index, scores.detach())
        return Loss(value=recon + self.weight * rank.mean(), per_sample=per_sample + self.weight * rank,
                    logs={"reconstruction": recon.detach(), "loss_prediction": rank.mean().detach()})

    @torch.no_grad()
    def remember(self, index: torch.Tensor, scores: torch.Tensor) -> None:
        index, scores = gather_no_grad(index), gather_no_grad(scores)  # every rank's samples
        try:
            self.predicted.index_copy_(0, index, scores.to(self.predicted.dtype))
            self.seen.index_fill_(0, index, True)
        except (IndexError, RuntimeError):  # ids out of range (on CPU; CUDA asserts on the device)
            check_ids("objective 'hard_patch_mining'", "Batch.index", index, self.num_samples)
            raise

    def choose(self, index: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The stored predictions of ``index`` for choosing a mask; samples not yet seen get
        uniform noise (a random mask)."""
        index = index.to(self.predicted.device)
        stored = self.predicted[index]
        noise = torch.rand(stored.shape, device=stored.device)
        return torch.where(self.seen[index, None], stored, noise).to(device)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        return example_masked_inputs(batch_size, self.num_patches, self.mask_ratio, self.embed_dim,
                                     self.patch_dim, generator=generator, shuffled_index=True)


class HardPatchMasking(Transform):
    """``(x, batch) -> (visible(x, ids_keep), batch + mask)`` as ``patch_masking``, but the hidden
    patches are, for the share ``hard_fraction(step)`` of them, those of highest predicted loss in
    the bound ``hard_patch_mining`` objective's memory (``Batch.index``), the rest uniformly
    among the others (:func:`sdk.masking.score_mask`). Get it as ``objective.masking``."""

    def __init__(self, _objective: HardPatchMining | None = None):
        super().__init__()
        if _objective is None:
            raise ConfigError("hard_patch_masking: take it from its objective, "
                              "sdk.create('objective', 'hard_patch_mining').masking", param="_objective")
        object.__setattr__(self, "objective", _objective)

    def forward(self, x: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, Batch]:
        obj = self.objective
        if batch.index is None:
            raise RequirementError("transform 'hard_patch_masking' needs Batch.index (the samples' "
                                   "stored loss predictions)")
        patches = patchify(as_image("transform 'hard_patch_masking'", x, obj.image_shape), obj.patch_size)
        scores = obj.choose(batch.index, x.device)
        mask = score_mask(scores, obj.mask_ratio, hard_fraction=obj.hard_now)
        extras = {**batch.extras, keys.MASK: mask.mask, keys.IDS_RESTORE: mask.ids_restore,
                  keys.RECONSTRUCTION_TARGET: patches}
        return visible(x, mask.ids_keep), batch.evolve(extras=extras)



CARD = Card(
    name="hard_patch_mining", kind="objective", title="Hard Patches Mining for Masked Image Modeling (HPM)",
    paper="arXiv:2304.05919",
    summary="MAE plus a loss predictor trained to rank the hidden patches by reconstruction loss; "
            "masks hide the patches it predicts hardest (easy-to-hard schedule).",
    formula="L = L_rec + w * L_pred; L_rec = MAE's masked MSE on normalised pixels; "
            "L_pred = -sum_{i,j hidden, e_i != e_j} [e_i > e_j] log sig(s_i - s_j) + [e_i < e_j] "
            "log(1 - sig(s_i - s_j)) / #pairs (e detached); mask: floor(a_t n) hidden patches of "
            "highest s, the rest random, a_t = (t + 1) / T * hard_ratio",
    left_out="The authors choose each mask from an EMA teacher's loss predictions on the whole, "
             "unmasked image; here the mask comes from the student's own predictions for that "
             "sample at its previous visit (stored by Batch.index; random at the first), so no "
             "second forward or teacher is needed. The schedule advances per step instead of per "
             "epoch. Tiny decoder for 8x8 digits; a recipe cannot bind the transform, which comes "
             "from the objective's `masking` in Python.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(HardPatchMining, card=CARD)
