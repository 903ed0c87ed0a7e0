"""The pipeline through its launcher, as a user runs it.

- Bad input (unknown key, impossible phase order, missing model / data / split, a work directory holding another
  run, a mesh or batch that cannot work): ``launch/tpu_run.py`` main() returns 2 with a one-paragraph message on stderr
  before anything is compiled or written (no compilation event, no phases/ directory).
- Recipes end to end (slow): ultrachat_dil and ultrachat_irl with their model swapped for a tiny random-init Llama and
  their data for local slices in the same formats, through ``key=value`` overrides, in a launcher subprocess;
  colab_smoke the same way, but through launch/colab_smoke.ipynb executed with nbclient (its install cell skipped).
- Interruption (slow): a shrunk CPU demo killed with SIGKILL mid-phase and stopped with SIGTERM (exit 75), each re-run
  with the same command, ends with the same phase metrics and bit-identical model files as an uninterrupted run.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import tiny_recipe
from tiny_recipe import LAUNCHER, REPO

# ---- shared fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny(shared_data, tmp_path_factory):
    """One tiny checkpoint, the zephyr tokenizer and the local data slices for the whole session."""
    root = tmp_path_factory.mktemp("tiny_recipe")
    return {"model": tiny_recipe.make_tiny_llama(root / "model"), "tokenizer": shared_data / tiny_recipe.TOKENIZER,
            "slices": tiny_recipe.write_slices(shared_data, root / "data")}


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory):
    """A persistent compilation cache shared by this session's launcher subprocesses."""
    return tmp_path_factory.mktemp("jax_cache")


def _overrides(name: str, tiny) -> list[str]:
    return tiny_recipe.recipe_overrides(name, tiny["model"], tiny["tokenizer"], tiny["slices"])


def _launcher():
    spec = importlib.util.spec_from_file_location("jaxalign_tpu_run", LAUNCHER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- bad input: exit 2, a clear message, nothing compiled ---------------------------------------------------------

_COMPILES: list[str] = []
_COUNTING = [False]


def _count_compiles(name, duration, **kw):
    if _COUNTING[0] and name == "/jax/core/compile/backend_compile_duration":
        _COMPILES.append(name)


@pytest.fixture(scope="module")
def launcher():
    from jax import monitoring

    monitoring.register_event_duration_secs_listener(_count_compiles)
    return _launcher()


def _run_bad(launcher, capsys, workdir: Path, config: str, overrides: list[str]) -> str:
    before = sorted(p.relative_to(workdir) for p in workdir.rglob("*")) if workdir.exists() else None
    _COMPILES.clear()
    _COUNTING[0] = True
    try:
        rc = launcher.main(["--config", config, "--workdir", str(workdir), *overrides])
    finally:
        _COUNTING[0] = False
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]  # (datasets' progress bars)
    assert lines[-1].startswith("jaxalign: error: ") and sum("jaxalign" in line for line in lines) == 1, err
    assert not _COMPILES, "something was compiled before the error"
    after = sorted(p.relative_to(workdir) for p in workdir.rglob("*")) if workdir.exists() else None
    assert after == before, "the work directory changed (or was created)"
    return err


def test_bad_input_unknown_key(launcher, capsys, tmp_path):
    err = _run_bad(launcher, capsys, tmp_path / "w", "ultrachat_dil", ["policy.learnig_rate=1e-6"])
    assert "unknown config key 'policy.learnig_rate'" in err and "Did you mean policy.learning_rate" in err


def test_bad_input_phase_order(launcher, capsys, tmp_path, tiny):
    err = _run_bad(launcher, capsys, tmp_path / "w", "ultrachat_irl",
                   _overrides("ultrachat_irl", tiny) + ["run.phases=sample,policy,reward,eval"])
    assert "policy before any reward model" in err and "sample,reward,policy,eval" in err


def test_bad_input_missing_model(launcher, capsys, tmp_path, tiny):
    # batches that split over the 8 CPU devices here: the mesh / batch check runs first (it needs no model)
    ov = _overrides("ultrachat_dil", tiny) + ["policy.accum_steps=1"]
    err = _run_bad(launcher, capsys, tmp_path / "w", "ultrachat_dil", ov + [f"model.path={tmp_path / 'no_model'}"])
    assert "no_model: model folder not found" in err
    err = _run_bad(launcher, capsys, tmp_path / "w", "ultrachat_dil", ov + ["model.path="])
    assert "model.path is empty" in err


