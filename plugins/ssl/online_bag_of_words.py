"""OBoW: the student predicts, from a perturbed view, the bag of visual words a momentum teacher
builds from its local features over an online vocabulary.

Gidaris, Bursuc, Puy, Komodakis, Cord & Pérez, "OBoW: Online Bag-of-Visual-Words Generation for
Self-Supervised Learning", CVPR 2021 (arXiv:2012.11552); formula and defaults from the authors'
code (github.com/valeoai/obow, ``obow/builder_obow.py``).

Teacher side (no gradient), for the local features ``u_i(l)`` ``[C]`` of sample ``i`` at location
``l`` and the vocabulary ``V = [w_1 .. w_K]``::

    d_i(l, k) = ||u_i(l) - w_k||^2
    mu       <- m mu + (1 - m) mean_{i, l} min_k d_i(l, k)            (training; m = 0.99)
    c_i(l)    = softmax_k(-(delta / mu) d_i(l, k))                    (delta = 15)
    y_i       = max_l c_i(l) / || max_l c_i(l) ||_1                   (the BoW target)

then one (3 x 3 locally averaged) local feature per sample replaces the oldest words (a queue).
Student side: a generator ``G`` maps each word to ``omega_k = G(w_k) / ||G(w_k)||`` and the
prediction from the student's global feature ``z`` is ``q = softmax(kappa omega^T z)``
(``kappa = 8``); the loss is ``KL(y || q)`` per student view.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, Interval
from torch import Tensor, nn

from sdk import keys
from sdk.card import Card
from sdk.constraints import one_of
from sdk.distributed import Gather, gather_no_grad, resolve_gather, sum_over_ranks
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.momentum import EMATeacher
from sdk.ssl import at_least_float32
from sdk.types import Batch, Loss, Views

OWNER = "objective 'online_bag_of_words'"
POOLS = ("max", "avg")
UPDATES = ("auto", "local_average", "global_average", "no_averaging")


def local_features(t: Tensor, field: str = "teacher output") -> tuple[Tensor, Tensor | None]:
    """``(u, maps)``: the teacher's local features as a set ``u`` ``[B, L, C]`` and, for feature
    maps ``[B, C, H, W]``, the maps without their one-pixel border (as the authors' code, which
    drops it before assigning words; ``None`` otherwise). ``[B, C]`` is one location per sample,
    ``[B, L, C]`` a set of ``L`` local features (tokens)."""
    if not t.is_floating_point() or t.dim() not in (2, 3, 4):
        raise ShapeError(f"{OWNER}: {field} must be floating [B, C] features, [B, L, C] local "
                         f"features or [B, C, H, W] feature maps, got {t.dtype} {list(t.shape)}")
    if t.dim() == 2:
        return t[:, None, :], None
    if t.dim() == 3:
        return t, None
    if t.shape[2] < 3 or t.shape[3] < 3:
        raise ShapeError(f"{OWNER}: {field} feature maps {list(t.shape)} are too small: the border "
                         "is dropped, so H and W must be at least 3")
    maps = t[:, :, 1:-1, 1:-1]
    return maps.flatten(2).transpose(1, 2), maps


def word_distances(u: Tensor, words: Tensor) -> Tensor:
    """``||u_i(l) - w_k||^2`` ``[B, L, K]`` of local features ``u`` ``[B, L, C]`` to the words
    ``[K, C]`` (expanded as ``||u||^2 + ||w||^2 - 2 u.w``, as the authors' code)."""
    return u.pow(2).sum(-1, keepdim=True) + words.pow(2).sum(-1) - 2 * u @ words.T


def bow_target(dist: Tensor, inv_delta: float | Tensor, pool: str = "max") -> Tensor:
    """The BoW ``y`` ``[B, K]`` from distances ``[B, L, K]``: soft assignment codes
    ``softmax_k(-inv_delta d)``, pooled over the locations (``"max"``: the paper's, or
    ``"avg"``) and L1-normalised."""
    codes = F.softmax(-inv_delta * dist, dim=-1)
    bow = codes.amax(dim=1) if pool == "max" else codes.mean(dim=1)
    return F.normalize(bow, p=1, dim=-1)


def sample_local(u: Tensor, maps: Tensor | None, update: str) -> Tensor:
    """One local feature per sample ``[B, C]`` for the vocabulary queue: ``"local_average"``
    (maps: 3 x 3 average pooling, then a location drawn uniformly), ``"no_averaging"`` (a
    location drawn uniformly) or ``"global_average"`` (the mean over the locations)."""
    if update == "global_average":
        return u.mean(dim=1)
    if update == "local_average":
        if maps is None or maps.shape[2] < 3 or maps.shape[3] < 3:
            raise ShapeError(f"{OWNER}: update='local_average' needs teacher feature maps "
                             "[B, C, H, W] with H, W >= 5 (3 x 3 averaging after the border is "
                             f"dropped), got local features {list(u.shape)}")
        u = F.avg_pool2d(maps, kernel_size=3, stride=1).flatten(2).transpose(1, 2)
    b, n = u.shape[0], u.shape[1]
    pick = torch.randint(0, n, (b,), device=u.device)
    return u[torch.arange(b, device=u.device), pick]


class WordGenerator(nn.Module):
    """``omega_k = G(w_k) / ||G(w_k)||``, ``G = Linear(no bias) -> BN -> ReLU -> Linear`` on the
    L2-normalised words (the BoW prediction head's weight generator)."""

    def __init__(self, word_dim: int, dim: int, hidden_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(word_dim, hidden_dim, bias=False),
                                 nn.BatchNorm1d(hidden_dim), nn.ReLU(),
                                 nn.Linear(hidden_dim, dim))

    def forward(self, words: Tensor) -> Tensor:
        w = F.normalize(words.to(self.net[0].weight.dtype), dim=-1)
        return F.normalize(self.net(w), dim=-1)


class OnlineBagOfWords(Objective):
    """OBoW (see the module docstring). The teacher's local features of the first view
    (``Views.extras["teacher"][0]``: ``[B, C]``, ``[B, L, C]`` or feature maps ``[B, C, H, W]``;
    the ``online_bag_of_words`` teacher publishes its backbone's ``features``) give the targets;
    every other view's student embedding ``[B, dim]`` predicts them, and the loss is the mean of
    their ``KL(y || q)``.

    The vocabulary (``num_words`` words of ``word_dim`` channels, starting as ``max(0, N(0, 1))``
    draws), its pointer and the running mean ``mu`` of the minimum distances are buffers
    (checkpointed). In training the targets and predictions use the vocabulary as it was
    before the batch; ``mu`` is updated first and then the queue. ``gather`` ("auto": under
    DDP): ``mu``'s batch mean is over the global batch and the queue receives every rank's
    samples, so the ranks keep the same vocabulary."""

    requires = {"views": 2, "extras": (keys.TEACHER,)}
    batch_coupled = True

    def __init__(self, dim: Annotated[int, Ge(1)] = 128, word_dim: Annotated[int, Ge(1)] = 128,
                 num_words: Annotated[int, Ge(2)] = 8192,
                 inv_delta: Annotated[float, Gt(0)] = 15.0, kappa: Annotated[float, Gt(0)] = 8.0,
                 learn_kappa: bool = False,
                 hidden_dim: Annotated[int | None, Ge(1)] = None,
                 pool: Annotated[str, one_of(POOLS)] = "max",
                 update: Annotated[str, one_of(UPDATES)] = "auto",
                 distance_momentum: Annotated[float, Interval(ge=0, le=1)] = 0.99,
                 gather: Gather = "auto"):
        super().__init__()
        self.dim, self.word_dim, self.num_words = dim, word_dim, num_words
        self.inv_delta, self.pool, self.update, self.gather = inv_delta, pool, update, gather
        self.distance_momentum = distance_momentum
        self.generator = WordGenerator(word_dim, dim, 2 * dim if hidden_dim is None else hidden_dim)
        self.kappa = nn.Parameter(torch.tensor(float(kappa)), requires_grad=learn_kappa)
        self.register_buffer("words", torch.randn(num_words, word_dim).clamp(min=0))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("min_distance_mean", torch.tensor(0.5))

    def predict(self, z: Tensor, words: Tensor) -> Tensor:
        """BoW prediction logits ``kappa omega^T z`` ``[B, K]`` of student embeddings ``z``."""
        z = at_least_float32(z)
        omega = self.generator(words).to(z.dtype)
        return self.kappa.to(z.dtype) * z @ omega.T

    def _teacher(self, views: Views) -> Tensor:
        teacher = views.extras[keys.TEACHER]
        t = teacher[0] if isinstance(teacher, (tuple, list)) and teacher else teacher
        if not isinstance(t, Tensor):
            raise ShapeError(f"{OWNER}: extras[{keys.TEACHER!r}] must hold the teacher's local "
                             f"features of each view, got {type(teacher).__name__}")
        if t.shape[0] != views.batch_size:
            raise ShapeError(f"{OWNER}: extras[{keys.TEACHER!r}][0] has {t.shape[0]} rows, but Views "
                             f"hold {views.batch_size} samples")
        return t

    @torch.no_grad()
    def _observe(self, dist: Tensor, u: Tensor, maps: Tensor | None, gathered: bool) -> None:
        """Training: ``mu``'s EMA step and the queue update."""
        total = dist.amin(dim=-1).sum()
        count = total.new_tensor(float(dist.shape[0] * dist.shape[1]))
        if gathered:
            total, count = sum_over_ranks(total), sum_over_ranks(count)
        m = self.distance_momentum
        self.min_distance_mean.mul_(m).add_((total / count).to(self.min_distance_mean.dtype),
                                            alpha=1 - m)
        update = self.update if self.update != "auto" else (
            "local_average" if maps is not None else "no_averaging")
        new = sample_local(u, maps, update)
        if gathered:
            new = gather_no_grad(new)
        new = new[-self.num_words:]
        slots = (self.ptr + torch.arange(new.shape[0], device=new.device)) % self.num_words
        self.words.index_copy_(0, slots, new.to(self.words.dtype))
        self.ptr.copy_((self.ptr + new.shape[0]) % self.num_words)

    def forward(self, views: Views, batch: Batch) -> Loss:
        u, maps = local_features(self._teacher(views), f"extras[{keys.TEACHER!r}][0]")
        if u.shape[-1] != self.word_dim:
            raise ShapeError(f"{OWNER}: the teacher's local features have {u.shape[-1]} channels, "
                             f"but word_dim={self.word_dim}")
        students = views.embeddings[1:]
        for v, z in enumerate(students, start=1):
            if z.dim() != 2 or z.shape[1] != self.dim:
                raise ShapeError(f"{OWNER}: Views.embeddings[{v}] must be [B, {self.dim}] (dim), got "
                                 f"{list(z.shape)}")
        words = self.words  # the vocabulary before this batch (the queue update is last)
        logits = [self.predict(z, words) for z in students]
        with torch.no_grad():
            u = at_least_float32(u.detach())
            dist = word_distances(u, words.to(u.dtype))
            if self.training:
                self._observe(dist, u, None if maps is None else at_least_float32(maps.detach()),
                              resolve_gather(self.gather))
            target = bow_target(dist, self.inv_delta / self.min_distance_mean.to(u.dtype), self.pool)
        per_view = [F.kl_div(F.log_softmax(q, dim=-1), target.to(q.dtype), reduction="none").sum(-1)
                    for q in logits]
        per_sample = torch.stack(per_view).mean(0)
        perplexity = torch.exp(-torch.xlogy(target, target).sum(-1)).mean()
        return Loss(value=per_sample.mean(), per_sample=per_sample,
                    logs={"bow_perplexity": perplexity.detach()})

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        """Two views of student embeddings ``[B, dim]`` (the first, the teacher's view, takes no
        gradient: the student does not predict from it) and the teacher's features ``[B, 1,
        word_dim]`` on each (one location: nothing random is drawn for the queue)."""
        z = tuple(torch.randn(batch_size, self.dim, generator=generator).requires_grad_(v > 0)
                  for v in range(2))
        t = tuple(torch.randn(batch_size, 1, self.word_dim, generator=generator).relu()
                  for _ in range(2))
        return Views(embeddings=z, extras={keys.TEACHER: t}), Batch()


class BoWTeacher(EMATeacher):
    """OBoW's teacher: an EMA copy of the student (momentum 0.99 -> 1, cosine) whose output on
    each view is the copy's backbone ``features`` (the local features before the head: feature
    maps ``[B, C, H, W]`` for a convolutional backbone, ``[B, F]`` for an MLP; a plain module
    without ``features``: its output)."""

    def __init__(self, student: nn.Module | None = None,
                 momentum: Annotated[float, Interval(ge=0, le=1)] = 0.99,
                 final_momentum: Annotated[float, Interval(ge=0, le=1)] = 1.0):
        super().__init__(student=student, momentum=momentum, final_momentum=final_momentum)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        target = self._require_target()
        features = getattr(target, "features", None)
        return target(x) if features is None else features(x)


CARD = Card(
    name="online_bag_of_words", kind="objective",
    title="OBoW: Online Bag-of-Visual-Words Generation for Self-Supervised Learning",
    paper="arXiv:2012.11552",
    summary="A momentum teacher soft-assigns its local features to an online vocabulary of "
            "queued local features and max-pools the codes into a bag of words; the student "
            "predicts that BoW from a perturbed view through weights generated from the words.",
    formula="d(l, k) = ||u(l) - w_k||^2; mu <- m mu + (1-m) mean min_k d; "
            "y = normalize_1(max_l softmax_k(-(delta/mu) d(l, k))); "
            "q = softmax(kappa omega^T z), omega_k = G(w_k)/||G(w_k)||; L = mean_views KL(y || q); "
            "queue: w <- one 3x3-averaged local feature per sample (oldest out)",
    left_out="dim and word_dim are the encoder's widths (default 128 each; the paper's ResNet-50 "
             "has 2048, its words 1024 and 2048 channels); hidden_dim defaults to 2 dim as the "
             "authors'. One BoW level per objective (the paper's full model uses conv4 and conv5: two "
             "vocabularies); the teacher's view is the first one and the students are the other "
             "views, each weighted equally (the authors average the crops of one size and sum "
             "the sizes). The vocabulary is a ring buffer of any size (the authors require "
             "num_words to be a multiple of the batch). update='auto' is the paper's "
             "local_average on feature maps and the code's no_averaging on features without a "
             "spatial layout ([B, C] or [B, L, C]). The loss is the code's KL (cross-entropy "
             "minus the target's entropy: the same gradient). The online linear classifier on "
             "the teacher's features (monitoring only) and the image crops are left to the "
             "recipe; the teacher is the online_bag_of_words teacher (EMA, 0.99 -> 1).",
)

TEACHER_CARD = Card(
    name="online_bag_of_words", kind="teacher",
    title="OBoW: Online Bag-of-Visual-Words Generation for Self-Supervised Learning",
    paper="arXiv:2012.11552",
    summary="OBoW's momentum teacher: an EMA copy of the student publishing its backbone features "
            "(local features) on every view, for the online_bag_of_words objective.",
    formula="theta_t <- a theta_t + (1 - a) theta_s, a: 0.99 -> 1 (cosine); "
            "extras['teacher'][v] = features_t(x_v)",
    left_out="The local features are the encoder's features(x), the input of its head (the paper "
             "reads the ResNet's conv4 / conv5 maps).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(OnlineBagOfWords, card=CARD)
    registry.add(BoWTeacher, card=TEACHER_CARD)
