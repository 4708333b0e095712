"""Multi-level knowledge distillation for out-of-distribution detection (MLKD).

Wu, Jiang, Yin, Karlsson and Lin, "Multi-Level Knowledge Distillation for Out-of-Distribution
Detection in Text", ACL 2023 (arXiv:2211.11300): a randomly initialised student learns from a
fine-tuned teacher on in-distribution data only, at the prediction layer and at intermediate
layers; where the two disagree, the input is out-of-distribution.
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge, Gt
from torch import Tensor
from torch.nn import functional as F

from sdk import classification as cls
from sdk import keys
from sdk.card import Card
from sdk.distributed import Gather, gather_no_grad, gather_with_grad, resolve_gather
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Detector, Objective
from sdk.types import Batch, Loss, Views

_NAME = "multilevel_kd_ood"


def layer_similarity_loss(student: Tensor, teacher: Tensor, temperature: float = 0.1) -> Tensor:
    """``(1/B) sum_i -log[exp(cos(s_i, t_i) / tau) / sum_j exp(cos(s_i, t_j) / tau)]``: each
    student row must be closer to its own teacher row than to the batch's other teacher rows."""
    s = F.normalize(cls.upcast(student), dim=1)
    t = F.normalize(teacher.detach().to(s.dtype), dim=1)
    logits = s @ t.T / temperature
    return F.cross_entropy(logits, torch.arange(len(s), device=s.device))


def mlkd_loss(logits: Tensor, teacher_logits: Tensor, student_layers: tuple[Tensor, ...],
              teacher_layers: tuple[Tensor, ...], lambda_sim: float = 1.0, temperature: float = 0.1,
              kd_temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, prediction KL, similarity sum)``: ``mean_i T^2 KL(p_T || p_S) + lambda_sim
    sum_l L_sim^l``."""
    kl = cls.distillation_kl(logits, teacher_logits.detach(), kd_temperature).mean()
    sim = sum((layer_similarity_loss(s, t, temperature) for s, t in zip(student_layers, teacher_layers)),
              start=kl.new_zeros(()))
    return kl + lambda_sim * sim, kl, sim


def mlkd_score(student_logits: Tensor, teacher_logits: Tensor, student_layers: tuple[Tensor, ...] = (),
               teacher_layers: tuple[Tensor, ...] = ()) -> Tensor:
    """Anomaly score ``[N]``: ``sum_l (1 - cos(h_S^l, h_T^l)) - log p_S(argmax p_T)``, the
    student's distance from the teacher at every distilled layer plus its negative
    log-likelihood of the teacher's prediction."""
    z_s = cls.upcast(student_logits)
    nll = F.cross_entropy(z_s, teacher_logits.argmax(1), reduction="none")
    for s, t in zip(student_layers, teacher_layers):
        nll = nll + 1 - F.cosine_similarity(cls.upcast(s), t.to(z_s.dtype), dim=1)
    return nll


def _layers(entry: object) -> tuple:
    return (entry,) if isinstance(entry, Tensor) else tuple(entry)  # type: ignore[arg-type]


