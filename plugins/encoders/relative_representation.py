"""Relative representations: each sample described by its cosine similarities to fixed anchors.

Moschella, Maiorca, Fumero, Norelli, Locatello and Rodolà, "Relative representations enable
zero-shot latent space communication", ICLR 2023 (arXiv:2209.15430).
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from annotated_types import Ge
from torch import Tensor, nn

from sdk.card import Card
from sdk.context import FromData
from sdk.errors import ConfigError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Encoder, Metric
from sdk.layers import mlp_layers


def relative_projection(z: Tensor, anchors: Tensor, center: bool = False) -> Tensor:
    """``r_ij = cos(e_i - c, a_j - c)`` ``[B, A]`` for embeddings ``z [B, D]`` and anchor
    embeddings ``anchors [A, D]``; ``c`` is the anchors' mean when ``center`` else 0."""
    if center:
        mean = anchors.mean(0, keepdim=True)
        z, anchors = z - mean, anchors - mean
    return F.normalize(z, dim=-1) @ F.normalize(anchors, dim=-1).T


class RelativeRepresentation(Encoder):
    """``r(x) = [cos(e(x), e(a_j))]_{j=1..A}``: the backbone ``e`` embeds the batch and the
    anchor inputs ``a_j`` (a buffer) in the same forward, so the anchors' embeddings follow
    training. ``anchors``: inputs ``[A, ...]``; else ``num_anchors`` rows of ``dataset`` (the
    training split, drawn uniformly with ``seed``); without either, ``num_anchors`` standard-normal
    inputs of ``in_dim`` stand in (a placeholder for shape checks: pass real anchors). Without a
    backbone, ``e`` is an MLP ``in_dim -> hidden_dim -> embed_dim``. ``center``: subtract the
    anchor embeddings' mean first (then ``r`` is also invariant to translations of the latent
    space). ``features(x)`` is ``r(x)``; :meth:`absolute` gives ``e(x)``."""

    def __init__(self, backbone: nn.Module | None = None, anchors: Any = None,
                 dataset: Annotated[Any, FromData("dataset")] = None,
                 num_anchors: Annotated[int, Ge(1)] = 64, center: bool = False,
                 seed: int = 0, in_dim: Annotated[int | None, Ge(1), FromData("in_dim")] = None,
                 hidden_dim: Annotated[int, Ge(1)] = 128, embed_dim: Annotated[int, Ge(1)] = 64):
        super().__init__()
        if backbone is None:
            backbone = mlp_layers([in_dim or 64, hidden_dim, embed_dim], batch_norm=False)
        self.backbone, self.center = backbone, center
        g = torch.Generator().manual_seed(seed)
        if anchors is None and dataset is not None:
            data = dataset if isinstance(dataset, Tensor) else dataset[:][0]
            if data.shape[0] < num_anchors:
                raise ConfigError(f"relative_representation: the dataset has {data.shape[0]} rows, "
                                  f"fewer than num_anchors={num_anchors}", param="num_anchors")
            anchors = data[torch.randperm(data.shape[0], generator=g)[:num_anchors]]
        elif anchors is None:
            anchors = torch.randn(num_anchors, in_dim or 64, generator=g)
        anchors = torch.as_tensor(anchors)
        if anchors.dim() < 2 or anchors.shape[0] < 1 or not anchors.is_floating_point():
            raise ConfigError(f"relative_representation: anchors must be floating inputs [A, ...], "
                              f"got {anchors.dtype} {list(anchors.shape)}", param="anchors")
        self.register_buffer("anchors", anchors.detach().clone().float())
        self.out_dim = anchors.shape[0]

    def absolute(self, x: Tensor) -> Tensor:
        """The backbone's embedding ``e(x)`` ``[B, D]``."""
        if x.shape[1:] != self.anchors.shape[1:] or not x.is_floating_point():
            raise ShapeError(f"encoder 'relative_representation': x must be floating [B, "
                             f"{', '.join(map(str, self.anchors.shape[1:]))}] like the anchors, "
                             f"got {x.dtype} {list(x.shape)}")
        return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        z = self.absolute(x)
        a = self.backbone(self.anchors.to(x.dtype))
        return relative_projection(z.float(), a.float(), self.center)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> Tensor:
        return torch.randn(batch_size, *self.anchors.shape[1:], generator=generator)


