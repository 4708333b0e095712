"""Label-agnostic forgetting (LAF): unlearn a forget set without labels. Two VAEs model the
representations of the remaining and of the forgotten data; the encoder is then updated, in
alternation, to (1) keep remaining representations well reconstructed by the remaining VAE and
make forgotten ones badly reconstructed by the forgotten VAE, and (2) keep remaining
representations aligned with the original (frozen) model's while forgotten ones move away.

Shen, Zhang, Zhao, Bialkowski, Chen & Xu, "Label-Agnostic Forgetting: A Supervision-Free
Unlearning in Deep Models", ICLR 2024 (openreview SIZWiya7FE), Sec. 4; the losses, their
alternation and the defaults follow the authors' code (github.com/ShaofeiShen768/LAF,
``VUnlearning.extractor_unlearning``, ``Train.vae_loss_function``, ``hyperparameter.md``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt
from torch import Tensor, nn

from sdk.card import Card
from sdk.cluster import dataset_index
from sdk.errors import RequirementError, ShapeError
from sdk.events import State
from sdk.hookspecs import hookimpl
from sdk.interfaces import Callback, Encoder

OWNER = "label_agnostic_forgetting"


class RepresentationVAE(nn.Module):
    """The authors' representation VAE: ``D -> 128 -> 32 -> (mu, log var)`` of ``latent_dim``,
    ``z = mu + sigma eps``, decoder ``latent_dim -> 32 -> 128 -> D`` (ReLU between layers; a linear
    output, where the authors' sigmoid assumes representations in [0, 1])."""

    def __init__(self, dim: int, latent_dim: int = 8):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(dim, 128), nn.ReLU(), nn.Linear(128, 32), nn.ReLU())
        self.mu, self.log_var = nn.Linear(32, latent_dim), nn.Linear(32, latent_dim)
        self.decoder = nn.Sequential(nn.Linear(latent_dim, 32), nn.ReLU(), nn.Linear(32, 128),
                                     nn.ReLU(), nn.Linear(128, dim))

    def forward(self, e: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = self.encoder(e)
        mu, sigma = self.mu(h), torch.exp(0.5 * self.log_var(h))
        return self.decoder(mu + sigma * torch.randn_like(sigma)), mu, sigma


def vae_loss(out: Tensor, e: Tensor, mu: Tensor, sigma: Tensor, kld_weight: float = 0.025) -> Tensor:
    """``sum ||out - e||^2 / B + w * KL(N(mu, sigma^2) || N(0, I)) / B``, ``w = kld_weight``."""
    kl = -0.5 * (torch.log(sigma.pow(2) + 1e-8) + 1 - mu.pow(2) - sigma.pow(2)).sum()
    return (F.mse_loss(out, e, reduction="sum") + kld_weight * kl) / e.shape[0]


def reconstruction_energy(out: Tensor, e: Tensor) -> Tensor:
    """``sum_i exp(m_i / (m_i + 1))`` with ``m_i = ||out_i - e_i||^2``: bounded in ``[B, e B)``."""
    m = (out - e).pow(2).sum(1)
    return torch.exp(m / (m + 1)).sum()


def extractor_loss(remain_out: Tensor, remain: Tensor, forget_out: Tensor, forget: Tensor) -> Tensor:
    """Step 1 (representation unlearning): ``E(VAE_r(e_r), e_r) - E(VAE_f(e_f), e_f)``, with
    :func:`reconstruction_energy` ``E``."""
    return reconstruction_energy(remain_out, remain) - reconstruction_energy(forget_out, forget)


def alignment_loss(remain: Tensor, remain_teacher: Tensor, forget: Tensor, forget_teacher: Tensor,
                   temperature: float = 5.0) -> Tensor:
    """Step 2 (representation alignment), the authors' contrastive form:
    ``sum_i [d(e_i, t_i) - log sum_j exp(d(f_j, t'_j) / T)]`` over remaining rows ``i`` and
    forgotten rows ``j``, ``d = 1 - cos``, ``t`` the original model's representations."""
    d_remain = 1 - F.cosine_similarity(remain, remain_teacher, dim=1)
    d_forget = 1 - F.cosine_similarity(forget, forget_teacher, dim=1)
    return (d_remain - torch.logsumexp(d_forget / temperature, dim=0)).sum()


def _batches(n: int, size: int, g: torch.Generator) -> list[Tensor]:
    return list(torch.randperm(n, generator=g).split(size))


def fit_vae(e: Tensor, *, latent_dim: int = 8, epochs: int = 10, lr: float = 1e-3,
            batch_size: int = 32, kld_weight: float = 0.025, seed: int = 0) -> RepresentationVAE:
    """A :class:`RepresentationVAE` fitted to representations ``e`` ``[N, D]`` with Adam."""
    torch.manual_seed(seed)
    vae = RepresentationVAE(e.shape[1], latent_dim).to(e.device)
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in _batches(e.shape[0], batch_size, g):
            out, mu, sigma = vae(e[idx])
            loss = vae_loss(out, e[idx], mu, sigma, kld_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return vae.eval().requires_grad_(False)


def unlearn(model: nn.Module, represent: Callable[[Tensor], Tensor], forget_x: Tensor,
            remain_x: Tensor, *, latent_dim: int = 8, epochs: int = 20, lr_ue: float = 5e-5,
            lr_ra: float = 1e-4, temperature: float = 5.0, vae_epochs: int = 10,
            vae_lr: float = 1e-3, kld_weight: float = 0.025, batch_size: int = 32,
            seed: int = 0) -> None:
    """LAF on ``model`` in place (no labels): ``represent(x)`` gives the representations (a
    function of ``model``). Fit ``VAE_r`` on the remaining and ``VAE_f`` on the forgotten
    representations; then for ``epochs`` passes over paired shuffled batches (as many as the
    smaller set has), one Adam step (``lr_ue``) on :func:`extractor_loss` and one (``lr_ra``) on
    :func:`alignment_loss` against a frozen copy of the original model."""
    was = model.training
    model.eval()
    with torch.no_grad():
        e_remain, e_forget = represent(remain_x).float(), represent(forget_x).float()
    model.train(was)
    vae_r = fit_vae(e_remain, latent_dim=latent_dim, epochs=vae_epochs, lr=vae_lr,
                    batch_size=batch_size, kld_weight=kld_weight, seed=seed)
    vae_f = fit_vae(e_forget, latent_dim=latent_dim, epochs=vae_epochs, lr=vae_lr,
                    batch_size=batch_size, kld_weight=kld_weight, seed=seed + 1)
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    teacher_represent = _rebind(represent, model, teacher)
    params = [p for p in model.parameters() if p.requires_grad]
    opt_ue, opt_ra = torch.optim.Adam(params, lr=lr_ue), torch.optim.Adam(params, lr=lr_ra)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for fi, ri in zip(_batches(forget_x.shape[0], batch_size, g),
                          _batches(remain_x.shape[0], batch_size, g)):
            f, r = forget_x[fi], remain_x[ri]
            e_r, e_f = represent(r), represent(f)
            loss = extractor_loss(vae_r(e_r)[0], e_r, vae_f(e_f)[0], e_f)
            opt_ue.zero_grad()
            loss.backward()
            opt_ue.step()
            with torch.no_grad():
                t_r, t_f = teacher_represent(r), teacher_represent(f)
            loss = alignment_loss(represent(r), t_r, represent(f), t_f, temperature)
            opt_ra.zero_grad()
            loss.backward()
            opt_ra.step()


def _rebind(represent: Callable[[Tensor], Tensor], model: nn.Module,
            teacher: nn.Module) -> Callable[[Tensor], Tensor]:
    """``represent`` for the teacher: a bound method of ``model`` rebinds to ``teacher``; the
    model itself becomes the teacher."""
    if represent is model:
        return teacher
    owner = getattr(represent, "__self__", None)
    if owner is model:
        return getattr(teacher, represent.__name__)
    raise RequirementError(f"{OWNER}: represent must be the model or one of its bound methods")


class LabelAgnosticForgetting(Callback):
    """Unlearns the training rows whose ``Batch.index`` is in ``forget_index`` when the fit
    ends (an empty ``forget_index``, the default, forgets nothing)
    (:func:`unlearn` on the Trainer's encoder; representations: its ``features`` when
    ``features``, else its outputs), using no labels. Defaults: the authors' MNIST CNN settings
    for random-data unlearning (latent 8, 20 epochs, lr 5e-5 / 1e-4, T = 5). The training set
    must be a map-style dataset whose items start with the input ``x``."""

    def __init__(self, forget_index: tuple[Annotated[int, Ge(0)], ...] = (),
                 latent_dim: Annotated[int, Ge(1)] = 8, epochs: Annotated[int, Ge(1)] = 20,
                 lr_ue: Annotated[float, Gt(0)] = 5e-5, lr_ra: Annotated[float, Gt(0)] = 1e-4,
                 temperature: Annotated[float, Gt(0)] = 5.0,
                 vae_epochs: Annotated[int, Ge(1)] = 10, vae_lr: Annotated[float, Gt(0)] = 1e-3,
                 kld_weight: Annotated[float, Ge(0)] = 0.025,
                 batch_size: Annotated[int, Ge(1)] = 32, features: bool = True, seed: int = 0):
        self.forget_index = tuple(forget_index)
        self.options = dict(latent_dim=latent_dim, epochs=epochs, lr_ue=lr_ue, lr_ra=lr_ra,
                            temperature=temperature, vae_epochs=vae_epochs, vae_lr=vae_lr,
                            kld_weight=kld_weight, batch_size=batch_size, seed=seed)
        self.features = features

    def split(self, dataset: Any) -> tuple[Tensor, Tensor]:
        """``(forget_x, remain_x)`` of ``dataset`` by its rows' ``Batch.index``."""
        index = dataset_index(dataset)
        forget = torch.isin(index, torch.tensor(self.forget_index))
        missing = set(self.forget_index) - set(index[forget].tolist())
        if missing:
            raise ShapeError(f"{OWNER}: forget_index holds ids absent from the training set's "
                             f"Batch.index: {sorted(missing)[:5]}")
        if bool(forget.all()):
            raise ShapeError(f"{OWNER}: forget_index covers the whole training set; nothing remains")
        x = torch.stack([torch.as_tensor(dataset[i][0]) for i in range(len(dataset))])
        return x[forget], x[~forget]

    def on_fit_end(self, state: State) -> None:
        if not self.forget_index:  # nothing to forget: the model stays as trained
            return
        trainer = state.trainer
        encoder = trainer.encoder
        if self.features and not isinstance(encoder, Encoder):
            raise RequirementError(f"{OWNER}: features=True needs an sdk Encoder with features(x), "
                                   f"got {type(encoder).__name__}")
        forget_x, remain_x = self.split(trainer.train_loader.dataset)
        device = next(encoder.parameters()).device
        represent = encoder.features if self.features else encoder
        unlearn(encoder, represent, forget_x.to(device), remain_x.to(device), **self.options)


CARD = Card(
    name=OWNER, kind="callback",
    title="Label-Agnostic Forgetting: A Supervision-Free Unlearning in Deep Models",
    paper="https://openreview.net/forum?id=SIZWiya7FE",
    summary="Supervision-free unlearning at the end of a fit: VAEs of the remaining and the "
            "forgotten representations, then alternating Adam steps that keep remaining "
            "representations reconstructable and aligned with the original model while pushing "
            "forgotten ones off their VAE and away from the original representations.",
    formula="E(o, e) = sum_i exp(m_i / (m_i + 1)), m_i = ||o_i - e_i||^2; L_UE = E(VAE_r(e_r), e_r) "
            "- E(VAE_f(e_f), e_f); L_RA = sum_i [(1 - cos(e_i, t_i)) - log sum_j exp((1 - cos(f_j, "
            "t'_j)) / T)]; VAE loss = sum ||o - e||^2 / B + 0.025 KL / B; per paired batch: Adam "
            "(lr_ue = 5e-5) on L_UE, then Adam (lr_ra = 1e-4) on L_RA; 20 epochs, T = 5, latent 8",
    left_out="The supervised classifier fine-tuning of LAF+R (the head is left as it is: no labels "
             "are used), the CNN/ResNet backbones and the image benchmarks. The VAE decoder's "
             "output is linear (the authors' sigmoid assumes representations in [0, 1]). The "
             "defaults are the authors' MNIST CNN settings for random-data unlearning; their "
             "class-unlearning (T = 20) and ResNet settings are other values of the same "
             "parameters. Unlearning runs once, on one process, at the end of the fit; forget_index "
             "defaults to empty, which forgets nothing.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(LabelAgnosticForgetting, card=CARD)
