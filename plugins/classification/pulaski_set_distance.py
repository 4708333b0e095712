"""PULASki: a statistical distance between a model's sampled segmentations and the raters' masks.

Chatterjee, Gaidzik, Sciarra, Mattern, Janiga, Speck, Nürnberger & Pathiraja, "PULASki:
Learning inter-rater variability using statistical distances to improve probabilistic
segmentation" (arXiv:2312.15686). A Probabilistic U-Net (a conditional VAE) is trained with
its per-pixel reconstruction term replaced by a distance between two sets of masks seen as
point clouds in ``R^P``: the ``M`` segmentations decoded from ``M`` latent samples and the
``R`` raters' masks of the same image, plus ``beta KL(q(z|x, y) || p(z|x))``.

The distances are GeomLoss's (Feydy et al.) with its defaults, as the authors' code calls
them (github.com/soumickmj/PULASki, ``pipeline.py``: ``SamplesLoss(loss=...)``; the KL and
the distance weighted 1 each):

* ``"sinkhorn"``: the debiased Sinkhorn divergence ``S_eps(mu, nu) = OT_eps(mu, nu) -
  OT_eps(mu, mu)/2 - OT_eps(nu, nu)/2`` with cost ``||x - y||^2 / 2``, ``eps = blur^2``,
  ``blur = 0.05``, solved in the log domain with eps-scaling (ratio 0.5) and the gradient of
  the last extrapolation step (the envelope theorem), as GeomLoss's tensorised backend does;
* ``"hausdorff"`` (the code's default mode, "Hausdorff with the energy kernel"): in GeomLoss
  0.3 this routes to the kernel norm ``||mu - nu||_k^2 / 2`` with ``k(x, y) = -||x - y||``,
  the energy distance, which is what is computed here.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from annotated_types import Ge, Gt, Interval

from sdk import classification as cls
from sdk.card import Card
from sdk.constraints import one_of
from sdk.errors import RequirementError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.types import Batch, Loss, Views

NAME = "pulaski_set_distance"
KL = "kl"
"""``Views.extras["kl"]`` [B]: the model's ``KL(q(z|x, y) || p(z|x))`` per image."""


def _sq_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``||x_i - y_j||^2`` [B, N, M] for point clouds [B, N, P] and [B, M, P]."""
    sq = x.square().sum(-1)[..., :, None] + y.square().sum(-1)[..., None, :] - 2 * x @ y.transpose(-1, -2)
    return sq.clamp_min(0)


def _softmin(eps: float, cost: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``-eps log sum_j exp(h_j - C_ij / eps)`` [B, N] (the soft c-transform)."""
    return -eps * torch.logsumexp(h[..., None, :] - cost / eps, -1)


def epsilon_schedule(diameter: float, blur: float, scaling: float) -> list[float]:
    """Temperatures of the eps-scaling descent (cost exponent 2): ``diameter^2``, then divided
    by ``scaling^2`` per iteration down to ``blur^2`` (GeomLoss's schedule)."""
    steps = [math.exp(e) for e in torch.arange(2 * math.log(diameter), 2 * math.log(blur),
                                                   2 * math.log(scaling), dtype=torch.float64).tolist()]
    return [diameter ** 2] + steps + [blur ** 2]


