"""Supervised contrastive positives: samples sharing a target are positives (SupCon).

Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020.
"""

from __future__ import annotations

from sdk.card import Card
from sdk.errors import RequirementError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Sampler
from sdk.types import Batch, Pairs, Views


class LabelPositives(Sampler):
    """positive[r, c] = (y(r) == y(c)) over all views; negative = different target.

    With ``nt_xent`` this is SupCon's L_out: the denominator holds every other row."""

    produces = frozenset({Input.PAIRS})

    def pairs(self, views: Views, batch: Batch) -> Pairs:
        if batch.targets is None or batch.targets.dim() != 1:
            raise RequirementError("sampler 'label_positives' needs Batch.targets as class ids [B]")
        y = batch.targets.repeat(views.n_views)
        same = y[:, None] == y[None, :]
        return Pairs(positive=same, negative=~same)


CARD = Card(
    name="label_positives", kind="sampler",
    title="Supervised Contrastive Learning", paper="arXiv:2004.11362",
    summary="Positives are all rows with the anchor's class; with nt_xent this is SupCon (L_out).",
    formula="positive[r,c] = [y(r) = y(c)], negative[r,c] = [y(r) != y(c)]",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(LabelPositives, card=CARD)
