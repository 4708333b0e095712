"""Self-taught on-the-fly meta loss rescaling: a small rescaling network maps features the model
gives about each sample (its loss, its running loss, the prediction's entropy and margin) to a
loss weight, and is meta-learned on the fly without clean data: after a virtual SGD step of the
weighted loss, the rescaler is updated to lower the loss of the training samples it currently
trusts most.

Heck, Geishauser, Lubis, van Niekerk, Feng, Lin, Ruppik, Vukovic & Gašić, "Learning from Noisy
Labels via Self-Taught On-the-Fly Meta Loss Rescaling" (STORM), AAAI 2025 (arXiv:2412.12955),
Algorithm 1.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import annotated_types
import torch
import torch.nn.functional as F
from torch import Tensor

from sdk import distributed
from sdk.card import Card
from sdk.errors import RequirementError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Reweighter
from sdk.reweighting import check_rows
from sdk.sample_stats import SampleStats
from sdk.types import Batch

FEATURES = 4


def rescaler_features(per_sample: Tensor, ema_loss: Tensor, logits: Tensor, targets: Tensor) -> Tensor:
    """``[B, 4]``: the loss, its running average, the prediction's entropy and the probability
    margin ``p_y - max_{k != y} p_k`` (detached, float32)."""
    p = logits.detach().float().softmax(-1)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1)
    own = p.gather(1, targets[:, None]).squeeze(1)
    other = p.scatter(1, targets[:, None], -1.0).amax(1)
    return torch.stack([per_sample.detach().float(), ema_loss.float(), entropy, own - other], 1)


def rescale(features: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """The rescaler ``sigmoid(w2 relu(w1 u + b1) + b2)`` ``[B]``."""
    return torch.sigmoid(F.relu(features @ w1.T + b1) @ w2.T + b2).squeeze(-1)


def meta_loss(phi: list[Tensor], features: Tensor, params: dict[str, Tensor], model: Any,
              x: Tensor, targets: Tensor, lr: float, meta_fraction: float) -> Tensor:
    """The loss of the meta batch after a virtual step (differentiable in ``phi``): with
    ``l_i(theta)`` the cross-entropy of ``model`` (called functionally with ``params``) on
    ``x``, ``theta' = theta - lr grad_theta mean_i g(u_i) l_i(theta)``, then the mean
    cross-entropy at ``theta'`` of the ``ceil(meta_fraction B)`` samples with the highest
    current weights."""
    g = rescale(features, *phi)
    names = list(params)
    logits = torch.func.functional_call(model, params, (x,))
    losses = F.cross_entropy(_at_least_float32(logits), targets, reduction="none")
    grads = torch.autograd.grad((g * losses).mean(), [params[n] for n in names], create_graph=True)
    virtual = {n: params[n] - lr * gr for n, gr in zip(names, grads)}
    k = max(1, math.ceil(meta_fraction * x.shape[0]))
    chosen = g.detach().topk(k).indices
    after = torch.func.functional_call(model, virtual, (x[chosen],))
    return F.cross_entropy(_at_least_float32(after), targets[chosen])


def _at_least_float32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


class SelfTaughtMetaRescaling(Reweighter):
    """Weights ``g(u_i)`` normalised to mean 1 over the batch, detached; ``u_i`` from
    :func:`rescaler_features` with the running loss kept per ``Batch.index``
    (:class:`sdk.sample_stats.SampleStats`, momentum ``ema``). The rescaler (MLP 4 -> ``hidden``
    -> 1, sigmoid) and its Adam state are buffers (checkpointed, never in the Trainer's
    optimizer). On every training batch, before the weights are returned: one meta step
    ``phi <- Adam(grad_phi meta_loss)`` (:func:`meta_loss`, ``lr`` the virtual step's rate,
    default the optimizer's first group's), its gradient averaged over DDP ranks.

    Needs the encoder's outputs as class logits (``Views.logits``, or the single view's
    embedding) and class ids ``Batch.targets``; the meta batch is evaluated on the batch's
    inputs before any transform (``state.x``)."""

    def __init__(self, num_samples: Annotated[int, annotated_types.Ge(1)] = 4096,
                 hidden: Annotated[int, annotated_types.Ge(1)] = 32,
                 meta_lr: Annotated[float, annotated_types.Gt(0)] = 1e-3,
                 lr: Annotated[float, annotated_types.Gt(0)] | None = None,
                 meta_fraction: Annotated[float, annotated_types.Interval(gt=0, le=1)] = 0.25,
                 ema: Annotated[float, annotated_types.Interval(ge=0, lt=1)] = 0.9, seed: int = 0):
        super().__init__()
        self.meta_lr, self.lr, self.meta_fraction = meta_lr, lr, meta_fraction
        self.stats = SampleStats(num_samples, momentum=ema)
        g = torch.Generator().manual_seed(seed)
        bound1, bound2 = 1 / math.sqrt(FEATURES), 1 / math.sqrt(hidden)
        shapes = {"w1": (hidden, FEATURES), "b1": (hidden,), "w2": (1, hidden), "b2": (1,)}
        for name, shape in shapes.items():
            bound = bound1 if name.endswith("1") else bound2
            self.register_buffer(name, (2 * torch.rand(shape, generator=g) - 1) * bound)
            self.register_buffer(f"adam_m_{name}", torch.zeros(shape))
            self.register_buffer(f"adam_v_{name}", torch.zeros(shape))
        self.register_buffer("meta_steps", torch.zeros((), dtype=torch.long))
        self.__dict__["_context"] = None  # (x, logits) of the current micro-batch
        self.__dict__["_model"] = None  # (encoder, virtual-step rate), by reference

    PHI = ("w1", "b1", "w2", "b2")

    def on_fit_start(self, state: Any) -> None:
        lr = self.lr if self.lr is not None else state.optimizer.param_groups[0]["lr"]
        self.__dict__["_model"] = (state.trainer.encoder, float(lr))

    def after_forward(self, state: Any) -> None:
        views = state.views
        logits = views.logits if views.logits is not None else (
            views.embeddings[0] if len(views.embeddings) == 1 else None)
        self.__dict__["_context"] = (state.x, logits)

    def attach(self, model: Any, lr: float, x: Tensor, logits: Tensor) -> None:
        """Outside a Trainer: the model, the virtual step's rate and the batch's inputs and
        logits (what ``on_fit_start`` and ``after_forward`` record)."""
        self.__dict__["_model"] = (model, float(self.lr if self.lr is not None else lr))
        self.__dict__["_context"] = (x, logits)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Batch]:
        """For the conformance kit: a small linear classifier's losses on a batch, attached."""
        model = torch.nn.Linear(6, 4)
        x = torch.randn(batch_size, 6, generator=generator)
        targets = torch.arange(batch_size) % 4
        with torch.no_grad():
            logits = model(x)
        self.attach(model, 0.1, x, logits)
        per_sample = F.cross_entropy(logits, targets, reduction="none")
        return per_sample.requires_grad_(), Batch(targets=targets, index=torch.arange(batch_size))

    def phi(self) -> list[Tensor]:
        return [getattr(self, n) for n in self.PHI]

    def weights(self, per_sample: Tensor, batch: Batch) -> Tensor:
        owner = "reweighter 'self_taught_meta_rescaling'"
        check_rows(owner, per_sample, batch)
        index = self.stats.check_index(owner, batch.index, per_sample.shape[0])
        context = self.__dict__["_context"]
        if context is None or context[1] is None:
            raise RequirementError(f"{owner} needs the encoder's class logits of the batch (it reads "
                                   "them at after_forward, inside a Trainer)")
        x, logits = context
        targets = batch.targets
        if targets is None or targets.shape != per_sample.shape or targets.is_floating_point():
            raise ShapeError(f"{owner} needs class ids Batch.targets [{per_sample.shape[0]}], got "
                             f"{None if targets is None else list(targets.shape)}")
        seen = self.stats.seen[index] > 0
        ema = torch.where(seen, self.stats.loss_ema[index], per_sample.detach().float())
        features = rescaler_features(per_sample, ema, logits, targets)
        if self.training:
            self.meta_step(features, x, targets)
            self.stats.update(index, per_sample, logits, targets)
        with torch.no_grad():
            g = rescale(features, *self.phi())
            return (g / g.mean().clamp_min(1e-12)).to(per_sample.dtype)

    def meta_step(self, features: Tensor, x: Tensor, targets: Tensor) -> None:
        """One Adam step of the rescaler on :func:`meta_loss` (betas 0.9, 0.999, eps 1e-8)."""
        if self.__dict__["_model"] is None:
            raise RequirementError("reweighter 'self_taught_meta_rescaling' needs the model: use it "
                                   "inside a Trainer (it takes the encoder at on_fit_start)")
        model, lr = self.__dict__["_model"]
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        phi = [p.detach().clone().requires_grad_() for p in self.phi()]
        with torch.enable_grad():
            loss = meta_loss(phi, features, params, model, x, targets, lr, self.meta_fraction)
            grads = list(torch.autograd.grad(loss, phi))
        distributed.all_reduce_mean_(grads)
        with torch.no_grad():
            self.meta_steps += 1
            t = self.meta_steps.float()
            for name, g in zip(self.PHI, grads):
                m, v = getattr(self, f"adam_m_{name}"), getattr(self, f"adam_v_{name}")
                m.mul_(0.9).add_(g, alpha=0.1)
                v.mul_(0.999).addcmul_(g, g, value=0.001)
                step = self.meta_lr * (m / (1 - 0.9 ** t)) / ((v / (1 - 0.999 ** t)).sqrt() + 1e-8)
                getattr(self, name).sub_(step)


CARD = Card(
    name="self_taught_meta_rescaling", kind="reweighter",
    title="Learning from Noisy Labels via Self-Taught On-the-Fly Meta Loss Rescaling",
    paper="arXiv:2412.12955",
    summary="STORM: a rescaler MLP on per-sample features (loss, running loss, entropy, margin) "
            "weights the loss; it is meta-learned on the fly through a virtual step, on the "
            "training samples it trusts most (no clean data).",
    formula="u_i = [l_i, EMA_i(l), H(p_i), p_iy - max_{k!=y} p_ik]; g = sigmoid(MLP(u)); "
            "theta' = theta - lr grad mean_i g_i l_i; phi <- Adam(grad_phi mean_{j in top "
            "meta_fraction by g} l_j(theta')); w_i = g_i / mean_j g_j (detached)",
    left_out="The NLP models and the paper's G forward passes per feature set: the features are "
             "from the one forward of the step (the catalogue's four, not the paper's exact list). "
             "The meta batch is the current batch's most trusted quarter, not a separately drawn "
             "batch; the virtual step is plain SGD at the optimizer's rate whatever the optimizer. "
             "num_samples bounds Batch.index (the running-loss table's size).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(SelfTaughtMetaRescaling, card=CARD)
