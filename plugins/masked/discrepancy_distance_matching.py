"""D-SLA: discrepancy-based self-supervised learning. A discriminator tells the original sample
from its perturbed versions, the embedding distance to each perturbed version is made
proportional to its edit distance, and other samples are kept a margin farther than the
perturbed ones.

Kim, Baek, Lee and Hwang, "Graph Self-supervised Learning with Accurate Discrepancy Learning",
NeurIPS 2022 (arXiv:2202.02989).
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge
from torch import Tensor, nn

from sdk import keys
from sdk.card import Card
from sdk.distributed import Gather, gather_with_grad, rank, resolve_gather
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.types import Batch, Loss, Views


def discrimination_loss(scores: Tensor) -> Tensor:
    """``[B]``: ``-log softmax(scores)_0``, the original (column 0 of ``scores [B, V]``) against
    its perturbed versions."""
    return -torch.log_softmax(scores, dim=1)[:, 0]


def edit_loss(z: Tensor, edits: Tensor) -> Tensor:
    """``[B]``: ``mean_{1 <= i < j < V} (d_i / e_i - d_j / e_j)^2`` with ``d_i = ||z_i - z_0||``
    (``z [B, V, D]``, view 0 the original) and ``e_i`` the edit distances ``[B, V - 1]``; zero
    exactly when the distances are proportional to the edits."""
    ratio = (z[:, 1:] - z[:, :1]).norm(dim=-1) / edits
    i, j = torch.triu_indices(ratio.shape[1], ratio.shape[1], offset=1, device=z.device)
    return (ratio[:, i] - ratio[:, j]).pow(2).mean(1)


def margin_loss(z: Tensor, margin: float, originals: Tensor | None = None,
                offset: int = 0) -> Tensor:
    """``[B]``: ``mean_{b' != b, i >= 1} max(0, margin + ||z_bi - z_b0|| - ||z_b0 - z_b'0||)``: each
    perturbed version stays ``margin`` closer to its original than any other sample's original.
    ``originals [N, D]`` are the candidates ``z_b'0`` (default ``z[:, 0]``; all ranks' under
    gathering, this rank's rows starting at ``offset``)."""
    anchor = z[:, 0]
    others = anchor if originals is None else originals
    pos = (z[:, 1:] - z[:, :1]).norm(dim=-1)  # [B, V-1]
    diff = anchor[:, None] - others[None]
    neg = diff.pow(2).sum(-1).clamp_min(1e-30).sqrt()  # [B, N]; the self column is dropped below
    own = torch.arange(z.shape[0], device=z.device) + offset
    not_self = torch.ones_like(neg, dtype=torch.bool).scatter_(1, own[:, None], False)
    hinge = torch.relu(margin + pos[:, None, :] - neg[:, :, None])  # [B, N, V-1]
    return (hinge * not_self[:, :, None]).sum((1, 2)) / (not_self.sum(1) * pos.shape[1])


