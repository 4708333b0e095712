"""TensorBoard: a run's scalars, hyperparameters, summary and plots as TensorBoard event files."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sdk.card import Card
from sdk.errors import ConfigError
from sdk.hookspecs import hookimpl
from sdk.tracking import Tracker


def _hparam_value(value: Any) -> Any:
    return value if isinstance(value, (bool, int, float, str)) else str(value)


class TensorBoardLogger(Tracker):
    """Writes with ``torch.utils.tensorboard.SummaryWriter`` into ``log_dir`` (default
    ``run_dir/tensorboard``): each record's scalars at its step, the recipe as text and, at the
    end, the hyperparameters with the summary metrics (the HPARAMS tab), ``summary/<key>``
    scalars and the run's plots as images."""

    def __init__(self, log_dir: str | None = None):
        super().__init__()
        self.log_dir = log_dir
        self.params: dict[str, Any] = {}

    def start(self, run_dir: Path | None, params: dict[str, Any]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError("callback 'tensorboard' needs the tensorboard package: "
                              "pip install 'paperplug[trackers]'") from exc
        if self.log_dir is None and run_dir is None:
            raise ConfigError("callback 'tensorboard': give log_dir, or a run_dir to the "
                              "Trainer (the events then go to run_dir/tensorboard)", param="log_dir")
        where = Path(self.log_dir) if self.log_dir is not None else run_dir / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(where))
        self.params = {k: _hparam_value(v) for k, v in params.items()}
        lines = "\n".join(f"    {k} = {v!r}" for k, v in self.params.items())
        self.writer.add_text("hyperparameters", lines or "    (none)", 0)

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        wall = time.time()
        for key, value in values.items():
            self.writer.add_scalar(key, value, step, walltime=wall)

    def log_summary(self, values: dict[str, float], step: int) -> None:
        from torch.utils.tensorboard.summary import hparams

        self.log_scalars(values, step)
        for event in hparams(self.params, values):
            self.writer.file_writer.add_summary(event)

    def log_artifact(self, path: Path) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as img:
            pixels = np.asarray(img.convert("RGB"))
        self.writer.add_image(f"plots/{path.stem}", pixels, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


CARD = Card(
    name="tensorboard", kind="callback",
    title="TensorBoard: visualising a run's scalars, hyperparameters and plots",
    paper="https://www.tensorflow.org/tensorboard",
    summary="Sends the records of metrics.jsonl, the recipe's hyperparameters, the final summary "
            "and the run's plots to TensorBoard event files (main process only).",
    formula="scalars train/<key>, epoch/<key> at each record's step; hparams(recipe, summary); "
            "summary/<key>; plots/<name> images",
    left_out="Histograms of weights and gradients, embeddings (the projector) and profiler "
             "traces. Needs the tensorboard package (extra 'trackers').",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(TensorBoardLogger, card=CARD)
