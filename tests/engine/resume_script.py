"""A training run for the kill-and-resume test: ``python resume_script.py RUN_DIR MODE``.

MODE ``full`` trains to the end; ``hang`` trains until the step after ``HANG_AT_STEP`` has
begun (a checkpoint exists at ``HANG_AT_STEP``), writes ``RUN_DIR/hanging`` and sleeps, so the
test can SIGKILL it mid-epoch and mid-step; ``resume`` continues from ``RUN_DIR``'s checkpoint.
Every mode writes the final state of everything that trains or carries state to
``RUN_DIR/final.pt``.

The run exercises every piece of state a resume must restore: shuffled data order, random
augmentations (torch's generator), AdamW moments, an LR schedule, gradient accumulation with a
partial last group, an EMA teacher (``ema``) whose target feeds the loss, and per-sample
buffers keyed by ``Batch.index`` that feed the loss too.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import sdk
from sdk.data import Compose, GaussianNoise, IndexedDataset, RandomMask
from sdk.interfaces import Callback, Objective
from sdk.types import Batch, Loss, Views

N, DIM, CLASSES, BATCH, ACCUMULATE = 60, 8, 3, 8, 2  # 8 batches (last has 4): 4 steps per epoch
EPOCHS, CHECKPOINT_EVERY, HANG_AT_STEP = 3, 3, 6  # step 6 ends mid-epoch 1 (batch 4 of 8)


class MemoryCE(Objective):
    """Cross-entropy weighted by a per-sample running loss (a buffer keyed by dataset index),
    plus agreement with the EMA teacher's outputs."""

    requires = {"logits": True, "targets": True, "index": True}

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("avg", torch.zeros(n))
        self.register_buffer("seen", torch.zeros(n, dtype=torch.long))

    def forward(self, views: Views, batch: Batch) -> Loss:
        per = F.cross_entropy(views.logits, batch.targets, reduction="none")
        w = 1.0 + self.avg[batch.index]
        with torch.no_grad():
            self.avg[batch.index] = 0.9 * self.avg[batch.index] + 0.1 * per.detach()
            self.seen[batch.index] += 1
        teacher = views.extras["teacher"][0]
        agree = (views.embeddings[0] - teacher).pow(2).mean()
        return Loss(value=(w * per).mean() + 0.1 * agree, per_sample=per)


class Hang(Callback):
    """In ``hang`` mode, stop dead inside the step after ``HANG_AT_STEP``."""

    def __init__(self, run_dir: Path, active: bool) -> None:
        self.run_dir, self.active = run_dir, active

    def after_forward(self, state) -> None:
        if self.active and state.step == HANG_AT_STEP:
            (self.run_dir / "hanging").write_text(str(state.step))
            time.sleep(600)


def main(run_dir: Path, mode: str) -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, CLASSES, (N,), generator=g)
    x = torch.randn(CLASSES, DIM, generator=g)[y] * 2 + torch.randn(N, DIM, generator=g)
    data = IndexedDataset(x, y)
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Linear(16, CLASSES))
    objective = MemoryCE(N)
    teacher = sdk.create("teacher", "ema", momentum=0.9, final_momentum=0.99)
    trainer = sdk.Trainer(
        enc, objective, functools.partial(torch.optim.AdamW, lr=0.05), teacher=teacher,
        transforms=Compose([RandomMask(0.2), GaussianNoise(0.3)]),
        scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=3, gamma=0.7),
        callbacks=[Hang(run_dir, mode == "hang")], max_epochs=EPOCHS, accumulate=ACCUMULATE,
        seed=7, run_dir=run_dir, log_every=1, checkpoint_every=CHECKPOINT_EVERY, progress=False)
    trainer.fit(DataLoader(data, batch_size=BATCH, shuffle=True), resume=mode == "resume")
    torch.save({"encoder": enc.state_dict(), "teacher": teacher.state_dict(),
                "objective": objective.state_dict(), "optimizer": trainer.optimizer.state_dict(),
                "step": trainer.step, "epoch": trainer.epoch}, run_dir / "final.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
