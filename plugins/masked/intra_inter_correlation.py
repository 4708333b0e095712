"""Focus the Discrepancy (FOD): reconstruct patch features through attention layers whose
intra-correlations (patch to patch within an image) and inter-correlations (patch to a normal
reference) are trained against learned Gaussian distance priors, and score anomalies by the
inter-correlation discrepancy times the reconstruction error.

Yao et al., "Focus the Discrepancy: Intra- and Inter-Correlation Learning for Image Anomaly
Detection", ICCV 2023 (arXiv:2308.02983).
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from annotated_types import Ge
from torch import Tensor, nn

from sdk import keys
from sdk.card import Card
from sdk.errors import ConfigError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.masking import sincos_2d
from sdk.types import Batch, Loss, Views

EPS = 1e-4
"""The authors' smoothing inside ``log(p + eps)`` of the KL divergence and the entropy."""


def square_distances(grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """``(dy2, dx2)``, each ``[L, L]``: squared row and column offsets between the patches of a
    ``rows x cols`` grid in row-major order."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    r, c = rows.flatten().double(), cols.flatten().double()
    return (r[:, None] - r[None]).pow(2), (c[:, None] - c[None]).pow(2)


def gaussian_prior(sigma: Tensor, dy2: Tensor, dx2: Tensor) -> Tensor:
    """``[B, H, L, L]`` target correlation from per-query scales ``sigma [B, H, L, 2]``:
    ``exp(-dy^2 / (2 s1^2) - dx^2 / (2 s2^2)) / (2 pi s1 s2)``, normalised over each row."""
    s1, s2 = sigma[..., 0:1], sigma[..., 1:2]
    g = torch.exp(-dy2 / (2 * s1 ** 2) - dx2 / (2 * s2 ** 2)) / (2 * math.pi * s1 * s2)
    return g / g.sum(-1, keepdim=True)


def kl_rows(p: Tensor, q: Tensor) -> Tensor:
    """``[B, L]``: ``sum_s p (log(p + eps) - log(q + eps))`` per row, averaged over the heads."""
    return (p * ((p + EPS).log() - (q + EPS).log())).sum(-1).mean(1)


def entropy_rows(p: Tensor) -> Tensor:
    """``[B, L]``: ``-sum_s p log(p + eps)`` per row, averaged over the heads."""
    return -(p * (p + EPS).log()).sum(-1).mean(1)


def correlation_losses(corr: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(to_target, to_corr, entropy)``, each ``[B]``: the symmetric KL between a correlation
    ``[B, H, L, L]`` and its prior, once with the correlation detached (it trains the prior's
    scales) and once with the prior detached (it trains the correlation), and the correlation's
    entropy; each averaged over the rows."""
    c, t = corr.detach(), target.detach()
    to_target = (kl_rows(target, c) + kl_rows(c, target)).mean(1)
    to_corr = (kl_rows(t, corr) + kl_rows(corr, t)).mean(1)
    return to_target, to_corr, entropy_rows(corr).mean(1)


def reconstruction_error(output: Tensor, x: Tensor) -> Tensor:
    """``[B, L]``: ``mean_d (o - x)^2 + 1 - cos(o, x)`` per patch (the authors' MSE + cosine)."""
    return (output - x).pow(2).mean(-1) + 1 - nn.functional.cosine_similarity(output, x, dim=-1)


def _wide(t: Tensor) -> Tensor:
    """float32, or float64 for float64 inputs (the losses are not computed in half precision)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class CorrelationAttention(nn.Module):
    """Multi-head attention that also returns its correlation ``softmax(q k^T / sqrt(d_h))``
    ``[B, H, L, S]`` and the Gaussian prior of each query, with scales ``sigma = 3^(sigmoid(5 a)
    + 1e-5) - 1`` from a linear map ``a`` of the query (two per head: rows, columns)."""

    def __init__(self, dim: int, heads: int, grid: tuple[int, int]):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.sigma = nn.Linear(dim, 2 * heads)
        dy2, dx2 = square_distances(grid)
        self.register_buffer("dy2", dy2.float(), persistent=False)
        self.register_buffer("dx2", dx2.float(), persistent=False)

    def forward(self, query: Tensor, key: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, n, d = query.shape
        h = self.heads
        q = self.q(query).view(b, n, h, -1).transpose(1, 2)
        k = self.k(key).view(key.shape[0], key.shape[1], h, -1).transpose(1, 2).expand(b, -1, -1, -1)
        v = self.v(key).view(key.shape[0], key.shape[1], h, -1).transpose(1, 2).expand(b, -1, -1, -1)
        corr = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), dim=-1)
        a = self.sigma(query).view(b, n, h, 2).transpose(1, 2)
        sigma = torch.pow(3.0, torch.sigmoid(5 * a) + 1e-5) - 1
        target = gaussian_prior(sigma, self.dy2.to(sigma.dtype), self.dx2.to(sigma.dtype))
        return self.out((corr @ v).transpose(1, 2).reshape(b, n, d)), corr, target


class I2CorrelationLayer(nn.Module):
    """``x -> LN(z + MLP(z))``, ``z = LN(Intra(x, x) - Inter(x, ref))``: the I2Correlation block
    (the residual input ``(x + intra) - (x + inter)``), a GELU MLP of 4x width."""

    def __init__(self, dim: int, heads: int, grid: tuple[int, int]):
        super().__init__()
        self.intra = CorrelationAttention(dim, heads, grid)
        self.inter = CorrelationAttention(dim, heads, grid)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: Tensor, ref: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor, Tensor]]:
        intra, intra_corr, intra_target = self.intra(x, x)
        inter, inter_corr, inter_target = self.inter(x, ref)
        z = self.norm1((x + intra) - (x + inter))
        return self.norm2(z + self.mlp(z)), (intra_corr, intra_target, inter_corr, inter_target)


class IntraInterCorrelation(Objective):
    """Patch features ``Views.extras[keys.FEATURES]`` ``[B, L, in_dim]`` (or ``[B, 1 + L,
    in_dim]`` from a token encoder: the class token is dropped), ``L = rows * cols`` of
    ``grid``, are embedded (linear + sine-cosine positions), passed through ``depth``
    :class:`I2CorrelationLayer` s with the normal reference (the buffer ``reference [L, in_dim]``,
    the running mean of the training features seen so far, or the one given to
    :meth:`set_reference`; embedded with its own linear map) and projected back. The loss is the
    sum of the authors' two stages (one backward pass gives their summed gradients):
    ``L1 = rec + l1 KL_intra(prior) - l1 KL_inter(prior)`` trains the priors' scales (the
    correlations detached) and ``L2 = rec - l1 KL_intra(corr) - l2 H_intra + l1 KL_inter(corr) +
    l2 H_inter`` the correlations (the priors detached): intra-correlations are pushed away from
    the local prior and spread, inter-correlations towards theirs and focused. KL is symmetric,
    averaged over heads, rows and layers; ``rec`` is :func:`reconstruction_error`'s mean.
    :meth:`score` is the anomaly map ``[B, L]``."""

    requires = {"views": 1, "extras": (keys.FEATURES,)}
    batch_coupled = False

    def __init__(self, in_dim: Annotated[int, Ge(1)] = 64,
                 grid: tuple[Annotated[int, Ge(1)], ...] | list[int] = (4, 4),
                 dim: Annotated[int, Ge(4)] = 256, heads: Annotated[int, Ge(1)] = 8,
                 depth: Annotated[int, Ge(1)] = 3, lambda1: Annotated[float, Ge(0)] = 0.5,
                 lambda2: Annotated[float, Ge(0)] = 0.5):
        super().__init__()
        grid = tuple(int(g) for g in grid)
        if len(grid) != 2:
            raise ConfigError(f"intra_inter_correlation: grid must be (rows, cols), got {grid}",
                              param="grid")
        if dim % 4 or dim % heads:
            raise ConfigError(f"intra_inter_correlation: dim={dim} must be divisible by 4 (2-D "
                              f"positions) and by heads={heads}", param="dim")
        self.in_dim, self.grid, self.num_tokens = in_dim, grid, grid[0] * grid[1]
        self.lambda1, self.lambda2 = lambda1, lambda2
        self.embed, self.ref_embed = nn.Linear(in_dim, dim), nn.Linear(in_dim, dim)
        self.register_buffer("pos", sincos_2d(dim, grid), persistent=False)
        self.layers = nn.ModuleList(I2CorrelationLayer(dim, heads, grid) for _ in range(depth))
        self.norm, self.proj = nn.LayerNorm(dim), nn.Linear(dim, in_dim)
        self.register_buffer("reference", torch.zeros(self.num_tokens, in_dim))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def _tokens(self, views: Views) -> Tensor:
        owner = "objective 'intra_inter_correlation'"
        x = views.extras[keys.FEATURES]
        x = x[0] if isinstance(x, (tuple, list)) else x
        if (not isinstance(x, Tensor) or x.dim() != 3 or x.shape[2] != self.in_dim
                or x.shape[1] not in (self.num_tokens, self.num_tokens + 1) or not x.is_floating_point()):
            shape = f"{x.dtype} {list(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ShapeError(f"{owner}: Views.extras['features'] must be floating patch features "
                             f"[B, {self.num_tokens}, {self.in_dim}] (grid {self.grid}, in_dim; "
                             f"or with a class token first), got {shape}")
        return x[:, -self.num_tokens:]

    def set_reference(self, features: Tensor) -> None:
        """The normal reference: the mean over ``features [N, L, in_dim]`` of normal samples (the
        paper's mean of the training set's features); online updates stop (``seen = -1``)."""
        if features.dim() != 3 or features.shape[1:] != self.reference.shape:
            raise ShapeError(f"intra_inter_correlation: reference features must be [N, "
                             f"{self.num_tokens}, {self.in_dim}], got {list(features.shape)}")
        self.reference.copy_(features.detach().mean(0))
        self.seen.fill_(-1)

    def run(self, x: Tensor) -> tuple[Tensor, list[tuple[Tensor, Tensor, Tensor, Tensor]]]:
        """``(reconstruction [B, L, in_dim], per layer (intra_corr, intra_prior, inter_corr,
        inter_prior))``."""
        w = self.embed.weight
        x = x if torch.is_autocast_enabled(x.device.type) else x.to(w.dtype)
        h = self.embed(x) + self.pos.to(w.dtype)
        ref = (self.ref_embed(self.reference.to(w.dtype)) + self.pos.to(w.dtype))[None]
        maps = []
        for layer in self.layers:
            h, m = layer(h, ref)
            maps.append(m)
        return self.proj(self.norm(h)), maps

    def score(self, x: Tensor) -> Tensor:
        """``[B, L]`` anomaly map: ``rec_l * (max_l' s_l' - s_l)``, ``s = softmax_l(-KL_inter)``
        (the symmetric inter-correlation discrepancy of each patch, averaged over layers)."""
        x = x[:, -self.num_tokens:]
        out, maps = self.run(x)
        rec = reconstruction_error(_wide(out), _wide(x))
        kl = torch.stack([kl_rows(_wide(c), _wide(t)) + kl_rows(_wide(t), _wide(c))
                          for _, _, c, t in maps]).mean(0)
        s = torch.softmax(-kl, dim=-1)
        return rec * (s.max(-1, keepdim=True).values - s)

    def forward(self, views: Views, batch: Batch) -> Loss:
        x = self._tokens(views)
        out, maps = self.run(x)
        rec = reconstruction_error(_wide(out), _wide(x)).mean(1)
        terms = [(correlation_losses(_wide(a), _wide(b)), correlation_losses(_wide(c), _wide(d)))
                 for a, b, c, d in maps]
        mean = lambda k, j: torch.stack([t[k][j] for t in terms]).mean(0)  # noqa: E731
        intra_t, intra_c, intra_h = mean(0, 0), mean(0, 1), mean(0, 2)
        inter_t, inter_c, inter_h = mean(1, 0), mean(1, 1), mean(1, 2)
        stage1 = rec + self.lambda1 * intra_t - self.lambda1 * inter_t
        stage2 = (rec - self.lambda1 * intra_c - self.lambda2 * intra_h
                  + self.lambda1 * inter_c + self.lambda2 * inter_h)
        per_sample = stage1 + stage2
        if self.training and torch.is_grad_enabled():
            self._update_reference(x.detach())
        return Loss(value=per_sample.mean(), per_sample=per_sample,
                    logs={"reconstruction": rec.mean().detach(), "intra_kl": intra_c.mean().detach(),
                          "inter_kl": inter_c.mean().detach()})

    @torch.no_grad()
    def _update_reference(self, x: Tensor) -> None:
        """After the loss: the running mean of every training feature seen so far (frozen once
        :meth:`set_reference` has set it, ``seen = -1``)."""
        n = x.shape[0]
        live = self.seen >= 0
        weight = torch.where(live, n / (self.seen.clamp_min(0) + n), 0.0)
        # a new tensor, not in place: the loss's graph still holds the reference it used
        self.reference = torch.lerp(self.reference, x.float().mean(0).to(self.reference.dtype),
                                    weight.to(self.reference.dtype))
        self.seen = self.seen + live.long() * n

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        x = torch.randn(batch_size, self.num_tokens, self.in_dim, generator=generator).requires_grad_()
        return (Views(embeddings=(x.mean(1).detach(),), extras={keys.FEATURES: (x,)}),
                Batch(index=torch.arange(batch_size)))


CARD = Card(
    name="intra_inter_correlation", kind="objective",
    title="Focus the Discrepancy: Intra- and Inter-Correlation Learning for Image Anomaly "
          "Detection (FOD)",
    paper="arXiv:2308.02983",
    summary="Patch features are reconstructed through I2Correlation layers; intra-correlations "
            "(self-attention) are pushed away from a learned Gaussian distance prior and "
            "spread, inter-correlations (attention to the mean normal features) towards theirs "
            "and focused; the anomaly map is the reconstruction error times the inter-"
            "correlation discrepancy.",
    formula="corr = softmax(q k^T / sqrt(d_h)); prior_ls ~ exp(-dy^2/(2 s1^2) - dx^2/(2 s2^2)), "
            "s = 3^(sigmoid(5 W q) + 1e-5) - 1; KL(p, q) = sum p (log(p + 1e-4) - log(q + "
            "1e-4)), symmetric; rec = mean (o - x)^2 + 1 - cos(o, x); L = [rec + l1 KL_intra"
            "(corr detached) - l1 KL_inter(corr detached)] + [rec - l1 KL_intra(prior detached) - "
            "l2 H(intra) + l1 KL_inter(prior detached) + l2 H(inter)], l1 = l2 = 0.5; score = rec * "
            "(max softmax(-KL_inter) - softmax(-KL_inter))",
    left_out="The paper's frozen wide-ResNet50 features of two levels, its 3x3 average pooling and "
             "MVTec/BTAD data are not here: any encoder's patch tokens go in (freeze it as the "
             "paper does), on one level. The reference is the mean of the training features "
             "(the paper computes it offline; here set_reference, or a running mean updated "
             "after each training loss). The authors' code drops the attention's output "
             "projection; it is applied here. Image-level score (max of the Gaussian-smoothed "
             "upsampled map) is left to the user.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(IntraInterCorrelation, card=CARD)