def _paired(batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Two relative representations ``[B, 8]`` of the same samples, the second a noisy copy."""
    r = torch.randn(batch_size, 8, generator=generator)
    return r, r + 0.1 * torch.randn(batch_size, 8, generator=generator)


class RelativeSimilarity(Metric):
    """How alike two encoders' relative representations of the same samples are:
    ``update(r_a, r_b)`` with ``[N, A]`` rows of one sample each; ``compute()`` gives ``cosine``,
    the mean ``cos(r_a(x), r_b(x))``, and ``jaccard``, the mean Jaccard overlap
    ``|N_a(x) ∩ N_b(x)| / |N_a(x) ∪ N_b(x)|`` of each sample's ``k`` nearest other samples
    (cosine) in the two spaces, over everything updated (``k`` is capped at ``N - 1``)."""

    example_inputs = staticmethod(_paired)

    def __init__(self, k: Annotated[int, Ge(1)] = 10):
        self.k = k
        self.reset()

    def update(self, r_a: Tensor, r_b: Tensor) -> None:
        if (not isinstance(r_a, Tensor) or not isinstance(r_b, Tensor) or r_a.dim() != 2
                or r_a.shape != r_b.shape or not r_a.is_floating_point()
                or not r_b.is_floating_point() or r_a.shape[0] == 0):
            raise ShapeError(f"metric 'relative_representation': r_a and r_b must be floating "
                             f"[N, A] of the same samples and anchors, got "
                             f"{list(getattr(r_a, 'shape', []))} and {list(getattr(r_b, 'shape', []))}")
        self._a.append(r_a.detach().double())
        self._b.append(r_b.detach().to(r_a.device, torch.float64))

    def compute(self) -> dict[str, float]:
        if not self._a:
            return {"cosine": math.nan, "jaccard": math.nan}
        a, b = torch.cat(self._a), torch.cat(self._b)
        cosine = F.cosine_similarity(a, b, dim=1).mean()
        n = a.shape[0]
        k = min(self.k, n - 1)
        if k < 1:
            return {"cosine": float(cosine), "jaccard": math.nan}
        eye = torch.eye(n, dtype=torch.bool, device=a.device)

        def neighbours(r: Tensor) -> Tensor:
            s = F.normalize(r, dim=1) @ F.normalize(r, dim=1).T
            idx = s.masked_fill(eye, -math.inf).topk(k, dim=1).indices
            return torch.zeros(n, n, dtype=torch.bool, device=r.device).scatter_(1, idx, True)

        na, nb = neighbours(a), neighbours(b)
        jaccard = ((na & nb).sum(1).double() / (na | nb).sum(1)).mean()
        return {"cosine": float(cosine), "jaccard": float(jaccard)}

    def reset(self) -> None:
        self._a: list[Tensor] = []
        self._b: list[Tensor] = []

    def state_dict(self) -> dict[str, Any]:
        return {"a": [t.clone() for t in self._a], "b": [t.clone() for t in self._b]}

    def load_state_dict(self, state: Any) -> None:
        self._a, self._b = [t.clone() for t in state["a"]], [t.clone() for t in state["b"]]


_TITLE = "Relative representations enable zero-shot latent space communication"

CARD = Card(
    name="relative_representation", kind="encoder", title=_TITLE, paper="arXiv:2209.15430",
    summary="Wrap any encoder so that each sample is described by its cosine similarities to a "
            "fixed set of anchor samples embedded by the same encoder: invariant to rotations, "
            "reflections and rescaling of the latent space, so heads trained on one encoder's "
            "relative space transfer to another's (zero-shot stitching).",
    formula="r(x) = [cos(e(x) - c, e(a_j) - c)]_{j=1..A}; c = mean_j e(a_j) (center) or 0",
    left_out="Anchors are drawn uniformly (the paper also selects them by class or as parallel "
             "anchors across domains: pass them as `anchors`); num_anchors=64 suits small data "
             "(the paper uses hundreds to thousands); its other similarity functions and the "
             "text, graph and vision models of its experiments are not here.",
)

METRIC_CARD = Card(
    name="relative_representation", kind="metric", title=_TITLE, paper="arXiv:2209.15430",
    summary="Similarity of two encoders' relative spaces on the same samples: mean cosine between "
            "a sample's two relative representations and the Jaccard overlap of its k nearest "
            "neighbours in each.",
    formula="cosine = mean_x cos(r_A(x), r_B(x)); jaccard = mean_x |kNN_A(x) ∩ kNN_B(x)| / "
            "|kNN_A(x) ∪ kNN_B(x)|, k = 10",
    left_out="The paper's mean reciprocal rank is not reported; rows are kept until compute "
             "(the kNN sets need all samples).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(RelativeRepresentation, card=CARD)
    registry.add(RelativeSimilarity, card=METRIC_CARD)