def test_bad_input_missing_data_or_split(launcher, capsys, tmp_path, tiny):
    # one micro-batch of 8 pairs: the 8 CPU devices here split it (the tiny recipe's 2 x 4 would be refused first)
    ov = _overrides("ultrachat_dil", tiny) + ["policy.accum_steps=1"]
    err = _run_bad(launcher, capsys, tmp_path / "w", "ultrachat_dil", ov + ["data.train.split=train_prefs"])
    assert "The split 'train_prefs' does not exist" in err and "['train']" in err
    err = _run_bad(launcher, capsys, tmp_path / "w", "ultrachat_dil", ov + [f"data.train.source={tmp_path}/x.jsonl"])
    assert "x.jsonl' does not exist" in err


def test_bad_input_workdir_of_another_run(launcher, capsys, tmp_path, tiny):
    from jaxalign import config as config_lib

    work = tmp_path / "w"
    (work / "phases" / "sft").mkdir(parents=True)
    (work / "phases" / "sft" / "done.json").write_text("{}")
    (work / "run.yaml").write_text(config_lib.dump(config_lib.load("demo_cpu")))
    err = _run_bad(launcher, capsys, work, "ultrachat_dil", _overrides("ultrachat_dil", tiny))
    assert "holds a different run (name='demo_cpu', method='irl')" in err and "--workdir" in err


def test_bad_input_mesh_and_batch(launcher, capsys, tmp_path, tiny):
    """8 CPU devices here: a mesh that does not tile them, a batch that does not split over them."""
    ov = _overrides("ultrachat_dil", tiny)
    err = _run_bad(launcher, capsys, tmp_path / "w", "ultrachat_dil", ov + ["mesh.fsdp=3"])
    assert "mesh: data*fsdp*tensor = 1*3*1 = 3 but there are 8 devices" in err
    err = _run_bad(launcher, capsys, tmp_path / "w", "ultrachat_dil", ov + ["policy.batch_size=12",
                                                                          "policy.accum_steps=1"])
    assert "policy.batch_size=12 with policy.accum_steps=1 gives micro-batches of 12 rows" in err
    assert "the mesh's 8 batch shards" in err
    # the micro-batch, not only the global batch: 16 pairs in 4 micro-batches of 4 cannot split over 8 devices
    err = _run_bad(launcher, capsys, tmp_path / "w", "ultrachat_dil", ov + ["policy.batch_size=16",
                                                                          "policy.accum_steps=4"])
    assert "micro-batches of 4 rows" in err


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_outside_a_training_loop_exits_75(sig, launcher, capsys, tmp_path, tiny, monkeypatch):
    """SIGTERM or SIGINT while loading / sampling / evaluating stops the run like Ctrl-C: exit 75 with the resume hint
    (inside a training loop the loop saves a checkpoint first: the slow interruption test covers that). SIGINT arrives
    ignored here, as a non-interactive shell's `cmd &` starts it: CI lost a Ctrl-C during sampling that way."""
    from jaxalign.pipeline.runner import Pipeline

    signum = getattr(signal, sig)

    def run(self):
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler raises here
        raise AssertionError(f"{sig} did not stop the run")

    monkeypatch.setattr(Pipeline, "run", run)
    outer = signal.signal(signal.SIGINT, signal.SIG_IGN) if sig == "SIGINT" else None
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        rc = launcher.main(["--config", "ultrachat_dil", "--workdir", str(tmp_path / "w"),
                            *_overrides("ultrachat_dil", tiny)])
        assert rc == 75 and "re-run the same command to resume" in capsys.readouterr().err
        # the launcher restores the handlers it replaced
        assert {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)} == previous
    finally:
        if outer is not None:
            signal.signal(signal.SIGINT, outer)


# ---- recipes end to end on the tiny model ----------------------------------------------------------------------------

