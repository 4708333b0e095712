"""Plots of a run: training curves and reliability diagrams (matplotlib, imported lazily)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("plots need matplotlib: pip install 'paperplug[plots]'") from exc
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: str | Path | BinaryIO) -> Path | BinaryIO:
    """Write ``fig`` as PNG to a path or a binary stream (the report embeds the bytes) and close
    it."""
    plt = _pyplot()
    target = path if hasattr(path, "write") else Path(path)
    fig.savefig(target, dpi=110, format="png")
    plt.close(fig)
    return target


def reliability_bins(probs: Tensor, labels: Tensor, n_bins: int = 15) -> dict[str, Tensor]:
    """Top-label reliability over ``n_bins`` equal-width confidence bins ``(k/n, (k+1)/n]``.

    Returns per bin the mean ``confidence``, the ``accuracy`` and the ``count`` (bins without
    samples hold 0), as in Guo et al. (2017); ECE is ``sum(count * |acc - conf|) / N``.
    """
    conf, pred = probs.float().max(dim=-1)
    correct = (pred == labels).float()
    # bin k holds confidences in (k/n, (k+1)/n]; confidence 0 falls into bin 0
    idx = (torch.ceil(conf * n_bins).long() - 1).clamp(0, n_bins - 1)
    count = torch.zeros(n_bins).index_add_(0, idx.cpu(), torch.ones_like(conf).cpu())
    conf_sum = torch.zeros(n_bins).index_add_(0, idx.cpu(), conf.cpu())
    acc_sum = torch.zeros(n_bins).index_add_(0, idx.cpu(), correct.cpu())
    safe = count.clamp_min(1)
    return {"confidence": conf_sum / safe, "accuracy": acc_sum / safe, "count": count}


def reliability_diagram(panels: Mapping[str, tuple[Tensor, Tensor]],
                        path: str | Path | BinaryIO, n_bins: int = 15) -> Path | BinaryIO:
    """One reliability diagram per ``title -> (probs, labels)`` side by side, saved as PNG."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    edges = torch.linspace(0, 1, n_bins + 1)
    for ax, (title, (probs, labels)) in zip(axes[0], panels.items()):
        bins = reliability_bins(probs, labels, n_bins)
        filled = bins["count"] > 0
        n = bins["count"].sum()
        ece = float((bins["count"] * (bins["accuracy"] - bins["confidence"]).abs()).sum() / n)
        left, acc = edges[:-1][filled].tolist(), bins["accuracy"][filled].tolist()
        gap = (bins["confidence"] - bins["accuracy"])[filled].tolist()
        ax.bar(left, acc, width=1 / n_bins, align="edge", edgecolor="black", color="tab:blue",
               label="accuracy")
        ax.bar(left, gap, bottom=acc, width=1 / n_bins, align="edge", color="tab:red", alpha=0.35,
               label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
               title=f"{title} (ECE {ece:.3f})")
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return save(fig, path)


def training_curves(history: Sequence[Mapping[str, Any]],
                    path: str | Path | BinaryIO) -> Path | BinaryIO | None:
    """Training loss per logged step and per epoch, and validation metrics per epoch."""
    train = [r for r in history if r.get("kind") == "train"]
    epochs = [r for r in history if r.get("kind") == "epoch" and "loss" in r]
    if not train and not epochs:
        return None
    plt = _pyplot()
    val_keys = sorted({k for r in epochs for k in r if k.startswith("val/")})
    n = 2 if val_keys else 1
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4), squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train (logged)",
                alpha=0.6)
    if epochs:
        ax.plot([r["step"] for r in epochs], [r["loss"] for r in epochs], "o-", markersize=3,
                label="train (epoch mean)")
    ax.set(xlabel="step", ylabel="loss", title="training loss")
    ax.legend()
    if val_keys:
        ax = axes[0][1]
        for key in val_keys:
            pts = [(r["epoch"], r[key]) for r in epochs if key in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", markersize=3, label=key)
        ax.set(xlabel="epoch", title="validation")
        ax.legend()
    fig.tight_layout()
    return save(fig, path)
