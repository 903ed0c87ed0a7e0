"""Two real JAX processes on this machine (gloo collectives over 127.0.0.1, 4 CPU devices each, one (2,2,2) mesh over
the 8): each reads its own shard of every batch, and together they train, log and checkpoint what one process with 8
devices does; a SIGTERM to one of them stops both at the same step; their checkpoint resumes on 2 processes or on 1.

Tolerances: the 2-process global batch holds the same rows as the 1-process one but in another order (each process
takes every other row of the stream), and gloo sums across processes in its own order, so 2 vs 1 process agree to
float32 rounding (losses to 1e-5 relative, params and optimizer moments to 2e-5 absolute after 40 AdamW steps), while
2 processes vs 2 processes, interrupted or not, agree bit for bit.
"""
from __future__ import annotations

import numpy as np
import pytest

from engine_script import (EXIT_PREEMPTED, committed_steps, copy_workdir, load_params, read_checkpoint,
                           read_data_states, read_losses, read_rows, reference_run, run_multiprocess, run_script,
                           uncommitted)

TIMEOUT = 420  # seconds for a 2-process run (both start, connect, compile from the shared cache, 40 steps)
STEPS = 40


def _check_ok(results):
    for i, (rc, log) in enumerate(results):
        assert rc == 0, f"process {i} exited {rc}:\n{log[-4000:]}"


def _union_rows(workdir):
    p0, p1 = read_rows(workdir, 0), read_rows(workdir, 1)
    assert sorted(p0) == sorted(p1)
    for step in p0:
        assert not set(p0[step]) & set(p1[step]), f"step {step}: the two processes read overlapping rows"
    return {step: sorted(p0[step] + p1[step]) for step in p0}


def _assert_close_params(a, b, atol):
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=atol, err_msg=k)


@pytest.fixture(scope="module")
def reference():
    return reference_run()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    wd = tmp_path_factory.mktemp("two") / "run"
    _check_ok(run_multiprocess(wd, timeout=TIMEOUT))
    return wd


@pytest.mark.slow
def test_two_processes_equal_one(reference, two_processes):
    wd = two_processes
    # each process read its own half of every global batch, and together the same rows as the single process
    assert _union_rows(wd) == {s: sorted(r) for s, r in read_rows(reference).items()}
    # the loss trajectory (logged by process 0, a global value) matches
    ours, theirs = read_losses(wd), read_losses(reference)
    assert sorted(ours) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([ours[s] for s in sorted(ours)], [theirs[s] for s in sorted(ours)], rtol=1e-5)
    _assert_close_params(load_params(wd), load_params(reference), 2e-5)
    # the checkpoint both processes wrote holds the same train state (params, optimizer moments, step) and a data
    # position for each process that equals the single process's
    assert committed_steps(wd)[-1] == committed_steps(reference)[-1] == STEPS and not uncommitted(wd)
    ours, theirs = read_checkpoint(wd, STEPS), read_checkpoint(reference, STEPS)
    assert sorted(ours) == sorted(theirs)
    _assert_close_params(ours, theirs, 2e-5)
    states = read_data_states(wd, STEPS)
    assert sorted(states) == ["process_0-of-2.json", "process_1-of-2.json"]
    assert states["process_0-of-2.json"] == states["process_1-of-2.json"] == \
        read_data_states(reference, STEPS)["process_0-of-1.json"]


@pytest.mark.slow
def test_sigterm_to_one_process_then_resume_on_two_or_one(reference, two_processes, tmp_path):
    """SIGTERM reaches process 1 only, after step 20: the all-gather in PreemptionGuard makes both save step 20 and
    exit 75. The same command on 2 processes ends bit-identical to the uninterrupted 2-process run; a copy of the
    checkpoint resumed by one process (8 devices) ends where the 1-process run ends, on the same batches."""
    wd = tmp_path / "run"
    results = run_multiprocess(wd, "--sigterm-at", "20", "--sigterm-process", "1", timeout=TIMEOUT)
    for i, (rc, log) in enumerate(results):
        assert rc == EXIT_PREEMPTED, f"process {i} exited {rc}:\n{log[-4000:]}"
        msgs = [line for line in log.splitlines() if "resume with the same command" in line]
        assert len(msgs) == 1 and "at step 20 " in msgs[0], log[-3000:]
    assert "SIGTERM to self" in results[1][1] and "SIGTERM to self" not in results[0][1]
    assert committed_steps(wd)[-1] == 20 and not uncommitted(wd)
    assert sorted(read_data_states(wd, 20)) == ["process_0-of-2.json", "process_1-of-2.json"]
    one = copy_workdir(wd, tmp_path / "one")

    _check_ok(run_multiprocess(wd, "--sigterm-at", "20", "--sigterm-process", "1", timeout=TIMEOUT))
    a, b = load_params(wd), load_params(two_processes)
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert read_losses(wd) == read_losses(two_processes)
    assert _union_rows(wd) == _union_rows(two_processes)

    p = run_script(one, timeout=TIMEOUT)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "training from step 20" in p.stdout
    _assert_close_params(load_params(one), load_params(reference), 2e-5)
    ref_rows = read_rows(reference)
    rows = read_rows(one, 0)  # the single process logged whole global batches from step 21 on
    assert {s: r for s, r in rows.items() if s > 20} == {s: r for s, r in ref_rows.items() if s > 20}
    ours, theirs = read_losses(one), read_losses(reference)
    np.testing.assert_allclose([ours[s] for s in range(21, STEPS + 1)], [theirs[s] for s in range(21, STEPS + 1)],
                               rtol=1e-5)