def _launch(config: str, workdir: Path, overrides: list[str], cache: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(LAUNCHER), "--config", config, "--workdir", str(workdir), *overrides],
                            cwd=REPO, env=tiny_recipe.subprocess_env(cache), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def _finish(proc: subprocess.Popen, timeout: float = 900) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _done(workdir: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted((workdir / "phases").glob("*/done.json"))}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ultrachat_dil", "ultrachat_irl"])
def test_recipe_runs_end_to_end_on_a_tiny_model(name, tiny, jax_cache, tmp_path):
    from jaxalign import config as config_lib
    from jaxalign.pipeline.phases import plan

    work = tmp_path / name
    overrides = _overrides(name, tiny)
    rc, out = _finish(_launch(name, work, overrides, jax_cache))
    assert rc == 0, out[-4000:]
    cfg = config_lib.load(name, overrides)
    phases = plan(cfg)
    done = _done(work)
    assert set(done) == {p.dir_name for p in phases}, out[-2000:]
    report = (work / "report.md").read_text()
    assert f"# jaxalign run: {name}" in report and f"{len(phases)} of {len(phases)} phases finished" in report
    assert (work / "plots" / "curves.png").is_file()
    for info in done.values():  # every training phase ran its few steps
        if info["kind"] in ("policy", "reward"):
            assert info["metrics"]["steps"] == 2 and info["metrics"]["loss"] == info["metrics"]["loss"]
    rounds = max(p.round for p in phases)
    last_policy = work / "phases" / f"r{rounds}_policy" / "model"
    # the run's last lines say where the aligned model and the report are
    assert f"[jaxalign] final model (r{rounds}/policy): {last_policy}" in out, out[-1500:]
    assert f"[jaxalign] report: {work / 'report.md'}" in out
    from jaxalign.models import from_pretrained

    import numpy as np

    trained, start = from_pretrained(last_policy), from_pretrained(tiny["model"])
    assert trained.cfg == start.cfg  # same architecture, written back in the master-weight dtype (float32)
    before, after = start.param_dict(), trained.param_dict()
    assert before.keys() == after.keys() and any(not np.array_equal(after[k], before[k]) for k in before)
    if name == "ultrachat_dil":  # LSIF at the reference point: -exp(0) + exp(0)/2; trained on given pairs
        assert done["r1_policy"]["metrics"]["pairs"] == 32
        # the same run with the reference log-probs computed once before the phase (no reference weights in the
        # step) trains the same policy: same logged metrics, same weights up to float rounding
        pre = tmp_path / "precomputed"
        rc, out = _finish(_launch(name, pre, overrides + ["policy.precompute_reference=true"], jax_cache))
        assert rc == 0, out[-4000:]
        assert list((pre / "phases" / "r1_policy" / "reference").glob("*.npz")), "no reference cache written"
        a, b = done["r1_policy"]["metrics"], _done(pre)["r1_policy"]["metrics"]
        for key in ("loss", "rewards/accuracies", "rewards/margins"):
            assert abs(a[key] - b[key]) <= 1e-3 * max(1.0, abs(a[key])), (key, a[key], b[key])
        again = from_pretrained(pre / "phases" / "r1_policy" / "model").param_dict()
        for k in after:
            np.testing.assert_allclose(again[k], after[k], rtol=0, atol=2e-3 * float(np.abs(after[k]).max()) + 1e-6)
    else:  # two IRL rounds: RM pairs accumulate, the RM is scored on held-out pairs, best-of-N pairs feed DPO
        assert done["r2_policy"]["metrics"]["pairs"] > 0
        for k in (1, 2):
            assert 0.0 <= done[f"r{k}_eval"]["metrics"]["rm_heldout_accuracy"] <= 1.0
        assert "rm_heldout_accuracy" in report
        samples = json.loads((work / "phases" / "r2_sample" / "samples.json").read_text())
        assert samples["num_samples"] == 2 and len(samples["row_ids"]) == 16


# ---- interruption: SIGKILL / SIGTERM and re-run == uninterrupted, bit for bit ---------------------------------------

