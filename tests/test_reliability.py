"""Faults a long run meets, and what the engine does about each: preemption (SIGTERM), kill -9, a non-finite step, a
full disk. The phase runs as a real process (tests/engine_script.py: a tiny SFT phase, 40 steps on a (2,2,2) mesh of
8 CPU devices) and every interrupted run is resumed with the same command until it ends; the final params must equal
an uninterrupted run's bit for bit (CPU), and the batches must be the same ones in the same order.

Fault table (what each test injects and what must hold):

| fault                        | injected by                                | must hold                            |
|------------------------------|--------------------------------------------|--------------------------------------|
| SIGTERM at a step boundary   | the script signals itself after step S     | exit 75 + one-line message, step S   |
|                              |                                            | saved; resume: bit-identical, same   |
|                              |                                            | batches                              |
| SIGTERM during an async save | a timer thread right after a save starts   | the same                             |
| kill -9, 20 seeded trials    | SIGKILL at a random moment, save_every=1   | resume: bit-identical; <= 2 steps    |
|                              | (most land inside an orbax save)           | redone per kill; torn saves ignored  |
| NaN loss                     | an out-of-vocabulary id in one example     | NonFiniteError names step, metric,   |
|                              |                                            | row id; last good checkpoint intact  |
| NaN loss, skip_nonfinite     | the same                                   | counted; the step changes nothing;   |
|                              |                                            | training goes on                     |
| disk full                    | shutil.disk_usage reports no space         | DiskFullError, previous step intact; |
|                              |                                            | a re-run resumes and finishes        |
"""
from __future__ import annotations

import collections
import random
import re
import signal
import time

import jax
import numpy as np
import pytest

import engine_fixtures as fx
from engine_script import (EXIT_PREEMPTED, _init_params, committed_steps, launch, load_params,
                           read_losses, read_rows, reference_run, row_records, run_script, uncommitted)
from jaxalign import sharding
from jaxalign.checkpoint import DiskFullError, PhaseCheckpointer
from jaxalign.train.loop import NonFiniteError
from jaxalign.train.optim import OptimConfig, make_optimizer
from jaxalign.train.run import PhaseSettings, make_dataset, train
from jaxalign.train.state import create_state
from jaxalign.train.steps import StepConfig

TIMEOUT = 300  # seconds for one subprocess run (start-up, compile from the shared cache, 40 tiny steps)


def assert_same_run(workdir, reference):
    """Bit-identical final params, the same batch (row ids) at every step, the same logged losses."""
    ref, got = load_params(reference), load_params(workdir)
    assert sorted(ref) == sorted(got)
    for name in ref:
        assert np.array_equal(ref[name], got[name]), f"{name} differs by {np.abs(ref[name] - got[name]).max()}"
    assert read_rows(workdir) == read_rows(reference)
    assert read_losses(workdir) == read_losses(reference)


@pytest.fixture(scope="module")
def reference():
    return reference_run()


# ---- preemption -----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_at_several_steps_resumes_bit_exact(reference, tmp_path):
    """One command, run until it succeeds: SIGTERM after step 7, after step 20 (= N/2), and from a timer thread while
    the async save of step 28 is in flight. Each run exits 75 with a one-line message; the last one finishes."""
    wd = tmp_path / "run"
    cmd = ("--sigterm-at", "7,20", "--sigterm-after-save", "28")
    stops = []
    for expected in (7, 20, None):
        p = run_script(wd, *cmd, timeout=TIMEOUT)
        out = p.stdout + p.stderr
        assert p.returncode == EXIT_PREEMPTED, out[-3000:]
        lines = [line for line in out.splitlines() if "resume with the same command" in line]
        assert len(lines) == 1, out[-3000:]
        step = int(re.search(r"at step (\d+)", lines[0]).group(1))
        if expected is None:  # the signal came from another thread while step 28's save was being written
            assert "async save in flight: True" in out, out[-3000:]
            assert 29 <= step <= 31, lines[0]  # noticed at the next step boundary (or soon after)
        else:
            assert step == expected, lines[0]
        assert committed_steps(wd)[-1] == step and not uncommitted(wd)
        stops.append(step)
    p = run_script(wd, *cmd, timeout=TIMEOUT)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert f"training from step {stops[-1]}" in p.stdout
    assert_same_run(wd, reference)


