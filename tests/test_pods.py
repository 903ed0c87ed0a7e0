"""The pipeline as a pod runs it, on this machine: the launcher started as 2 JAX processes (``--distributed on`` with
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, gloo collectives over 127.0.0.1, 1 CPU device each).

- One shared work directory: the shrunk CPU demo (tests/test_pipeline.py's SHRUNK_DEMO: SFT, eval0, one round of
  sample / reward / policy (DPO, held-out metrics, the reference's log-probs precomputed) / eval) ends with the same
  round table as one process with 2 devices (the same (2, 1, 1) mesh, so the same global batches and sampler
  shapes): every phase's done.json metrics, timings aside; the samples and greedy answers are the same tokens.
- Two different local work directories (what each host of a Cloud TPU slice has on its boot disk): both processes exit
  2 with the shared-directory message, having written nothing but process 0's token.

Tolerances. The two runs compute the same math on the same rows, but 1 process sums the data-parallel gradients and
the per-device pieces of every reduction inside one XLA program, 2 processes through gloo, in another order: float32
rounding differences (the engine's own 2-vs-1-process test, tests/test_multihost.py, measures 1e-5 relative on
losses). Here they pass through 12 SFT steps, sampling, 8 reward steps and 3 policy steps, so losses, margins and
held-out losses are compared to ``RTOL`` relative / ``ATOL`` absolute (measured: losses within 6e-6 relative; the
largest gap, 2.1e-5 relative = 1.3e-7 absolute, on the policy's reward margin, a difference of near-equal sums).
Counts and every discrete outcome (sampled tokens, greedy answers, accuracies, gold, win rate) are compared exactly:
a rounding difference could flip a sampled token or an argmax on a near-tie, but on this run none does, so an exact
check is honest here; should a future change make one flip, widen only that key and say why.
"""
from __future__ import annotations

import json
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import tiny_recipe
from test_pipeline import SHRUNK_DEMO, TIMING_KEYS
from tiny_recipe import LAUNCHER, REPO

RTOL, ATOL = 1e-4, 1e-6
# seconds for one demo run, compiles included (measured on 2 cores shared with other work at load ~12: 1 process
# 271 s, 2 processes 360 s; 5.6 CPU minutes for the whole file)
RUN_TIMEOUT = 900
REFUSE_CPU_S = 60  # CPU seconds of both processes together until their exit 2 (import, connect, token, collective)
# the reference log-probs precomputed before the policy phase: each process evaluates its share of every batch
# (jaxalign/train/reference.py), the other path that splits rows between processes
OVERRIDES = [*SHRUNK_DEMO, "policy.precompute_reference=true"]
PHASES = {"sft", "eval0", "r1_sample", "r1_reward", "r1_policy", "r1_eval"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir: Path, cache: Path, log: Path, *, devices: int, distributed: str,
            process: tuple[int, int, int] | None = None) -> subprocess.Popen:
    """The launcher on the demo; ``process`` = (port, count, id) makes it one process of several."""
    env = tiny_recipe.subprocess_env(cache, devices=devices)
    for v in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(v, None)
    if process is not None:
        port, count, pid = process
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(count),
                   JAX_PROCESS_ID=str(pid))
    with open(log, "w") as out:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, str(LAUNCHER), "--config", "demo_cpu", "--distributed", distributed,
                                 "--workdir", str(workdir), *OVERRIDES], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)