SHRUNK_DEMO = [
    "run.rounds=1", "run.show_progress=false", "reliability.async_checkpointing=true",
    "sft.epochs=1", "sft.max_steps=12", "sft.save_every=4",
    "sample.limit=32", "sample.max_new_tokens=8", "policy.num_samples=2",
    "reward.batch_size=16", "reward.epochs=4", "reward.save_every=3",  # 8 steps
    "policy.batch_size=8", "policy.save_every=1", "policy.max_steps=3",
    "eval.num_prompts=16", "eval.max_new_tokens=8", "data.eval_prefs.limit=32",
    "policy.objective=dpo", "eval.eval_steps=2",  # a DPO step, held-out metrics at steps 2 and 3
]
TIMING_KEYS = {"tokens_per_second", "sample_tokens_per_second", "mfu", "seconds"}


def _wait_for(proc: subprocess.Popen, ready, what: str, timeout: float = 600) -> None:
    t0 = time.time()
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before {what}:\n{proc.stdout.read()[-3000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def _committed(checkpoints: Path) -> list[int]:
    return sorted(int(p.name) for p in checkpoints.glob("*") if p.name.isdigit()) if checkpoints.is_dir() else []


def _logged_steps(phase_dir: Path) -> int:
    f = phase_dir / "tb" / "metrics.jsonl"
    return f.read_text().count("\n") if f.is_file() else 0


def _snapshot(work: Path) -> dict:
    """Everything a run produces that must not depend on interruptions: metrics, samples, answers, model bytes."""
    out = {}
    for name, info in _done(work).items():
        out[f"{name}/metrics"] = {k: v for k, v in info["metrics"].items() if k not in TIMING_KEYS}
    for f in sorted((work / "phases").glob("*/model/*.safetensors")) + sorted((work / "phases").glob("*/*.json")):
        if f.name not in ("done.json", "eval.json"):  # samples.json, normalization.json: byte for byte
            out[str(f.relative_to(work))] = f.read_bytes()
    for f in sorted((work / "phases").glob("*/eval.json")):
        ev = json.loads(f.read_text())
        ev["metrics"] = {k: v for k, v in ev["metrics"].items() if k not in TIMING_KEYS}
        out[str(f.relative_to(work))] = ev
    return out


@pytest.mark.slow
def test_interrupted_demo_resumes_to_identical_results(tmp_path_factory):
    """Shrunk demo (1 IRL round, 12 SFT steps, 8 RM steps, 3 policy steps): uninterrupted vs SIGKILL in the SFT
    phase after its first checkpoint -> re-run -> Ctrl-C while sampling (exit 75) -> re-run -> SIGTERM in the RM
    phase after its first step (exit 75, a checkpoint saved) -> re-run. Every phase's done.json metrics (timings
    aside), the samples, the eval answers and every model's safetensors bytes are identical."""
    cache = tmp_path_factory.mktemp("demo_jax_cache")
    base = tmp_path_factory.mktemp("demo_runs")
    a, b = base / "a", base / "b"

    rc, out = _finish(_launch("demo_cpu", a, SHRUNK_DEMO, cache))
    assert rc == 0, out[-4000:]
    expected = _snapshot(a)
    assert {"sft", "eval0", "r1_sample", "r1_reward", "r1_policy", "r1_eval"} == set(_done(a))
    # a finished phase keeps its exported model and drops its training checkpoints (reliability.
    # keep_finished_checkpoints=false, the default), and a re-run still skips it
    for name in ("sft", "r1_reward", "r1_policy"):
        assert (a / "phases" / name / "model" / "config.json").is_file()
        assert not (a / "phases" / name / "checkpoints").exists(), name
    rc, out = _finish(_launch("demo_cpu", a, SHRUNK_DEMO, cache))
    assert rc == 0, out[-4000:]
    for name in ("sft", "eval0", "r1/sample", "r1/reward", "r1/policy", "r1/eval"):
        assert f"{name}: finished earlier, skipped" in out
    # held-out metrics while training (eval.eval_steps=2 of 3 DPO steps): TRL's tags in tensorboard, eval_* in
    # done.json and in the report's phase table
    from test_trackers import read_tensorboard

    tb = read_tensorboard(a / "phases" / "r1_policy" / "tb")
    assert {(tag, step) for tag in ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins")
            for step in (2, 3)} <= set(tb)
    policy = _done(a)["r1_policy"]["metrics"]
    assert policy["eval_rewards/accuracies"] == pytest.approx(tb[("eval/rewards/accuracies", 3)])
    assert 0.0 <= policy["eval_rewards/accuracies"] <= 1.0
    # the RM on held-out (demonstration, own answer) pairs: the SFT model's greedy eval answers that differ from the
    # demonstration, recounted here from eval0's file with the demo's character tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a / "assets" / "tokenizer")
    sft_eval = json.loads((a / "phases" / "eval0" / "eval.json").read_text())
    differ = sum(tok.encode(d, add_special_tokens=False) != ids
                 for d, ids in zip(sft_eval["demonstrations"], sft_eval["answer_ids"]))
    r1 = _done(a)["r1_eval"]["metrics"]
    assert r1["rm_demo_vs_sample_pairs"] == differ > 0
    assert (r1["rm_demo_vs_sample_accuracy"] * differ) == pytest.approx(round(r1["rm_demo_vs_sample_accuracy"] * differ))
    reward_tb = read_tensorboard(a / "phases" / "r1_reward" / "tb")
    assert {("eval/rewards/accuracies", 8), ("train/accuracy", 8), ("train/margin", 8)} <= set(reward_tb)
    assert ("eval/loss", 12) in read_tensorboard(a / "phases" / "sft" / "tb")
    assert "eval_rewards/accuracies" in (a / "report.md").read_text()

    # 1) SIGKILL in the middle of the SFT phase, once its first checkpoint is committed
    proc = _launch("demo_cpu", b, SHRUNK_DEMO, cache)
    _wait_for(proc, lambda: _committed(b / "phases" / "sft" / "checkpoints"), "the first SFT checkpoint")
    proc.kill()
    proc.wait(timeout=60)
    proc.stdout.close()
    assert not (b / "phases" / "sft" / "done.json").exists(), "killed too late: the SFT phase had finished"
    killed_at = _logged_steps(b / "phases" / "sft")

    # 2) re-run; Ctrl-C (SIGINT) once the sampling phase has started (no training loop there): exit 75
    proc = _launch("demo_cpu", b, SHRUNK_DEMO, cache)
    _wait_for(proc, lambda: (b / "phases" / "r1_sample").is_dir(), "the sampling phase")
    proc.send_signal(signal.SIGINT)
    rc, out = _finish(proc)
    assert rc == 75, out[-4000:]
    # (were sampling already over, the signal would land in the reward loop: also exit 75, after a checkpoint)
    assert "interrupted; finished phases and the last checkpoint are kept" in out or "stopped by a signal" in out
    assert (b / "phases" / "sft" / "done.json").is_file()  # the killed SFT phase was resumed and finished

    # 3) re-run; SIGTERM once the reward phase has logged a step: the loop saves a checkpoint and exits 75
    proc = _launch("demo_cpu", b, SHRUNK_DEMO, cache)
    _wait_for(proc, lambda: _logged_steps(b / "phases" / "r1_reward") >= 1, "the first reward step")
    proc.send_signal(signal.SIGTERM)
    rc, out = _finish(proc)
    assert rc == 75, out[-4000:]
    assert "stopped by a signal" in out and "resume with the same command" in out
    assert not (b / "phases" / "r1_reward" / "done.json").exists()
    assert _committed(b / "phases" / "r1_reward" / "checkpoints"), "no checkpoint saved on SIGTERM"

    # 4) re-run to the end
    rc, out = _finish(_launch("demo_cpu", b, SHRUNK_DEMO, cache))
    assert rc == 0, out[-4000:]
    assert "sft: finished earlier, skipped" in out
    got = _snapshot(b)
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == expected[key], f"{key} differs after interruptions (SFT killed after step {killed_at})"


# ---- AfD: the discriminator reward and best-of-N with it ----------------------------------------------------------

@pytest.mark.slow
def test_afd_discriminator_and_best_of_n_on_the_demo_task(jax_cache, tmp_path):
    """run.method=afd on the demo task: SFT, then r1/sample draws pi_SFT answers (positives) and pi_init answers
    (negatives), r1/reward trains the pointwise AfD discriminator on them, and r1/eval answers greedily and with the
    best of N SFT samples ranked by the discriminator's logit. Checks the phases, the samples of both policies, the
    discriminator's logged metrics against their definitions, and the best-of-N answers and metrics."""
    work = tmp_path / "afd"
    overrides = SHRUNK_DEMO + ["run.method=afd", "reward.loss=afd_discriminator", "eval.best_of_n=3"]
    rc, out = _finish(_launch("demo_cpu", work, overrides, jax_cache))
    assert rc == 0, out[-4000:]
    done = _done(work)
    assert set(done) == {"sft", "eval0", "r1_sample", "r1_reward", "r1_eval"}, out[-2000:]
    samples = json.loads((work / "phases" / "r1_sample" / "samples.json").read_text())
    assert len(samples["negatives"]) == len(samples["samples"]) == 32
    logged = (work / "phases" / "r1_reward" / "tb" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in logged]
    train = [r for r in rows if r.get("split") == "train"]
    assert len(train) == 8
    import math

    for r in train:  # accuracy = mean of the per-class accuracies; margin = mean positive - mean negative logit
        assert 0.0 <= r["accuracy/positive"] <= 1.0 and 0.0 <= r["accuracy/negative"] <= 1.0
        assert math.isclose(r["accuracy"], 0.5 * (r["accuracy/positive"] + r["accuracy/negative"]), abs_tol=1e-6)
        assert r["loss"] >= 0.0 and r["rewards/margins"] == pytest.approx(
            r["rewards/positive"] - r["rewards/negative"], abs=1e-5)
    metrics = done["r1_eval"]["metrics"]
    assert 0.0 <= metrics["bon_gold"] <= 1.0 and 0.0 <= metrics["bon_rm_win_rate_vs_sft"] <= 1.0
    assert metrics["rm_win_rate_vs_sft"] == 0.5  # AfD has no policy phase: the greedy answers are SFT's (all ties)
    ev = json.loads((work / "phases" / "r1_eval" / "eval.json").read_text())
    assert len(ev["best_of_n_answers"]) == len(ev["answers"]) == 16
    assert "bon_gold" in (work / "report.md").read_text()


# ---- the Colab notebook, on CPU ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_colab_notebook_runs_on_cpu(tiny, jax_cache, tmp_path):
    """launch/colab_smoke.ipynb executed cell by cell with nbclient: the install cell is skipped
    (JAXALIGN_SKIP_INSTALL=1, this checkout is the repository), the run is colab_smoke with the tiny model and local
    slices (JAXALIGN_OVERRIDES), and the last cell shows report.md and the plots inline."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")

    work = tmp_path / "colab_smoke"
    env = tiny_recipe.subprocess_env(jax_cache)
    env.update(JAXALIGN_SKIP_INSTALL="1", JAXALIGN_REPO_DIR=str(REPO), JAXALIGN_WORKDIR=str(work),
               JAXALIGN_OVERRIDES=json.dumps(_overrides("colab_smoke", tiny)))
    nb = nbformat.read(REPO / "launch" / "colab_smoke.ipynb", as_version=4)
    assert any("pip" in c.source and "install" in c.source for c in nb.cells if c.cell_type == "code")
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "SKIP_INSTALL" in text and "exit code 0" in text
    shown = [o for o in outputs if o.get("output_type") == "display_data"]
    markdown = [o["data"]["text/markdown"] for o in shown if "text/markdown" in o.get("data", {})]
    assert any(m.startswith("# jaxalign run: colab_smoke (irl)") and "5 of 5 phases finished" in m for m in markdown)
    assert sum("image/png" in o.get("data", {}) for o in shown) >= 1
    done = _done(work)
    assert set(done) == {"eval0", "r1_sample", "r1_reward", "r1_policy", "r1_eval"}
    assert done["r1_policy"]["metrics"]["steps"] == 2


# ---- the oracle control: best-of-N pairs ranked by the gold program ------------------------------------------------

@pytest.mark.slow
def test_oracle_pairs_are_ranked_by_the_gold_program(jax_cache, tmp_path):
    """policy.reward=gold on the demo task: no reward phase; r1/policy picks each prompt's max-min pair by the demo's
    gold scorer. Its logged gold figures are recomputed here from samples.json with the scorer called directly."""
    from transformers import AutoTokenizer

    from jaxalign.tasks.demo import gold_score

    work = tmp_path / "oracle"
    overrides = SHRUNK_DEMO + ["policy.reward=gold", "run.phases=sample,policy,eval", "policy.num_samples=4",
                               "sample.max_new_tokens=16"]
    rc, out = _finish(_launch("demo_cpu", work, overrides, jax_cache))
    assert rc == 0, out[-4000:]
    done = _done(work)
    assert set(done) == {"sft", "eval0", "r1_sample", "r1_policy", "r1_eval"}, out[-2000:]
    m = done["r1_policy"]["metrics"]
    tok = AutoTokenizer.from_pretrained(work / "assets" / "tokenizer")
    prompts = [json.loads(line)["messages"][0]["content"]
               for line in (work / "assets" / "data" / "train.jsonl").read_text().splitlines()]
    s = json.loads((work / "phases" / "r1_sample" / "samples.json").read_text())
    gold = np.array([[gold_score(prompts[row], tok.decode([t for t in c if t != tok.eos_token_id],
                                                           skip_special_tokens=True).strip()) for c in cands]
                     for row, cands in zip(s["row_ids"], s["samples"])])
    kept = gold.max(axis=1) != gold.min(axis=1)
    assert m["samples_gold"] == pytest.approx(gold.mean(), abs=1e-6)
    assert m["pairs"] == kept.sum() > 0
    assert m["chosen_gold"] == pytest.approx(gold.max(axis=1)[kept].mean(), abs=1e-6)
    assert m["rejected_gold"] == pytest.approx(gold.min(axis=1)[kept].mean(), abs=1e-6)
    assert m["rm_gold_pair_accuracy"] == 1.0  # the gold ranks its own pairs as the gold does
    assert m["rm_gold_pairs"] == sum((a != b) for g in gold for i, a in enumerate(g) for b in g[i + 1:])


def test_a_finished_phase_survives_a_key_added_to_the_schema():
    """Upgrading jaxalign must not invalidate finished work: a done marker recorded before a key existed still matches
    while that key holds its default, and is refused once it does not, or when any recorded value changed. Markers
    from before settings were recorded (hash only) are judged against the previous run.yaml's keys."""
    import hashlib

    from jaxalign import config as config_lib
    from jaxalign.pipeline.phases import plan
    from jaxalign.pipeline.runner import bound_sections, finished_with, settings

    cfg = config_lib.load("demo_cpu", ["run.rounds=1"])
    phase = next(p for p in plan(cfg) if p.kind == "reward")
    recorded = settings(cfg, phase)
    del recorded["model"]["lora"]["dropout"]  # as a marker written before the key existed
    info = {"settings": recorded, "fingerprint": "unused"}
    assert finished_with(info, cfg, phase, None)
    assert not finished_with(info, config_lib.load("demo_cpu", ["run.rounds=1", "model.lora.dropout=0.1"]),
                             phase, None)
    assert not finished_with(info, config_lib.load("demo_cpu", ["run.rounds=1", "reward.learning_rate=0.5"]),
                             phase, None)
    assert finished_with(info, config_lib.load("demo_cpu", ["run.rounds=1", "policy.beta=0.5"]), phase, None)

    # a hash-only marker: its hash was taken over the sections as the run.yaml of its time had them
    old_run = config_lib.to_dict(cfg)
    del old_run["model"]["lora"]["dropout"]
    blob = json.dumps({s: old_run[s] for s in bound_sections(phase)}, sort_keys=True)
    legacy = {"fingerprint": hashlib.sha256(blob.encode()).hexdigest()[:16] + f"-seed{cfg.run.seed}"}
    assert finished_with(legacy, cfg, phase, old_run)
    assert not finished_with(legacy, config_lib.load("demo_cpu", ["run.rounds=1", "reward.epochs=9"]), phase, old_run)
