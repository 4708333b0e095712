"""Weights & Biases: a run's metrics, config, summary and plots, online or offline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from sdk.card import Card
from sdk.constraints import one_of
from sdk.hookspecs import hookimpl
from sdk.tracking import Tracker


class WandbLogger(Tracker):
    """Logs through ``wandb.init(project=..., mode=..., dir=save_dir, config=recipe)`` (``save_dir``
    defaults to the run directory): each record at its step (``run.log``), the summary into
    ``run.summary``, the plots as ``wandb.Image`` under ``plots/``. ``mode="offline"`` (the
    default) writes the run to disk for ``wandb sync``; ``"online"`` needs a login."""

    def __init__(self, project: str = "paperplug",
                 mode: Annotated[str, one_of(("offline", "online"))] = "offline",
                 save_dir: str | None = None, name: str | None = None):
        super().__init__()
        self.project, self.mode, self.save_dir, self.name = project, mode, save_dir, name

    def start(self, run_dir: Path | None, params: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise ImportError("callback 'wandb' needs wandb: pip install 'paperplug[trackers]'"
                              ) from exc
        self.wandb = wandb
        where = self.save_dir if self.save_dir is not None else (str(run_dir) if run_dir else None)
        if where is not None:
            Path(where).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=self.project, mode=self.mode, dir=where, config=params, reinit="create_new",
            name=self.name or params.get("name") or (run_dir.name if run_dir else None),
            settings=wandb.Settings(quiet=True, console="off", x_disable_stats=True,
                                    disable_git=True, save_code=False))

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def log_summary(self, values: dict[str, float], step: int) -> None:
        self.run.summary.update(values)

    def log_artifact(self, path: Path) -> None:
        self.run.log({f"plots/{path.stem}": self.wandb.Image(str(path))}, step=self.step)

    def close(self) -> None:
        self.run.finish()


CARD = Card(
    name="wandb", kind="callback",
    title="Weights & Biases: experiment tracking, online or offline",
    paper="https://docs.wandb.ai/",
    summary="Sends the records of metrics.jsonl, the recipe as config, the final summary and the "
            "run's plots to a W&B run, offline by default (main process only).",
    formula="config = recipe (dotted keys); run.log(train/<key>, epoch/<key>, step=record step); "
            "run.summary[summary/<key>]; plots/<name> images",
    left_out="Artifacts of model files, sweeps, and system metrics (disabled). Needs wandb "
             "(extra 'trackers').",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(WandbLogger, card=CARD)