@pytest.mark.slow
def test_kill9_at_random_moments(reference, tmp_path):
    """20 seeded kill -9 trials (save_every=1, so most kills hit an async save); each kill is followed by a resume with
    the same command; every chain of resumes ends with the uninterrupted run's params and batches."""
    rng = random.Random(8)
    trials = []
    chain = 0
    while len(trials) < 20:
        chain += 1
        wd = tmp_path / f"chain{chain}"
        wd.mkdir()
        finished = False
        while len(trials) < 20 and not finished:
            log = wd / f"log{len(trials)}.txt"
            seen = len(row_records(wd))
            p = launch(wd, "--save-every", "1", log=log)
            # wait until this run has trained two steps (start-up and the first save's set-up are behind it), then
            # kill at a random moment within the next two step times (each step includes starting a save)
            deadline = time.monotonic() + TIMEOUT
            while len(new := row_records(wd)[seen:]) < 3 and p.poll() is None:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.02)
            start = re.search(r"training from step (\d+)", log.read_text())
            if len(new) >= 3:
                time.sleep(rng.uniform(0.0, 2.0) * (new[2]["time"] - new[1]["time"]))
            if p.poll() is not None:  # the phase ended before the kill: this chain is complete
                assert p.returncode == 0, log.read_text()[-3000:]
                finished = True
                break
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=60)
            trained = max(read_rows(wd), default=0)
            committed = max(committed_steps(wd), default=0)
            torn = uncommitted(wd)
            trials.append(dict(chain=chain, start=int(start.group(1)) if start else None, trained=trained,
                               committed=committed, inside_save=bool(torn), log=log))
            assert trained - committed <= 2, trials[-1]  # at most the step being saved and the one after it
        log = wd / "log-final.txt"
        p = launch(wd, "--save-every", "1", log=log)
        assert p.wait(timeout=TIMEOUT) == 0, log.read_text()[-3000:]
        assert_same_run(wd, reference)
    # a run that follows a kill inside a save reports the partial checkpoint it skipped
    for i, t in enumerate(trials):
        if t["inside_save"]:
            nxt = trials[i + 1]["log"] if i + 1 < len(trials) and trials[i + 1]["chain"] == t["chain"] else \
                t["log"].with_name("log-final.txt")
            assert "ignored partially written checkpoint" in nxt.read_text(), nxt
    inside = sum(t["inside_save"] for t in trials)
    redone = collections.Counter(t["trained"] - t["committed"] for t in trials)
    print(f"\nkill -9: {len(trials)} kills over {chain} chain(s); {inside} landed inside an orbax save; steps redone "
          f"after a kill: {dict(sorted(redone.items()))}")
    for t in trials:
        print(f"  chain {t['chain']}: resumed at {t['start']}, killed after step {t['trained']}, last committed "
              f"{t['committed']}, inside save: {t['inside_save']}")
    assert inside >= 1


# ---- non-finite steps -----------------------------------------------------------------------------------------------
CFG = fx.tiny_cfg()
SETTINGS = dict(global_batch_size=8, num_epochs=1, save_every=1, keep_checkpoints=10, async_checkpointing=True,
                show_progress=False)


@pytest.fixture(scope="module")
def poisoned():
    """32 SFT examples, one of which (in the third batch) holds an out-of-vocabulary id: its loss is NaN."""
    examples = fx.sft_examples(32)
    ds = make_dataset("sft", examples, PhaseSettings(**SETTINGS), pad_id=0, buckets=(32,))
    it = iter(ds)
    batches = [next(it) for _ in range(3)]
    row = int(batches[2]["row_id"][3])
    bad = dict(examples[row])
    bad["input_ids"] = np.array(bad["input_ids"])
    bad["input_ids"][2] = CFG.vocab_size + 1000  # jnp.take fills NaN outside the table
    examples[row] = bad
    return examples, row


def _train(examples, workdir, *, skip, counters=None):
    return train(cfg=CFG, params=_init_params(CFG, "sft"), examples=examples, phase_dir=workdir,
                 mesh=sharding.single_device_mesh(), step_cfg=StepConfig("sft"),
                 optim=OptimConfig(learning_rate=1e-2, warmup_ratio=0), pad_id=0, buckets=(32,),
                 settings=PhaseSettings(skip_nonfinite=skip, **SETTINGS), counters=counters)


def _restore_params(workdir, step):
    optimizer, _ = make_optimizer(OptimConfig(learning_rate=1e-2, warmup_ratio=0), 4)
    like = create_state(_init_params(CFG, "sft"), optimizer, sharding.single_device_mesh())
    ck = PhaseCheckpointer(workdir / "checkpoints")
    try:
        state, meta = ck.restore(step, like)
    finally:
        ck.close()
    assert meta["step"] == step
    return jax.device_get(state)