def sinkhorn_divergence(x: torch.Tensor, y: torch.Tensor, blur: float = 0.05, scaling: float = 0.5,
                        diameter: float | None = None, iters: int = 0) -> torch.Tensor:
    """Debiased Sinkhorn divergence [B] between the uniform measures on the rows of ``x``
    [B, N, P] and ``y`` [B, M, P], cost ``||x - y||^2 / 2``, ``eps = blur^2``. ``diameter``
    (the first temperature's scale) defaults to ``sqrt(P)``, the diameter of ``[0, 1]^P`` in
    which masks and probability maps lie (no host sync). The potentials are iterated without a
    graph; the last extrapolation step carries the gradient (exact at convergence)."""
    n, m = x.shape[-2], y.shape[-2]
    diameter = math.sqrt(x.shape[-1]) if diameter is None else diameter
    eps_list = epsilon_schedule(max(diameter, blur), blur, scaling)
    eps_list += [blur ** 2] * iters
    a_log = torch.full(x.shape[:-1], -math.log(n), dtype=x.dtype, device=x.device)
    b_log = torch.full(y.shape[:-1], -math.log(m), dtype=x.dtype, device=x.device)
    # each potential differentiates through its own points only (the other side detached), so
    # that <a, f> + <b, g> has the plan's gradient once, as in GeomLoss
    c_xy, c_yx = _sq_dist(x, y.detach()) / 2, _sq_dist(y, x.detach()) / 2
    c_xx, c_yy = _sq_dist(x, x.detach()) / 2, _sq_dist(y, y.detach()) / 2
    with torch.no_grad():
        cxy, cyx, cxx, cyy = c_xy.detach(), c_yx.detach(), c_xx.detach(), c_yy.detach()
        eps = eps_list[0]
        f_ba, g_ab = _softmin(eps, cxy, b_log), _softmin(eps, cyx, a_log)
        f_aa, g_bb = _softmin(eps, cxx, a_log), _softmin(eps, cyy, b_log)
        for eps in eps_list:
            ft_ba = _softmin(eps, cxy, b_log + g_ab / eps)
            gt_ab = _softmin(eps, cyx, a_log + f_ba / eps)
            ft_aa = _softmin(eps, cxx, a_log + f_aa / eps)
            gt_bb = _softmin(eps, cyy, b_log + g_bb / eps)
            f_ba, g_ab = (f_ba + ft_ba) / 2, (g_ab + gt_ab) / 2
            f_aa, g_bb = (f_aa + ft_aa) / 2, (g_bb + gt_bb) / 2
    eps = eps_list[-1]
    f_ba, g_ab = _softmin(eps, c_xy, b_log + g_ab / eps), _softmin(eps, c_yx, a_log + f_ba / eps)
    f_aa, g_bb = _softmin(eps, c_xx, a_log + f_aa / eps), _softmin(eps, c_yy, b_log + g_bb / eps)
    return (f_ba - f_aa).mean(-1) + (g_ab - g_bb).mean(-1)


