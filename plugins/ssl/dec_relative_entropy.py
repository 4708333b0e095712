"""DEPICT: clustering by relative entropy minimisation with a cluster-frequency prior.

Ghasedi Dizaji, Herandi, Deng, Cai & Huang, "Deep Clustering via Joint Convolutional Autoencoder
Embedding and Relative Entropy Minimization", ICCV 2017, arXiv:1704.06327 (reference code
github.com/herandy/DEPICT).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge
from torch import Tensor, nn

from sdk.card import Card
from sdk.cluster import dataset_index, kmeans
from sdk.constraints import one_of
from sdk.distributed import Gather, gather_no_grad, rank, resolve_gather
from sdk.errors import ConfigError
from sdk.events import State
from sdk.graph import target_distribution
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.types import Batch, Loss, Views, check_ids

SHARPEN = ("sqrt_frequency", "square")


def depict_target(p: Tensor, sharpen: str = "sqrt_frequency", mask: Tensor | None = None) -> Tensor:
    """DEPICT's auxiliary target from predictions ``p`` [N, K] (rows of ``mask`` [N] only enter
    the cluster frequencies ``f_k = sum_i p_ik``):

    * ``"sqrt_frequency"`` (paper, Eq. 7): ``q_ik ~ p_ik / f_k^(1/2)``, the minimiser of
      ``KL(Q || P) + KL(f || u)`` with a uniform prior ``u``;
    * ``"square"`` (the released code): ``q_ik ~ p_ik^2 / f_k``, DEC's target.

    Rows are normalised to sum to 1."""
    p = p.to(torch.promote_types(p.dtype, torch.float32))
    if sharpen == "square" and mask is None:
        return target_distribution(p)
    f = p.sum(0) if mask is None else (p * mask[:, None]).sum(0)
    f = f.clamp_min(torch.finfo(p.dtype).tiny)
    w = p / f.sqrt() if sharpen == "sqrt_frequency" else p.pow(2) / f
    return w / w.sum(dim=1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)


def depict_kl(logits: Tensor, q: Tensor) -> Tensor:
    """Per-sample ``KL(q_i || p_i) = sum_k q_ik (log q_ik - log p_ik)`` with ``p = softmax(logits)``
    [B]; ``q`` is a fixed target (its entropy carries no gradient)."""
    q = q.detach().to(logits.dtype)
    log_q = torch.where(q > 0, q.clamp_min(torch.finfo(q.dtype).tiny).log(), torch.zeros_like(q))
    return (q * (log_q - F.log_softmax(logits, dim=1))).sum(dim=1)


class DECRelativeEntropy(Objective):
    """DEPICT's clustering objective: a multinomial logistic regression ``p_i = softmax(W z_i + b)``
    (the ``head``, ``n_clusters`` outputs) on each view's embedding is fitted to an auxiliary
    target ``Q`` by ``mean_i KL(q_i || p_i)`` (views averaged). ``Q`` is :func:`depict_target` of
    the predictions, which folds in the uniform prior on the cluster frequencies.

    As in the paper's alternating optimisation, ``Q`` is held fixed while the network trains and
    refreshed once per epoch: buffers keyed by ``Batch.index`` (``num_samples`` rows,
    checkpointed) keep every sample's latest prediction of the first view (recorded in training
    forwards) and its target; at ``on_epoch_end`` the targets of all predicted samples are
    recomputed from them. At fit start (once; kept on resume) the head is initialised from
    k-means of the training set's embeddings (rows normalised, zero bias, as the reference code)
    and the first targets come from the whole training set. A sample without a target yet uses
    the target of its batch; that couples the batch, so ``gather`` ("auto": under DDP) computes
    it over the global batch, and the recorded predictions are every rank's."""

    requires = {"views": 1, "index": True}
    batch_coupled = True

    def __init__(self, n_clusters: Annotated[int, Ge(2)] = 10,
                 num_samples: Annotated[int, Ge(1)] = 65536,
                 sharpen: Annotated[str, one_of(SHARPEN)] = "sqrt_frequency",
                 gather: Gather = "auto"):
        super().__init__()
        self.n_clusters, self.num_samples, self.sharpen, self.gather = (
            n_clusters, num_samples, sharpen, gather)
        self.head = nn.LazyLinear(n_clusters)
        self.register_buffer("probs", torch.zeros(num_samples, n_clusters))
        self.register_buffer("seen", torch.zeros(num_samples, dtype=torch.bool))
        self.register_buffer("target", torch.zeros(num_samples, n_clusters))
        self.register_buffer("has_target", torch.zeros(num_samples, dtype=torch.bool))
        self.register_buffer("initialised", torch.tensor(False))

    def logits(self, z: Tensor) -> Tensor:
        """Cluster scores ``W z + b`` [B, K], in ``z``'s precision (float32 at least)."""
        if isinstance(self.head.weight, nn.UninitializedParameter):
            self.head(z[:0].detach().to(self.head.weight.dtype))  # materialises the head
        dtype = torch.promote_types(z.dtype, torch.float32)
        return F.linear(z.to(dtype), self.head.weight.to(dtype), self.head.bias.to(dtype))

    def forward(self, views: Views, batch: Batch) -> Loss:
        logits = [self.logits(z) for z in views.embeddings]
        index = batch.index
        try:  # index_select, unlike indexing, refuses negative ids (on CPU; CUDA asserts)
            known = self.has_target.index_select(0, index)
            stored = self.target.index_select(0, index)
        except (IndexError, RuntimeError):
            check_ids(f"objective {self.name!r}", "Batch.index", index, self.num_samples)
            raise
        p = logits[0].detach().softmax(dim=1)
        gathered = resolve_gather(self.gather)
        all_p, all_index = (gather_no_grad(p), gather_no_grad(index)) if gathered else (p, index)
        batch_q = depict_target(all_p, self.sharpen)
        if gathered:
            b = p.shape[0]
            batch_q = batch_q[rank() * b:(rank() + 1) * b]
        q = torch.where(known[:, None], stored.to(batch_q.dtype), batch_q)
        per_sample = torch.stack([depict_kl(x, q) for x in logits]).mean(0)
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                self.probs[all_index] = all_p.to(self.probs.dtype)
                self.seen[all_index] = True
        return Loss(value=per_sample.mean(), per_sample=per_sample,
                    logs={"stored_targets": known.float().mean().detach()})

    @torch.no_grad()
    def refresh_targets(self) -> None:
        """Targets of every sample with a recorded prediction <- :func:`depict_target` of them."""
        q = depict_target(self.probs, self.sharpen, mask=self.seen)
        self.target.copy_(torch.where(self.seen[:, None], q.to(self.target.dtype), self.target))
        self.has_target |= self.seen

    @torch.no_grad()
    def initialise(self, embeddings: Tensor, index: Tensor) -> None:
        """Head <- normalised k-means centroids of ``embeddings`` [N, D] (zero bias); the
        samples ``index`` [N] get their predictions and targets."""
        if index.numel() and int(index.max()) >= self.num_samples:
            raise ConfigError(f"dec_relative_entropy: num_samples={self.num_samples} does not "
                              f"cover the training set's Batch.index (up to {int(index.max())})",
                              param="num_samples")
        embeddings = embeddings.float()
        self.logits(embeddings[:0])  # materialises the head
        _, centres = kmeans(embeddings, self.n_clusters)
        self.head.weight.copy_(F.normalize(centres, dim=1))
        self.head.bias.zero_()
        index = index.to(self.probs.device)
        self.probs[index] = self.logits(embeddings).softmax(dim=1).to(self.probs.dtype)
        self.seen[index] = True
        self.refresh_targets()
        self.initialised.fill_(True)

    def on_fit_start(self, state: State) -> None:
        if not bool(self.initialised):
            loader = state.trainer.train_loader
            self.initialise(state.trainer.embed(loader), dataset_index(loader.dataset))

    def on_epoch_end(self, state: State) -> None:
        self.refresh_targets()


