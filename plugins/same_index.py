"""The default pair rule of instance discrimination: views of one sample are positives."""

from __future__ import annotations

import torch

from sdk.card import Card
from sdk.hookspecs import hookimpl
from sdk.interfaces import Sampler
from sdk.types import Batch, Pairs, Views


def sample_ids(views: Views) -> torch.Tensor:
    """Sample id of every row of ``cat(views.embeddings)`` (view-major)."""
    b = views.batch_size
    device = views.embeddings[0].device
    return torch.arange(b, device=device).repeat(views.n_views)


class SameIndex(Sampler):
    """positive[r, c] = (sample(r) == sample(c)); negative = not positive (self excluded
    by the objective)."""

    def pairs(self, views: Views, batch: Batch) -> Pairs:
        ids = sample_ids(views)
        same = ids[:, None] == ids[None, :]
        return Pairs(positive=same, negative=~same)


CARD = Card(
    name="same_index", kind="sampler",
    title="A Simple Framework for Contrastive Learning of Visual Representations (SimCLR)",
    paper="arXiv:2002.05709",
    summary="Instance discrimination pairs: other views of the same sample are positives, "
            "all views of other samples negatives.",
    formula="positive[r,c] = [id(r) = id(c)], negative[r,c] = [id(r) != id(c)]",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add("sampler", "same_index", SameIndex, card=CARD)
