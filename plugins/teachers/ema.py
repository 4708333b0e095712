"""Exponential-moving-average target network with BYOL's cosine momentum schedule (the teacher
itself is :class:`sdk.momentum.EMATeacher`, shared with the ``queue`` teacher).

Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020 (schedule); Tarvainen & Valpola,
"Mean teachers are better role models", NeurIPS 2017 (EMA teacher).
"""

from __future__ import annotations

from sdk.card import Card
from sdk.hookspecs import hookimpl
from sdk.momentum import EMATeacher

CARD = Card(
    name="ema", kind="teacher",
    title="Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning",
    paper="arXiv:2006.07733",
    summary="Momentum (EMA) copy of the student, momentum increased to 1 on a cosine schedule.",
    formula="theta_t <- m_k theta_t + (1 - m_k) theta_s; "
            "m_k = 1 - (1 - m_0)(cos(pi k / K) + 1) / 2",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(EMATeacher, card=CARD)
