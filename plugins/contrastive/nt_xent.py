"""NT-Xent / InfoNCE (SimCLR), over any number of views, on the shared masked InfoNCE (the
objective itself is :class:`sdk.contrastive.NTXent`, which other contrastive objectives extend).

Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations", ICML 2020.
"""

from __future__ import annotations

from sdk.card import Card
from sdk.contrastive import NTXent, nt_xent_loss
from sdk.hookspecs import hookimpl

__all__ = ["NTXent", "nt_xent_loss"]

CARD = Card(
    name="nt_xent", kind="objective",
    title="A Simple Framework for Contrastive Learning of Visual Representations (SimCLR)",
    paper="arXiv:2002.05709",
    summary="Normalised-temperature cross-entropy over all views of a batch; Sampler-aware, "
            "multi-positive (SupCon with label_positives), gathers across ranks.",
    formula="l_i = -mean_{p in P(i)} log exp(cos(z_i,z_p)/t) / sum_{a != i} exp(cos(z_i,z_a)/t); "
            "L = mean_i l_i; extra negatives (synthetic, queue, memory bank) join the denominator",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(NTXent, card=CARD)
