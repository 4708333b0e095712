# Out-of-domain unlabelled data improves generalisation: Saberi, Najafi, Heidari, Movasaghinia,
# Motahari & Khalaj, "Out-Of-Domain Unlabeled Data Improves Generalization", ICLR 2024
# (arXiv:2310.00027), its two-Gaussian mixture experiment at toy scale.
#
# Run the full version:  PYTHONPATH=. python examples/recipes/robust_ssl_ood_unlabeled.py
# (the fast version is main(fast=True), which tests/recipes/ runs).
"""A linear classifier on ``m`` labelled samples of ``x = y mu + N(0, I_d)`` (``y = +-1``), then
the same model self-trained on ``n >> m`` unlabelled samples of a SHIFTED mixture
``x = y mu' + N(0, I_d)``, ``mu' = mu + shift * u`` (``u`` a unit vector orthogonal to ``mu``):
its pseudo-labels are first those of the labelled-only ("standard") model, then refreshed round
by round (``self_training``). The labelled-only arm continues the standard model for as many
steps without the unlabelled term, so that both arms train as long. Both arms train on inputs
through a Gaussian input-noise transform (``sdk.data.GaussianNoise``), which stands in for the
paper's distributionally robust loss.

The test error is exact: a linear score ``s(x) = w.x + b`` errs with probability
``(Phi(-(w.mu + b)/|w|) + Phi(-(w.mu - b)/|w|)) / 2`` on the in-domain mixture.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

import sdk
from sdk.data import GaussianNoise

FULL = dict(d=20, labelled=10, unlabelled=2000, norm=1.5, shifts=(0.0, 0.5, 1.0, 2.0),
            noise=0.3, steps=200, seeds=5)
FAST = dict(d=20, labelled=10, unlabelled=400, norm=1.5, shifts=(0.5,), noise=0.3, steps=60,
            seeds=1)
BATCH = 200


class Unlabelled(Dataset):
    """Items ``{"x", "index"}``: inputs without labels, keyed by their index (``self_training``)."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "index": torch.tensor(i)}


def mixture(n: int, mu: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples of ``y mu + N(0, I)``, class ids ``(y + 1) / 2``."""
    y = torch.randint(0, 2, (n,), generator=gen)
    return (2 * y - 1).float()[:, None] * mu + torch.randn(n, mu.numel(), generator=gen), y


def mixture_error(encoder: torch.nn.Module, mu: torch.Tensor) -> float:
    """The exact in-domain error of a linear two-logit encoder."""
    layer = encoder.net[-1]
    w = (layer.weight[1] - layer.weight[0]).detach().double()
    b = (layer.bias[1] - layer.bias[0]).detach().double()
    margin, scale = w @ mu.double(), w.norm()
    phi = lambda t: 0.5 * math.erfc(-float(t) / math.sqrt(2))  # noqa: E731
    return 0.5 * (phi(-(margin + b) / scale) + phi(-(margin - b) / scale))


def trainer(encoder, steps: int, noise: float, seed: int, callbacks=(), unlabelled=False):
    return sdk.Trainer(encoder, sdk.create("objective", "cross_entropy"),
                       lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.01),
                       transforms=[GaussianNoise(noise)],
                       unlabeled_transforms=[GaussianNoise(noise)] if unlabelled else None,
                       callbacks=list(callbacks), max_steps=steps, progress=False, device="cpu",
                       seed=seed)


def one_seed(seed: int, *, d: int, labelled: int, unlabelled: int, norm: float,
             shifts: tuple[float, ...], noise: float, steps: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    mu = torch.randn(d, generator=gen)
    mu = norm * mu / mu.norm()
    u = torch.randn(d, generator=gen)
    u = u - (u @ mu) / (mu @ mu) * mu
    u = u / u.norm()
    x, y = mixture(labelled, mu, gen)
    loader = DataLoader(TensorDataset(x, y, torch.arange(labelled)), batch_size=labelled,
                        shuffle=True)
    torch.manual_seed(seed)
    standard = sdk.create("encoder", "mlp", in_dim=d, hidden_dims=(), out_dim=2, batch_norm=False)
    trainer(standard, steps, noise, seed).fit(loader)

    def copy() -> torch.nn.Module:
        model = sdk.create("encoder", "mlp", in_dim=d, hidden_dims=(), out_dim=2,
                           batch_norm=False)
        model.load_state_dict(standard.state_dict())
        return model

    # every arm continues the standard model for `steps` more steps: labelled only, or with
    # the unlabelled term
    alone = copy()
    trainer(alone, steps, noise, seed).fit(loader)
    out = {"labelled_only": mixture_error(alone, mu)}
    for shift in shifts:
        xu, _ = mixture(unlabelled, mu + shift * u, gen)
        model = copy()
        # a round is one pass over the unlabelled set: the first round's pseudo-labels are
        # the standard model's predictions, refreshed after every round
        rounds = sdk.create("callback", "self_training", threshold=0.0, weight=1.0,
                            refresh_every=max(1, unlabelled // BATCH))
        trainer(model, steps, noise, seed, [rounds], unlabelled=True).fit(
            loader, unlabeled=DataLoader(Unlabelled(xu), batch_size=BATCH, shuffle=True))
        out[f"ood_shift_{shift:g}"] = mixture_error(model, mu)
    out["bayes"] = 0.5 * math.erfc(norm / math.sqrt(2))
    return out


def main(fast: bool = False, seed: int = 0) -> dict:
    """Per-seed in-domain test errors of the labelled-only model and of self-training on
    unlabelled data at each shift; ``seeds`` runs seeds ``seed .. seed + seeds - 1``."""
    size = dict(FAST if fast else FULL)
    seeds = size.pop("seeds")
    runs = [one_seed(seed + k, **size) for k in range(seeds)]
    return {key: [r[key] for r in runs] for key in runs[0]}


if __name__ == "__main__":
    result = main()
    print(f"{'arm':<18} " + " ".join(f"seed{k}" for k in range(len(result['bayes']))) + "   mean")
    for key, values in result.items():
        print(f"{key:<18} " + " ".join(f"{v:.3f}" for v in values)
              + f"  {sum(values) / len(values):.3f}")
