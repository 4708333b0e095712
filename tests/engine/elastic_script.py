"""A 2-rank gloo run under ``torchrun`` for the multi-process fault tests:
``python -m torch.distributed.run ... elastic_script.py RUN_DIR MODE``.

Every rank trains ``nt_xent`` with a ``queue`` teacher on two noisy views (AdamW, a shuffled
map-style loader sharded by the Trainer) with ``run_dir=RUN_DIR`` and ``resume=True``,
checkpointing every ``CHECKPOINT_EVERY`` steps, then writes its final state (and the step its
training began at) to ``RUN_DIR/final_rank{r}.pt``. MODE:

* ``full``: trains to the end;
* ``kill``: rank 1 SIGKILLs itself inside step ``KILL_AT`` (mid-epoch) unless ``RUN_DIR/killed``
  says it already did; torchrun's elastic agent then restarts both ranks, which resume from the
  newest checkpoint; the restarted rank 1 joins ``RESTART_DELAY_S`` late, as a slow node
  would (rank 0 must then wait for its new address, not connect to the killed one's);
* ``raise``: rank 1's callback raises ``Boom`` inside step ``RAISE_AT``.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

import sdk
from sdk.data import GaussianNoise, IndexedDataset
from sdk.interfaces import Callback

N, DIM, BATCH, EPOCHS = 48, 6, 4, 3  # 6 steps per epoch on 2 ranks, 18 in all
CHECKPOINT_EVERY, KILL_AT, RAISE_AT = 2, 8, 3  # step 8 is batch 2 of epoch 1
RESTART_DELAY_S = 6.0


class Boom(Exception):
    """The error rank 1 raises in ``raise`` mode."""


class Fault(Callback):
    """Rank 1's injected fault (``kill`` or ``raise``) in ``after_forward``."""

    def __init__(self, run_dir: Path, mode: str) -> None:
        self.run_dir, self.mode = run_dir, mode
        self.rank = int(os.environ.get("RANK", "0"))
        self.first_step: int | None = None  # where this process's training began

    def after_forward(self, state) -> None:
        if self.first_step is None:
            self.first_step = state.step
        if self.rank != 1:
            return
        marker = self.run_dir / "killed"
        if self.mode == "kill" and state.step == KILL_AT and not marker.exists():
            marker.write_text(str(state.step))
            os.kill(os.getpid(), signal.SIGKILL)
        if self.mode == "raise" and state.step == RAISE_AT:
            raise Boom(f"rank 1 gave up at step {state.step}")


def main(run_dir: Path, mode: str) -> None:
    torch.set_num_threads(1)
    if os.environ.get("RANK") == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        time.sleep(RESTART_DELAY_S)
    g = torch.Generator().manual_seed(0)
    data = IndexedDataset(torch.randn(N, DIM, generator=g), torch.zeros(N, dtype=torch.long))
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Linear(16, 8))
    teacher = sdk.create("teacher", "queue", size=16, momentum=0.9)
    fault = Fault(run_dir, mode)
    trainer = sdk.Trainer(
        enc, sdk.create("objective", "nt_xent", temperature=0.5),
        functools.partial(torch.optim.AdamW, lr=0.05), teacher=teacher,
        transforms=GaussianNoise(0.3), callbacks=[fault], max_epochs=EPOCHS,
        seed=3, run_dir=run_dir, log_every=1, checkpoint_every=CHECKPOINT_EVERY, progress=False)
    trainer.fit(DataLoader(data, batch_size=BATCH, shuffle=True), resume=True)
    torch.save({"encoder": enc.state_dict(), "teacher": teacher.state_dict(),
                "optimizer": trainer.optimizer.state_dict(), "step": trainer.step,
                "epoch": trainer.epoch, "world": trainer.world, "first_step": fault.first_step},
               run_dir / f"final_rank{trainer.rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
