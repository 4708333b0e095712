"""Adversarial removal of a nuisance attribute from representations: an attribute classifier
reads the features through a gradient-reversal layer, so one optimizer step trains the
classifier to predict the attribute and the encoder to hide it.

Zhao, Wang, Chao, Wu & Meng, "Adversarial Speaker Disentanglement Using Unannotated External
Data for Self-supervised Representation Based Voice Conversion", 2023 (arXiv:2305.09167):
a discriminator tells whether content embeddings come from the target speaker or from external,
unannotated corpora, and the content path learns to remove that speaker information; the
reversal layer is Ganin & Lempitsky's (ICML 2015, arXiv:1409.7495).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge
from torch import Tensor, nn

from sdk import classification as cls
from sdk import keys
from sdk.adversarial import reverse_gradient
from sdk.card import Card
from sdk.errors import RequirementError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Objective
from sdk.types import Batch, Loss, Views, check_ids


class GradientReversalDisentangle(Objective):
    """On features ``h`` (``Views.extras["features"][0]``, else ``Views.embeddings[0]``) and the
    attribute ids ``a`` (``Batch.extras["attribute"]``)::

        L = 1/B sum_i CE(D(GRL_lambda(h_i)), a_i)

    ``GRL_lambda`` is the identity forward and ``-lambda`` times the gradient backward, so ``D``
    (``feature_dim -> hidden_dim -> num_attributes``, ReLU; a linear layer with
    ``hidden_dim=0``) descends the cross-entropy while the encoder ascends it. Add it to the
    task's objective (``task + w * gradient_reversal_disentangle``); two attributes (target
    speaker against external data) is the paper's case."""

    requires = {"views": 1}
    consumes = frozenset({Input.FEATURES})
    batch_coupled = False

    def __init__(self, feature_dim: Annotated[int, Ge(1)] = 128,
                 num_attributes: Annotated[int, Ge(2)] = 2,
                 hidden_dim: Annotated[int, Ge(0)] = 128,
                 grl_lambda: Annotated[float, Ge(0)] = 1.0):
        super().__init__()
        self.feature_dim, self.num_attributes, self.grl_lambda = feature_dim, num_attributes, grl_lambda
        self.classifier = (nn.Linear(feature_dim, num_attributes) if hidden_dim == 0 else
                           nn.Sequential(nn.Linear(feature_dim, hidden_dim), nn.ReLU(),
                                         nn.Linear(hidden_dim, num_attributes)))

    def forward(self, views: Views, batch: Batch) -> Loss:
        owner = f"objective {self.name!r}"
        entry = views.extras.get(keys.FEATURES, views.embeddings[0] if views.embeddings else None)
        h = entry[0] if isinstance(entry, (tuple, list)) else entry
        if not isinstance(h, Tensor) or h.dim() != 2 or h.shape[1] != self.feature_dim \
                or not h.is_floating_point():
            got = list(h.shape) if isinstance(h, Tensor) else type(h).__name__
            raise ShapeError(f"{owner}: the features must be floating [B, {self.feature_dim}] "
                             f"(feature_dim={self.feature_dim}), got {got}")
        a = batch.extras.get(keys.ATTRIBUTE)
        if a is None:
            raise RequirementError(f"{owner} needs Batch.extras[{keys.ATTRIBUTE!r}]: the attribute "
                                   f"id [B] of each sample")
        check_ids(owner, f"Batch.extras[{keys.ATTRIBUTE!r}]", a,
                  self.num_attributes if a.device.type == "cpu" else None)
        if a.shape[0] != h.shape[0]:
            raise ShapeError(f"{owner}: Batch.extras[{keys.ATTRIBUTE!r}] has {a.shape[0]} ids for "
                             f"{h.shape[0]} feature rows")
        weight = next(self.classifier.parameters())
        scores = self.classifier(reverse_gradient(h.to(weight.dtype), self.grl_lambda))
        per_sample = F.cross_entropy(cls.upcast(scores), a, reduction="none")
        accuracy = (scores.detach().argmax(1) == a).float().mean()
        return Loss(value=per_sample.mean(), per_sample=per_sample,
                    logs={"attribute_accuracy": accuracy})

    def example_inputs(self, batch_size: int, g: torch.Generator) -> tuple[Views, Batch]:
        """For the conformance kit: features of ``feature_dim`` (as the embedding) and random
        attribute ids."""
        feats = torch.randn(batch_size, self.feature_dim, generator=g).requires_grad_()
        attribute = torch.randint(0, self.num_attributes, (batch_size,), generator=g)
        return Views(embeddings=(feats,)), Batch(extras={keys.ATTRIBUTE: attribute})


CARD = Card(
    name="gradient_reversal_disentangle", kind="objective",
    title="Adversarial Speaker Disentanglement Using Unannotated External Data for "
          "Self-supervised Representation Based Voice Conversion",
    paper="arXiv:2305.09167",
    summary="An attribute classifier on the features behind a gradient-reversal layer: the "
            "classifier learns to predict a nuisance attribute (speaker, domain, source corpus), "
            "the encoder receives -lambda times its gradient and learns to hide the attribute.",
    formula="L = 1/B sum_i CE(D(GRL_lambda(h_i)), a_i); GRL_lambda(h) = h forward, "
            "-lambda dL/dh backward; lambda = 1, two attributes",
    left_out="The voice-conversion system: the SSL speech encoder, the acoustic model, its "
             "mel-spectrogram discriminator (the paper's second adversary) and the vocoder. The "
             "discriminator here reads one feature vector per sample (a sequence of content "
             "embeddings would be pooled first); its width and lambda = 1 (Ganin & Lempitsky's "
             "value) are ours, not read from the paper. The attribute ids come from the data "
             "(Batch.extras['attribute'], e.g. 1 for the target speaker and 0 for the external "
             "corpora); no speech data.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(GradientReversalDisentangle, card=CARD)
