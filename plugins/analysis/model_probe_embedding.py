"""Black-box model embeddings from outputs on a fixed probe set, and model retrieval by them.

Shang, Liu, Liu, Gu, Ding, Ji, "Know2Vec: A Black-Box Proxy for Neural Network Retrieval",
AAAI 2025 (arXiv:2412.16251): each model of a zoo is queried in advance through a black-box
interface and its decision knowledge is turned into a vector; a user's task, given as labelled
query samples, becomes a knowledge vector from the class structure of those samples; the model
whose vector is most similar to the task's (an inner product of the two vectors) is retrieved.
Here both vectors live on one fixed probe set, with no learned encoder: a model is its softmax
outputs on the probe rows, the task is the class its query samples' nearest class mean gives
each probe row, and models are ranked by the cosine of the two.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdk.card import Card
from sdk.distributed import sum_over_ranks
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Metric
from sdk.metrics import check_embeddings

_NAME = "model_probe_embedding"
_STAT = torch.float64


@torch.no_grad()
def probe_outputs(model: nn.Module, probe_x: Tensor) -> Tensor:
    """The black-box knowledge of ``model``: ``softmax(model(probe_x))`` ``[P, C]`` (float64),
    the model called once in eval mode without gradients (its training mode restored)."""
    training = model.training
    model.eval()
    try:
        logits = model(probe_x)
    finally:
        model.train(training)
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ShapeError(f"{_NAME}: the model must map the probe set to floating class scores "
                         f"[P, C], got {logits.dtype} {list(logits.shape)}")
    return logits.to(_STAT).softmax(dim=1)


def model_embedding(probs: Tensor) -> Tensor:
    """``e = vec(Q) / ||vec(Q)||`` of the probe outputs ``Q [P, C]`` (rows in probe order,
    classes in the model's output order)."""
    _check_table("probs", probs)
    return F.normalize(probs.to(_STAT).reshape(-1), dim=0)


def task_probe_labels(probe_x: Tensor, query_x: Tensor, query_y: Tensor, num_classes: int) -> Tensor:
    """The task on the probe set ``T [P, num_classes]``: one-hot rows of the nearest (Euclidean)
    class mean ``mu_k = mean_{y_j = k} x_j`` of the task's labelled query samples (classes absent
    from the query are never chosen). Probe and query rows must share one input (or reference
    feature) space."""
    check_embeddings(_NAME, query_x, query_y, what="query_x")
    check_embeddings(_NAME, probe_x, what="probe_x")
    if probe_x.shape[1] != query_x.shape[1] or not probe_x.is_floating_point() \
            or not query_x.is_floating_point():
        raise ShapeError(f"{_NAME}: probe_x and query_x must be floating rows of one width, got "
                         f"{probe_x.dtype} {list(probe_x.shape)} and {query_x.dtype} "
                         f"{list(query_x.shape)}")
    if query_y.numel() and int(query_y.max()) >= num_classes:
        raise ShapeError(f"{_NAME}: query_y holds class {int(query_y.max())}, beyond "
                         f"num_classes={num_classes}")
    onehot = F.one_hot(query_y.long(), num_classes).to(_STAT)                 # [Q, K]
    counts = onehot.sum(0)
    means = (onehot.T @ query_x.to(_STAT)) / counts.clamp_min(1)[:, None]    # [K, D]
    dist = torch.cdist(probe_x.to(_STAT), means)
    dist = dist.masked_fill(counts[None, :] == 0, math.inf)
    return F.one_hot(dist.argmin(1), num_classes).to(_STAT)


def task_embedding(targets: Tensor) -> Tensor:
    """``t = vec(T) / ||vec(T)||`` of the task's targets on the probe set ``T [P, C]``."""
    _check_table("targets", targets)
    return F.normalize(targets.to(_STAT).reshape(-1), dim=0)


def retrieval_scores(model_embeddings: Tensor, task: Tensor) -> Tensor:
    """``s_m = <e_m, t>`` ``[M]``: the cosine of each model's embedding (rows of ``[M, P C]``)
    with the task's; rank the models by ``s.argsort(descending=True)``."""
    if model_embeddings.dim() != 2 or task.shape != model_embeddings.shape[1:]:
        raise ShapeError(f"{_NAME}: model embeddings must be [M, {task.numel()}] for a task "
                         f"embedding {list(task.shape)}, got {list(model_embeddings.shape)}")
    return model_embeddings.to(_STAT) @ task.to(_STAT)


def _check_table(what: str, t: Tensor) -> None:
    if t.dim() != 2 or not t.is_floating_point():
        raise ShapeError(f"{_NAME}: {what} must be floating [P, C], got {t.dtype} {list(t.shape)}")


def _example(batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``update`` arguments for the conformance kit: three models' probabilities ``[3, B, 4]``
    on ``B`` probe rows and the task's class ids ``i % 4``."""
    task = torch.arange(batch_size) % 4
    logits = torch.randn(3, batch_size, 4, generator=generator) + 3 * F.one_hot(task, 4)
    return logits.softmax(-1), task


class ModelProbeEmbedding(Metric):
    """Streams probe rows: ``update(outputs, task)`` with the candidate models' probe outputs
    ``[M, P, C]`` (:func:`probe_outputs` of each) and the task's targets on the same rows, class
    ids ``[P]`` or a table ``[P, C]`` (:func:`task_probe_labels`). ``compute()`` gives
    ``model_m``, the cosine of model ``m``'s embedding with the task's over every row updated
    (sums over the ranks), and ``best``, the index of the model retrieved."""

    example_inputs = staticmethod(_example)

    def __init__(self) -> None:
        self.reset()

    def update(self, outputs: Tensor, task: Tensor) -> None:
        if outputs.dim() != 3 or not outputs.is_floating_point():
            raise ShapeError(f"{_NAME}: outputs must be floating [M, P, C] (M models' outputs on "
                             f"P probe rows), got {outputs.dtype} {list(outputs.shape)}")
        m, p, c = outputs.shape
        if task.dim() == 1 and not task.is_floating_point() and task.dtype != torch.bool:
            if task.shape != (p,) or (p and (int(task.min()) < 0 or int(task.max()) >= c)):
                raise ShapeError(f"{_NAME}: task class ids must be [{p}] in [0, {c}), got "
                                 f"{list(task.shape)}")
            task = F.one_hot(task.long(), c)
        elif task.shape != (p, c) or not task.is_floating_point():
            raise ShapeError(f"{_NAME}: task must be class ids [{p}] or floating targets "
                             f"[{p}, {c}], got {task.dtype} {list(task.shape)}")
        if m == 0 or (self._dot is not None and self._dot.shape != (m,)):
            raise ShapeError(f"{_NAME}: outputs must keep the number of models "
                             f"({'>= 1' if self._dot is None else self._dot.shape[0]}), got {m}")
        q, t = outputs.detach().to(_STAT), task.detach().to(_STAT).to(outputs.device)
        stats = ((q * t).sum((1, 2)), q.pow(2).sum((1, 2)), t.pow(2).sum())
        if self._dot is None:
            self._dot, self._model_sq, self._task_sq = stats
        else:
            self._dot = self._dot + stats[0].to(self._dot.device)
            self._model_sq = self._model_sq + stats[1].to(self._dot.device)
            self._task_sq = self._task_sq + stats[2].to(self._dot.device)

    def compute(self) -> dict[str, float]:
        if self._dot is None:
            return {"best": math.nan}
        dot, mq, tq = (sum_over_ranks(s) for s in (self._dot, self._model_sq, self._task_sq))
        scores = dot / (mq * tq).sqrt()
        out = {f"model_{i}": float(s) for i, s in enumerate(scores.tolist())}
        out["best"] = math.nan if bool(scores.isnan().any()) else float(scores.argmax())
        return out

    def reset(self) -> None:
        self._dot: Tensor | None = None
        self._model_sq: Tensor | None = None
        self._task_sq: Tensor | None = None

    def state_dict(self) -> dict[str, Any]:
        if self._dot is None:
            return {}
        return {"dot": self._dot.clone(), "model_sq": self._model_sq.clone(),
                "task_sq": self._task_sq.clone()}

    def load_state_dict(self, state: Any) -> None:
        self.reset()
        if "dot" in state:
            self._dot = torch.as_tensor(state["dot"]).clone()
            self._model_sq = torch.as_tensor(state["model_sq"]).clone()
            self._task_sq = torch.as_tensor(state["task_sq"]).clone()


CARD = Card(
    name=_NAME, kind="metric", title="Know2Vec: A Black-Box Proxy for Neural Network Retrieval",
    paper="arXiv:2412.16251",
    summary="Model retrieval by black-box knowledge on a fixed probe set: a model is embedded by "
            "its softmax outputs on the probe rows, a task by the class its labelled query "
            "samples' nearest class mean gives each probe row; candidate models are ranked by "
            "the cosine of the two embeddings; update(outputs [M, P, C], task).",
    formula="e_m = vec(softmax(f_m(X_probe))) / ||.||; mu_k = mean_{y_j = k} x_j over the query; "
            "T_ik = 1[k = argmin_l ||x_i - mu_l||], t = vec(T) / ||.||; s_m = <e_m, t>; "
            "retrieved model = argmax_m s_m",
    left_out="Know2Vec's learned proxy is left out: the model encoder over the knowledge it "
             "extracts (class-centre and decision-boundary probe samples found per model, "
             "encoded by a frozen ResNet-18 and an LSTM), the query encoder (ResNet-18 class "
             "means of the query images joined by a graph network over the classes) and their "
             "alignment space trained with ranking and classification losses; so is the model "
             "zoo. Without a learned alignment both sides are put on one fixed probe set, which "
             "requires the task's classes to be indexed like the models' outputs; the task side "
             "is a nearest-class-mean labelling of the probe rows in their input space (pass "
             "frozen reference features for the paper's ResNet-18 space), and the similarity is "
             "the cosine (the paper scores pairs by the inner product of its embeddings).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(ModelProbeEmbedding, card=CARD)
