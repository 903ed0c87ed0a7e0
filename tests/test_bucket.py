"""A work directory in a bucket (``--workdir gs://bucket/path``), against a real GCS emulator on 127.0.0.1.

The emulator (``tests/gcs_emulator.py``) speaks the GCS JSON API; everything jaxalign writes goes through the same
clients it would use on Google Cloud: gcsfs (epath), tensorstore (orbax's arrays), google-cloud-storage (tensorboardX).
The checks read the bucket back with google-cloud-storage, independently of the code under test.
"""
from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import gcs_emulator
import tiny_recipe
from tiny_recipe import LAUNCHER, REPO

BUCKET = "jaxalign-test"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator's URL, with the environment pointing every GCS client at it (restored afterwards)."""
    with gcs_emulator.running(BUCKET) as url:
        env = {**gcs_emulator.env_for(url), "JAXALIGN_CACHE_DIR": str(tmp_path_factory.mktemp("jaxalign_cache"))}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield url
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture(scope="module")
def bucket(gcs):
    from google.cloud import storage

    return storage.Client().bucket(BUCKET)


def _names(bucket, prefix: str) -> set[str]:
    return {b.name[len(prefix):] for b in bucket.client.list_blobs(BUCKET, prefix=prefix)}


def _url(path: str) -> str:
    return f"gs://{BUCKET}/{path}"


# ---- storage.py -----------------------------------------------------------------------------------------------------

def test_is_remote():
    from jaxalign.storage import is_remote

    assert is_remote("gs://b/x") and is_remote("s3://b/x")
    assert not is_remote("/tmp/x") and not is_remote("runs/x") and not is_remote("file:///tmp/x")


def test_write_atomic_local_and_remote(bucket, tmp_path):
    from jaxalign.storage import write_atomic

    write_atomic(tmp_path / "a.json", '{"x": 1}')
    write_atomic(tmp_path / "a.json", '{"x": 2}')
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary file left behind
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 2}
    write_atomic(_url("atomic/a.json"), '{"x": 1}')
    write_atomic(_url("atomic/a.json"), b'{"x": 2}')
    assert _names(bucket, "atomic/") == {"a.json"}
    assert json.loads(bucket.blob("atomic/a.json").download_as_bytes()) == {"x": 2}


# ---- the work directory ---------------------------------------------------------------------------------------------

def test_workdir_markers_and_models_in_a_bucket(bucket):
    from jaxalign.pipeline.phases import Phase
    from jaxalign.pipeline.workdir import WorkDir

    wd = WorkDir(_url("wd"))
    sft, policy = Phase("sft", "sft", 0), Phase("r1/policy", "policy", 1)
    wd.base_model = "base"
    assert wd.done(sft) is None and wd.sft_model() == "base" and wd.reward_model(1) is None
    info = {"phase": "sft", "metrics": {"loss": 0.5}, "seconds": 1.0}
    wd.mark_done(sft, info)
    assert wd.done(sft) == info and wd.done(policy) is None
    assert json.loads(bucket.blob("wd/phases/sft/done.json").download_as_bytes()) == info
    # a model folder is a prefix with objects under it: found by the same is_dir checks as a local folder
    bucket.blob("wd/phases/sft/model/config.json").upload_from_string("{}")
    bucket.blob("wd/phases/r1_reward/model/config.json").upload_from_string("{}")
    assert str(wd.sft_model()) == _url("wd/phases/sft/model")
    assert str(wd.policy_model(1)) == _url("wd/phases/sft/model")  # no round-1 policy yet: the SFT model
    assert wd.latest_reward_model(2) == (1, wd.phase("r1/reward") / "model")
    assert _names(bucket, "wd/phases/sft/") == {"done.json", "model/config.json"}


# ---- checkpoints ----------------------------------------------------------------------------------------------------

def _dataset():
    import grain

    return grain.MapDataset.range(64).shuffle(seed=3).batch(4).to_iter_dataset()


