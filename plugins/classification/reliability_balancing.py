"""ARBEx's reliability balancing: a classifier's label distribution corrected by anchors and attention.

Wasi, Šerbetar, Islam, Rafi & Chae, "ARBEx: Attentive Feature Extraction with Reliability
Balancing for Robust Facial Expression Learning" (arXiv:2305.01486), Sec. 3. The generic head
of the method, as in the authors' code (github.com/takihasan/ARBEx, ``train.py``, ``loss.py``,
``models/anchors.py``, ``models/attn.py``):

* the classifier's distribution ``p = softmax(z / T)`` and its confidence ``c = 1 - H(p) /
  log C`` (normalised entropy);
* a geometric distribution from ``k`` learnable anchors per class: ``s = sum_k softmax(-||e -
  a_ck|| / delta)`` over all ``C k`` anchors, with confidence ``c_g``; an attention
  distribution from single-head self-attention over the batch's embeddings, with ``c_a``;
* the correction ``r = (c_g s + c_a att) / (c_g + c_a)``, the corrected distribution ``q = c p
  + (1 - c) r`` and the trained one ``p~ = (1 - t) p + t q`` with the trust ``t`` rising from 0
  to 1 over training;
* ``L = NLL(log p~, y) + t (lambda_mu L_anchor + lambda_c L_center)``: the anchor loss
  ``-sum_{c, c'} ||a_c - a_c'||^2 / (sqrt(D) k^2)`` (class anchors concatenated) keeps the
  classes' anchors apart, the centre loss ``mean_i c_i min_k ||e_i - a_{y_i k}|| / sqrt(D)``
  pulls each embedding to its class's nearest anchor.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import torch
from annotated_types import Ge, Gt, Interval
from torch import nn

from sdk import classification as cls
from sdk.card import Card
from sdk.context import FromData
from sdk.distributed import Gather, gather_with_grad, rank, resolve_gather
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Objective
from sdk.types import Batch, Loss, Views

NAME = "reliability_balancing"


def confidence(p: torch.Tensor) -> torch.Tensor:
    """``1 - H(p) / log C`` [B] for distributions ``p`` [B, C] (1 for a one-hot row)."""
    h = -(p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum(-1)  # finite gradient at p = 0
    return 1 - h / math.log(p.shape[-1])


def anchor_distances(e: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """``||e_i - a_ck||`` [B, C, k] for embeddings [B, D] and anchors [C, k, D]."""
    sq = (e[:, None, None, :] - anchors[None]).square().sum(-1)
    return sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt()


def anchor_loss(anchors: torch.Tensor) -> torch.Tensor:
    """``-sum_{c, c'} ||a_c - a_c'||^2 / (sqrt(D) k^2)``, ``a_c`` the concatenation of class
    ``c``'s ``k`` anchors (the code's ``AnchorLoss``)."""
    c, k, d = anchors.shape
    flat = anchors.reshape(c, k * d)
    return -(flat[:, None] - flat[None]).square().sum() / math.sqrt(d) / k / k


def balance(p: torch.Tensor, similarity: torch.Tensor, attention: torch.Tensor,
            trust: float | torch.Tensor) -> torch.Tensor:
    """``p~ = (1 - t) p + t (c p + (1 - c) r)`` [B, C], ``r = (c_g s + c_a att) / (c_g + c_a)``."""
    c, c_g, c_a = confidence(p)[:, None], confidence(similarity)[:, None], confidence(attention)[:, None]
    correction = (similarity * c_g + attention * c_a) / (c_g + c_a).clamp_min(torch.finfo(p.dtype).tiny)
    corrected = c * p + (1 - c) * correction
    return (1 - trust) * p + trust * corrected


class ReliabilityBalancing(Objective):
    """Reliability balancing on ``Views.logits`` [B, C] (the classifier) and
    ``Views.embeddings[0]`` [B, D] (the embeddings it classifies), class ids ``Batch.targets``.
    The objective owns the anchors [C, k, D] and the attention's projections (materialised on
    the first batch when ``num_classes`` / ``embedding_dim`` are not given). The trust ``t``
    is ``trust`` when given, else ``step / trust_steps`` (the run's total steps by default),
    updated after every optimizer step and checkpointed. ``logs["corrected_accuracy"]``: the
    accuracy of ``argmax p~``. The attention couples the batch: with ``gather`` (under DDP)
    it runs over the global batch."""

    requires = {"views": 1, "logits": True, "targets": True}
    consumes = frozenset({Input.LOGITS, Input.LABELS})
    batch_coupled = True

    def __init__(self, num_anchors: Annotated[int, Ge(1)] = 1,
                 temperature: Annotated[float, Gt(0)] = 1.0, delta: Annotated[float, Gt(0)] = 1.0,
                 lambda_ce: Annotated[float, Ge(0)] = 1.0, lambda_mu: Annotated[float, Ge(0)] = 1.0,
                 lambda_center: Annotated[float, Ge(0)] = 1.0,
                 trust: Annotated[float | None, Interval(ge=0, le=1)] = None,
                 trust_steps: Annotated[int | None, Ge(1)] = None,
                 num_classes: Annotated[int | None, Ge(2), FromData("num_classes")] = None,
                 embedding_dim: Annotated[int | None, Ge(1)] = None,
                 class_weights: tuple[float, ...] | None = None, seed: int = 0,
                 gather: Gather = "auto"):
        super().__init__()
        self.k, self.temperature, self.delta = num_anchors, temperature, delta
        self.lambda_ce, self.lambda_mu, self.lambda_center = lambda_ce, lambda_mu, lambda_center
        self.fixed_trust, self.trust_steps, self.seed, self.gather = trust, trust_steps, seed, gather
        self.register_buffer("class_weights", cls.weight_buffer(NAME, class_weights))
        self.register_buffer("trust", torch.tensor(0.0 if trust is None else float(trust)))
        names = ("anchors", "w_q", "b_q", "w_k", "b_k", "w_v", "b_v", "w_o", "b_o")
        for name in names:
            setattr(self, name, nn.UninitializedParameter())
        if num_classes is not None and embedding_dim is not None:
            self._materialise(num_classes, embedding_dim, torch.device("cpu"))

    def _materialise(self, c: int, d: int, device: torch.device) -> None:
        if not isinstance(self.anchors, nn.UninitializedParameter):
            return
        e = c * self.k
        g = torch.Generator().manual_seed(self.seed)
        shapes = {"anchors": (c, self.k, d), "w_q": (d, e), "b_q": (e,), "w_k": (d, e), "b_k": (e,),
                  "w_v": (d, e), "b_v": (e,), "w_o": (e, e), "b_o": (e,)}
        for name, shape in shapes.items():
            param = getattr(self, name)
            param.materialize(shape, device=device)
            with torch.no_grad():
                if name == "anchors":  # the code's zero initialisation
                    param.zero_()
                else:  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
                    bound = 1 / math.sqrt(d if name[-1] in "qkv" else e)
                    param.copy_((torch.rand(shape, generator=g) * 2 - 1) * bound)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        anchors = state_dict.get(prefix + "anchors")
        if isinstance(anchors, torch.Tensor) and isinstance(self.anchors, nn.UninitializedParameter):
            self.k = anchors.shape[1]
            self._materialise(anchors.shape[0], anchors.shape[2], anchors.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def attention(self, e: torch.Tensor) -> torch.Tensor:
        """Single-head scaled dot-product self-attention over the batch's embeddings [B, D],
        softmax over its ``C k`` outputs, summed over each class's anchors: [B, C]."""
        q, k, v = (e @ w.to(e.dtype) + b.to(e.dtype) for w, b in
                   ((self.w_q, self.b_q), (self.w_k, self.b_k), (self.w_v, self.b_v)))
        scores = torch.softmax(q @ k.T / math.sqrt(q.shape[-1]), -1)
        out = (scores @ v) @ self.w_o.to(e.dtype) + self.b_o.to(e.dtype)
        return torch.softmax(out, -1).view(e.shape[0], -1, self.k).sum(-1)

    def forward(self, views: Views, batch: Batch) -> Loss:
        z, e = views.logits, views.embeddings[0]
        b, c = z.shape
        t = cls.targets(NAME, z, batch.targets, soft=False)
        if c < 2:
            raise ShapeError(f"{NAME}: Views.logits must score at least 2 classes (confidences are "
                             f"1 - H / log C), got {list(z.shape)}")
        cls.class_weights(NAME, self.class_weights, c)
        self._materialise(c, e.shape[1], e.device)
        if self.anchors.shape[:2] != (c, self.k) or self.anchors.shape[2] != e.shape[1]:
            raise ShapeError(f"{NAME}: the anchors are [{self.anchors.shape[0]}, {self.k}, "
                             f"{self.anchors.shape[2]}], but Views.logits has {c} classes and "
                             f"Views.embeddings[0] is {list(e.shape)}")
        zf, ef = cls.upcast(z), cls.upcast(e)
        anchors = self.anchors.to(ef.dtype)
        p = torch.softmax(zf / self.temperature, -1)
        dist = anchor_distances(ef, anchors)
        similarity = torch.softmax(-dist.reshape(b, -1) / self.delta, -1).view_as(dist).sum(-1)
        if resolve_gather(self.gather):
            attention = self.attention(gather_with_grad(ef))[rank() * b:(rank() + 1) * b]
        else:
            attention = self.attention(ef)
        trust = (self.trust.to(p.dtype) if self.fixed_trust is None
                 else torch.tensor(self.fixed_trust, dtype=p.dtype, device=p.device))
        p_tilde = balance(p, similarity, attention, trust)
        nll = -torch.log(cls.pick(p_tilde, t).clamp_min(torch.finfo(p.dtype).tiny))
        ce = cls.reduce(nll, t, self.class_weights)
        center = (dist.gather(1, t.ids[:, None, None].expand(b, 1, self.k)).squeeze(1).min(-1).values
                  * confidence(p) / math.sqrt(e.shape[1]))
        per_sample = self.lambda_ce * ce.per_sample + trust * self.lambda_center * center
        value = (self.lambda_ce * ce.value + trust * (self.lambda_mu * anchor_loss(anchors)
                                                      + self.lambda_center * center.mean()))
        with torch.no_grad():
            hit = (p_tilde.argmax(-1) == t.ids).float().mean()
        return Loss(value=value, per_sample=per_sample,
                    logs={"corrected_accuracy": hit, "trust": trust.detach()})

    def after_optimizer_step(self, state: Any) -> None:
        if self.fixed_trust is not None:
            return
        total = self.trust_steps or getattr(state.trainer, "total_steps", None)
        if total:
            self.trust.fill_(min(state.step / total, 1.0))

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        # at the start of training (trust 0) only the classifier's distribution is trained:
        # the embeddings enter through the anchors and the attention once t > 0
        e = torch.randn(batch_size, 5, generator=generator)
        z = torch.randn(batch_size, 3, generator=generator).requires_grad_()
        return Views(embeddings=(e,), logits=z), Batch(targets=torch.arange(batch_size) % 3)


CARD = Card(
    name=NAME, kind="objective",
    title="ARBEx: Attentive Feature Extraction with Reliability Balancing for Robust Facial "
          "Expression Learning",
    paper="arXiv:2305.01486",
    summary="Corrects a classifier's label distribution, in proportion to its uncertainty, "
            "with the distributions of learnable class anchors and of self-attention over the "
            "batch (each weighted by its confidence), trained with anchor-margin and "
            "anchor-centre losses.",
    formula="p = softmax(z/T), c(p) = 1 - H(p)/log C; s_c = sum_k softmax_{ck}(-||e - a_ck||/delta); "
            "att = sum_k softmax(SelfAttn(E))_ck; r = (c(s) s + c(att) att)/(c(s) + c(att)); "
            "p~ = (1-t) p + t (c(p) p + (1 - c(p)) r); L = lambda_ce NLL(p~, y) + t (lambda_mu "
            "(-sum_{c,c'} ||a_c - a_c'||^2/(sqrt(D) k^2)) + lambda_c mean_i c(p_i) min_k "
            "||e_i - a_{y_i k}||/sqrt(D)); t = step / total steps",
    left_out="The window-based cross-attention ViT (POSTER) backbone, the face-landmark "
             "features, the heavy augmentation and the data refinement of the paper are the "
             "model's and the data's part. The code's Q/K/V linear layers followed by "
             "nn.MultiheadAttention's own input projections are merged into one projection "
             "each (the same function class). The code's temperature and delta defaults (1.0) "
             "and anchors per class (1) are used; the code weights the NLL by inverse class "
             "frequency (class_weights here). Test-time correction (off by default in the "
             "code) is not applied: predictions are the classifier's.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(ReliabilityBalancing, card=CARD)
