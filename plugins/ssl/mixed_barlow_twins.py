"""Mixed Barlow Twins: Barlow Twins with a mixup regulariser on the cross-correlation.

Bandara, De Melo, Patel, "Guarding Barlow Twins Against Overfitting with Mixed Samples", 2023
(arXiv:2312.02151); formula and defaults from the authors' code (github.com/wgcban/mix-bt).

A mixed input ``x_m = alpha x_1 + (1 - alpha) x_2[perm]`` (``alpha ~ Beta(1, 1)``, ``perm`` a
random permutation of the batch) is encoded to ``z_m``. With ``n = BN(z)`` the batch-standardised
embeddings, a network linear in its input would map the mix to the mix of the embeddings, so
the cross-correlation of ``z_m`` with each view is asked to be the mix of the views' own::

    C(z_m, z_v) = n_m^T n_v / N   ->   (alpha n_1 + (1 - alpha) n_2[perm])^T n_v / N,   v = 1, 2
    L = L_BT(z_1, z_2) + s * lambd * sum_v || C(z_m, z_v) - target_v ||_F^2
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge, Gt
from torch import Tensor

from sdk.card import Card
from sdk.distributed import Gather, gather_with_grad, resolve_gather
from sdk.errors import RequirementError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.ssl import batch_standardize, cross_correlation, off_diagonal_sq_sum
from sdk.types import Batch, Loss, Views

MIXED = "mixed_barlow_twins"
"""``Views.extras``: ``(z_m, z_partner, alpha)``: the embeddings ``[B, D]`` of the mixed inputs,
the second view's embeddings of each sample's mixing partner ``z_2[perm]`` ``[B, D]`` and the
mixing weight of each sample ``[B]`` (set by :meth:`MixedBarlowTwins.after_forward`)."""


def mixup_regularizer(z1: Tensor, z2: Tensor, z_mixed: Tensor, z_partner: Tensor, alpha: Tensor,
                      eps: float = 1e-5) -> Tensor:
    """``sum_v || n_m^T n_v / N - (alpha n_1 + (1 - alpha) n_p)^T n_v / N ||_F^2`` over the two
    views ``v``, with ``n = BN(z)`` (:func:`sdk.ssl.batch_standardize`) and ``n_p = BN(z_2)[perm]``
    given as ``BN(z_partner)`` (standardisation commutes with a permutation of the rows);
    ``alpha`` ``[B]`` (or a scalar) the weight of the first view in each mixed sample."""
    n1, n2 = batch_standardize(z1, eps), batch_standardize(z2, eps)
    nm, np_ = batch_standardize(z_mixed, eps), batch_standardize(z_partner, eps)
    a = alpha.to(n1.dtype).reshape(-1, 1) if alpha.dim() else alpha.to(n1.dtype)
    gap = nm - (a * n1 + (1 - a) * np_)
    n = z1.shape[0]
    return (gap.T @ n1 / n).pow(2).sum() + (gap.T @ n2 / n).pow(2).sum()


def mixed_barlow_twins_loss(z1: Tensor, z2: Tensor, z_mixed: Tensor, z_partner: Tensor,
                            alpha: Tensor, lambd: float = 0.0078125, mix_scale: float = 4.0,
                            eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """``(L_BT, L_mix)``: Barlow Twins' ``sum_i (1 - C_ii)^2 + lambd sum_{i!=j} C_ij^2`` and
    ``mix_scale * lambd *`` :func:`mixup_regularizer`; the loss is their sum."""
    c = cross_correlation(z1, z2, eps)
    bt = (torch.diagonal(c) - 1).pow(2).sum() + lambd * off_diagonal_sq_sum(c)
    return bt, mix_scale * lambd * mixup_regularizer(z1, z2, z_mixed, z_partner, alpha, eps)


class MixedBarlowTwins(Objective):
    """Mixed Barlow Twins (see the module docstring) on two views.

    In training under the Trainer, the objective's ``after_forward`` listener draws ``alpha ~
    Beta(alpha_a, alpha_b)`` and ``perm``, mixes the two views' inputs
    (``Trainer.view_inputs``), encodes the mix with the model and puts ``(z_m, z_2[perm],
    alpha)`` in ``Views.extras["mixed_barlow_twins"]``; called directly, give them there. Without
    them (validation, which fires no events) the loss is Barlow Twins' alone. ``gather``
    ("auto": under DDP) standardises and correlates over the global batch; each rank mixes
    within its own batch."""

    requires = {"views": 2}
    batch_coupled = True

    def __init__(self, lambd: Annotated[float, Ge(0)] = 0.0078125,
                 mix_scale: Annotated[float, Ge(0)] = 4.0,
                 alpha_a: Annotated[float, Gt(0)] = 1.0, alpha_b: Annotated[float, Gt(0)] = 1.0,
                 eps: Annotated[float, Gt(0)] = 1e-5, gather: Gather = "auto"):
        super().__init__()
        self.lambd, self.mix_scale, self.eps, self.gather = lambd, mix_scale, eps, gather
        self.alpha_a, self.alpha_b = alpha_a, alpha_b

    def after_forward(self, state) -> None:
        """Encode the mixed inputs of this micro-batch and hand them to :meth:`forward`."""
        xs = state.trainer.view_inputs
        x1, x2 = xs[0], xs[1]
        b = x1.shape[0]
        alpha = torch.distributions.Beta(x1.new_tensor(self.alpha_a, dtype=torch.float32),
                                         x1.new_tensor(self.alpha_b, dtype=torch.float32)).sample()
        perm = torch.randperm(b, device=x1.device)
        a = alpha.to(x1.dtype) if x1.is_floating_point() else alpha
        z_m = state.model(a * x1 + (1 - a) * x2[perm])
        z_partner = state.views.embeddings[1][perm]
        extras = {**state.views.extras, MIXED: (z_m, z_partner, alpha.expand(b))}
        state.views = state.views.evolve(extras=extras)

    def _mixed(self, views: Views) -> tuple[Tensor, Tensor, Tensor] | None:
        got = views.extras.get(MIXED)
        if got is None:
            return None
        want = list(views.embeddings[0].shape)
        if not isinstance(got, (tuple, list)) or len(got) != 3:
            raise ShapeError(f"objective 'mixed_barlow_twins': extras[{MIXED!r}] must be (z_mixed, "
                             "z_partner, alpha)")
        z_m, z_p, alpha = got
        for field, t in (("z_mixed", z_m), ("z_partner", z_p)):
            if not isinstance(t, Tensor) or not t.is_floating_point() or list(t.shape) != want:
                shape = list(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ShapeError(f"objective 'mixed_barlow_twins': extras[{MIXED!r}] {field} must be "
                                 f"floating {want} (as the embeddings), got {shape}")
        if not isinstance(alpha, Tensor) or list(alpha.shape) not in ([], [want[0]]):
            shape = list(alpha.shape) if isinstance(alpha, Tensor) else type(alpha).__name__
            raise ShapeError(f"objective 'mixed_barlow_twins': extras[{MIXED!r}] alpha must be a "
                             f"scalar or [{want[0]}], got {shape}")
        return z_m, z_p, alpha

    def forward(self, views: Views, batch: Batch) -> Loss:
        if views.n_views != 2:
            raise RequirementError(f"objective 'mixed_barlow_twins' takes exactly 2 views, got "
                                   f"{views.n_views}")
        z1, z2 = views.embeddings
        mixed = self._mixed(views)
        if mixed is None:
            if resolve_gather(self.gather):
                z1, z2 = gather_with_grad(z1), gather_with_grad(z2)
            c = cross_correlation(z1, z2, self.eps)
            bt = (torch.diagonal(c) - 1).pow(2).sum() + self.lambd * off_diagonal_sq_sum(c)
            return Loss(value=bt, logs={"barlow_twins": bt.detach()})
        z_m, z_p, alpha = mixed
        if not alpha.dim():
            alpha = alpha.expand(z1.shape[0])
        if resolve_gather(self.gather):
            z1, z2, z_m, z_p, alpha = (gather_with_grad(t) for t in (z1, z2, z_m, z_p, alpha))
        bt, mix = mixed_barlow_twins_loss(z1, z2, z_m, z_p, alpha, self.lambd, self.mix_scale,
                                          self.eps)
        return Loss(value=bt + mix, logs={"barlow_twins": bt.detach(), "mixup": mix.detach()})

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        """Two views, the embeddings of their mixes and the partners' (``z_2[perm]``)."""
        z1, z2 = (torch.randn(batch_size, 16, generator=generator) for _ in range(2))
        alpha = torch.rand(batch_size, generator=generator)
        perm = torch.randperm(batch_size, generator=generator)
        z_m = torch.tanh(alpha[:, None] * z1 + (1 - alpha[:, None]) * z2[perm])
        leaves = [t.requires_grad_() for t in (z1, z2, z_m)]
        return Views(embeddings=(leaves[0], leaves[1]),
                     extras={MIXED: (leaves[2], z2.detach()[perm], alpha)}), Batch()


