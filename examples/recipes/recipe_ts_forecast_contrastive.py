# Contrastive learning for time-series forecasting, end to end or pretrain-then-finetune:
# Yan, Zhang, Meng & Sylvain, "What Constitutes Good Contrastive Learning in Time-Series
# Forecasting?", IJCAI 2023 AI4TS workshop (arXiv:2306.12086), on a synthetic series.
#
# Run the full version:  PYTHONPATH=. python examples/recipes/recipe_ts_forecast_contrastive.py
# (the fast version is main(fast=True), which tests/recipes/ runs).
"""A small Transformer forecaster (``sequence_transformer`` over runs of the look-back window,
its pooled output read out to the horizon by a linear head) on univariate windows of a
multi-periodic series (two periods, a slow amplitude modulation, a per-channel scale, noise),
trained four ways:

- ``mse``: the forecasting loss alone;
- ``mse_contrastive``: end to end, ``(1 - lam) MSE + lam NT-Xent`` (the authors' code weighs the
  two terms so), NT-Xent (``nt_xent``) on the encoder's pooled outputs of two views of each
  look-back window, each view a random scaling then a jitter (``sdk.data.RandomScale``,
  ``sdk.data.GaussianNoise``);
- ``pretrain_finetune``: NT-Xent alone first, then the whole forecaster trained on MSE;
- ``pretrain_frozen``: NT-Xent alone first, then only the linear head on the frozen encoder
  (the two-step protocol of TS2Vec and CoST that the paper compares with).

Every stage has the same number of steps, batch and optimizer (Adam); the test MSE is over
the last 20% of the series (the first 70% trains), in units of the standardised series.

Where this differs from the paper: its code defaults to ``lam = 0.5`` and sweeps 0.01-0.7 (0.1
here, where 0.5 hurt forecasting); its end-to-end Transformer (Informer) is contrasted with
TS2Vec's hierarchical instance + temporal loss over timestamp-masked views, not NT-Xent over the
pooled output of scaling+jitter views; ETT / Weather / ECL data and the receptive-field
analysis are not here.
"""

from __future__ import annotations

import math

import torch

import sdk
from sdk.data import Compose, GaussianNoise, RandomScale

ARMS = ("mse", "mse_contrastive", "pretrain_finetune", "pretrain_frozen")
FULL = dict(channels=8, length=1200, look_back=24, horizon=8, patch=4, embed=16, depth=2,
            steps=200, batch=32, lam=0.1, arms=ARMS, seeds=3)
FAST = dict(channels=4, length=800, look_back=24, horizon=8, patch=4, embed=16, depth=1,
            steps=100, batch=32, lam=0.1, arms=("mse", "mse_contrastive", "pretrain_frozen"),
            seeds=1)
LR = 1e-3


def series(channels: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """``[channels, length]``: ``s_c (sin(2 pi t / 8 + a) + 0.6 sin(2 pi t / 20 + b))
    (1 + 0.4 sin(2 pi t / 200 + c)) + 0.1 eps``, scales ``s_c`` log-uniform in [0.5, 2]."""
    t = torch.arange(length, dtype=torch.float32)
    scale = torch.empty(channels).uniform_(math.log(0.5), math.log(2.0), generator=gen).exp()
    a, b, c = (torch.rand(3, channels, 1, generator=gen) * 2 * math.pi).unbind(0)
    wave = (torch.sin(2 * math.pi * t / 8 + a) + 0.6 * torch.sin(2 * math.pi * t / 20 + b)) \
        * (1 + 0.4 * torch.sin(2 * math.pi * t / 200 + c))
    return scale[:, None] * wave + 0.1 * torch.randn(channels, length, generator=gen)


def windows(s: torch.Tensor, look_back: int, horizon: int, start: int, stop: int,
            stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Look-back windows ``[N, look_back, 1]`` and their horizons ``[N, horizon]`` of every
    channel, starting in ``[start, stop - look_back - horizon]`` every ``stride`` steps."""
    starts = torch.arange(start, stop - look_back - horizon + 1, stride)
    idx = starts[:, None] + torch.arange(look_back + horizon)
    w = s[:, idx].reshape(-1, look_back + horizon)
    return w[:, :look_back, None], w[:, look_back:]


def one_seed(seed: int, *, channels: int, length: int, look_back: int, horizon: int, patch: int,
             embed: int, depth: int, steps: int, batch: int, lam: float,
             arms: tuple[str, ...]) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    s = series(channels, length, gen)
    train_end = int(0.7 * length)
    mean, std = s[:, :train_end].mean(), s[:, :train_end].std()
    s = (s - mean) / std
    x_train, y_train = windows(s, look_back, horizon, 0, train_end, 1)
    x_test, y_test = windows(s, look_back, horizon, int(0.8 * length), length, 2)
    views = Compose([RandomScale(0.5), GaussianNoise(0.1)])
    nt_xent = sdk.create("objective", "nt_xent")

    def contrastive(encoder, x):
        batch = sdk.Batch()
        z = tuple(encoder(views(x, batch)[0]) for _ in range(2))
        return nt_xent(sdk.Views(embeddings=z), batch).value

    def train(params, loss_of, draws):
        opt = torch.optim.Adam(params, lr=LR)
        for _ in range(steps):
            i = torch.randint(0, len(x_train), (batch,), generator=draws)
            loss = loss_of(x_train[i], y_train[i])
            opt.zero_grad()
            loss.backward()
            opt.step()

    def run_arm(arm: str) -> float:
        torch.manual_seed(seed)  # the same initial forecaster and view draws in every arm
        encoder = sdk.create("encoder", "sequence_transformer", seq_len=look_back, in_features=1,
                             patch_size=patch, embed_dim=embed, depth=depth, heads=4)
        head = torch.nn.Linear(embed, horizon)
        draws = torch.Generator().manual_seed(seed + 1)

        def mse(x, y):
            return ((head(encoder(x)) - y) ** 2).mean()

        params = [*encoder.parameters(), *head.parameters()]
        if arm == "mse":
            train(params, mse, draws)
        elif arm == "mse_contrastive":
            train(params, lambda x, y: (1 - lam) * mse(x, y) + lam * contrastive(encoder, x),
                  draws)
        else:
            train(list(encoder.parameters()), lambda x, y: contrastive(encoder, x), draws)
            if arm == "pretrain_frozen":
                encoder.requires_grad_(False)
                params = list(head.parameters())
            train(params, mse, draws)
        encoder.eval()
        with torch.no_grad():
            return float(((head(encoder(x_test)) - y_test) ** 2).mean())

    return {arm: run_arm(arm) for arm in arms}


def main(fast: bool = False, seed: int = 0) -> dict:
    """Per-seed test MSE of each arm."""
    size = dict(FAST if fast else FULL)
    seeds = size.pop("seeds")
    runs = [one_seed(seed + k, **size) for k in range(seeds)]
    return {key: [r[key] for r in runs] for key in runs[0]}


if __name__ == "__main__":
    result = main()
    n = len(next(iter(result.values())))
    print(f"{'arm':<18} " + " ".join(f"seed{k:<2}" for k in range(n)) + "  mean")
    for key, values in result.items():
        print(f"{key:<18} " + " ".join(f"{v:.3f}" for v in values) + f"  {sum(values) / n:.3f}")