def test_checkpointer_saves_and_restores_state_and_data_iterator_in_a_bucket(bucket, monkeypatch):
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxalign.checkpoint import PhaseCheckpointer, free_bytes

    # a bucket has no free space to ask about: the disk check must not touch the local disk API
    monkeypatch.setattr("jaxalign.checkpoint.shutil.disk_usage", lambda p: pytest.fail(f"disk_usage({p})"))
    assert free_bytes(_url("ck")) is None
    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    state = {"w": jax.device_put(np.arange(64, dtype=np.float32).reshape(16, 4), NamedSharding(mesh, P("d"))),
             "count": jax.numpy.int32(0)}
    ck = PhaseCheckpointer(_url("ck"), keep=2, async_save=True)
    assert ck.latest_step() is None
    it = iter(_dataset())
    for step in (1, 2, 3):
        next(it)
        state = {"w": state["w"] + 1, "count": state["count"] + 1}
        ck.save(step, state, it, {"step": step})
    expected_next = [next(it) for _ in range(3)]
    ck.close()
    steps = {n.split("/")[0] for n in _names(bucket, "ck/")}
    assert {s for s in steps if s.isdigit()} == {"2", "3"}  # keep=2 removed step 1 from the bucket
    assert not any("tmp" in s for s in steps)

    assert _committed(bucket, "ck/") == {2, 3}
    # a save killed half-way leaves a step folder without commit_success.txt: reported, ignored, cleaned up
    bucket.blob("ck/4/state/manifest.ocdbt").upload_from_string(b"partial")
    again = PhaseCheckpointer(_url("ck"), keep=2)
    assert again.latest_step() == 3 and again.ignored == ["4"]
    assert not _names(bucket, "ck/4/")
    fresh = iter(_dataset())
    restored, meta = again.restore(3, jax.tree.map(jax.numpy.zeros_like, state), fresh)
    again.close()
    assert meta == {"step": 3}
    np.testing.assert_array_equal(restored["w"], np.arange(64, dtype=np.float32).reshape(16, 4) + 3)
    assert int(restored["count"]) == 3 and restored["w"].sharding == state["w"].sharding
    for want in expected_next:  # the restored iterator goes on exactly where the saved one stood
        np.testing.assert_array_equal(next(fresh), want)


# ---- metrics --------------------------------------------------------------------------------------------------------

def _tb_scalars(data: bytes) -> dict[tuple[str, int], float]:
    """(tag, step) -> value from a tensorboard event file (TFRecord framing: length, crc, payload, crc)."""
    from tensorboardX.proto import event_pb2

    out, pos = {}, 0
    while pos < len(data):
        (n,) = struct.unpack("<Q", data[pos:pos + 8])
        event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
        pos += 12 + n + 4
        for v in event.summary.value:
            out[(v.tag, event.step)] = v.simple_value
    return out


def test_metrics_writer_in_a_bucket_appends_on_resume(bucket):
    from jaxalign.metrics import MetricsWriter, read_metrics

    logdir = _url("metrics/tb")
    w = MetricsWriter(logdir, total_steps=4, desc="t", show_progress=False, flush_secs=0)
    w.log(1, {"loss": 1.0})
    # uploaded as it goes (every flush_secs): a run killed now keeps step 1 in the bucket
    logged = bucket.blob("metrics/tb/metrics.jsonl").download_as_text().splitlines()
    assert [json.loads(x)["step"] for x in logged] == [1]
    for step in (2, 3):
        w.log(step, {"loss": 1.0 / step})
    w.close()
    time.sleep(1.1)  # tensorboardX names event files by the second: two writers within one would share the name
    # resumed from a step-2 checkpoint: step 3 is logged again, then step 4; this writer uploads on flush and close
    w = MetricsWriter(logdir, total_steps=4, desc="t", show_progress=False, initial_step=2, flush_secs=3600)
    w.log(3, {"loss": 0.3})
    assert len(bucket.blob("metrics/tb/metrics.jsonl").download_as_text().splitlines()) == 3
    w.flush()  # (the training loop flushes at every checkpoint)
    assert len(bucket.blob("metrics/tb/metrics.jsonl").download_as_text().splitlines()) == 4
    w.log(4, {"loss": 0.25})
    w.close()
    rows = [json.loads(x) for x in bucket.blob("metrics/tb/metrics.jsonl").download_as_text().split("\n") if x]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (3, 0.3), (4, 0.25)]
    assert read_metrics(logdir) == rows
    assert [(r["step"], r["loss"]) for r in read_metrics(logdir, latest_only=True)] == \
        [(1, 1.0), (2, 0.5), (3, 0.3), (4, 0.25)]
    events = sorted(n for n in _names(bucket, "metrics/tb/") if n.startswith("events.out.tfevents"))
    assert len(events) == 2  # one tensorboard file per writer, as in a local directory
    scalars = {}
    for name in events:  # (named by creation time: the resumed writer's values come last)
        scalars.update(_tb_scalars(bucket.blob(f"metrics/tb/{name}").download_as_bytes()))
    assert {k: v for k, v in scalars.items() if k[0] == "train/loss"} == pytest.approx(
        {("train/loss", 1): 1.0, ("train/loss", 2): 0.5, ("train/loss", 3): 0.3, ("train/loss", 4): 0.25})


