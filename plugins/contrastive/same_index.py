"""The default pair rule of instance discrimination: views of one sample are positives."""

from __future__ import annotations

from sdk.card import Card
from sdk.contrastive import sample_ids
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Sampler
from sdk.types import Batch, Pairs, Views


class SameIndex(Sampler):
    """positive[r, c] = (sample(r) == sample(c)); negative = not positive (self excluded
    by the objective)."""

    produces = frozenset({Input.PAIRS})

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
    registry.add(SameIndex, card=CARD)