def _wait(procs: list[subprocess.Popen], timeout: float) -> list[int | None]:
    """Return codes, or None for a process still running at the deadline (it is killed)."""
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        return [p.poll() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _two_processes(workdirs: tuple[Path, Path], cache: Path, logs: Path, timeout: float) -> list[tuple[int, str]]:
    port = _free_port()
    procs = [_launch(workdirs[i], cache, logs / f"p{i}.log", devices=1, distributed="on", process=(port, 2, i))
             for i in range(2)]
    codes = _wait(procs, timeout)
    return [(rc, (logs / f"p{i}.log").read_text()) for i, rc in enumerate(codes)]


def _children_cpu() -> float:
    """User + system CPU seconds of this process's finished children."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _done(workdir: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted((workdir / "phases").glob("*/done.json"))}


def _table(workdir: Path) -> dict[str, dict[str, float]]:
    """phase -> its done.json metrics without the timings: the round table's numbers and every other phase metric."""
    return {name: {k: v for k, v in info["metrics"].items() if k not in TIMING_KEYS}
            for name, info in _done(workdir).items()}


def _print_tables(one: dict, two: dict) -> None:
    print(f"\n{'phase':10s} {'metric':28s} {'1 process':>14s} {'2 processes':>14s} {'rel diff':>9s}")
    for phase in sorted(one):
        for key in sorted(one[phase]):
            a, b = one[phase][key], two.get(phase, {}).get(key)
            rel = abs(a - b) / max(abs(a), 1e-12) if b is not None else float("nan")
            print(f"{phase:10s} {key:28s} {a:14.8g} {b if b is None else format(b, '14.8g'):>14s} {rel:9.1e}")


DISCRETE = ("accuracies", "accuracy", "gold", "win_rate", "answer_length", "mean_length", "samples", "steps", "pairs")


@pytest.mark.slow
def test_two_processes_end_with_the_round_table_of_one(tmp_path):
    cache = tmp_path / "jax_cache"
    one, two = tmp_path / "one", tmp_path / "two"
    t0 = time.monotonic()
    (rc,) = _wait([_launch(one, cache, tmp_path / "one.log", devices=2, distributed="off")], RUN_TIMEOUT)
    assert rc == 0, (tmp_path / "one.log").read_text()[-4000:]
    t1 = time.monotonic()
    for i, (rc, log) in enumerate(_two_processes((two, two), cache, tmp_path, RUN_TIMEOUT)):
        assert rc == 0, f"process {i} exited {rc}:\n{log[-4000:]}"
    print(f"\n1 process: {t1 - t0:.0f} s, 2 processes: {time.monotonic() - t1:.0f} s")

    expected, got = _table(one), _table(two)
    _print_tables(expected, got)
    assert set(expected) == set(got) == PHASES
    for phase in expected:
        assert set(got[phase]) == set(expected[phase]), phase
        for key, want in expected[phase].items():
            if any(d in key for d in DISCRETE):
                assert got[phase][key] == want, f"{phase} {key}: {got[phase][key]} vs {want}"
            else:
                np.testing.assert_allclose(got[phase][key], want, rtol=RTOL, atol=ATOL, err_msg=f"{phase} {key}")
    # what the discrete metrics rest on: the same sampled tokens and the same greedy answers
    for name in ("r1_sample/samples.json",):
        assert json.loads((two / "phases" / name).read_text()) == json.loads((one / "phases" / name).read_text())
    for name in ("eval0", "r1_eval"):
        a, b = (json.loads((w / "phases" / name / "eval.json").read_text()) for w in (one, two))
        assert b["answer_ids"] == a["answer_ids"], name
    # only process 0 wrote: one report, one set of models, and no process wrote a second copy of the demo assets
    assert (two / "report.md").is_file() and (two / "assets" / "demo_task.json").is_file()
    for name in ("sft", "r1_reward", "r1_policy"):
        assert (two / "phases" / name / "model" / "model.safetensors").is_file(), name


@pytest.mark.slow
def test_separate_work_directories_are_refused_on_every_process(tmp_path):
    """Both processes exit 2 naming the fix, having written nothing but process 0's token. "Within a minute" is
    checked as CPU time (both processes together, under ``REFUSE_CPU_S``) with a wall-clock limit three times that:
    measured 21 s CPU and 36 s wall on 2 cores shared with other work, whose wall time says more about the neighbours
    than about the refusal."""
    cache = tmp_path / "jax_cache"
    t0, cpu0 = time.monotonic(), _children_cpu()
    results = _two_processes((tmp_path / "host0", tmp_path / "host1"), cache, tmp_path, 3 * REFUSE_CPU_S)
    took, cpu = time.monotonic() - t0, _children_cpu() - cpu0
    print(f"\nrefused after {took:.0f} s wall, {cpu:.0f} s CPU (both processes)")
    for i, (rc, log) in enumerate(results):
        assert rc == 2, f"process {i} exited {rc}:\n{log[-4000:]}"
        assert "is not shared by the 2 processes of this run: process(es) [1] do not see the file process 0 wrote" \
            in log and "--workdir gs://BUCKET/PATH" in log, log[-3000:]
    assert cpu < REFUSE_CPU_S, f"the refusal took {cpu:.0f} CPU seconds ({took:.0f} s wall)"
    # refused before anything but process 0's token was written
    assert [p.name for p in (tmp_path / "host0").iterdir()] == [".jaxalign-hosts"]
    assert not (tmp_path / "host1").exists() or not any((tmp_path / "host1").iterdir())