class DiscrepancyDistanceMatching(Objective):
    """``Views.embeddings``: ``V >= 3`` tensors ``[B, embed_dim]``, the original sample's embedding
    first, then its perturbed versions (the last one strongly perturbed when ``strong_last``);
    ``Batch.extras[keys.EDIT_DISTANCE]`` ``[B, V - 1]`` their edit counts (positive: a zero
    count gives a non-finite loss). Loss per sample:
    ``CE(s(z_0..z_{V-1}), 0) + edit_coeff * edit_loss + margin_coeff * margin_loss``, ``s`` this
    objective's score MLP (``D -> D -> D -> 1``, ReLU), the discriminator. The margin loss uses
    the other samples' originals as negatives (``gather``: of every rank) and leaves the strongly
    perturbed view out; it needs two samples."""

    requires = {"views": 3, "extras": (keys.EDIT_DISTANCE,)}
    batch_coupled = True

    def __init__(self, embed_dim: Annotated[int, Ge(1)] = 300,
                 edit_coeff: Annotated[float, Ge(0)] = 0.7, margin: Annotated[float, Ge(0)] = 5.0,
                 margin_coeff: Annotated[float, Ge(0)] = 0.5, strong_last: bool = False,
                 gather: Gather = "auto"):
        super().__init__()
        self.embed_dim, self.edit_coeff, self.margin = embed_dim, edit_coeff, margin
        self.margin_coeff, self.strong_last, self.gather = margin_coeff, strong_last, gather
        self.score = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.ReLU(),
                                   nn.Linear(embed_dim, embed_dim), nn.ReLU(), nn.Linear(embed_dim, 1))

    def forward(self, views: Views, batch: Batch) -> Loss:
        owner = "objective 'discrepancy_distance_matching'"
        zs = views.embeddings
        if len(zs) < 3 + self.strong_last:
            raise ShapeError(f"{owner}: needs the original and at least two perturbed views "
                             f"({3 + self.strong_last} with strong_last), got {len(zs)}")
        z = torch.stack(zs, 1)
        if z.dim() != 3 or z.shape[2] != self.embed_dim or not z.is_floating_point():
            raise ShapeError(f"{owner}: Views.embeddings must be floating [B, {self.embed_dim}] "
                             f"(embed_dim), got {z.dtype} {list(zs[0].shape)}")
        edits = batch.extras[keys.EDIT_DISTANCE]
        b, v = z.shape[:2]
        if not isinstance(edits, Tensor) or edits.shape != (b, v - 1):
            raise ShapeError(f"{owner}: Batch.extras['edit_distance'] must be [{b}, {v - 1}] (one "
                             f"edit count per perturbed view), got "
                             f"{list(getattr(edits, 'shape', [])) or type(edits).__name__}")
        dtype = torch.promote_types(z.dtype, torch.float32)
        w = self.score[0].weight
        scores = self.score(z if torch.is_autocast_enabled(z.device.type) else z.to(w.dtype))
        gd = discrimination_loss(scores.squeeze(-1).to(dtype))
        zf = z.to(dtype)
        ed = edit_loss(zf, edits.to(dtype))
        weak = zf[:, :-1] if self.strong_last else zf
        originals, offset = None, 0
        if resolve_gather(self.gather):
            originals, offset = gather_with_grad(weak[:, 0].contiguous()), rank() * b
        if (b if originals is None else originals.shape[0]) < 2:
            raise ShapeError(f"{owner}: the margin loss needs other samples as negatives, got a "
                             "batch of 1")
        mg = margin_loss(weak, self.margin, originals, offset)
        per_sample = gd + self.edit_coeff * ed + self.margin_coeff * mg
        return Loss(value=per_sample.mean(), per_sample=per_sample,
                    logs={"discrimination": gd.mean().detach(), "edit": ed.mean().detach(),
                          "margin": mg.mean().detach()})

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        z0 = torch.randn(batch_size, self.embed_dim, generator=generator)
        edits = torch.randint(1, 5, (batch_size, 2), generator=generator).float()
        zs = [z0] + [z0 + 0.1 * e[:, None] * torch.randn(batch_size, self.embed_dim, generator=generator)
                     for e in edits.T]
        return (Views(embeddings=tuple(t.requires_grad_() for t in zs)),
                Batch(index=torch.arange(batch_size), extras={keys.EDIT_DISTANCE: edits}))


CARD = Card(
    name="discrepancy_distance_matching", kind="objective",
    title="Graph Self-supervised Learning with Accurate Discrepancy Learning (D-SLA)",
    paper="arXiv:2202.02989",
    summary="A discriminator picks the original among its perturbed versions; embedding distances "
            "to the perturbed versions are made proportional to their edit distances; other "
            "samples are kept a margin farther than the perturbed ones.",
    formula="L = CE(s(z_0), ..., s(z_{V-1}); 0) + 0.7 mean_{i<j} (d_i/e_i - d_j/e_j)^2 + 0.5 "
            "mean_{b' != b, i} max(0, 5 + d_i - ||z_b0 - z_b'0||), d_i = ||z_i - z_0||",
    left_out="The GNN encoder and the graph perturbations (edge deletion/insertion and node-"
             "attribute masking with counted edits) are not here: any encoder's views and edit "
             "counts go in through Batch.extras['edit_distance']. Defaults are the authors' "
             "code's (num_candidates 4: the original and three perturbed; edit_coeff 0.7, "
             "margin 5, margin_coeff 0.5); the mean over pairs and negatives is theirs too.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(DiscrepancyDistanceMatching, card=CARD)
