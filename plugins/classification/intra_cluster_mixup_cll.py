"""Intra-Cluster Mixup (ICM) for complementary-label learning, and the SCL losses it trains with.

Mai & Lin, "Intra-Cluster Mixup: An Effective Data Augmentation Technique for
Complementary-Label Learning", TMLR 2025 (arXiv:2509.17971). In complementary-label learning
(CLL) each sample carries a class ``ybar`` it does *not* belong to. Plain mixup of a random
pair ``(i, j)`` gives the mixed sample the complementary labels of both, and ``ybar_i = y_j`` or
``ybar_j = y_i`` happens often (complementary-label noise: a "complementary" label that is the
mixed sample's true class). ICM mixes each sample only with a partner from its own k-means
cluster of self-supervised embeddings (SimSiam's in the paper), which mostly shares its class.
As in the authors' code (``aug_intra_class``): one ``lam ~ Beta(alpha, alpha)`` per batch,
each sample's partner drawn uniformly from the batch's members of its cluster (itself
included), the loss ``lam L(ybar_i) + (1 - lam) L(ybar_j)``: the SCL losses are linear in the
target, so this is the loss of the mixed complementary label ``lam e_i + (1 - lam) e_j``.
SCL-NL and SCL-EXP are Chou et al., "Unbiased Risk Estimators Can Mislead: A Case Study of
Learning with Complementary Labels", ICML 2020: ``-log(1 - p_ybar)`` and ``exp(p_ybar)``.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt

from sdk import classification as cls
from sdk.card import Card
from sdk.cluster import kmeans
from sdk.constraints import one_of
from sdk.context import FromData
from sdk.errors import ConfigError, RequirementError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Objective, Transform
from sdk.state import ResizableBuffers
from sdk.types import Batch, Loss, Views

NAME = "intra_cluster_mixup_cll"
CLUSTER = "cluster"
"""``Batch.extras["cluster"]`` [B] (long): the batch's cluster ids, overriding the stored ones."""


def log1m_softmax(logits: torch.Tensor) -> torch.Tensor:
    """``log(1 - softmax(z)_k)`` [B, C] in float32 or better, without cancellation: for the
    row's largest logit ``log sum_{j != k} e^{z_j} - log sum_j e^{z_j}`` (two log-sum-exps),
    for the others ``log(S - e_k) - log S`` with ``e = exp(z - max z)``, where ``S - e_k >= 1``."""
    z = cls.upcast(logits)
    top = z.argmax(-1, keepdim=True)
    is_max = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, top, True)
    lse = torch.logsumexp(z, -1, keepdim=True)
    rest = torch.logsumexp(z.masked_fill(is_max, float("-inf")), -1, keepdim=True) - lse
    e = torch.exp(z - z.gather(-1, top))
    total = e.sum(-1, keepdim=True)
    others = torch.log((total - e).masked_fill(is_max, 1.0)) - torch.log(total)
    return torch.where(is_max, rest, others)


def scl_loss(logits: torch.Tensor, t: cls.Targets, kind: str = "nl") -> torch.Tensor:
    """Per-sample complementary-label loss against complementary labels ``ybar`` (ids) or
    their mixtures ``q`` [B, C]: SCL-NL ``-sum_k q_k log(1 - p_k)``, SCL-EXP
    ``sum_k q_k exp(p_k)`` (``p = softmax(z)``)."""
    if kind == "nl":
        return -cls.pick(log1m_softmax(logits), t)
    return cls.pick(torch.exp(cls.log_probs(logits).exp()), t)


