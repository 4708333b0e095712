"""Core-tuning: contrast-regularised fine-tuning with a focal supervised contrastive term, hard
pair mining and mixup-generated hard pairs.

Zhang et al., "Unleashing the Power of Contrastive Self-Supervised Visual Models via
Contrast-Regularized Fine-Tuning", NeurIPS 2021, arXiv:2102.06605 (reference code
github.com/Vanint/Core-tuning).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, Interval
from torch import Tensor

from sdk import contrastive
from sdk.card import Card
from sdk.distributed import Gather, gather_no_grad, gather_with_grad, rank, resolve_gather
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Objective
from sdk.types import Batch, Loss, Views, check_ids


def focal_supcon(z: Tensor, labels: Tensor, temperature: float = 0.07) -> tuple[Tensor, Tensor]:
    """Focal supervised contrastive loss per anchor and the mask of anchors with a positive::

        p_ij = exp(s_ij/t) / sum_{k != i} exp(s_ik/t),  s = cos
        l_i  = -1/|P_i| sum_{j in P_i} (1 - p_ij) log p_ij

    ``labels`` [N, C] (soft or one-hot) or [N] ids; positives share an identical label vector.
    """
    zn = F.normalize(z.float(), dim=-1)
    logits = zn @ zn.T / temperature
    n = z.shape[0]
    not_self = ~torch.eye(n, dtype=torch.bool, device=z.device)
    if labels.dim() == 1:
        same = labels[:, None] == labels[None, :]
    else:
        y = labels.float()
        same = torch.cdist(y, y, compute_mode="donot_use_mm_for_euclid_dist") < 1e-6
    positive = same & not_self
    log_prob = logits - contrastive.masked_logsumexp(logits, not_self)[:, None]
    focal = (1 - log_prob.exp()) * log_prob
    n_pos = positive.sum(1)
    loss = -(focal * positive).sum(1) / n_pos.clamp_min(1)
    return loss, n_pos > 0


def hard_pair_indices(z: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """For each sample, its hardest positive (least similar other sample of its class; itself
    when it has none) and hardest negative (most similar sample of another class; itself when
    there is none), by cosine similarity of detached embeddings."""
    zn = F.normalize(z.detach().float(), dim=-1)
    sim = zn @ zn.T
    n = z.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    same = targets[:, None] == targets[None, :]
    big = torch.finfo(sim.dtype).max / 2
    self_idx = torch.arange(n, device=z.device)
    pos_mask, neg_mask = same & ~eye, ~same
    pos = torch.where(pos_mask, sim, big).argmin(1)
    neg = torch.where(neg_mask, sim, -big).argmax(1)
    return (torch.where(pos_mask.any(1), pos, self_idx), torch.where(neg_mask.any(1), neg, self_idx))


def core_tuning_loss(z: Tensor, logits: Tensor, targets: Tensor, *, eta: float = 0.1,
                     temperature: float = 0.07, mixup: bool = True, mixup_alpha: float = 1.0,
                     min_lambda: float = 0.8, order: Tensor | None = None,
                     lam_negative: Tensor | None = None, lam_positive: Tensor | None = None
                     ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """``mean CE(logits, y) + eta * mean focal_supcon(z, y)`` over the batch and, with ``mixup``,
    its two generated sets (hard negatives: ``(1-l) x + l x[order]``, ``l >= min_lambda``; hard
    pairs: ``l x[hardest positive] + (1-l) x[hardest negative]``), mixing embeddings, logits and
    one-hot targets alike. ``order``/``lam_*`` [B] are drawn (Beta(alpha, alpha)) when None.

    Returns ``(value, per_sample [B] averaged over each sample's copies, logs)``.
    """
    b = z.shape[0]
    y = F.one_hot(targets, logits.shape[1]).to(logits.dtype)
    zs, ls, ys = [z], [logits], [y]
    if mixup:
        beta = torch.distributions.Beta(torch.tensor(float(mixup_alpha), device=z.device),
                                        torch.tensor(float(mixup_alpha), device=z.device))
        if order is None:
            order = torch.randperm(b, device=z.device)
        if lam_negative is None:
            lam_negative = beta.sample((b,)).clamp_min(min_lambda)
        if lam_positive is None:
            lam_positive = beta.sample((b,))
        ln, lp = lam_negative.to(z.dtype)[:, None], lam_positive.to(z.dtype)[:, None]
        pos, neg = hard_pair_indices(z, targets)
        for t, out in ((z, zs), (logits, ls), (y, ys)):
            out.append((1 - ln.to(t.dtype)) * t + ln.to(t.dtype) * t[order])
            out.append(lp.to(t.dtype) * t[pos] + (1 - lp.to(t.dtype)) * t[neg])
    z_all, l_all, y_all = torch.cat(zs), torch.cat(ls), torch.cat(ys)
    ce = -(y_all.float() * F.log_softmax(l_all.float(), dim=1)).sum(1)
    if eta:
        fcl, valid = focal_supcon(z_all, y_all, temperature)
    else:
        fcl, valid = ce.new_zeros(ce.shape), torch.zeros_like(ce, dtype=torch.bool)
    value = ce.mean() + eta * contrastive.masked_mean(fcl, valid)
    per_sample = (ce + eta * fcl).view(-1, b).mean(0)
    return value, per_sample, {"cross_entropy": ce.mean().detach(),
                               "focal_contrastive": contrastive.masked_mean(fcl, valid).detach()}


class CoreTuning(Objective):
    """Core-tuning: ``L = CE + eta * L_fcl`` on the batch plus mixup-generated hard pairs
    (see :func:`core_tuning_loss`, :func:`focal_supcon`).

    ``Views.embeddings[0]`` are the contrastive head's outputs, ``Views.logits`` the
    classifier's; ``Batch.targets`` class ids. Hard pairs are generated in training mode only
    (as the reference's evaluation uses the plain batch). ``gather`` ("auto": under DDP) gathers
    every rank's embeddings, logits and targets, and each rank computes the loss of the global
    batch, as one process would (in training with its own mixup draws); ``per_sample`` keeps
    this rank's samples.
    """

    requires = {"views": 1, "logits": True, "targets": True}
    consumes = frozenset({Input.LOGITS, Input.LABELS})
    batch_coupled = True

    def __init__(self, eta: Annotated[float, Ge(0)] = 0.1, temperature: Annotated[float, Gt(0)] = 0.07,
                 mixup: bool = True, mixup_alpha: Annotated[float, Gt(0)] = 1.0,
                 min_lambda: Annotated[float, Interval(ge=0, le=1)] = 0.8,
                 gather: Gather = "auto"):
        super().__init__()
        self.eta, self.temperature, self.mixup = eta, temperature, mixup
        self.mixup_alpha, self.min_lambda = mixup_alpha, min_lambda
        self.gather = gather

    def forward(self, views: Views, batch: Batch) -> Loss:
        targets = batch.targets
        check_ids(f"objective {self.name!r}", "Batch.targets", targets)
        z, logits, targets = views.embeddings[0], views.logits, targets.long()
        b = z.shape[0]
        gathered = resolve_gather(self.gather)
        if gathered:
            z, logits, targets = gather_with_grad(z), gather_with_grad(logits), gather_no_grad(targets)
        try:
            value, per_sample, logs = core_tuning_loss(
                z, logits, targets, eta=self.eta,
                temperature=self.temperature, mixup=self.mixup and self.training,
                mixup_alpha=self.mixup_alpha, min_lambda=self.min_lambda)
        except (IndexError, RuntimeError):  # ids out of range (on CPU; CUDA asserts on the device)
            check_ids(f"objective {self.name!r}", "Batch.targets", targets, logits.shape[1])
            raise
        if gathered:
            per_sample = per_sample[rank() * b:(rank() + 1) * b]
        return Loss(value=value, per_sample=per_sample, logs=logs)


CARD = Card(
    name="core_tuning", kind="objective",
    title="Unleashing the Power of Contrastive Self-Supervised Visual Models via Contrast-Regularized "
          "Fine-Tuning",
    paper="arXiv:2102.06605",
    summary="Fine-tuning loss: cross-entropy plus eta times a focal supervised contrastive term, "
            "on the batch and on mixup-generated hard negatives and hard positive/negative pairs "
            "(mined by cosine similarity), which also smooths the decision boundary.",
    formula="L = mean_i -sum_c y_ic log softmax(f_i)_c + eta * mean_i -1/|P_i| sum_{j in P_i} "
            "(1 - p_ij) log p_ij, p_ij = e^{s_ij/t} / sum_{k!=i} e^{s_ik/t}, t=0.07; over "
            "{x_i} + {(1-l) x_i + l x_pi(i), l=max(Beta(a,a), 0.8)} + {l x_hp(i) + (1-l) x_hn(i), "
            "l~Beta(a,a)} with x = (embedding, logits, one-hot label); positives share the label vector",
    left_out="Mixing is applied to the given embeddings and logits instead of backbone features "
             "before the heads (for a linear classifier, mixing logits equals mixing features; for "
             "the MLP contrastive head it does not). The focal term averages over each anchor's "
             "positives (the reference code divides by the number of columns). The reference "
             "detaches the un-mixed features; here they keep their gradient. eta defaults to 0.1 "
             "(the paper tunes it per task; the CIFAR script uses 10 with its other averaging). "
             "The MoCo-v2 backbone and segmentation experiments are not included.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(CoreTuning, card=CARD)
