"""One tiny training phase as a command, for the tests that need a real process: preemption, kill -9, multi-host.

    python tests/engine_script.py --workdir W [--kind sft|dpo|dil|reward] [--mesh 2,2,2] [--steps 40] [--save-every 4]
        [--sigterm-at 5,9] [--sigterm-after-save 12] [--sigterm-process 1] [--poison-row 7] [--skip-nonfinite]
        [--num-processes 2 --process-id 0 --coordinator 127.0.0.1:PORT] [--devices 8] [--lora-rank 4]

Re-running the same command resumes from the last checkpoint under ``W/phase/checkpoints``. The script

- logs the ``row_id`` of every batch it trains on to ``W/rows.p<process>.jsonl`` (``{"step": s, "rows": [...]}``),
- writes the final params to ``W/params.npz`` (process 0, all processes' shards gathered),
- sends itself SIGTERM after step ``S`` of ``--sigterm-at`` (only in a run that started before ``S``), or from a timer
  thread right after the async save of step ``S`` of ``--sigterm-after-save`` was started (the save still in flight),
- exits with ``EXIT_PREEMPTED`` (75) and a one-line "resume with the same command" message when preempted, 3 on a
  non-finite step (the diagnostic on stderr), 0 when the phase is done.

The module's top level imports only the standard library: the tests import the helpers below (``script_env``,
``run_script``, ``read_rows``, ...) without pulling in JAX, and the script configures JAX before importing it.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SCRIPT = Path(__file__).resolve()
EXIT_PREEMPTED = 75
EXIT_NONFINITE = 3
PHASE = "phase"


# ------------------------------------------------------------------------------------------------ test helpers
def script_env(devices: int = 8) -> dict[str, str]:
    """Environment for a subprocess: CPU only, ``devices`` host devices, a shared persistent compilation cache."""
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    flags = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f)
    env["XLA_FLAGS"] = (flags + f" --xla_force_host_platform_device_count={devices}").strip()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if not env.get("JAXALIGN_COMPILE_CACHE"):
        env["JAXALIGN_COMPILE_CACHE"] = compile_cache_dir()
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


_CACHE_DIR: list[str] = []


def compile_cache_dir() -> str:
    """One persistent-compilation-cache folder per test session (so each resumed process skips most compiling)."""
    if not _CACHE_DIR:
        _CACHE_DIR.append(tempfile.mkdtemp(prefix="jaxalign-test-jit-cache-"))
        atexit.register(shutil.rmtree, _CACHE_DIR[0], ignore_errors=True)
    return _CACHE_DIR[0]


def command(workdir, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), "--workdir", str(workdir), *map(str, extra)]


def run_script(workdir, *extra: str, devices: int = 8, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the script to completion (bounded by ``timeout``); stdout and stderr captured as text."""
    return subprocess.run(command(workdir, *extra), env=script_env(devices), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def launch(workdir, *extra: str, devices: int = 8, log=None) -> subprocess.Popen:
    """Start the script in the background, stdout and stderr appended to ``log`` (or discarded)."""
    out = open(log, "a") if log else subprocess.DEVNULL
    try:
        return subprocess.Popen(command(workdir, *extra), env=script_env(devices), stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT)
    finally:
        if log:
            out.close()  # the child holds its own descriptor


_REFERENCE: dict[tuple, Path] = {}


def reference_run(*extra: str, timeout: float = 600) -> Path:
    """The uninterrupted phase (one process, 8 devices) for ``extra`` arguments, run once per test session and
    shared by the resume, kill and multi-host tests (save_every and the like change no numbers)."""
    key = tuple(map(str, extra))
    if key not in _REFERENCE:
        workdir = Path(tempfile.mkdtemp(prefix="jaxalign-reference-"))
        atexit.register(shutil.rmtree, workdir, ignore_errors=True)
        p = run_script(workdir, *extra, timeout=timeout)
        if p.returncode != 0:
            raise AssertionError(f"reference run failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
        _REFERENCE[key] = workdir
    return _REFERENCE[key]


def read_checkpoint(workdir, step: int) -> dict:
    """The saved train state of ``step`` as {key path: numpy array}, read without a mesh (any process count)."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    path = checkpoint_dir(workdir) / str(step) / "state"
    ck = ocp.PyTreeCheckpointer()
    tree = ck.metadata(path).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    out = ck.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(out)[0]}


def read_data_states(workdir, step: int) -> dict[str, dict]:
    """The grain iterator states saved at ``step``: {file name: state}."""
    d = checkpoint_dir(workdir) / str(step) / "data"
    return {p.name: json.loads(p.read_text()) for p in sorted(d.glob("process_*.json"))}


def run_multiprocess(workdir, *extra: str, num_processes: int = 2, devices: int = 4, timeout: float = 300,
                     per_process: dict[int, list[str]] | None = None) -> list[tuple[int, str]]:
    """Run the script as ``num_processes`` JAX processes on this machine (gloo collectives); [(returncode, log)]."""
    port = free_port()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    procs, logs = [], []
    for i in range(num_processes):
        log = workdir / f"log.p{i}.txt"
        log.write_text("")
        args = [*extra, "--num-processes", num_processes, "--process-id", i, "--coordinator", f"127.0.0.1:{port}",
                *(per_process or {}).get(i, [])]
        procs.append(launch(workdir, *args, devices=devices, log=log))
        logs.append(log)
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(p.returncode, log.read_text()) for p, log in zip(procs, logs)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_rows(workdir, process: int = 0) -> dict[int, list[int]]:
    """step -> row ids of the batch trained at that step. A step logged twice (re-done after a kill -9) must have had
    the same rows both times; torn lines from a killed process are skipped."""
    out: dict[int, list[int]] = {}
    path = Path(workdir) / f"rows.p{process}.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        step, rows = rec["step"], rec["rows"]
        if step in out and out[step] != rows:
            raise AssertionError(f"step {step} was trained on rows {out[step]} and, after a resume, on {rows}")
        out[step] = rows
    return out


def row_records(workdir, process: int = 0) -> list[dict]:
    """Every intact record of the row log, in the order written ({"step", "rows", "time"})."""
    path = Path(workdir) / f"rows.p{process}.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def read_losses(workdir) -> dict[int, float]:
    """step -> loss from the phase's metrics.jsonl (the latest record of a step re-done after a resume)."""
    out = {}
    path = Path(workdir) / PHASE / "tb" / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("split") == "train":
            out[rec["step"]] = rec["loss"]
    return out


def load_params(workdir) -> dict:
    import numpy as np

    with np.load(Path(workdir) / "params.npz") as z:
        return {k: z[k] for k in z.files}


def checkpoint_dir(workdir) -> Path:
    return Path(workdir) / PHASE / "checkpoints"


def committed_steps(workdir) -> list[int]:
    d = checkpoint_dir(workdir)
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def uncommitted(workdir) -> list[str]:
    d = checkpoint_dir(workdir)
    return sorted(p.name for p in d.iterdir() if "orbax-checkpoint-tmp" in p.name) if d.is_dir() else []


def copy_workdir(src, dst) -> Path:
    shutil.copytree(src, dst)
    return Path(dst)


# ------------------------------------------------------------------------------------------------------ the CLI
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--kind", default="sft", choices=["sft", "dpo", "dil", "reward"])
    ap.add_argument("--mesh", default="2,2,2")
    ap.add_argument("--examples", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40, help="max_steps of the phase")
    ap.add_argument("--save-every", type=int, default=4)
    ap.add_argument("--keep", type=int, default=2)
    ap.add_argument("--sync-save", action="store_true")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--sigterm-at", default="")
    ap.add_argument("--sigterm-after-save", default="")
    ap.add_argument("--sigterm-process", type=int, default=-1, help="only this process signals itself (-1: all)")
    ap.add_argument("--poison-row", type=int, default=-1)
    ap.add_argument("--skip-nonfinite", action="store_true")
    ap.add_argument("--num-processes", type=int, default=1)
    ap.add_argument("--process-id", type=int, default=0)
    ap.add_argument("--coordinator", default="")
    ap.add_argument("--devices", type=int, default=0, help="host devices of this process (default: from XLA_FLAGS)")
    ap.add_argument("--lora-rank", type=int, default=0,
                    help="train LoRA adapters (dropout 0.1) on the frozen base; dpo / dil: the base is the reference")
    return ap.parse_args(argv)


def _steps(text: str) -> set[int]:
    return {int(s) for s in text.split(",") if s.strip()}


def _init_params(cfg, kind: str, seed: int = 0):
    """Deterministic numpy init (no per-op compiles at start-up): normal(0, 0.02) matrices, ones for norm scales."""
    import numpy as np

    from jaxalign.models import param_shapes

    rng = np.random.RandomState(seed)
    out = {}
    for name, shape in sorted(param_shapes(cfg).items()):
        if name.endswith("norm"):
            out[name] = np.ones(shape, np.float32)
        elif name.startswith("b") or name.endswith("_bias"):
            out[name] = np.zeros(shape, np.float32)
        else:
            out[name] = (0.02 * rng.standard_normal(shape)).astype(np.float32)
    if kind == "reward":
        out.pop("lm_head", None)
        out["score"] = (rng.standard_normal(cfg.hidden_size) / np.sqrt(cfg.hidden_size + 1)).astype(np.float32)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["JAX_PLATFORMS"] = "cpu"
    if args.devices:
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={args.devices}"])
    import jax

    if args.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator, num_processes=args.num_processes, process_id=args.process_id,
                                   initialization_timeout=120)
    cache = os.environ.get("JAXALIGN_COMPILE_CACHE")
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

    import numpy as np
    from jax.experimental import multihost_utils

    import engine_fixtures as fx
    from jaxalign import sharding
    from jaxalign.checkpoint import PhaseCheckpointer
    from jaxalign.train.loop import EXIT_PREEMPTED as LOOP_EXIT, NonFiniteError, Preempted
    from jaxalign.train.optim import OptimConfig
    from jaxalign.train.run import PhaseSettings, train
    from jaxalign.losses import get_objective
    from jaxalign.train.steps import StepConfig

    assert LOOP_EXIT == EXIT_PREEMPTED
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    pid = jax.process_index()
    cfg = fx.tiny_cfg()
    params = _init_params(cfg, args.kind)
    if args.kind == "sft":
        examples = fx.sft_examples(args.examples)
    else:
        examples = fx.pair_examples(args.examples)
    if args.poison_row >= 0:  # an out-of-vocabulary id: the embedding lookup fills NaN, so the loss is NaN
        key = "input_ids" if args.kind == "sft" else "chosen_ids"
        ex = dict(examples[args.poison_row])
        ex[key] = np.array(ex[key])
        ex[key][1] = cfg.vocab_size + 1000
        examples[args.poison_row] = ex
    mesh = sharding.make_mesh(*(int(x) for x in args.mesh.split(",")))
    kind = {"sft": "sft", "reward": "reward"}.get(args.kind, "policy")
    step_cfg = StepConfig(kind, objective=get_objective({"dpo": "dpo", "dil": "dil_lsif"}.get(args.kind, "dpo"))[1])
    settings = PhaseSettings(global_batch_size=args.batch, num_epochs=args.epochs, max_steps=args.steps,
                             save_every=args.save_every, keep_checkpoints=args.keep,
                             async_checkpointing=not args.sync_save, skip_nonfinite=args.skip_nonfinite,
                             show_progress=False)
    optim = OptimConfig(learning_rate=args.lr, warmup_ratio=0.0)

    mine = args.sigterm_process < 0 or args.sigterm_process == pid
    sig_steps = _steps(args.sigterm_at) if mine else set()
    sig_after_save = _steps(args.sigterm_after_save) if mine else set()
    started: list[int] = []
    rows_path = workdir / f"rows.p{pid}.jsonl"
    torn = rows_path.is_file() and rows_path.stat().st_size and not rows_path.read_bytes().endswith(b"\n")
    rows_log = open(rows_path, "a")
    if torn:  # a killed run left half a line
        rows_log.write("\n")

    def on_batch(step, host_batch):
        if not started:
            started.append(step - 1)
            print(f"[script] process {pid}: training from step {step - 1}", flush=True)
        rows = np.asarray(host_batch["row_id"]).ravel().tolist()
        rows_log.write(json.dumps({"step": step, "rows": rows, "time": time.time()}) + "\n")
        rows_log.flush()

    def on_step(step):
        if step in sig_steps and started and step > started[0]:
            print(f"[script] process {pid}: SIGTERM to self after step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGTERM)

    if sig_after_save:
        original_save = PhaseCheckpointer.save

        def save(self, step, *a, **kw):
            out = original_save(self, step, *a, **kw)
            if step in sig_after_save and started and step > started[0]:
                def fire(manager=self.manager):
                    in_flight = manager.is_saving_in_progress()
                    print(f"[script] process {pid}: SIGTERM from a timer thread after starting the save of step "
                          f"{step}; async save in flight: {in_flight}", flush=True)
                    os.kill(os.getpid(), signal.SIGTERM)

                threading.Thread(target=fire, daemon=True).start()
            return out

        PhaseCheckpointer.save = save

    frozen = None
    if args.lora_rank:
        import dataclasses

        from jaxalign.models.lora import LoraConfig, init_adapters, split_trainable

        lcfg = LoraConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank, dropout=0.1)
        adapters = {k: np.asarray(v) for k, v in init_adapters(cfg, lcfg, jax.random.PRNGKey(0)).items()}
        params, frozen = split_trainable(params, adapters, trainable=("score",) if kind == "reward" else ())
        step_cfg = dataclasses.replace(step_cfg, lora=lcfg, seed=7,
                                       reference_logps="base" if kind == "policy" else step_cfg.reference_logps)
    ref = params if step_cfg.takes_reference_params else None
    try:
        final = train(cfg=cfg, params=params, examples=examples, phase_dir=workdir / PHASE, mesh=mesh,
                      step_cfg=step_cfg, optim=optim, settings=settings, pad_id=cfg.pad_token_id, buckets=(32,),
                      ref_params=ref, frozen=frozen, on_step=on_step, on_batch=on_batch, name=PHASE)
    except Preempted as e:
        print(str(e), flush=True)
        return EXIT_PREEMPTED
    except NonFiniteError as e:
        print(f"NonFiniteError: {e}", file=sys.stderr, flush=True)
        return EXIT_NONFINITE
    finally:
        rows_log.close()
    host = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) if not v.is_fully_addressable
            else np.asarray(v) for k, v in final.items()}
    if pid == 0:
        np.savez(workdir / "params.tmp.npz", **host)
        os.replace(workdir / "params.tmp.npz", workdir / "params.npz")
    print(f"[script] process {pid}: phase done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