# ---- models ---------------------------------------------------------------------------------------------------------

def _params(cfg, seed):
    from jaxalign.models import param_shapes

    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in sorted(param_shapes(cfg).items())}


def test_model_save_and_load_through_a_bucket(bucket):
    import engine_fixtures as fx
    from jaxalign.models import read_params, resolve_model_folder, save_params
    from jaxalign.storage import cache_root

    cfg = fx.tiny_cfg()
    first = _params(cfg, 0)
    save_params(first, cfg, _url("models/m"), max_shard_bytes=20_000)  # several shards and an index
    names = _names(bucket, "models/m/")
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    assert len(shards) > 1 and {"config.json", "model.safetensors.index.json"} <= names
    assert json.loads(bucket.blob("models/m/config.json").download_as_bytes())["architectures"] == ["LlamaForCausalLM"]

    local = resolve_model_folder(_url("models/m"))
    assert cache_root() in local.parents and sorted(p.name for p in local.glob("*.safetensors")) == shards
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(read_params(local, cfg)), first)
    assert resolve_model_folder(_url("models/m")) == local  # unchanged in the bucket: the cached copy

    # rewritten in the bucket (one file now): the stale shards are gone and the next read downloads again
    second = _params(cfg, 1)
    save_params(second, cfg, _url("models/m"))
    assert _names(bucket, "models/m/") == {"config.json", "model.safetensors"}
    local2 = resolve_model_folder(_url("models/m"))
    assert local2 != local
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(read_params(local2, cfg)), second)


# ---- the reference log-prob cache -----------------------------------------------------------------------------------

def test_reference_cache_in_a_bucket(bucket, monkeypatch):
    import engine_fixtures as fx
    from jaxalign import sharding
    from jaxalign.train import reference as reference_mod

    cfg = fx.tiny_cfg()
    params = _params(cfg, 2)
    params = {k: v * 0.02 if v.ndim > 1 else np.ones_like(v) for k, v in params.items()}
    examples = fx.pair_examples(12)
    kw = dict(reduce="sum", mesh=sharding.make_mesh(2, 2, 2), batch_size=8, pad_id=0, buckets=(32,),
              cache_dir=_url("ref"))
    computed = reference_mod.precompute_reference_logps(params, cfg, examples, **kw)
    (name,) = _names(bucket, "ref/")
    with np.load(io.BytesIO(bucket.blob(f"ref/{name}").download_as_bytes())) as z:
        np.testing.assert_array_equal(z["chosen"], np.float32([e["ref_chosen_logps"] for e in computed]))
        np.testing.assert_array_equal(z["row_id"], [e["row_id"] for e in examples])

    def no_compute(*a, **k):
        raise AssertionError("recomputed although the bucket holds the cache")

    monkeypatch.setattr(reference_mod, "make_eval_logps", no_compute)
    again = reference_mod.precompute_reference_logps(params, cfg, examples, **kw)
    assert [(e["ref_chosen_logps"], e["ref_rejected_logps"]) for e in again] == \
        [(e["ref_chosen_logps"], e["ref_rejected_logps"]) for e in computed]


# ---- the whole demo -------------------------------------------------------------------------------------------------

BUCKET_DEMO = [
    "run.rounds=1", "run.show_progress=false", "reliability.async_checkpointing=true",
    "sft.epochs=1", "sft.max_steps=8", "sft.save_every=4",
    "sample.limit=16", "sample.max_new_tokens=8", "policy.num_samples=2",
    "reward.batch_size=16", "reward.epochs=1", "reward.save_every=1",
    "policy.batch_size=8", "policy.save_every=1", "policy.max_steps=2", "policy.precompute_reference=true",
    "eval.num_prompts=8", "eval.max_new_tokens=8", "data.eval_prefs.limit=16",
]
PHASES = ("sft", "eval0", "r1_sample", "r1_reward", "r1_policy", "r1_eval")


