"""Alignment and uniformity of L2-normalised embeddings.

Wang, Isola, "Understanding Contrastive Representation Learning through Alignment and
Uniformity on the Hypersphere", ICML 2020 (arXiv:2005.10242). Implementations in
:mod:`sdk.metrics`; this module registers their streaming forms.
"""

from __future__ import annotations

from sdk.card import Card
from sdk.hookspecs import hookimpl
from sdk.metrics import Alignment, Uniformity, alignment, uniformity

__all__ = ["ALIGNMENT_CARD", "UNIFORMITY_CARD", "Alignment", "Uniformity", "alignment", "uniformity"]

_TITLE = ("Understanding Contrastive Representation Learning through Alignment and Uniformity "
          "on the Hypersphere")

ALIGNMENT_CARD = Card(
    name="alignment", kind="metric", title=_TITLE, paper="arXiv:2005.10242",
    summary="Mean distance (to the power alpha) between the normalised embeddings of positive "
            "pairs; update(z1, z2) with matching rows. Lower is better.",
    formula="L_align = mean_i ||f(x_i) - f(x_i+)||_2^alpha, f L2-normalised, alpha = 2",
    left_out="Use as a training loss (see the contrastive objectives).",
)

UNIFORMITY_CARD = Card(
    name="uniformity", kind="metric", title=_TITLE, paper="arXiv:2005.10242",
    summary="Log of the mean Gaussian potential over all distinct pairs of normalised "
            "embeddings; keeps every row it is given (it needs all pairs). Lower is better.",
    formula="L_unif = log mean_{i<j} exp(-t ||f(x_i) - f(x_j)||_2^2), f L2-normalised, t = 2",
    left_out="Use as a training loss; per-batch estimates (all rows given to update are pooled).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(Alignment, card=ALIGNMENT_CARD)
    registry.add(Uniformity, card=UNIFORMITY_CARD)
