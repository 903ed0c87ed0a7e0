"""Metric trackers (jaxalign/metrics.py): tensorboard and wandb receive the same names and values, every
``logging_steps``-th train step plus the last, while metrics.jsonl keeps every step; wandb is optional and its absence
is a clear error. Both outputs are read back from their files: tensorboard's event file as TFRecords of
tensorboardX's Event protos, wandb's offline ``.wandb`` file as the LevelDB-style log of wandb's Record protos."""
from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxalign.metrics import MetricsWriter, TrackerError, check_trackers, read_metrics


def read_tensorboard(logdir: Path) -> dict[tuple[str, int], float]:
    from tensorboardX.proto import event_pb2

    out = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])  # after length + its crc
            pos += 12 + length + 4  # record + its crc
            for v in event.summary.value:
                out[(v.tag, event.step)] = v.simple_value
    return out


def wandb_records(run_file: Path) -> list:
    """The Record protos of an offline run: the file is ":W&B" + 3 header bytes, then 32 KiB blocks of chunks (crc32
    u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last) that join into serialized Records."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    out, pos, buf, block = [], 7, b"", 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            out.append(wandb_internal_pb2.Record.FromString(buf))
            buf = b""
    return out


def read_wandb(run_file: Path, timeout: float = 120) -> dict[tuple[str, int], float]:
    """(key, step) -> value of the run's history rows, once the run's exit record is on disk: ``run.finish()``
    returns before wandb's service process has flushed an offline run's file."""
    deadline = time.monotonic() + timeout
    while True:
        records = wandb_records(run_file)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    out = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):  # wandb's own _step, _runtime, _timestamp
                    out[(key, record.history.step.num)] = json.loads(item.value_json)
    return out


def _metrics(step: int) -> dict[str, float]:
    # values that float32 cannot hold exactly, different per step and per name
    return {"loss": 1.0 / (step + 2), "rewards/chosen": np.float32(step / 7), "logps/chosen": -step * np.pi}


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_root"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb_root").mkdir()
    return tmp_path / "wandb_root"


def test_wandb_and_tensorboard_hold_the_same_metrics(tmp_path, offline_wandb):
    pytest.importorskip("wandb")
    logdir = tmp_path / "phases" / "policy" / "tb"
    writer = MetricsWriter(logdir, total_steps=7, desc="policy", show_progress=False, trackers=("tensorboard", "wandb"),
                           logging_steps=3, run_name="demo", wandb_project="jaxalign-test", config={"seed": 3})
    for step in range(1, 8):
        writer.log(step, _metrics(step), advance=1)
    writer.close()

    (run_file,) = offline_wandb.glob("wandb/offline-run-*/run-*.wandb")
    wb, tb = read_wandb(run_file), read_tensorboard(logdir)
    expected = {(f"train/{k}", s): float(v) for s in (3, 6, 7) for k, v in _metrics(s).items()}
    assert sorted(wb) == sorted(tb) == sorted(expected)
    for key, value in expected.items():
        assert wb[key] == pytest.approx(value, rel=1e-12, abs=0)  # JSON keeps the double
        assert tb[key] == np.float32(value)  # tensorboard's simple_value is a float32
    # metrics.jsonl (the report's source) still has every step
    assert [r["step"] for r in read_metrics(logdir)] == list(range(1, 8))
    assert read_metrics(logdir)[0]["loss"] == pytest.approx(1 / 3)


def test_wandb_run_is_named_for_the_run_and_phase(tmp_path, offline_wandb):
    pytest.importorskip("wandb")

    logdir = tmp_path / "r1" / "reward" / "tb"
    writer = MetricsWriter(logdir, total_steps=1, desc="r1/reward", show_progress=False, trackers=("wandb",),
                           run_name="irl_demo", wandb_project="proj")
    run = writer.trackers[0].run
    assert (run.name, run.group, run.job_type, run.project) == ("irl_demo/r1/reward", "irl_demo", "r1/reward", "proj")
    writer.log(1, {"loss": 0.5})
    writer.close()
    assert not list(logdir.glob("events.out.tfevents.*"))  # wandb only: no tensorboard file
    (run_file,) = offline_wandb.glob("wandb/offline-run-*/run-*.wandb")
    assert read_wandb(run_file) == {("train/loss", 1): 0.5}


def test_logging_steps_keep_the_last_step_when_a_phase_stops_early(tmp_path):
    """Data ran out at step 5 of 20 with logging_steps 4: tensorboard holds steps 4 and 5 (the last, written on
    close), metrics.jsonl all five."""
    writer = MetricsWriter(tmp_path, total_steps=20, desc="sft", show_progress=False, logging_steps=4)
    for step in range(1, 6):
        writer.log(step, {"loss": float(step)})
    writer.close()
    assert read_tensorboard(tmp_path) == {("train/loss", 4): 4.0, ("train/loss", 5): 5.0}
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]


def test_default_is_tensorboard_every_step(tmp_path):
    writer = MetricsWriter(tmp_path, total_steps=3, desc="sft", show_progress=False)
    for step in range(1, 4):
        writer.log(step, {"loss": step / 10})
    writer.close()
    assert read_tensorboard(tmp_path) == {("train/loss", s): np.float32(s / 10) for s in (1, 2, 3)}


def test_missing_wandb_is_a_clear_error_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` sees where it is not installed
    with pytest.raises(TrackerError) as e:
        MetricsWriter(tmp_path / "tb", total_steps=3, desc="sft", show_progress=False,
                      trackers=("tensorboard", "wandb"))
    message = str(e.value)
    assert "pip install 'jaxalign[wandb]'" in message and "run.trackers" in message and "\n" not in message
    assert not (tmp_path / "tb").exists()
    with pytest.raises(TrackerError, match="jaxalign\\[wandb\\]"):
        check_trackers(["wandb"])
    assert check_trackers(["tensorboard"]) == check_trackers("tensorboard") == ("tensorboard",)


def test_trackers_as_a_config_string(tmp_path):
    """A config value spells them "tensorboard, wandb"; "" is no tracker at all (metrics.jsonl only)."""
    pytest.importorskip("wandb")
    assert check_trackers(" tensorboard, wandb ") == ("tensorboard", "wandb")
    writer = MetricsWriter(tmp_path, total_steps=1, desc="sft", show_progress=False, trackers="")
    writer.log(1, {"loss": 1.0})
    writer.close()
    assert writer.trackers == [] and not list(tmp_path.glob("events.out.tfevents.*"))
    assert [r["loss"] for r in read_metrics(tmp_path)] == [1.0]


def test_unknown_tracker_and_bad_logging_steps(tmp_path):
    with pytest.raises(TrackerError, match="unknown tracker.*'mlflow'.*tensorboard, wandb"):
        check_trackers(("tensorboard", "mlflow"))
    with pytest.raises(TrackerError, match="logging_steps=0"):
        MetricsWriter(tmp_path, total_steps=3, desc="sft", show_progress=False, logging_steps=0)
