"""One gloo rank on the CPU for the distributed tests: ``python ddp_worker.py OUT``.

The test starts one process per rank with the environment torchrun would set (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); the Trainer joins the process
group itself. Writes to OUT:

* ``objectives_rank{r}.pt``: per objective, this rank's loss (default ``gather="auto"``) on its slice
  of a fixed global batch and the gradients with respect to its slice of the embeddings;
* ``train_rank{r}.pt``: the parameters after a DDP ``fit`` of ``nt_xent`` (default gather) with
  the per-rank batch size ``BATCH`` on a plain (unsharded) DataLoader, and (``sam_params``) after
  the same fit with the ``sam`` callback (its second pass recomputed on every rank);
* ``run{r}/``: each rank's ``run_dir`` (only rank 0 may write there);
* ``tracked_rank{r}.pt`` and ``tb{r}/``: the parameters after the same fit of a plain module
  wrapped by ``sdk.encoder``, with a ``tensorboard`` tracker logging to ``tb{r}`` (only rank 0
  may write there).

``reference`` in this module is the single-process run on batch ``2 * BATCH`` the test compares
with.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

import sdk
from sdk.data import IndexedDataset
from sdk.interfaces import Transform

WORLD, N, DIM, BATCH, EPOCHS = 2, 32, 6, 4, 2
OBJECTIVES = {
    "nt_xent": {"temperature": 0.5},
    "decoupled_contrastive": {"temperature": 0.5},
    "decoupled_contrastive_weighted": {"temperature": 0.5, "sigma": 0.5},
}


def objective(name: str, **extra) -> sdk.interfaces.Objective:
    plugin = "decoupled_contrastive" if name.startswith("decoupled") else name
    return sdk.create("objective", plugin, **OBJECTIVES[name], **extra)


def global_embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2 * BATCH, 5, generator=g, dtype=torch.float64),
            torch.randn(2 * BATCH, 5, generator=g, dtype=torch.float64))


class Affine(Transform):
    """A deterministic view (``a x + b``), so every rank builds the single process's views."""

    def __init__(self, a: float, b: float) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x, batch):
        return self.a * x + self.b, batch


def data() -> IndexedDataset:
    g = torch.Generator().manual_seed(2)
    return IndexedDataset(torch.randn(N, DIM, generator=g, dtype=torch.float64),
                          torch.zeros(N, dtype=torch.long))


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Linear(16, 8)).double()


def train(batch_size: int, run_dir: Path | None, sam: bool = False) -> sdk.Trainer:
    enc = model()
    trainer = sdk.Trainer(
        enc, objective("nt_xent"), functools.partial(torch.optim.SGD, lr=0.5),
        transforms=[Affine(1.0, 0.0), Affine(-0.5, 0.2)], max_epochs=EPOCHS, device="cpu",
        run_dir=run_dir, log_every=1, checkpoint_every=2, progress=False,
        callbacks=[sdk.create("callback", "sam", rho=0.1)] if sam else [])
    return trainer.fit(DataLoader(data(), batch_size=batch_size, shuffle=True))


def reference(sam: bool = False) -> sdk.Trainer:
    return train(WORLD * BATCH, None, sam)


def tracked(batch_size: int, log_dir: Path) -> sdk.Trainer:
    """:func:`train` with the model as a user's plain module wrapped by ``sdk.encoder`` and a
    TensorBoard tracker."""
    enc = sdk.encoder(model(), out_dim=8)
    trainer = sdk.Trainer(
        enc, objective("nt_xent"), functools.partial(torch.optim.SGD, lr=0.5),
        transforms=[Affine(1.0, 0.0), Affine(-0.5, 0.2)], max_epochs=EPOCHS, device="cpu",
        log_every=1, progress=False,
        callbacks=[sdk.create("callback", "tensorboard", log_dir=str(log_dir))])
    return trainer.fit(DataLoader(data(), batch_size=batch_size, shuffle=True))


def worker(out: Path) -> None:
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    trainer = train(BATCH, out / f"run{rank}")  # joins the gloo group
    sam = train(BATCH, None, sam=True)
    wrapped = tracked(BATCH, out / f"tb{rank}")
    torch.save([p.detach() for p in wrapped.encoder.parameters()], out / f"tracked_rank{rank}.pt")
    torch.save({"params": [p.detach() for p in trainer.encoder.parameters()],
                "sam_params": [p.detach() for p in sam.encoder.parameters()],
                "step": trainer.step, "world": trainer.world},
               out / f"train_rank{rank}.pt")

    z1, z2 = global_embeddings()
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    results = {}
    for name in OBJECTIVES:
        a = z1[mine].clone().requires_grad_(True)
        b = z2[mine].clone().requires_grad_(True)
        loss = objective(name)(sdk.Views(embeddings=(a, b))).value
        loss.backward()
        results[name] = {"loss": loss.detach(), "grads": (a.grad, b.grad)}
    torch.save(results, out / f"objectives_rank{rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
