"""MSBReg: a multiview centroid attraction, a singular-value (global) dispersion and a Brownian
(local, purely random) dispersion of the embeddings, on a BYOL-style online / momentum pair.

Moon, Buracas, Park, Kim & Canny, "An Embedding-Dynamic Approach to Self-supervised Learning",
2022 (arXiv:2207.03552).

For ``V`` views of ``B`` samples, the online projections ``u_iv = z_iv / ||z_iv||`` (the
particles), their predictions ``p_iv = q(z_iv) / ||q(z_iv)||`` (``q`` the predictor, owned by the
objective) and the momentum teacher's projections ``t_iv = z'_iv / ||z'_iv||`` (no gradient)::

    L_MC = 1/B sum_i || mean_v p_iv - mean_v sg(t_iv) ||^2                       (attraction)
    L_SV = -1/K sum_{k <= K} log(sigma_k(U_c / sqrt(N)) + eps),  U_c = U - mean(U) (global)
    L_B  = -1/(B V) sum_{i, v} <u_iv, xi_iv>,  xi_iv ~ N(0, I / D) drawn afresh   (Brownian)
    L    = L_MC + lambda_sv L_SV + lambda_b L_B

``U`` ``[N, D]`` stacks every view's projections (``N = B V``) and ``K = min(N - 1, D)`` (the
rank a centred matrix can have). Among matrices of one Frobenius norm ``L_SV`` is least when
all ``K`` singular values are equal (the AM-GM inequality), the spatially homogeneous spread.
``L_B`` has zero mean over the draws and the gradient ``-xi_iv / (B V)`` at ``u_iv`` (projected
on the sphere's tangent): a random kick of each particle that needs no other particle's
coordinates. The dispersive forces act on the embeddings themselves, so the momentum teacher,
their moving average, inherits the spread.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt
from torch import Tensor

from sdk import keys
from sdk.card import Card
from sdk.distributed import Gather, gather_with_grad, resolve_gather
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.ssl import Predictor, at_least_float32, check_teacher, teacher_target_example
from sdk.types import Batch, Loss, Views

OWNER = "objective 'msbreg'"


def multiview_centroid_loss(online: Sequence[Tensor], target: Sequence[Tensor]) -> Tensor:
    """Per sample ``[B]``: ``|| mean_v p_v / ||p_v|| - mean_v sg(t_v) / ||t_v|| ||^2`` (the
    centroid of the online views pulled to the centroid of the teacher's)."""
    p = torch.stack([F.normalize(at_least_float32(o), dim=-1) for o in online]).mean(0)
    t = torch.stack([F.normalize(at_least_float32(x.detach()), dim=-1) for x in target]).mean(0)
    return (p - t.to(p.dtype)).pow(2).sum(-1)


def singular_value_loss(z: Tensor, eps: float = 1e-6) -> Tensor:
    """``-1/K sum_{k <= K} log(sigma_k(Z_c / sqrt(N)) + eps)`` of ``z`` ``[N, D]`` (``N >= 2``),
    ``Z_c`` centred over the rows, ``K = min(N - 1, D)``: the largest singular values, those a
    centred matrix can have non-zero; NaN when ``z`` holds a non-finite value."""
    z = at_least_float32(z)
    n, d = z.shape
    zc = (z - z.mean(dim=0)) / n ** 0.5
    finite = torch.isfinite(zc).all()  # the SVD refuses NaN / inf: such a batch gives NaN
    s = torch.linalg.svdvals(torch.where(finite, zc, torch.zeros_like(zc)))[: min(n - 1, d)]
    loss = -torch.log(s + eps).mean()
    return torch.where(finite, loss, torch.full_like(loss, float("nan")))


def brownian_loss(embeddings: Sequence[Tensor], noise: Sequence[Tensor]) -> Tensor:
    """``-1/(B V) sum_{i, v} <z_iv / ||z_iv||, xi_iv>`` for the given draws ``xi_v`` ``[B, D]``."""
    terms = [-(F.normalize(at_least_float32(z), dim=-1) * xi.to(at_least_float32(z).dtype)).sum(-1)
             for z, xi in zip(embeddings, noise, strict=True)]
    return torch.stack(terms).mean()


class MSBReg(Objective):
    """MSBReg (see the module docstring) on the encoder's projections ``z_v``
    (``Views.embeddings``, two or more views) and the momentum teacher's ``z'_v``
    (``Views.extras["teacher"]``, the ``ema`` teacher, 0.996 -> 1 cosine). The predictor (``dim
    -> hidden_dim -> dim``, BYOL's, batch norm inside, none at its output) belongs to the
    objective.

    The Brownian draws ``xi ~ N(0, I / D)`` are taken from torch's global generator in training
    mode (the Trainer checkpoints it, so a resumed run draws the same); in evaluation mode the
    term is its expectation, 0, so validation losses are deterministic. ``gather`` ("auto":
    under DDP) computes ``L_SV`` on the projections of the global batch; ``L_MC`` and ``L_B``
    are per sample."""

    requires = {"views": 2, "extras": (keys.TEACHER,)}
    batch_coupled = True

    def __init__(self, dim: Annotated[int, Ge(1)] = 256,
                 hidden_dim: Annotated[int, Ge(1)] = 4096,
                 lambda_sv: Annotated[float, Ge(0)] = 1.0, lambda_b: Annotated[float, Ge(0)] = 1.0,
                 eps: Annotated[float, Gt(0)] = 1e-6, gather: Gather = "auto"):
        super().__init__()
        self.predictor = Predictor(dim, hidden_dim, owner=OWNER)
        self.lambda_sv, self.lambda_b, self.eps, self.gather = lambda_sv, lambda_b, eps, gather

    def forward(self, views: Views, batch: Batch) -> Loss:
        targets = check_teacher(OWNER, views)
        online = [self.predictor(z, f"Views.embeddings[{v}]") for v, z in enumerate(views.embeddings)]
        mc = multiview_centroid_loss(online, targets).mean()
        u = torch.cat([F.normalize(at_least_float32(z), dim=-1) for z in views.embeddings])
        if resolve_gather(self.gather):
            u = gather_with_grad(u)
        if u.shape[0] < 2:
            raise ShapeError(f"{OWNER}: Views.embeddings hold {u.shape[0]} embedding in all; the "
                             "singular-value loss needs at least 2 rows")
        sv = singular_value_loss(u, self.eps)
        if self.training:
            d = u.shape[1]
            noise = [torch.randn(z.shape, device=z.device, dtype=u.dtype) / d ** 0.5
                     for z in views.embeddings]
            b = brownian_loss(views.embeddings, noise)
        else:
            b = mc.new_zeros(())
        value = mc + self.lambda_sv * sv + self.lambda_b * b
        return Loss(value=value, logs={"centroid": mc.detach(), "singular_value": sv.detach(),
                                       "brownian": b.detach()})

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        """Two views of ``[B, dim]`` projections and the teacher's."""
        return teacher_target_example(batch_size, self.predictor.dim, generator)


CARD = Card(
    name="msbreg", kind="objective",
    title="An Embedding-Dynamic Approach to Self-supervised Learning",
    paper="arXiv:2207.03552",
    summary="Embeddings as particles: the centroid of the online views is pulled to the momentum "
            "teacher's centroid, a singular-value loss spreads the batch homogeneously and a "
            "Brownian loss kicks each embedding along a fresh random direction.",
    formula="u_iv = z_iv/||z_iv||, p_iv = q(z_iv)/||q(z_iv)||, t_iv = z'_iv/||z'_iv||; "
            "L_MC = mean_i ||mean_v p_iv - mean_v sg(t_iv)||^2; "
            "L_SV = -mean_{k <= min(N-1, D)} log(sigma_k((U - mean U)/sqrt(N)) + eps); "
            "L_B = -mean_{i,v} <u_iv, xi_iv>, xi ~ N(0, I/D); L = L_MC + lambda_sv L_SV + lambda_b L_B",
    left_out="Only the abstract and the figure of the paper could be consulted: the three terms "
             "follow their description there (a centroid of online and target views, a "
             "singular-value loss pushing towards a homogeneous density, a Brownian diffusive "
             "loss needing no other particle). The exact form of L_SV (here the mean negative "
             "log singular value of the centred, normalised projections), the projections (not "
             "the predictions) as the particles the dispersive terms act on, and the weights "
             "lambda_sv = lambda_b = 1 are this implementation's, not checked against the "
             "paper's equations. The Brownian term is 0 in evaluation mode (its expectation). The "
             "momentum teacher is the ema teacher; the paper's image augmentations, LARS and "
             "its ResNet are not part of the loss. The predictor's batch norm uses each rank's "
             "batch under DDP.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(MSBReg, card=CARD)
