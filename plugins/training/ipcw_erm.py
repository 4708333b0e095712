"""Empirical risk minimisation under random right censoring: weight each uncensored sample by
the inverse of the Kaplan-Meier estimate of the censoring survival at its time, and each
censored sample by 0, which makes the weighted risk an (asymptotically) unbiased estimate of
the risk on the uncensored outcome.

Ausset, Clémençon & Portier, "Empirical Risk Minimization under Random Censorship: Theory and
Practice", JMLR 2022 (arXiv:1906.01908), the Kaplan-Meier weights of Section 3.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sdk import keys
from sdk.card import Card
from sdk.errors import NotFittedError, RequirementError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Reweighter
from sdk.reweighting import check_rows
from sdk.types import Batch


def censoring_survival(times: Tensor, events: Tensor) -> tuple[Tensor, Tensor]:
    """The Kaplan-Meier estimate of the censoring distribution's survival ``S_C``: the distinct
    observed times ``t_1 < ... < t_K`` and ``S_C(t_k) = prod_{j <= k} (1 - c_j / n_j)``, with
    ``c_j`` the censorings (``event == 0``) at ``t_j`` and ``n_j = #{T >= t_j}`` at risk
    (float64)."""
    t, inverse = torch.unique(times.double(), sorted=True, return_inverse=True)
    censored = torch.zeros_like(t).index_add_(0, inverse, (events == 0).double())
    at_time = torch.zeros_like(t).index_add_(0, inverse, torch.ones_like(times, dtype=torch.float64))
    at_risk = at_time.flip(0).cumsum(0).flip(0)
    return t, torch.cumprod(1 - censored / at_risk, 0)


def survival_before(t: Tensor, grid: Tensor, survival: Tensor) -> Tensor:
    """``S_C(t-)``: the estimate just before ``t`` (the product over grid times ``< t``; 1
    before the first)."""
    k = torch.searchsorted(grid, t.double(), right=False)  # how many grid times lie below t
    return torch.cat([survival.new_ones(1), survival])[k]


def ipcw_weights(times: Tensor, events: Tensor, grid: Tensor, survival: Tensor) -> Tensor:
    """``delta_i / S_C(T_i-)`` (0 for censored samples; float64)."""
    return (events != 0).double() / survival_before(times, grid, survival).clamp_min(1e-12)


class IPCWERM(Reweighter):
    """Weights ``w_i = delta_i / (B S_C(T_i-))`` from ``Batch.extras["time"]`` (``T = min(Y,
    C)``) and ``Batch.extras["event"]`` (``delta = 1[Y <= C]``), with ``S_C`` the Kaplan-Meier
    censoring survival fitted on the whole training set by :meth:`fit` (buffers, so checkpoints
    carry it). ``normalize = False``: the reduced loss ``(1/B) sum_i delta_i l_i / S_C(T_i-)`` is
    the IPCW estimate of the mean loss on the uncensored outcomes (its expectation is the
    uncensored risk when C is independent of (X, Y)). The loss ``l_i`` is computed by the
    objective on the observed time, which equals ``Y_i`` wherever ``delta_i = 1``."""

    normalize = False

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("grid", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("survival", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("inverse", torch.zeros(0))  # 1 / S_C(t_k-) for k = 0 .. K, float32

    def _load_from_state_dict(self, state, prefix, *args, **kwargs):  # fitted sizes differ
        for name in ("grid", "survival", "inverse"):
            if prefix + name in state:
                setattr(self, name, torch.empty_like(state[prefix + name]))
        super()._load_from_state_dict(state, prefix, *args, **kwargs)

    def fit(self, times: Tensor, events: Tensor) -> IPCWERM:
        """Fit the censoring survival on the training set's observed ``times`` ``[N]`` and
        ``events`` ``[N]``; returns ``self``."""
        times, events = self._check(times, events, "fit")
        grid, survival = censoring_survival(times.detach(), events.detach())
        self.grid, self.survival = grid.to(self.grid.device), survival.to(self.grid.device)
        before = torch.cat([survival.new_ones(1), survival]).clamp_min(1e-12)
        self.inverse = (1 / before).float().to(self.grid.device)
        return self

    def _check(self, times: Tensor | None, events: Tensor | None, where: str) -> tuple[Tensor, Tensor]:
        owner = "reweighter 'ipcw_erm'"
        if times is None or events is None:
            raise RequirementError(f"{owner} needs Batch.extras[{keys.TIME!r}] and "
                                   f"[{keys.EVENT!r}] (observed times and censoring indicators)")
        if times.dim() != 1 or events.shape != times.shape or not times.is_floating_point():
            raise ShapeError(f"{owner}: {where} needs floating times [N] and events [N], got "
                             f"{times.dtype} {list(times.shape)} and {list(events.shape)}")
        return times, events

    def weights(self, per_sample: Tensor, batch: Batch) -> Tensor:
        check_rows("reweighter 'ipcw_erm'", per_sample, batch)
        times, events = self._check(batch.extras.get(keys.TIME), batch.extras.get(keys.EVENT), "weights")
        if times.shape != per_sample.shape:
            raise ShapeError(f"reweighter 'ipcw_erm': Batch.extras[{keys.TIME!r}] {list(times.shape)} "
                             f"does not match the per-sample losses {list(per_sample.shape)}")
        if self.grid.numel() == 0:
            raise NotFittedError("reweighter 'ipcw_erm': weights() before fit(times, events) on the "
                                 "training set (the Kaplan-Meier censoring survival)")
        k = torch.searchsorted(self.grid, times.to(self.grid.device, torch.float64))  # = survival_before
        w = self.inverse[k] * (events.to(self.grid.device) != 0) / per_sample.shape[0]
        return w.to(per_sample.device, per_sample.dtype)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Batch]:
        """For the conformance kit: losses and a censored batch, which the survival is fitted on."""
        times = torch.rand(batch_size, generator=generator) + 0.1
        events = (torch.arange(batch_size) % 3 != 0).long()
        self.fit(times, events)
        return (torch.rand(batch_size, generator=generator).requires_grad_(),
                Batch(index=torch.arange(batch_size), extras={keys.TIME: times, keys.EVENT: events}))


CARD = Card(
    name="ipcw_erm", kind="reweighter",
    title="Empirical Risk Minimization under Random Censorship: Theory and Practice",
    paper="arXiv:1906.01908",
    summary="Inverse-probability-of-censoring weights: uncensored samples weigh 1 / S_C(T-) "
            "(Kaplan-Meier censoring survival fitted on the training set), censored ones 0.",
    formula="S_C(t) = prod_{t_j <= t} (1 - c_j / n_j) (c_j censorings at t_j, n_j = #{T >= t_j}); "
            "w_i = delta_i / (B S_C(T_i-)); loss = sum_i w_i l_i",
    left_out="Censoring that depends on X (the conditional, Beran-type estimate of S_C(t | x)): "
             "S_C is the marginal Kaplan-Meier estimate, valid when C is independent of (X, Y). "
             "The survival is fitted once on the training set (fit), not refreshed during training.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(IPCWERM, card=CARD)
