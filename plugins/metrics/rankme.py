"""RankMe: the effective rank of an embedding matrix.

Garrido, Balestriero, Najman, LeCun, "RankMe: Assessing the Downstream Performance of
Pretrained Self-Supervised Representations by Their Rank", ICML 2023 (arXiv:2210.02885).
Implementation in :mod:`sdk.metrics`; this module registers its streaming form, which
accumulates the Gram matrix so memory does not grow with the number of samples.
"""

from __future__ import annotations

from sdk.card import Card
from sdk.hookspecs import hookimpl
from sdk.metrics import RankMe, rankme

__all__ = ["CARD", "RankMe", "rankme"]

CARD = Card(
    name="rankme", kind="metric",
    title="RankMe: Assessing the Downstream Performance of Pretrained Self-Supervised "
          "Representations by Their Rank",
    paper="arXiv:2210.02885",
    summary="Exponential of the entropy of the L1-normalised singular values of the (uncentred) "
            "embedding matrix; about 1 for collapsed, up to min(N, D) for full-rank embeddings.",
    formula="p_k = s_k(Z) / ||s(Z)||_1 + eps; RankMe(Z) = exp(-sum_{k=1}^{min(N,D)} p_k log p_k), "
            "eps = 1e-7",
    left_out="Nothing; the paper recommends N >= D samples (25,600 in its experiments).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(RankMe, card=CARD)