CARD = Card(
    name="dec_relative_entropy", kind="objective",
    title="Deep Clustering via Joint Convolutional Autoencoder Embedding and Relative Entropy "
          "Minimization (DEPICT)",
    paper="arXiv:1704.06327",
    summary="A softmax clustering head on the embeddings is fitted to sharpened, frequency-"
            "balanced targets by KL(Q || P); the targets (a uniform prior on cluster sizes folded "
            "in) are per-sample buffers refreshed once per epoch, the head initialised by k-means.",
    formula="p_ik = softmax_k(W z_i + b); q_ik ~ p_ik / (sum_i' p_i'k)^(1/2) (sharpen="
            "'sqrt_frequency', the minimiser of KL(Q||P) + KL(f||u)) or p_ik^2 / sum_i' p_i'k "
            "('square', the released code); L = 1/B sum_i sum_k q_ik log(q_ik / p_ik), Q fixed",
    left_out="The convolutional autoencoder and its layer-wise reconstruction losses (compose a "
             "reconstruction objective), the dropout-noisy/clean double pathway (here each view's "
             "prediction is fitted, and the recorded predictions are the first view's in "
             "training mode, not a separate clean pass), the supervised warm-up on k-means labels "
             "and the AC-PIC initialisation used on some datasets. The catalogue's Student-t "
             "soft assignment is DEC's, not DEPICT's: DEPICT uses a softmax (multinomial "
             "logistic regression) layer and the target p / sqrt(f) (the released code's default "
             "p^2 / f is the 'square' option). Samples without a stored target use their batch's.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(DECRelativeEntropy, card=CARD)