def _demo(workdir: str, cache) -> subprocess.Popen:
    env = {**tiny_recipe.subprocess_env(cache), **gcs_emulator.env_for(os.environ["STORAGE_EMULATOR_HOST"]),
           "JAXALIGN_CACHE_DIR": os.environ["JAXALIGN_CACHE_DIR"]}
    return subprocess.Popen([sys.executable, str(LAUNCHER), "--config", "demo_cpu", "--workdir", workdir,
                             *BUCKET_DEMO], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _committed(bucket, prefix: str) -> set[int]:
    """Steps orbax finished saving in a bucket (it writes ``<step>/commit_success.txt`` last)."""
    return {int(n.split("/")[0]) for n in _names(bucket, prefix) if n.split("/")[0].isdigit()
            and n.split("/", 1)[1] == "commit_success.txt"}


@pytest.mark.slow
def test_demo_runs_resumes_and_skips_in_a_bucket(bucket, tmp_path):
    """The demo with ``--workdir gs://...``: killed once the first SFT checkpoint is in the bucket, re-run to the end
    (the SFT phase resumes from that checkpoint), then re-run again: every phase is skipped."""
    workdir, cache = _url("demo"), tmp_path / "jax_cache"
    proc = _demo(workdir, cache)
    t0 = time.time()
    while not _committed(bucket, "demo/phases/sft/checkpoints/"):
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        assert time.time() - t0 < 900, "no SFT checkpoint in the bucket after 15 minutes"
        time.sleep(0.5)
    proc.kill()
    proc.wait(timeout=60)
    proc.stdout.close()
    assert not _names(bucket, "demo/phases/sft/done.json"), "killed too late: the SFT phase had finished"

    out, _ = (proc := _demo(workdir, cache)).communicate(timeout=1800)
    assert proc.returncode == 0, out[-4000:]
    names = _names(bucket, "demo/")
    for phase in PHASES:
        assert f"phases/{phase}/done.json" in names
    for phase in ("sft", "r1_reward", "r1_policy"):
        assert {f"phases/{phase}/model/config.json", f"phases/{phase}/model/model.safetensors",
                f"phases/{phase}/tb/metrics.jsonl"} <= names
        assert any(n.startswith(f"phases/{phase}/tb/events.out.tfevents") for n in names)
        # a finished phase deletes its checkpoints (reliability.keep_finished_checkpoints=false), in a bucket too
        assert not any(n.startswith(f"phases/{phase}/checkpoints/") for n in names)
    assert {"run.yaml", "report.md", "plots/rounds.png", "plots/curves.png", "phases/r1_sample/samples.json",
            "phases/eval0/eval.json", "phases/r1_eval/eval.json"} <= names
    assert any(n.startswith("phases/r1_policy/reference/ref_logps-") for n in names)
    assert bucket.blob("demo/plots/curves.png").download_as_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![plots/rounds.png](plots/rounds.png)" in bucket.blob("demo/report.md").download_as_text()
    # the killed SFT run resumed: its log holds every step once the re-logged ones are folded, and its second
    # tensorboard file starts after the checkpoint it resumed from
    sft_log = [json.loads(x) for x in bucket.blob("demo/phases/sft/tb/metrics.jsonl").download_as_text().split("\n")
               if x.strip()]
    steps = [r["step"] for r in sft_log if r["split"] == "train"]
    assert sorted(set(steps)) == list(range(1, 9)) and steps[-1] == 8
    assert sum(n.startswith("phases/sft/tb/events.out.tfevents") for n in names) == 2
    done = json.loads(bucket.blob("demo/phases/sft/done.json").download_as_bytes())
    assert done["metrics"]["steps"] == 8

    out, _ = (proc := _demo(workdir, cache)).communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    for phase in ("sft", "eval0", "r1/sample", "r1/reward", "r1/policy", "r1/eval"):
        assert f"[jaxalign] {phase}: finished earlier, skipped" in out
    assert _names(bucket, "demo/phases/sft/done.json") and json.loads(
        bucket.blob("demo/phases/sft/done.json").download_as_bytes()) == done