def _distances(sq: torch.Tensor) -> torch.Tensor:
    """``sqrt`` with gradient 0 at 0 (the diagonal of a cloud's own distances)."""
    positive = sq > 0
    return torch.where(positive, sq.masked_fill(~positive, 1.0).sqrt(), 0.0)


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``||mu - nu||_k^2 / 2`` [B] with ``k(x, y) = -||x - y||`` for the uniform measures on
    the rows of ``x`` [B, N, P] and ``y`` [B, M, P]: ``mean ||x - y|| - mean ||x - x'|| / 2 -
    mean ||y - y'|| / 2`` (GeomLoss 0.3's ``"hausdorff"`` with the energy kernel)."""
    d_xy = _distances(_sq_dist(x, y)).mean((-1, -2))
    d_xx = _distances(_sq_dist(x, x)).mean((-1, -2))
    d_yy = _distances(_sq_dist(y, y)).mean((-1, -2))
    return d_xy - d_xx / 2 - d_yy / 2


class PulaskiSetDistance(Objective):
    """Per image: the distance between the ``M`` decoded segmentations ``Views.embeddings``
    (``M`` views [B, P]: one per latent sample, probabilities or masks flattened over the
    pixels) and the ``R`` raters' masks ``Batch.targets`` [B, R, P], plus ``beta`` times the
    model's ``KL(q || p)`` in ``Views.extras["kl"]`` [B] (required unless ``beta = 0``)."""

    requires = {"views": 1, "targets": True}
    consumes = frozenset()
    batch_coupled = False

    def __init__(self, distance: Annotated[str, one_of(("sinkhorn", "hausdorff"))] = "hausdorff",
                 blur: Annotated[float, Gt(0)] = 0.05,
                 scaling: Annotated[float, Interval(gt=0, lt=1)] = 0.5,
                 beta: Annotated[float, Ge(0)] = 1.0, iters: Annotated[int, Ge(0)] = 0):
        super().__init__()
        self.distance, self.blur, self.scaling, self.beta = distance, blur, scaling, beta
        self.iters = iters

    def forward(self, views: Views, batch: Batch) -> Loss:
        mu = cls.upcast(torch.stack(views.embeddings, 1))  # [B, M, P]
        b, _, p = mu.shape
        nu = batch.targets
        if nu.dim() != 3 or nu.shape[0] != b or nu.shape[2] != p or not nu.is_floating_point():
            raise ShapeError(f"{NAME}: Batch.targets must be the raters' masks [B={b}, R, P={p}] "
                             f"(floating), got {nu.dtype} {list(nu.shape)}")
        nu = nu.to(mu.dtype)
        if self.distance == "sinkhorn":
            per_sample = sinkhorn_divergence(mu, nu, self.blur, self.scaling, iters=self.iters)
        else:
            per_sample = energy_distance(mu, nu)
        logs = {"set_distance": per_sample.detach().mean()}
        if self.beta:
            kl = views.extras.get(KL)
            if kl is None:
                raise RequirementError(f"{NAME}: beta={self.beta} needs the model's KL(q || p) per "
                                       f"image in Views.extras['kl'] [B]; give beta=0 without one")
            if not isinstance(kl, torch.Tensor) or kl.shape != (b,):
                shape = list(kl.shape) if isinstance(kl, torch.Tensor) else type(kl).__name__
                raise ShapeError(f"{NAME}: Views.extras['kl'] must be [{b}], got {shape}")
            per_sample = per_sample + self.beta * kl.to(per_sample.dtype)
            logs["kl"] = kl.detach().float().mean()
        return Loss(value=per_sample.mean(), per_sample=per_sample, logs=logs)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        samples = tuple(torch.rand(batch_size, 6, generator=generator).requires_grad_() for _ in range(3))
        masks = (torch.rand(batch_size, 2, 6, generator=generator) > 0.5).float()
        kl = torch.rand(batch_size, generator=generator).requires_grad_()
        return Views(embeddings=samples, extras={KL: kl}), Batch(targets=masks)


CARD = Card(
    name=NAME, kind="objective",
    title="PULASki: Learning inter-rater variability using statistical distances to improve "
          "probabilistic segmentation",
    paper="arXiv:2312.15686",
    summary="Trains a probabilistic segmentation model with a statistical distance between its "
            "set of sampled segmentations and the set of raters' masks (each mask a point in "
            "R^P) instead of a per-pixel cross-entropy, plus the cVAE's KL term.",
    formula="mu = (1/M) sum_m delta_{s_m}, nu = (1/R) sum_r delta_{y_r}; hausdorff (energy kernel): "
            "D = mean_{m,r} ||s_m - y_r|| - mean_{m,m'} ||s_m - s_m'||/2 - mean_{r,r'} ||y_r - y_r'||/2; "
            "sinkhorn: D = OT_eps(mu, nu) - OT_eps(mu, mu)/2 - OT_eps(nu, nu)/2, C = ||x - y||^2/2, "
            "eps = blur^2; L = mean_b [D_b + beta KL_b]",
    left_out="The Probabilistic U-Net (2D/3D UNet, prior and posterior nets, latent sampling) is "
             "the model's part: it gives the M decoded samples as views and its KL per image in "
             "Views.extras['kl']. The FID / Fréchet ResNeXt distance modes and the TOF-MRA and "
             "MS-lesion data are not included. 'hausdorff' follows the code's GeomLoss 0.3 call "
             "(which computes the energy-kernel norm), not the eps-softmin Hausdorff divergence of "
             "Feydy et al. The Sinkhorn solver starts its eps-scaling at sqrt(P), the diameter of "
             "[0, 1]^P (GeomLoss estimates it from the data, a host sync): the same limit, a few "
             "more iterations. iters > 0 (default 0, as GeomLoss) adds iterations at the final "
             "temperature, converging to the exact S_eps; blur and scaling apply to 'sinkhorn' "
             "only.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(PulaskiSetDistance, card=CARD)