@pytest.fixture(scope="module")
def skipped_run(poisoned, tmp_path_factory):
    examples, _ = poisoned
    wd = tmp_path_factory.mktemp("skip") / "phase"
    counters = {}
    params = _train(examples, wd, skip=True, counters=counters)
    return wd, counters, jax.device_get(params)


def test_nonfinite_step_stops_with_a_diagnostic(poisoned, skipped_run, tmp_path):
    examples, row = poisoned
    wd = tmp_path / "phase"
    with pytest.raises(NonFiniteError) as err:
        _train(examples, wd, skip=False)
    msg = str(err.value)
    assert "step 3" in msg and "loss" in msg and "grad_norm" in msg and str(row) in msg, msg
    assert "last good checkpoint is step 2" in msg, msg
    ck = PhaseCheckpointer(wd / "checkpoints")
    try:
        assert ck.latest_step() == 2 and ck.ignored == []
    finally:
        ck.close()
    # the last good checkpoint is intact: the same state the skipping run saved after step 2
    mine, theirs = _restore_params(wd, 2), _restore_params(skipped_run[0], 2)
    jax.tree.map(np.testing.assert_array_equal, mine, theirs)


def test_skip_nonfinite_counts_and_goes_on(skipped_run):
    wd, counters, final = skipped_run
    assert counters == {"nonfinite_steps_skipped": 1}
    s2, s3, s4 = (_restore_params(wd, s) for s in (2, 3, 4))
    # step 3 (the poisoned batch) changed nothing, not even the optimizer's step count; step 4 trained again
    jax.tree.map(np.testing.assert_array_equal, s2, s3)
    assert int(s3.step) == 2 and int(s4.step) == 3
    assert any(not np.array_equal(s3.params[k], s4.params[k]) for k in s3.params)
    jax.tree.map(np.testing.assert_array_equal, final, s4.params)


# ---- disk full ------------------------------------------------------------------------------------------------------
def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ck = PhaseCheckpointer(tmp_path / "ck", min_free_bytes=0)
    state = {"w": jax.numpy.arange(1024, dtype=jax.numpy.float32)}
    ck.save(1, state)
    ck.wait()
    real = __import__("shutil").disk_usage
    Usage = collections.namedtuple("Usage", "total used free")
    monkeypatch.setattr("jaxalign.checkpoint.shutil.disk_usage", lambda p: Usage(10**9, 10**9, 1000))
    with pytest.raises(DiskFullError, match=r"previous checkpoint \(step 1\) is intact"):
        ck.save(2, {"w": state["w"] + 1})
    monkeypatch.setattr("jaxalign.checkpoint.shutil.disk_usage", real)
    ck.wait()
    assert ck.latest_step() == 1 and not any("tmp" in p.name for p in (tmp_path / "ck").iterdir())
    restored, _ = ck.restore(1, state)
    np.testing.assert_array_equal(restored["w"], state["w"])
    ck.close()
    # a reserve larger than what is free refuses the save just the same
    ck = PhaseCheckpointer(tmp_path / "ck", min_free_bytes=real(tmp_path).free * 4)
    with pytest.raises(DiskFullError):
        ck.save(2, state)
    ck.close()


def test_disk_full_during_training_then_resume(poisoned, skipped_run, tmp_path, monkeypatch):
    """The disk fills before the third save: train raises DiskFullError with step 2 committed; after space is freed
    the same call resumes and ends where an uninterrupted run ends (the skipping run's params)."""
    examples, _ = poisoned
    real = __import__("shutil").disk_usage
    Usage = collections.namedtuple("Usage", "total used free")
    calls = []

    def usage(path):
        calls.append(path)
        return real(path) if len(calls) <= 2 else Usage(10**9, 10**9, 0)

    monkeypatch.setattr("jaxalign.checkpoint.shutil.disk_usage", usage)
    wd = tmp_path / "phase"
    with pytest.raises(DiskFullError, match=r"step 2\) is intact"):
        _train(examples, wd, skip=True)
    monkeypatch.setattr("jaxalign.checkpoint.shutil.disk_usage", real)
    assert sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit()) == [1, 2]
    final = jax.device_get(_train(examples, wd, skip=True))
    jax.tree.map(np.testing.assert_array_equal, final, skipped_run[2])


def test_exit_code_constant():
    from jaxalign.train import loop

    assert loop.EXIT_PREEMPTED == EXIT_PREEMPTED == 75