CARD = Card(
    name="mixed_barlow_twins", kind="objective",
    title="Guarding Barlow Twins Against Overfitting with Mixed Samples",
    paper="arXiv:2312.02151",
    summary="Barlow Twins plus a mixup regulariser: the cross-correlation of a mixed sample's "
            "embedding with each view must be the same mix of the views' cross-correlations.",
    formula="x_m = a x_1 + (1-a) x_2[perm], a ~ Beta(1, 1); n = BN(z); "
            "L = sum_i (1 - C_ii)^2 + lambd sum_{i!=j} C_ij^2 "
            "+ s lambd sum_{v=1,2} || n_m^T n_v / N - (a n_1 + (1-a) n_2[perm])^T n_v / N ||_F^2",
    left_out="Defaults lambd = 1/128 and s = 4 are the authors' CIFAR-10 script (their argparse "
             "default s is 5; other datasets use other s). The embeddings are standardised with "
             "the biased variance plus eps (BatchNorm1d without affine, as barlow_twins here and "
             "the original Barlow Twins) where mix-bt's code divides by the unbiased std. Under "
             "DDP each rank mixes within its own batch (its own alpha and perm), the statistics "
             "are global. The mixed view is encoded only in training (after_forward); validation "
             "reports Barlow Twins' loss alone. Image augmentations are the recipe's.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(MixedBarlowTwins, card=CARD)
