"""Trained models out of a run directory: :func:`load_run` and :func:`export`.

A run directory written by ``paperplug run`` (:func:`sdk.cli_run.run_recipe`) holds the resolved
recipe (``config.toml``), the checkpoints (``checkpoints/step-*.pt``) and, once the run has
finished, ``inference.pt``: the fitted calibrator's state and, for a self-supervised recipe,
the linear probe its calibration and accuracy were measured with. :func:`load_run` builds the
recipe's encoder and calibrator again (reading the recipe's data source for the shapes its
plugins take from the data), loads the newest valid checkpoint's encoder weights and
``inference.pt``, and returns them in eval mode. Every file is read with
``torch.load(weights_only=True)`` (:func:`sdk.checkpoint.load`): loading a run runs no code
from it, and a recipe that imports factories loads only with ``allow_imports=True``.

:func:`export` writes the encoder as a TorchScript module (traced on two rows of the run's
test split), a plain ``state_dict`` (``torch.load(path, weights_only=True)``), or ONNX (when
the ``onnx`` package is importable).
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor, nn

from sdk import checkpoint as ckpt
from sdk.errors import CheckpointError, ConfigError

INFERENCE = "inference.pt"
FORMATS = ("torchscript", "state_dict", "onnx")
SUFFIX = {"torchscript": ".ts.pt", "state_dict": ".pt", "onnx": ".onnx"}


def inference_state(*, supervised: bool, features: bool, probe: Any, calibrator: Any) -> dict:
    """What ``inference.pt`` holds beside the checkpoint: how logits are made (the encoder's
    output, or a linear probe on its embeddings / features) and the fitted calibrator."""
    return {
        "format": 1, "supervised": supervised, "features": features,
        "probe": None if probe is None else {k: getattr(probe, k).detach().cpu()
                                              for k in ("mean", "std", "weight", "bias")},
        "calibrator": None if calibrator is None else dict(calibrator.state_dict()),
    }


@attrs.define(eq=False)
class TrainedRun:
    """A trained run, ready for inference (modules in eval mode, on the CPU unless loaded
    elsewhere): ``embed(x)`` the encoder's embeddings (``features=True``: the backbone's),
    ``logits(x)`` the class scores (the encoder's outputs for a supervised recipe, the linear
    probe's for a self-supervised one), ``predict_proba(x)`` calibrated probabilities when the
    run has a calibrator."""

    run_dir: Path
    recipe: Any
    encoder: nn.Module
    checkpoint: Path
    step: int
    calibrator: Any = None
    probe: Any = None
    features: bool = False
    supervised: bool = False
    example_input: Tensor | None = None

    @torch.no_grad()
    def embed(self, x: Tensor, *, features: bool | None = None) -> Tensor:
        use = self.features if features is None else features
        return self.encoder.features(x) if use else self.encoder(x)

    @torch.no_grad()
    def logits(self, x: Tensor) -> Tensor:
        if self.supervised:
            return self.encoder(x)
        if self.probe is None:
            raise ConfigError(f"run {self.run_dir}: a self-supervised run has class scores only "
                              "through its linear probe, and this run kept none (evaluation."
                              "linear_probe off and no calibrator, or the run did not finish)")
        return self.probe.logits(self.embed(x))

    @torch.no_grad()
    def predict_proba(self, x: Tensor) -> Tensor:
        """Calibrated class probabilities (the softmax of the logits without a calibrator)."""
        logits = self.logits(x)
        if self.calibrator is None:
            return logits.softmax(-1)
        from sdk.calibration import recipe_scores

        features = None
        if self.calibrator.inputs == "features":  # as the run fitted it (sdk.cli_run.calibrate)
            features = self.embed(x, features=True if self.supervised else None)
        return self.calibrator.predict_proba(recipe_scores(self.calibrator, logits, features))


def load_run(run_dir: str | Path, *, allow_imports: bool = False,
             map_location: Any = "cpu") -> TrainedRun:
    """The trained encoder (and calibrator, linear probe) of a run directory; see
    :mod:`sdk.runs`. A damaged newest checkpoint is skipped with a
    :class:`~sdk.errors.CheckpointWarning`; a checkpoint that does not fit the recipe's
    encoder raises :class:`~sdk.errors.CheckpointError` naming the keys."""
    from sdk.cli_run import build, load_splits
    from sdk.config import load_recipe
    from sdk.metrics import LinearProbeClassifier

    run_dir = Path(run_dir)
    config = run_dir / "config.toml"
    if not config.is_file():
        raise ConfigError(f"{run_dir} is not a run directory: it has no config.toml (the "
                          "resolved recipe 'paperplug run' writes)")
    recipe = load_recipe(config, allow_imports=allow_imports)
    if recipe.stages:
        names = ", ".join(str(run_dir / s.options.name) for s in recipe.stages)
        raise ConfigError(f"{run_dir} is the directory of a staged recipe; load one of its "
                          f"stages' runs: {names}")
    splits = load_splits(recipe.data)
    parts = build(recipe, splits)
    encoder = parts["encoder"]
    from sdk.stages import ENCODER

    if not (run_dir / "checkpoints").is_dir() and (run_dir / ENCODER).is_file():
        path = run_dir / ENCODER  # a stage that evaluated without training
        state = {"components": {"encoder": ckpt.load(path, map_location)},
                 "position": {"step": 0}}
    else:
        path, state = ckpt.load_newest(run_dir / "checkpoints", map_location)
    saved = state.get("components", {}).get("encoder")
    if saved is None:
        raise CheckpointError(f"checkpoint {path} holds no encoder")
    if (why := ckpt.mismatch(encoder, saved)) is not None:
        raise CheckpointError(f"checkpoint {path} does not fit the encoder of {config}: {why}")
    encoder.load_state_dict(saved)
    encoder.to(map_location).eval()
    run = TrainedRun(run_dir=run_dir, recipe=recipe, encoder=encoder, checkpoint=path,
                     step=int(state["position"]["step"]),
                     supervised=bool(parts["objective"].requires.get("logits")),
                     example_input=splits.test.x[:2].to(map_location))
    extra = run_dir / INFERENCE
    if extra.is_file():
        info = ckpt.load(extra, map_location)
        run.features, run.supervised = bool(info["features"]), bool(info["supervised"])
        if info["probe"] is not None:
            run.probe = LinearProbeClassifier(**info["probe"])
        calibrator = parts["calibrator"]
        if calibrator is not None and info["calibrator"] is not None:
            calibrator.load_state_dict(info["calibrator"])
            run.calibrator = calibrator.to(map_location).eval()
    return run


class _Features(nn.Module):
    """An encoder's :meth:`~sdk.interfaces.Encoder.features` as a module's forward."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder.features(x)


def export(run: TrainedRun | str | Path, format: str, path: str | Path | None = None,
           *, features: bool = False, allow_imports: bool = False) -> Path:
    """Write the run's encoder as ``format`` (one of :data:`FORMATS`) to ``path`` (default
    ``run_dir/encoder`` with the format's suffix); returns the path. ``features=True`` exports
    the backbone's features (``encoder.features``, the representation a self-supervised run is
    evaluated on) instead of the encoder's output; a state_dict holds both."""
    if format not in FORMATS:
        raise ConfigError(f"export: format must be one of {', '.join(FORMATS)}, got {format!r}")
    if features and format == "state_dict":
        raise ConfigError("export: features=True applies to torchscript and onnx; a state_dict "
                          "holds the whole encoder, backbone and head")
    if format == "onnx" and importlib.util.find_spec("onnx") is None:
        raise ConfigError("export: the onnx format needs the 'onnx' package, which is not "
                          "installed (pip install onnx); torchscript and state_dict need nothing")
    if not isinstance(run, TrainedRun):
        run = load_run(run, allow_imports=allow_imports)
    path = Path(path) if path is not None else run.run_dir / f"encoder{SUFFIX[format]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    encoder = run.encoder.eval()
    if format == "state_dict":
        torch.save({k: v.detach().cpu() for k, v in encoder.state_dict().items()}, path)
        return path
    if features and not callable(getattr(encoder, "features", None)):
        raise ConfigError(f"export: features=True, but the encoder ({type(encoder).__name__}) "
                          "has no features(x)")
    model = _Features(encoder).eval() if features else encoder
    example = run.example_input
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit: still supported
        # the input checks (shape, dtype) are Python-side: a trace keeps the math, not them
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        if format == "torchscript":
            traced = torch.jit.trace(model, example, check_trace=False)
            traced.save(str(path))
        else:
            torch.onnx.export(model, (example,), str(path), input_names=["x"],
                              output_names=["embeddings"], dynamic_axes={"x": {0: "batch"},
                                                                         "embeddings": {0: "batch"}})
    return path
