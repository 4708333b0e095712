"""The wandb callback in offline mode, read back from the run's own transaction log
(``run-<id>.wandb``: W&B's LevelDB-format log of protobuf ``Record`` messages)."""

from __future__ import annotations

import json
import struct
import time

import pytest

pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

BLOCK, HEADER = 32768, 7  # LevelDB log blocks; each chunk: crc32c, length, type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path):
    """The protobuf records of a W&B transaction log, in order."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"  # W&B's file header: ident, magic, version
    pos, pending, out = 7, b"", []
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:  # a block's tail too short for a chunk header is padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if pos + HEADER + length > len(data):  # a chunk still being written
            break
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def finished_records(path, timeout=60.0):
    """The records of a run's log once its ``exit`` record is on disk: ``run.finish()`` returns
    when the W&B service has the run's last record, and the service may write its buffered
    tail a moment later on a loaded machine."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, (
            f"{path}: no exit record after {timeout:.0f} s; record kinds "
            f"{[r.WhichOneof('record_type') for r in records]}")
        time.sleep(0.2)


def test_config_history_summary_and_plots_match_the_run(tracked_run, expected_scalars):
    run_dir, records, summary = tracked_run('name = "wandb"\nproject = "digits"')
    (log,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    history, summaries, config = {}, {}, {}
    for record in finished_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            step = record.history.step.num
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                history.setdefault(key, []).append((step, json.loads(item.value_json)))
        elif kind == "summary":
            for item in record.summary.update:
                summaries[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "run":  # the run's start: its project, name and config
            assert record.run.project == "digits" and record.run.display_name == "supervised_digits"
            for item in record.run.config.update:
                config[item.key] = json.loads(item.value_json)
    for name, points in expected_scalars(records).items():
        assert history[name] == points, name
    for key in ("accuracy", "ece_after", "nll_after"):
        assert summaries[f"summary/{key}"] == summary[key]
    assert config["optimizer.lr"] == 0.001 and config["objectives.0.name"] == "cross_entropy"
    assert config["trainer.max_steps"] == 12
    images = {k.rsplit("/", 1)[0]: v for k, v in history.items() if k.endswith("/_type")}
    assert images == {"plots/reliability": [(12, "image-file")],
                      "plots/training_curves": [(12, "image-file")]}
    media = list((log.parent / "files" / "media" / "images").rglob("*.png"))
    assert len(media) == 2
