"""IGNITE: train the surrogate of offline (model-based) optimisation under a bound on its
sharpness, the largest change of its mean prediction within a ball of radius rho around its
parameters, approximated to first order by rho times the norm of the parameter gradient of the
mean prediction; the constrained problem is solved with a Lagrange multiplier by gradient
descent on the parameters and projected ascent on the multiplier.

Dao, Nguyen, Truong & Hoang, "Incorporating Surrogate Gradient Norm to Improve Offline
Optimization Techniques", NeurIPS 2024 (OpenReview ag7piyoyut): sharpness
``S(w) = max_{||g|| <= rho} h(w + g) - h(w) ~ rho ||grad_w h(w)||``, ``h(w) = 1/n sum_i f(x_i; w)``;
``min_w L(w) s.t. rho ||grad_w h(w)|| <= eps``.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from annotated_types import Ge, Gt
from torch import Tensor, nn

from sdk.card import Card
from sdk.distributed import Gather, gather_with_grad, resolve_gather
from sdk.errors import RequirementError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Callback
from sdk.types import Loss


def parameter_gradient_norm(predictions: Tensor, params: list[Tensor], *, gather: bool = False) -> Tensor:
    """``||grad_w h||_2``, ``h`` the mean of ``predictions`` (``[B]``, or ``[B, D]``: over the
    outputs too) over the (global, with ``gather``) batch,
    differentiable in ``w`` (double backward). Under DDP each rank's gradient vector is gathered
    and averaged, which is the global mean's gradient when the ranks hold equal batches."""
    h = predictions.float().mean()
    grads = torch.autograd.grad(h, params, create_graph=True, allow_unused=True)
    used = [g.reshape(-1) for g in grads if g is not None]
    if not used:
        raise RequirementError("surrogate_gradient_norm: the predictions do not depend on the "
                               "model's parameters")
    v = torch.cat(used)
    if gather:
        v = gather_with_grad(v[None]).mean(0)
    return torch.linalg.vector_norm(v)


class SurrogateGradientNorm(Callback):
    """IGNITE's Lagrangian added to whatever loss trains the surrogate (model-agnostic, as the
    paper's point is: the regression loss of gradient ascent, COMs' conservative loss, ...)::

        L <- L + lambda (rho ||grad_w h(w)|| - eps),  h = mean_i f(x_i; w)

    At ``after_loss`` the predictions ``f(x_i; w)`` are the first view's outputs
    (``state.views.embeddings[0]``, ``[B]`` or ``[B, 1]``; a surrogate of ``D`` outputs
    ``[B, D]`` takes the mean over the outputs too) and ``w`` the parameters of the
    Trainer's encoder that require gradients; the multiplier then takes a projected ascent step
    ``lambda <- max(0, lambda + eta_lambda (rho ||grad_w h|| - eps))`` (``eta_lambda = 0``: a fixed
    penalty weight ``lambda_init``), and checkpoints carry it. A bias in the output layer
    contributes exactly 1 to ``grad_w h``, so ``rho ||grad_w h|| >= rho`` and a bound
    ``eps < rho`` cannot be met (the multiplier then grows without end)."""

    def __init__(self, rho: Annotated[float, Gt(0)] = 0.05,
                 epsilon: Annotated[float, Ge(0)] = 0.1,
                 eta_lambda: Annotated[float, Ge(0)] = 0.01,
                 lambda_init: Annotated[float, Ge(0)] = 1.0,
                 gather: Gather = "auto"):
        self.rho, self.epsilon, self.eta_lambda, self.gather = rho, epsilon, eta_lambda, gather
        self.lam = torch.tensor(float(lambda_init))

    def add_to(self, loss: Loss, predictions: Tensor, model: nn.Module) -> Loss:
        """``loss`` with the penalty of ``predictions`` (of ``model``) added, and the multiplier
        stepped; the penalty uses the multiplier from before the step."""
        owner = "callback 'surrogate_gradient_norm'"
        pred = predictions
        if pred.dim() not in (1, 2) or pred.shape[0] == 0 or not pred.is_floating_point():
            raise ShapeError(f"{owner}: the predictions (Views.embeddings[0]) must be floating, "
                             f"[B] or [B, D] with B >= 1, got {predictions.dtype} "
                             f"{list(predictions.shape)}")
        if pred.grad_fn is None:
            raise RequirementError(f"{owner}: the predictions carry no gradient graph to the model's "
                                   "parameters")
        params = [p for p in model.parameters() if p.requires_grad]
        sharpness = self.rho * parameter_gradient_norm(pred, params, gather=resolve_gather(self.gather))
        lam = self.lam.to(sharpness.device)
        penalty = lam * (sharpness - self.epsilon)
        if self.eta_lambda:
            self.lam = (lam + self.eta_lambda * (sharpness.detach() - self.epsilon)).clamp_min(0)
        logs = dict(loss.logs)
        logs.update({"ignite/sharpness": sharpness.detach(), "ignite/lambda": lam})
        return Loss(value=loss.value + penalty, per_sample=loss.per_sample, logs=logs)

    def after_loss(self, state: Any) -> None:
        state.loss = self.add_to(state.loss, state.views.embeddings[0], state.trainer.encoder)

    def state_dict(self) -> dict[str, Any]:
        return {"lam": self.lam.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lam = state["lam"].clone()


CARD = Card(
    name="surrogate_gradient_norm", kind="callback",
    title="Incorporating Surrogate Gradient Norm to Improve Offline Optimization Techniques",
    paper="https://openreview.net/forum?id=ag7piyoyut",
    summary="IGNITE: adds to the offline-optimisation surrogate's training loss a Lagrange "
            "multiplier times its first-order sharpness rho ||grad_w mean_i f(x_i; w)|| minus a "
            "threshold; the multiplier rises while the sharpness bound is violated.",
    formula="L <- L + lambda (rho ||grad_w h(w)||_2 - eps), "
            "h(w) = 1/B sum_i f(x_i; w); lambda <- max(0, lambda + eta_lambda (rho ||grad_w h|| - eps))",
    left_out="The design search that follows surrogate training (gradient ascent, COMs, "
             "REINFORCE, ...) and the Design-Bench tasks. The paper tunes rho, eps and eta_lambda "
             "per task; rho = 0.05, eps = 0.1, eta_lambda = 0.01, lambda_init = 1 are our defaults. "
             "The parameter gradient is taken of the batch's mean prediction (the paper's h is the "
             "mean over the offline set); under DDP the ranks' gradient vectors are averaged "
             "(exact for equal batch sizes; not checked on several ranks). A callback rather than an "
             "objective: the penalty is a function of the encoder's parameters, not of the "
             "objective's inputs, and is added to any surrogate loss.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(SurrogateGradientNorm, card=CARD)
