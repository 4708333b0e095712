"""KRR-ST: self-supervised dataset distillation by kernel ridge regression on target
representations.

Lee, Lee & Hwang, "Self-Supervised Dataset Distillation for Transfer Learning", ICLR 2024
(arXiv:2310.06511).

A small synthetic set ``X_s`` ``[m, ...]`` with learnable target representations ``Y_s`` ``[m, d]``
(initialised as ``m`` real samples and a self-supervised target model's representations of them)
is optimised so that kernel ridge regression on it, with the features ``f`` of a model from a
pool, predicts the target's representations ``Y_r = g(X_r)`` of real batches (eq. 5):
``L = ||K_rs (K_ss + lambda I)^-1 Y_s - Y_r||^2 / (n d)``, ``K_rs = [f(X_r), 1] [f(X_s), 1]^T``,
``K_ss = [f(X_s), 1] [f(X_s), 1]^T``, ``lambda = 1e-6 tr(K_ss)`` (detached). After each outer step
the model used takes one online step of ``MSE(h(f(X_s)), Y_s)``; a model that has taken
``online_iterations`` steps is re-initialised (the model pool). Defaults from the authors' code:
10 models, online SGD (lr 0.1, momentum 0.9, weight decay 1e-3) for up to 1000 steps, outer
AdamW lr 1e-3.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt
from torch import Tensor, nn

from sdk.card import Card
from sdk.errors import ConfigError, ShapeError
from sdk.events import State
from sdk.hookspecs import hookimpl
from sdk.interfaces import Callback


def _with_bias(f: Tensor) -> Tensor:
    return torch.cat([f, f.new_ones(f.shape[0], 1)], dim=1)


def krr_predict(f_real: Tensor, f_syn: Tensor, y_syn: Tensor, reg: float = 1e-6) -> Tensor:
    """``K_rs (K_ss + lambda I)^-1 Y_s`` with the features given a bias column and ``lambda = reg
    tr(K_ss)`` (no gradient through ``lambda``)."""
    fr, fs = _with_bias(f_real), _with_bias(f_syn)
    k_ss = fs @ fs.T
    lam = reg * torch.trace(k_ss).detach()
    eye = torch.eye(k_ss.shape[0], dtype=k_ss.dtype, device=k_ss.device)
    return (fr @ fs.T) @ torch.linalg.solve(k_ss + lam * eye, y_syn)


def krr_distill_loss(f_real: Tensor, f_syn: Tensor, y_syn: Tensor, y_real: Tensor,
                     reg: float = 1e-6) -> Tensor:
    """``MSE(krr_predict(f_real, f_syn, y_syn), y_real)`` (eq. 5, mean over entries)."""
    return F.mse_loss(krr_predict(f_real, f_syn, y_syn, reg), y_real)


class PoolModel(nn.Module):
    """A feature extractor ``f`` (linear + ReLU layers on flat inputs) with a linear head ``h``
    to the representation width: the pool's models and the model pre-trained on the result."""

    def __init__(self, in_dim: int, hidden_dims: Sequence[int], out_dim: int):
        super().__init__()
        layers: list[nn.Module] = []
        for a, b in zip([in_dim, *hidden_dims[:-1]], hidden_dims):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(hidden_dims[-1], out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x.flatten(1)))