def cluster_partners(clusters: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """For each sample a partner drawn uniformly from the samples of its cluster in the
    batch, itself included (a sample alone in its cluster is its own partner): [B] indices,
    one [B, B] draw, no host sync."""
    b = clusters.shape[0]
    u = torch.rand(b, b, generator=generator, device=clusters.device)
    return u.masked_fill(clusters[:, None] != clusters[None, :], -1.0).argmax(1)


def random_partners(b: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Plain mixup's pairing: a partner drawn uniformly from the whole batch (itself included,
    as the authors' mixup baseline draws it)."""
    return torch.randint(b, (b,), generator=generator, device=device)


def noise_rate(complementary: torch.Tensor, true: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
    """The share of mixed pairs with complementary-label noise, ``ybar_i = y_j`` or
    ``ybar_j = y_i`` (the paper's Sec. 3 count; needs the true labels: diagnostics only)."""
    j = partner
    return ((complementary == true[j]) | (complementary[j] == true)).float().mean()


class IntraClusterMixup(ResizableBuffers, Transform):
    """ICM on the input batch: each sample mixed with a partner from its own cluster,
    ``x~ = lam x_i + (1 - lam) x_j``, its complementary labels ``q~ = lam e_{ybar_i} + (1 - lam)
    e_{ybar_j}`` (soft labels [B, C] in ``Batch.targets``), ``lam ~ Beta(alpha, alpha)`` per batch.

    Cluster ids: ``Batch.extras["cluster"]`` [B] when the batch has them, else the table that
    :meth:`cluster` fills by k-means over the training set's self-supervised embeddings,
    keyed by ``Batch.index`` (checkpointed). ``pairing="random"`` is plain mixup (the paper's
    ablation). ``extras`` records ``mixup_lambda`` and ``mixup_perm``. Training mode only."""

    produces = frozenset({Input.SOFT_LABELS})
    resizable_buffers = ("clusters",)

    def __init__(self, alpha: Annotated[float, Gt(0)] = 1.0,
                 num_classes: Annotated[int | None, FromData("num_classes")] = None,
                 n_clusters: Annotated[int | None, Ge(1)] = None,
                 pairing: Annotated[str, one_of(("cluster", "random"))] = "cluster",
                 seed: int = 0):
        super().__init__()
        self.alpha, self.num_classes, self.n_clusters = alpha, num_classes, n_clusters
        self.pairing, self.seed = pairing, seed
        self._beta = torch.distributions.Beta(torch.tensor(alpha), torch.tensor(alpha))
        self.register_buffer("clusters", torch.zeros(0, dtype=torch.long))

    @torch.no_grad()
    def cluster(self, embeddings: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """k-means (``n_clusters`` groups, ``num_classes`` by default, the paper's K = C) of
        ``embeddings`` [N, D] from a frozen self-supervised encoder; the samples ``index`` [N]
        (``0..N-1`` by default) keep their cluster. Returns the [N] cluster ids."""
        k = self.n_clusters or self.num_classes
        if k is None:
            raise ConfigError(f"transform {NAME!r}: cluster() needs n_clusters= or num_classes=",
                              param="n_clusters")
        if embeddings.dim() != 2:
            raise ShapeError(f"transform {NAME!r}: embeddings must be [N, D], got {list(embeddings.shape)}")
        index = torch.arange(embeddings.shape[0]) if index is None else index.long()
        if index.shape != (embeddings.shape[0],):
            raise ShapeError(f"transform {NAME!r}: index must be [{embeddings.shape[0]}], "
                             f"got {list(index.shape)}")
        labels, _ = kmeans(embeddings, k, seed=self.seed)
        table = torch.full((int(index.max()) + 1,), -1, dtype=torch.long, device=labels.device)
        table[index.to(labels.device)] = labels
        self.clusters = table
        return labels

    def _batch_clusters(self, batch: Batch, b: int, device: torch.device) -> torch.Tensor:
        given = batch.extras.get(CLUSTER)
        if given is not None:
            if not isinstance(given, torch.Tensor) or given.shape != (b,):
                shape = list(given.shape) if isinstance(given, torch.Tensor) else type(given).__name__
                raise ShapeError(f"transform {NAME!r}: Batch.extras['cluster'] must be [{b}] cluster "
                                 f"ids, got {shape}")
            return given.to(device)
        if self.clusters.shape[0] == 0 or batch.index is None:
            raise RequirementError(f"transform {NAME!r} needs cluster ids: call .cluster(embeddings, "
                                   f"index) first and give Batch.index, or Batch.extras['cluster']")
        idx = batch.index.to(self.clusters.device).long()
        known = idx < self.clusters.shape[0]
        found = self.clusters[idx.clamp_max(self.clusters.shape[0] - 1)]
        # a sample without a stored cluster is its own cluster (it mixes with itself)
        return torch.where(known & (found >= 0), found, -1 - idx).to(device)

    def forward(self, x: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, Batch]:
        if not self.training:
            return x, batch
        if batch.targets is None:
            raise RequirementError(f"transform {NAME!r} needs Batch.targets (complementary labels)")
        b = x.shape[0]
        y = batch.targets
        if y.dim() == 1:
            if self.num_classes is None:
                raise RequirementError(f"transform {NAME!r}: class-id targets need num_classes=")
            y = F.one_hot(y.long(), self.num_classes)
        elif y.dim() != 2:
            raise ShapeError(f"transform {NAME!r}: Batch.targets must be complementary class ids "
                             f"[{b}] or soft labels [{b}, C], got {list(y.shape)}")
        if self.pairing == "cluster":
            partner = cluster_partners(self._batch_clusters(batch, b, x.device))
        else:
            partner = random_partners(b, x.device)
        lam = self._beta.sample().to(x.device)
        mixed = lam * x + (1 - lam) * x[partner]
        y = y.to(x.dtype if x.is_floating_point() else torch.float32)
        targets = lam * y + (1 - lam) * y[partner]
        extras = {**batch.extras, "mixup_lambda": lam, "mixup_perm": partner}
        return mixed, batch.evolve(targets=targets, extras=extras)

    def example_inputs(self, batch_size: int, generator: torch.Generator):
        labels = torch.arange(batch_size) % 3
        extras = {CLUSTER: torch.arange(batch_size) % 2}
        return (torch.randn(batch_size, 16, generator=generator),
                Batch(targets=F.one_hot(labels, 3).float(), extras=extras))


class ComplementaryLoss(Objective):
    """SCL-NL (or SCL-EXP) on ``Views.logits`` against complementary labels in
    ``Batch.targets``: class ids [B] of a class each sample is *not*, or their ICM / mixup
    mixtures [B, C] (rows sum to 1)."""

    requires = {"logits": True, "targets": True}
    consumes = frozenset({Input.LOGITS, Input.LABELS, Input.SOFT_LABELS})
    batch_coupled = False

    def __init__(self, loss: Annotated[str, one_of(("nl", "exp"))] = "nl"):
        super().__init__()
        self.loss = loss

    def forward(self, views: Views, batch: Batch) -> Loss:
        z = views.logits
        t = cls.targets(NAME, z, batch.targets)
        if z.shape[1] < 2:
            raise ShapeError(f"{NAME}: complementary labels (Batch.targets) need Views.logits over "
                             f"at least 2 classes, got {list(z.shape)}")
        return cls.reduce(scl_loss(z, t, self.loss), t)


_TITLE = ("Intra-Cluster Mixup: An Effective Data Augmentation Technique for "
          "Complementary-Label Learning")

TRANSFORM_CARD = Card(
    name=NAME, kind="transform", title=_TITLE, paper="arXiv:2509.17971",
    summary="Mixup for complementary-label learning that pairs each sample with a partner from "
            "its own k-means cluster of self-supervised embeddings, so that the mixed sample's "
            "complementary labels rarely name its true class.",
    formula="c = kmeans(SSL embeddings, K); j ~ U{j' in batch : c_j' = c_i} (i itself included); "
            "lam ~ Beta(alpha, alpha) per batch; x~_i = lam x_i + (1 - lam) x_j, "
            "q~_i = lam e_{ybar_i} + (1 - lam) e_{ybar_j}",
    left_out="The self-supervised encoder (SimSiam in the paper) is not part of this plugin: "
             "cluster(embeddings, index) takes any frozen encoder's embeddings (e.g. an ssl "
             "plugin's run), or batches carry Batch.extras['cluster']. K defaults to the number "
             "of classes (the paper's default; it tunes K per dataset). The paper's variants "
             "that mix three or four in-cluster samples, and its imbalanced-CLL reweighting, are "
             "not implemented. pairing='random' is plain mixup (the paper's baseline).",
)

OBJECTIVE_CARD = Card(
    name=NAME, kind="objective", title=_TITLE, paper="arXiv:2509.17971",
    summary="The surrogate complementary-label losses ICM trains with: SCL-NL (default) or "
            "SCL-EXP (Chou et al. 2020) on complementary labels or their mixtures.",
    formula="p = softmax(z); SCL-NL: l = -sum_k q_k log(1 - p_k); SCL-EXP: l = sum_k q_k exp(p_k) "
            "(q one-hot at the complementary label, or ICM's mixture)",
    left_out="The other CLL losses the paper combines ICM with (e.g. unbiased risk estimators, "
             "FWD, DM, MCL) are not implemented. Uniform complementary labels are assumed to be "
             "given (the data's part).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(IntraClusterMixup, card=TRANSFORM_CARD)
    registry.add(ComplementaryLoss, card=OBJECTIVE_CARD)