class MultiLevelKD(Objective):
    """Trains the student: ``Views.logits`` are its predictions, ``Views.extras[keys.LAYERS]``
    its representations at the ``L`` distilled layers; the teacher's logits are
    ``Views.extras[keys.TEACHER][0]`` and its representations at the same layers
    ``Views.extras[keys.TEACHER_LAYERS]`` (``L`` tensors, widths as the student's). The
    similarity term contrasts each row with the batch's other rows: ``gather`` ("auto": under
    DDP) contrasts over every rank's rows."""

    requires = {"logits": True, "extras": (keys.TEACHER, keys.LAYERS, keys.TEACHER_LAYERS)}
    batch_coupled = True

    def __init__(self, lambda_sim: Annotated[float, Ge(0)] = 1.0, temperature: Annotated[float, Gt(0)] = 0.1,
                 kd_temperature: Annotated[float, Gt(0)] = 1.0, gather: Gather = "auto"):
        super().__init__()
        self.lambda_sim, self.temperature, self.kd_temperature = lambda_sim, temperature, kd_temperature
        self.gather = gather

    @staticmethod
    def example_inputs(batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        """For the conformance kit: 5 classes and two layers of widths 6 and 4."""
        student = tuple(torch.randn(batch_size, d, generator=generator).requires_grad_() for d in (6, 4))
        teacher = tuple(torch.randn(batch_size, d, generator=generator) for d in (6, 4))
        logits = torch.randn(batch_size, 5, generator=generator).requires_grad_()
        extras = {keys.TEACHER: (2 * torch.randn(batch_size, 5, generator=generator),),
                  keys.LAYERS: student, keys.TEACHER_LAYERS: teacher}
        return Views(logits=logits, extras=extras), Batch(index=torch.arange(batch_size))

    def forward(self, views: Views, batch: Batch) -> Loss:
        owner = f"objective {self.name!r}"
        teacher_logits = cls.teacher_logits(owner, views)
        student, layers = (_layers(views.extras[k]) for k in (keys.LAYERS, keys.TEACHER_LAYERS))
        if len(layers) != len(student):
            raise ShapeError(f"{owner}: Views.extras[{keys.TEACHER_LAYERS!r}] holds {len(layers)} "
                             f"teacher layers, but Views.extras[{keys.LAYERS!r}] {len(student)}")
        for i, (s, t) in enumerate(zip(student, layers)):
            for key, v in ((keys.LAYERS, s), (keys.TEACHER_LAYERS, t)):
                if not isinstance(v, Tensor) or v.dim() != 2 or v.shape[0] != views.batch_size \
                        or not v.is_floating_point():
                    raise ShapeError(f"{owner}: Views.extras[{key!r}][{i}] must be floating "
                                     f"[{views.batch_size}, D], got "
                                     f"{list(v.shape) if isinstance(v, Tensor) else type(v).__name__}")
            if t.shape != s.shape:
                raise ShapeError(f"{owner}: Views.extras[{keys.TEACHER_LAYERS!r}][{i}] {list(t.shape)} "
                                 f"must match Views.extras[{keys.LAYERS!r}][{i}] {list(s.shape)}")
        logits = views.logits
        if resolve_gather(self.gather):
            logits, teacher_logits = gather_with_grad(logits), gather_no_grad(teacher_logits)
            student = tuple(gather_with_grad(s) for s in student)
            layers = tuple(gather_no_grad(t.detach()) for t in layers)
        value, kl, sim = mlkd_loss(logits, teacher_logits, student, layers, self.lambda_sim,
                                   self.temperature, self.kd_temperature)
        return Loss(value=value, logs={"prediction_kl": kl.detach(), "layer_similarity": sim.detach()})


class MultiLevelKDScore(Detector):
    """``score(x)`` with ``x = [student | teacher]`` ``[N, 2 W]``: each half is the model's
    outputs concatenated in the order ``layer_dims`` (the distilled layers' widths) then the
    logits (``W - sum(layer_dims)`` columns); needs no fit."""

    inputs = "logits"

    def __init__(self, layer_dims: tuple[Annotated[int, Ge(1)], ...] = ()):
        super().__init__()
        self.layer_dims = tuple(layer_dims)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, ...]:
        """For the conformance kit: in-distribution rows whose student half is the teacher's
        plus noise, out-of-distribution rows whose halves are unrelated (5 classes)."""
        width = sum(self.layer_dims) + 5

        def rows(n: int, close: bool) -> Tensor:
            teacher = 3 * torch.randn(n, width, generator=generator)
            student = teacher + 0.3 * torch.randn(n, width, generator=generator) if close else \
                3 * torch.randn(n, width, generator=generator)
            return torch.cat([student, teacher], 1)

        return rows(64, True), torch.arange(64) % 5, rows(32, True), rows(32, False)

    def forward(self, x: Tensor) -> Tensor:
        half = x.shape[1] // 2
        if x.shape[1] % 2 or half <= sum(self.layer_dims):
            raise ShapeError(f"detector {self.name!r}: x must be [N, 2 W] = [student | teacher] "
                             f"with W > sum(layer_dims) = {sum(self.layer_dims)}, got {list(x.shape)}")
        student, teacher = x[:, :half], x[:, half:]
        cuts = [*self.layer_dims, half - sum(self.layer_dims)]
        s_parts, t_parts = student.split(cuts, 1), teacher.split(cuts, 1)
        return mlkd_score(s_parts[-1], t_parts[-1], s_parts[:-1], t_parts[:-1])


_TITLE = "Multi-Level Knowledge Distillation for Out-of-Distribution Detection in Text"

CARD = Card(
    name=_NAME, kind="objective", title=_TITLE, paper="arXiv:2211.11300",
    summary="A student distils a fine-tuned teacher on in-distribution data: the KL between "
            "their predictions plus, at every distilled layer, an InfoNCE over the batch that "
            "makes each student representation closest (in cosine) to the teacher's "
            "representation of the same input. tau = 0.1, lambda_sim = 1, T = 1.",
    formula="L = mean_i T^2 KL(p_T(x_i) || p_S(x_i)) + lambda_sim sum_l (1/B) sum_i "
            "-log[exp(cos(h_S^l_i, h_T^l_i) / tau) / sum_j exp(cos(h_S^l_i, h_T^l_j) / tau)]",
    left_out="The language-model setting: token-level next-word distributions and perplexity, "
             "GPT-2 teacher and student, the text benchmarks and the ChatGPT-text detection; "
             "here the prediction layer is a classifier's. The layer-similarity form, tau, "
             "lambda_sim and T come from the catalogue, reconstructed from the abstract; the "
             "paper's full text and code were not reachable to confirm them. The teacher's "
             "pretraining and fine-tuning are the user's (a FrozenTeacher around it).",
)

DETECTOR_CARD = Card(
    name=_NAME, kind="detector", title=_TITLE, paper="arXiv:2211.11300",
    summary="The student-teacher discrepancy as an anomaly score: one minus the cosine of their "
            "representations at every distilled layer plus the student's negative "
            "log-likelihood of the teacher's predicted class. x = [student outputs | teacher "
            "outputs], each half the layers (widths layer_dims) then the logits. The "
            "catalogue's 'metric' is this detector.",
    formula="s(x) = sum_l (1 - cos(h_S^l(x), h_T^l(x))) - log p_S(argmax_c p_T(x)_c | x)",
    left_out="The paper's language-model score (the student's token perplexity); the NLL here is "
             "of the teacher's predicted class, a classifier's stand-in, and how the paper "
             "weighs the two parts is not confirmed (summed with weight 1).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(MultiLevelKD, card=CARD)
    registry.add(MultiLevelKDScore, card=DETECTOR_CARD)