class ModelPool:
    """``L`` :class:`PoolModel` s held as stacked weights, so that one SGD step (momentum 0.9,
    weight decay, as ``torch.optim.SGD``) trains any subset of them at once; a model is
    re-initialised as a fresh :class:`PoolModel` would be."""

    def __init__(self, count: int, in_dim: int, hidden_dims: Sequence[int], out_dim: int,
                 lr: float, weight_decay: float, device: torch.device):
        self.shape = (in_dim, tuple(hidden_dims), out_dim)
        self.lr, self.weight_decay, self.device = lr, weight_decay, device
        fresh = [self._fresh() for _ in range(count)]
        self.params = [torch.stack(ps).requires_grad_() for ps in zip(*fresh)]
        self.momenta = [torch.zeros_like(p) for p in self.params]

    def _fresh(self) -> list[Tensor]:
        model = PoolModel(*self.shape)
        return [p.detach().to(self.device) for p in model.parameters()]

    def reset(self, i: int) -> None:
        with torch.no_grad():
            for p, m, q in zip(self.params, self.momenta, self._fresh()):
                p[i] = q
                m[i] = 0

    def features(self, x: Tensor, models: Tensor) -> Tensor:
        """``f_l(x)`` ``[len(models), N, h]`` for the models ``models`` (ids ``[k]``)."""
        h = x.flatten(1).expand(models.shape[0], -1, -1)
        layers = self.params[:-2]
        for w, b in zip(layers[0::2], layers[1::2]):
            h = torch.relu(torch.baddbmm(b[models][:, None, :], h, w[models].transpose(1, 2)))
        return h

    def __call__(self, x: Tensor, models: Tensor) -> Tensor:
        w, b = self.params[-2], self.params[-1]
        return torch.baddbmm(b[models][:, None, :], self.features(x, models), w[models].transpose(1, 2))

    def step(self, x: Tensor, y: Tensor, active: Tensor) -> None:
        """One SGD step of ``MSE(h_l(f_l(x)), y)`` for the models where ``active`` ``[L]`` holds."""
        everyone = torch.arange(active.shape[0], device=active.device)
        with torch.enable_grad():
            per_model = ((self(x, everyone) - y) ** 2).mean(dim=(1, 2))
            grads = torch.autograd.grad(per_model.sum(), self.params)
        with torch.no_grad():
            for p, m, g in zip(self.params, self.momenta, grads):
                mask = active.view(-1, *([1] * (p.dim() - 1))).to(p.dtype)
                d = g + self.weight_decay * p
                m.copy_(torch.where(mask > 0, 0.9 * m + d, m))
                p.sub_(self.lr * mask * m)

    def state_dict(self) -> dict[str, Any]:
        return {"params": [p.detach().clone() for p in self.params],
                "momenta": [m.clone() for m in self.momenta]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for p, q in zip(self.params, state["params"]):
                p.copy_(q)
            for m, q in zip(self.momenta, state["momenta"]):
                m.copy_(q)


class KRRSSLDistill(Callback):
    """Distils ``num_synthetic`` samples and their target representations from a training run.

    ``on_fit_start``: the first ``num_synthetic`` inputs of ``trainer.train_loader`` become
    ``X_s`` (all of them, with a warning, when there are fewer), ``Y_s = target(X_s)``, and each
    of the ``num_models`` pool models is trained on them
    for a random number of steps in ``[1, online_iterations)``. ``after_optimizer_step``: one
    outer step on the step's real batch ``state.x`` (``Y_r = target(state.x)``) with a pool
    model drawn at random, then that model's online step. ``target``: the self-supervised model
    whose representations are distilled (None: the encoder being trained, read as it is at each
    step, in eval mode). :meth:`synthetic` returns ``(X_s, Y_s)``; :meth:`pretrain` fits a fresh
    model to them. Everything (set, optimiser, pool, draws) is checkpointed."""

    def __init__(self, num_synthetic: Annotated[int, Ge(1)] = 1000,
                 num_models: Annotated[int, Ge(1)] = 10,
                 hidden_dims: tuple[Annotated[int, Ge(1)], ...] = (128,),
                 online_iterations: Annotated[int, Ge(2)] = 1000,
                 online_lr: Annotated[float, Gt(0)] = 0.1,
                 online_weight_decay: Annotated[float, Ge(0)] = 1e-3,
                 outer_lr: Annotated[float, Gt(0)] = 1e-3, reg: Annotated[float, Gt(0)] = 1e-6,
                 target: nn.Module | None = None, seed: int = 0):
        if not hidden_dims:
            raise ConfigError("krr_ssl_distill: hidden_dims needs at least one layer",
                              param="hidden_dims")
        self.num_synthetic, self.num_models, self.hidden_dims = num_synthetic, num_models, hidden_dims
        self.online_iterations, self.online_lr = online_iterations, online_lr
        self.online_weight_decay, self.outer_lr, self.reg = online_weight_decay, outer_lr, reg
        self.target, self.seed = target, seed
        self.x_syn: Tensor | None = None
        self.y_syn: Tensor | None = None
        self.last_loss: Tensor | None = None

    # set-up -----------------------------------------------------------------------------------
    def _represent(self, x: Tensor, model: nn.Module) -> Tensor:
        was_training = model.training
        param = next(model.parameters(), None)
        if param is not None and param.is_floating_point() and x.is_floating_point():
            x = x.to(param.dtype)
        model.eval()
        with torch.no_grad():
            y = model(x)
        model.train(was_training)
        if y.dim() != 2 or y.shape[0] != x.shape[0]:
            raise ShapeError(f"callback 'krr_ssl_distill': the target's representations must be "
                             f"[{x.shape[0]}, d], got {list(y.shape)}")
        return y.float()

    def _build(self, x: Tensor, y: Tensor) -> None:
        self.x_syn = x.detach().float().clone().requires_grad_()
        self.y_syn = y.detach().float().clone().requires_grad_()
        self.outer_opt = torch.optim.AdamW([self.x_syn, self.y_syn], lr=self.outer_lr, weight_decay=0.0)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.pool = ModelPool(self.num_models, self.x_syn[0].numel(), self.hidden_dims,
                              self.y_syn.shape[1], self.online_lr, self.online_weight_decay,
                              self.x_syn.device)
        self.iterations = [0] * self.num_models

    def _online_step(self, active: list[bool]) -> None:
        mask = torch.tensor(active, device=self.x_syn.device)
        self.pool.step(self.x_syn.detach(), self.y_syn.detach(), mask)

    def _target(self, state: State) -> nn.Module:
        return self.target if self.target is not None else state.model

    def initialize(self, x: Tensor, target: nn.Module) -> None:
        """``X_s = x`` (``num_synthetic`` rows), ``Y_s = target(x)``, and the pool's warm-up."""
        if x.shape[0] < self.num_synthetic:
            warnings.warn(f"krr_ssl_distill: num_synthetic={self.num_synthetic}, but the training set "
                          f"has {x.shape[0]} inputs: the synthetic set takes all of them",
                          stacklevel=2)
        x = x[:self.num_synthetic]
        self._build(x, self._represent(x, target))
        steps = torch.randint(1, self.online_iterations, (self.num_models,),
                              generator=self.generator).tolist()
        for t in range(max(steps)):  # all models at once, each for its own number of steps
            self._online_step([t < s for s in steps])
        self.iterations = steps

    def on_fit_start(self, state: State) -> None:
        if self.x_syn is not None:
            return
        rows, seen = [], 0
        for item in state.trainer.train_loader:
            x = item[0] if isinstance(item, (tuple, list)) else item
            rows.append(x)
            seen += x.shape[0]
            if seen >= self.num_synthetic:
                break
        device = next(state.model.parameters()).device
        self.initialize(torch.cat(rows).to(device), self._target(state))

    # the outer loop ---------------------------------------------------------------------------
    def outer_step(self, x_real: Tensor, target: nn.Module) -> Tensor:
        """One KRR-ST step on the real batch ``x_real``; returns the loss (detached)."""
        if x_real[0].numel() != self.x_syn[0].numel():
            raise ShapeError(f"callback 'krr_ssl_distill': real inputs of {x_real[0].numel()} "
                             f"values, but the synthetic set holds {self.x_syn[0].numel()}")
        y_real = self._represent(x_real, target)
        i = int(torch.randint(self.num_models, (1,), generator=self.generator))
        which = torch.tensor([i], device=self.x_syn.device)
        f_syn = self.pool.features(self.x_syn, which)[0]
        with torch.no_grad():
            f_real = self.pool.features(x_real.float(), which)[0]
        loss = krr_distill_loss(f_real, f_syn, self.y_syn, y_real, self.reg)
        self.outer_opt.zero_grad()
        x_grad, y_grad = torch.autograd.grad(loss, [self.x_syn, self.y_syn])
        self.x_syn.grad, self.y_syn.grad = x_grad, y_grad
        self.outer_opt.step()
        if self.iterations[i] >= self.online_iterations:
            self.pool.reset(i)
            self.iterations[i] = 0
        else:
            self._online_step([j == i for j in range(self.num_models)])
            self.iterations[i] += 1
        self.last_loss = loss.detach()
        return self.last_loss

    def after_optimizer_step(self, state: State) -> None:
        self.outer_step(state.x, self._target(state))

    # results and state ------------------------------------------------------------------------
    def synthetic(self) -> tuple[Tensor, Tensor]:
        """``(X_s, Y_s)``, detached."""
        return self.x_syn.detach().clone(), self.y_syn.detach().clone()

    def pretrain(self, steps: int = 1000, lr: float = 0.1, weight_decay: float = 1e-3) -> PoolModel:
        """A fresh model fitted to ``MSE(h(f(X_s)), Y_s)`` by full-batch SGD (momentum 0.9)."""
        x, y = self.synthetic()
        model = PoolModel(x[0].numel(), self.hidden_dims, y.shape[1]).to(x.device)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
        with torch.enable_grad():
            for _ in range(steps):
                opt.zero_grad()
                F.mse_loss(model(x), y).backward()
                opt.step()
        return model

    def state_dict(self) -> dict[str, Any]:
        if self.x_syn is None:
            return {}
        return {"x_syn": self.x_syn.detach().clone(), "y_syn": self.y_syn.detach().clone(),
                "outer_opt": copy.deepcopy(self.outer_opt.state_dict()),
                "rng": self.generator.get_state(),
                "pool": self.pool.state_dict(), "iterations": list(self.iterations)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self._build(state["x_syn"], state["y_syn"])
        self.outer_opt.load_state_dict(state["outer_opt"])
        self.generator.set_state(state["rng"])
        self.pool.load_state_dict(state["pool"])
        self.iterations = list(state["iterations"])


CARD = Card(
    name="krr_ssl_distill", kind="callback",
    title="Self-Supervised Dataset Distillation for Transfer Learning (KRR-ST)",
    paper="arXiv:2310.06511",
    summary="Distils a small synthetic set and its learnable target representations so that "
            "kernel ridge regression on a pool model's features of it predicts a self-supervised "
            "target's representations of real batches; models pre-trained on the result transfer.",
    formula="L = MSE(K_rs (K_ss + lambda I)^-1 Y_s, g(X_r)), K = [f(.), 1][f(.), 1]^T, lambda = "
            "1e-6 tr(K_ss); X_s, Y_s <- AdamW(1e-3); pool model: one SGD step of MSE(h(f(X_s)), "
            "Y_s), re-initialised after 1000",
    left_out="The paper's ConvNet / ResNet models, its image augmentations of the real batch "
             "(the real batch is state.x as loaded) and its Barlow Twins ResNet-18 target (any "
             "module: by default the encoder being trained, at its current weights). The pool's "
             "models here are MLPs on flat inputs (hidden_dims); the linear-probe and fine-tuning "
             "transfer evaluations are the caller's (pretrain() gives the pre-trained model). "
             "num_synthetic defaults to the paper's CIFAR-100 size (1000).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(KRRSSLDistill, card=CARD)
