"""Adaptive Inflation (AdaInf)'s data reweighting: when real and generated samples are mixed for
contrastive learning, the real ones weigh ``real_weight`` times a generated one (the authors
replicate the real set ``dup = 10`` times before mixing it with the generated set).

Wang, Zhang & Wang, "Do Generated Data Always Help Contrastive Learning?", ICLR 2024
(arXiv:2403.12448), Sec. 5 (AdaInf), following the authors' code (PKU-ML/adainf: ``data.dup``,
the real data's replication, and the weaker ``*_adainf.yaml`` augmentations).
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge, Gt
from torch import Tensor

from sdk import keys
from sdk.card import Card
from sdk.errors import RequirementError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Reweighter
from sdk.reweighting import check_rows
from sdk.types import Batch

OWNER = "reweighter 'generated_data_reweighting'"


def inflation_weights(generated: Tensor, *, real_weight: float = 10.0,
                      generated_weight: float = 1.0) -> Tensor:
    """``w_i = real_weight`` for a real sample, ``generated_weight`` for a generated one
    (``generated`` bool ``[B]``, True = generated)."""
    return torch.where(generated, generated_weight, real_weight)


class GeneratedDataReweighting(Reweighter):
    """Weights ``real_weight`` (real) and ``generated_weight`` (generated) per sample, read from
    ``Batch.extras[keys.GENERATED]`` (bool or 0/1 ``[B]``), reduced as ``sum(w l) / sum(w)``.

    On a batch drawn uniformly from the union of ``N_r`` real and ``N_g`` generated samples this
    is, in expectation, the loss over the authors' inflated set (the real set replicated
    ``real_weight`` times, then the generated set). ``generated_weight = 0`` trains on the real
    samples only; ``real_weight = generated_weight`` is vanilla inflation."""

    def __init__(self, real_weight: Annotated[float, Gt(0)] = 10.0,
                 generated_weight: Annotated[float, Ge(0)] = 1.0):
        super().__init__()
        self.real_weight, self.generated_weight = real_weight, generated_weight

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Batch]:
        """For the conformance kit: losses of a batch whose odd rows are generated."""
        per_sample = torch.rand(batch_size, generator=generator) + 0.5
        generated = torch.arange(batch_size) % 2 == 1
        return per_sample.requires_grad_(), Batch(extras={keys.GENERATED: generated})

    def weights(self, per_sample: Tensor, batch: Batch) -> Tensor:
        check_rows(OWNER, per_sample, batch)
        flag = batch.extras.get(keys.GENERATED)
        if flag is None:
            raise RequirementError(f"{OWNER} needs Batch.extras[{keys.GENERATED!r}]: which samples "
                                   "are generated, bool [B]")
        if not isinstance(flag, Tensor) or flag.shape != per_sample.shape or flag.is_floating_point():
            what = f"{flag.dtype} {list(flag.shape)}" if isinstance(flag, Tensor) else type(flag).__name__
            raise ShapeError(f"{OWNER}: Batch.extras[{keys.GENERATED!r}] must be bool or integer 0/1 "
                             f"[{per_sample.shape[0]}], got {what}")
        w = inflation_weights(flag.to(per_sample.device).bool(), real_weight=self.real_weight,
                              generated_weight=self.generated_weight)
        return w.to(per_sample.dtype)


CARD = Card(
    name="generated_data_reweighting", kind="reweighter",
    title="Do Generated Data Always Help Contrastive Learning?",
    paper="arXiv:2403.12448",
    summary="AdaInf's data reweighting for data inflation: real samples weigh real_weight (the "
            "authors' replication of the real set, 10) times a generated sample, so a mix with "
            "many generated samples keeps the real distribution dominant.",
    formula="w_i = real_weight if sample i is real else generated_weight; loss = sum_i w_i l_i / "
            "sum_i w_i (defaults 10 and 1: the authors' data.dup = 10)",
    left_out="The generative model (any generated set can be mixed in, flagged by "
             "Batch.extras['generated']) and AdaInf's other half, the weaker augmentation (the "
             "authors' *_adainf configs: random-resized-crop scale from 0.2 instead of 0.08, colour "
             "jitter with probability 0.4 instead of 0.8), which belongs to the views' transforms. "
             "The authors replicate the real samples in the dataset (real samples are drawn more "
             "often); weighting a uniformly drawn batch gives the same expected gradient, not the "
             "same batches.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(GeneratedDataReweighting, card=CARD)
