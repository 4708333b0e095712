"""The tensorboard callback, read back with TensorBoard's own event-file reader."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

import sdk
from sdk.data import IndexedDataset
from sdk.events import State

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def _read(log_dir):
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_scalars_hparams_summary_and_plots_match_the_run(tracked_run, expected_scalars):
    run_dir, records, summary = tracked_run('name = "tensorboard"')
    acc = _read(run_dir / "tensorboard")
    expected = expected_scalars(records)
    assert {"train/loss", "train/lr", "epoch/loss", "epoch/val/accuracy"} <= set(expected)
    for name, points in expected.items():
        logged = [(e.step, e.value) for e in acc.Scalars(name)]
        assert [s for s, _ in logged] == [s for s, _ in points], name
        assert [v for _, v in logged] == pytest.approx([v for _, v in points], rel=1e-6), name
    final = {e.step: e.value for e in acc.Scalars("summary/accuracy")}
    assert final == {12: pytest.approx(summary["accuracy"], rel=1e-6)}
    assert summary["ece_after"] == pytest.approx(acc.Scalars("summary/ece_after")[0].value, rel=1e-6)
    images = acc.Tags()["images"]
    assert {"plots/training_curves", "plots/reliability"} <= set(images)
    assert acc.Images("plots/reliability")[0].encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"
    # the recipe's hyperparameters: text, and the hparams plugin's session with its metrics
    text = acc.Tensors("hyperparameters/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "optimizer.lr = 0.001" in text and "objectives.0.name = 'cross_entropy'" in text
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.summary_metadata["_hparams_/experiment"].plugin_data.content
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content).experiment
    assert {h.name for h in experiment.hparam_infos} >= {"optimizer.lr", "data.batch_size"}
    assert {m.name.tag for m in experiment.metric_infos} >= {"summary/accuracy"}


def test_as_a_library_callback_it_ends_at_fit_end_and_needs_a_place(tmp_path):
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    loader = DataLoader(IndexedDataset(x, y), batch_size=16)
    tracker = sdk.create("callback", "tensorboard", log_dir=str(tmp_path / "tb"))
    trainer = sdk.Trainer(sdk.create("encoder", "mlp", in_dim=6, out_dim=3),
                          sdk.create("objective", "cross_entropy"), callbacks=[tracker],
                          max_epochs=2, log_every=2, progress=False)
    trainer.fit(loader)
    acc = _read(tmp_path / "tb")
    train = [r for r in trainer.history if r["kind"] == "train"]
    assert [e.step for e in acc.Scalars("train/loss")] == [r["step"] for r in train]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([r["loss"] for r in train],
                                                                         rel=1e-6)
    text = acc.Tensors("hyperparameters/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "max_epochs = 2" in text  # no recipe: the Trainer's settings
    assert not tracker.active
    with pytest.raises(sdk.ConfigError, match="callback 'tensorboard': give log_dir"):
        sdk.Trainer(sdk.create("encoder", "mlp", in_dim=6, out_dim=3),
                    sdk.create("objective", "cross_entropy"),
                    callbacks=[sdk.create("callback", "tensorboard")], max_epochs=1,
                    progress=False).fit(loader)


def test_only_the_main_process_writes(tmp_path):
    class Rank1:
        is_main, run_dir = False, tmp_path

    tracker = sdk.create("callback", "tensorboard", log_dir=str(tmp_path / "tb"))
    tracker.on_fit_start(State(trainer=Rank1()))
    tracker.on_log(State(trainer=Rank1(), record={"kind": "train", "step": 1, "loss": 1.0}))
    assert not tracker.active and not (tmp_path / "tb").exists()
