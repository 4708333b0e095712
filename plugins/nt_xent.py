"""NT-Xent / InfoNCE (SimCLR), over any number of views, on the shared masked InfoNCE.

Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations", ICML 2020.
"""

from __future__ import annotations

import torch

from sdk import contrastive
from sdk.card import Card
from sdk.errors import ConfigError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective, Sampler
from sdk.types import Batch, Loss, Views


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ConfigError(f"nt_xent: temperature must be > 0, got {temperature}", param="temperature")


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, *more_views: torch.Tensor,
                 temperature: float = 0.5, sampler: Sampler | None = None,
                 batch: Batch | None = None, gather: bool = False) -> torch.Tensor:
    """Mean NT-Xent over all anchors of all views; see :class:`NTXent`."""
    return NTXent(temperature=temperature, sampler=sampler, gather=gather)(
        Views(embeddings=(z1, z2, *more_views)), batch).value


class NTXent(Objective):
    """For anchor i (every row of every view), positives P(i) and all other rows A(i)::

        l_i = -1/|P(i)| sum_{p in P(i)} log( exp(s_ip / t) / sum_{a in A(i)} exp(s_ia / t) )

    with cosine similarity s. Default positives: the other views of the same sample (SimCLR);
    a Sampler (e.g. ``label_positives``, giving SupCon) can choose positives, negatives and
    pair weights, and add synthetic negatives; a queue or memory-bank teacher's entries in
    ``Views.extras["negatives"]`` join every anchor's denominator. ``gather=True`` contrasts
    against the embeddings of every DDP rank.
    """

    requires = {"views": 2}
    accepts_sampler = True

    def __init__(self, temperature: float = 0.5, sampler: Sampler | None = None,
                 gather: bool = False):
        super().__init__()
        _check_temperature(temperature)
        self.temperature = temperature
        self.sampler = sampler
        self.gather = gather

    def forward(self, views: Views, batch: Batch) -> Loss:
        c = contrastive.contrast(views, batch, gather=self.gather)
        pairs = None if self.sampler is None else contrastive.sampler_pairs(c, self.sampler)
        extra, extra_mask = contrastive.extra_negatives(c, pairs)
        extra = None if extra is None else extra / self.temperature
        if pairs is None:
            loss = contrastive.instance_info_nce(c, self.temperature, extra_negative_logits=extra,
                                                 extra_negative_mask=extra_mask)
            return Loss(value=loss.mean(), per_sample=contrastive.per_sample(loss, c))
        logits = c.anchors @ c.candidates.T / self.temperature
        loss, valid = contrastive.info_nce(logits, pairs.positive, pairs.negative, weight=pairs.weight,
                                           extra_negative_logits=extra, extra_negative_mask=extra_mask)
        return Loss(value=contrastive.masked_mean(loss, valid),
                    per_sample=contrastive.per_sample(loss, c))


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
    registry.add("objective", "nt_xent", NTXent, card=CARD)
