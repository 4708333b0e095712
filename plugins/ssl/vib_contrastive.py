"""CVIB: a VIB-masked ("self-pruned") copy of the representation, trained with the original by
classification and a self-pruning contrastive loss.

Chang, Yang, Jiang & Xu, "Reducing Spurious Correlations for Aspect-Based Sentiment Analysis with
Variational Information Bottleneck and Contrastive Learning", arXiv:2303.02846 (published as
"Contrastive Variational Information Bottleneck for Aspect-based Sentiment Analysis",
Knowledge-Based Systems 2024; reference code github.com/shesshan/CVIB). The masking layer is
Dai et al.'s VIBNet, "Compressing Neural Networks using the Variational Information Bottleneck",
ICML 2018.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt
from torch import Tensor, nn

from sdk.card import Card
from sdk.context import FromData
from sdk.distributed import Gather, gather_with_grad, rank, resolve_gather
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Objective
from sdk.types import Batch, Loss, Views, check_ids

_EPS = 1e-8  # the reference code's epsilon in log alpha and the KL


def vib_kl(mu: Tensor, log_var: Tensor) -> Tensor:
    """VIBNet's bound on the masking layer's information: ``1/2 sum_d log(1 + mu_d^2 / sigma_d^2)``."""
    return 0.5 * torch.log1p(mu.pow(2) / (log_var.exp() + _EPS)).sum()


def self_pruning_contrast(anchors: Tensor, candidates: Tensor, temperature: float,
                          offset: int = 0) -> Tensor:
    """Per anchor ``-log softmax_j(cos(a_i, c_j) / t)`` at ``j = offset + i``: the anchor's own
    sample among the candidates is its positive, every other sample a negative [A]."""
    dtype = torch.promote_types(anchors.dtype, torch.float32)
    logits = F.cosine_similarity(anchors.to(dtype)[:, None], candidates.to(dtype)[None], dim=-1)
    target = torch.arange(anchors.shape[0], device=anchors.device) + offset
    return F.cross_entropy(logits / temperature, target, reduction="none")


class VIBMask(nn.Module):
    """Per-dimension multiplicative mask ``s ~ N(mu, sigma^2)`` (VIBNet): in training a fresh
    ``s = mu + eps sigma`` per sample, in evaluation the deterministic ``mu * [log alpha <
    threshold]`` with ``log alpha = log sigma^2 - log(mu^2 + 1e-8)`` (dimensions pruned).
    Initialisation as the reference code: ``mu ~ N(1, init_var)``, ``log sigma^2 ~
    N(-init_mag, init_var)``; the width is taken on first use."""

    def __init__(self, init_mag: float, init_var: float, threshold: float):
        super().__init__()
        self.init_mag, self.init_var, self.threshold = init_mag, init_var, threshold
        self.mu = nn.UninitializedParameter()
        self.log_var = nn.UninitializedParameter()

    def _materialise(self, width: int, device: torch.device) -> None:
        if isinstance(self.mu, nn.UninitializedParameter):
            self.mu.materialize((width,), device=device)
            self.log_var.materialize((width,), device=device)
            with torch.no_grad():
                self.mu.normal_(1.0, self.init_var)
                self.log_var.normal_(-self.init_mag, self.init_var)

    def log_alpha(self) -> Tensor:
        return self.log_var - torch.log(self.mu.pow(2) + _EPS)

    def forward(self, h: Tensor) -> Tensor:
        self._materialise(h.shape[1], h.device)
        dtype = torch.promote_types(h.dtype, torch.float32)
        mu, log_var = self.mu.to(dtype), self.log_var.to(dtype)
        if self.training:
            scale = mu + torch.randn(h.shape, dtype=dtype, device=h.device) * (0.5 * log_var).exp()
        else:
            scale = (mu * (self.log_alpha() < self.threshold)).detach()
        return h.to(dtype) * scale

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        mu = state_dict.get(prefix + "mu")
        if isinstance(self.mu, nn.UninitializedParameter) and mu is not None:
            self._materialise(mu.shape[0], mu.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class VIBContrastive(Objective):
    """CVIB on the embeddings ``h`` (first view) of the original network and their self-pruned
    copy ``z = VIBMask(h)``, with a linear classifier (``num_classes`` outputs) on both::

        L = CE(W h, y) + sdcl * SC(sg(z), h)  +  CE(W z, y) + kl * KL(mask) + sdcl * SC(z, sg(h))

    the two networks' losses of the reference code, summed (``SC``:
    :func:`self_pruning_contrast`, ``sg``: stop-gradient, as the code detaches the other
    network's features). Its gradient is that of ``CE(h) + CE(z) + kl KL + 2 sdcl SC(z, h)``;
    the value counts both contrastive halves. More views: each view is a sample of its own (the
    losses averaged over views). ``gather`` ("auto": under DDP) uses every rank's embeddings as
    the contrastive candidates."""

    requires = {"views": 1, "targets": True}
    consumes = frozenset({Input.LABELS})
    batch_coupled = True

    def __init__(self, num_classes: Annotated[int, Ge(2), FromData("num_classes")] = 10,
                 sdcl: Annotated[float, Ge(0)] = 0.5, temperature: Annotated[float, Gt(0)] = 0.1,
                 kl: Annotated[float, Ge(0)] = 2.5e-7, init_mag: float = 9.0,
                 init_var: Annotated[float, Ge(0)] = 0.01, threshold: float = 0.0,
                 gather: Gather = "auto"):
        super().__init__()
        self.num_classes, self.sdcl, self.temperature, self.kl = num_classes, sdcl, temperature, kl
        self.gather = gather
        self.mask = VIBMask(init_mag, init_var, threshold)
        self.classifier = nn.LazyLinear(num_classes)

    def logits(self, h: Tensor) -> Tensor:
        """The classifier's scores ``W h + b`` [B, C] in ``h``'s precision (float32 at least)."""
        if isinstance(self.classifier.weight, nn.UninitializedParameter):
            self.classifier(h[:0].detach().to(self.classifier.weight.dtype))  # materialises it
        dtype = torch.promote_types(h.dtype, torch.float32)
        return F.linear(h.to(dtype), self.classifier.weight.to(dtype), self.classifier.bias.to(dtype))

    def forward(self, views: Views, batch: Batch) -> Loss:
        owner = f"objective {self.name!r}"
        y = batch.targets
        check_ids(owner, "Batch.targets", y)
        gathered = resolve_gather(self.gather)
        offset = rank() * y.shape[0] if gathered else 0
        kl = None
        per_view = []
        for h in views.embeddings:
            z = self.mask(h)
            kl = vib_kl(self.mask.mu, self.mask.log_var) if kl is None else kl
            try:
                ce_main = F.cross_entropy(self.logits(h), y, reduction="none")
                ce_sub = F.cross_entropy(self.logits(z), y, reduction="none")
            except (IndexError, RuntimeError):
                check_ids(owner, "Batch.targets", y, self.num_classes)
                raise
            h_all = gather_with_grad(h) if gathered else h
            main = ce_main + self.sdcl * self_pruning_contrast(z.detach(), h_all, self.temperature,
                                                               offset)
            sub = ce_sub + self.sdcl * self_pruning_contrast(z, h_all.detach(), self.temperature,
                                                             offset)
            per_view.append(main + sub)
        per_sample = torch.stack(per_view).mean(0) + self.kl * kl
        return Loss(value=per_sample.mean(), per_sample=per_sample,
                    logs={"kl": kl.detach(), "kept": (self.mask.log_alpha() < self.mask.threshold)
                          .float().mean().detach()})


CARD = Card(
    name="vib_contrastive", kind="objective",
    title="Reducing Spurious Correlations for Aspect-Based Sentiment Analysis with Variational "
          "Information Bottleneck and Contrastive Learning (CVIB)",
    paper="arXiv:2303.02846",
    summary="A self-pruned copy of the representation (a VIBNet multiplicative Gaussian mask "
            "whose information is penalised) is classified alongside the original and pulled "
            "to it by a contrastive loss whose negatives are the batch's other samples.",
    formula="z = h * s, s ~ N(mu, sigma^2) per dimension (eval: mu * [log sigma^2 - log mu^2 < "
            "thr]); KL = 1/2 sum_d log(1 + mu_d^2 / sigma_d^2); SC(a, c)_i = -log softmax_j("
            "cos(a_i, c_j) / t)_i; L = CE(Wh) + sdcl SC(sg z, h) + CE(Wz) + kl KL + sdcl SC(z, sg h)",
    left_out="The text encoders (BERT, RGAT) and the aspect-based sentiment data. The reference "
             "prunes a second, separate network with a mask after each layer and scales each "
             "mask's KL by the sequence length (by the width on fully connected layers); here "
             "one mask acts on the shared representation and classifier, and its KL is not "
             "scaled, so the code's kl = 2.5e-7 (the default) is weak at this scale. The "
             "separate optimiser and learning-rate decay of the mask parameters are left to the "
             "trainer. The catalogue's Gaussian-encoder VIB with KL(q(z|x) || N(0, I)) and a "
             "supervised contrastive term is not what the paper does: its VIB is VIBNet "
             "masking and its contrastive term is instance-level (original vs pruned).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(VIBContrastive, card=CARD)
