"""On-policy recipes through the launcher, as a user runs them (slow; a subprocess each, shrunk sizes):

- ``tldr_irl`` (PPO, its model swapped for a tiny Llama and its data for local slices) and ``ultrachat_irl
  policy.kind=rloo``: every phase finishes, the policy phase logs TRL's on-policy metrics for each rollout batch, the
  policy's weights moved, the report has the run;
- the demo with ``policy.kind=online_dil`` (no reward phase in the plan), with DITTO pairs over two SPIN rounds (the
  pair count is DITTO's ordering's), and with ``policy.kind=rloo``; each report table is printed.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tiny_recipe
from tiny_recipe import LAUNCHER, REPO

pytestmark = pytest.mark.slow

ONPOLICY_KEYS = {"objective/kl", "objective/entropy", "objective/rlhf_reward", "objective/scores", "policy/clipfrac",
                 "loss", "val/num_eos_tokens"}
SHRUNK_DEMO = ["run.show_progress=false", "sft.epochs=1", "sft.max_steps=12", "sample.limit=32",
               "sample.max_new_tokens=8", "reward.batch_size=16", "reward.max_steps=4", "policy.batch_size=8",
               "policy.max_steps=3", "eval.num_prompts=16", "eval.max_new_tokens=8", "data.eval_prefs.limit=32"]


@pytest.fixture(scope="module")
def tiny(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_onpolicy")
    return {"model": tiny_recipe.make_tiny_llama(root / "model"), "tokenizer": shared_data / tiny_recipe.TOKENIZER,
            "slices": tiny_recipe.write_slices(shared_data, root / "data")}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache_onpolicy")


def _run(config: str, work: Path, overrides: list[str], cache: Path) -> str:
    proc = subprocess.run([sys.executable, str(LAUNCHER), "--config", config, "--workdir", str(work), *overrides],
                          cwd=REPO, env=tiny_recipe.subprocess_env(cache), capture_output=True, text=True,
                          timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def _done(work: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted((work / "phases").glob("*/done.json"))}


def _logged(work: Path, phase: str) -> list[dict]:
    lines = (work / "phases" / phase / "tb" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if x.strip()]


def _check_onpolicy_phase(work: Path, phase: str, steps: int) -> None:
    rows = _logged(work, phase)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for r in rows:
        assert ONPOLICY_KEYS <= r.keys(), sorted(r)
        assert all(np.isfinite(v) for v in r.values() if isinstance(v, float))
    assert (work / "phases" / phase / "model" / "config.json").is_file()


def _report_table(work: Path) -> str:
    report = (work / "report.md").read_text()
    table = report.split("## Rounds")[1].split("![")[0].strip()
    print(f"\n{work.name}:\n{table}")
    return report


def _moved(a: Path, b: Path) -> bool:
    from jaxalign.models import from_pretrained

    pa, pb = from_pretrained(a).param_dict(), from_pretrained(b).param_dict()
    return pa.keys() == pb.keys() and any(not np.array_equal(pa[k], pb[k]) for k in pa)


def test_tldr_irl_ppo_on_a_tiny_model(tiny, cache, tmp_path):
    s = tiny["slices"]
    overrides = [f"model.path={tiny['model']}", f"model.tokenizer={tiny['tokenizer']}", "data.chat_template=",
                 "model.dtype=float32", "run.rounds=1", "run.show_progress=false",
                 f"data.train.source={s['sft_train']}", "data.train.format=messages", "data.train.limit=32",
                 f"data.eval_prompts.source={s['sft_test']}", "data.eval_prompts.format=messages",
                 f"data.eval_prefs.source={s['prefs_test']}", "data.eval_prefs.format=preference",
                 "data.eval_prefs.split=train", "data.train.split=train", "data.eval_prompts.split=train",
                 "data.max_length=128", "data.max_prompt_length=64", "sample.max_new_tokens=8", "sample.limit=16",
                 "eval.num_prompts=8", "eval.max_new_tokens=8", "sft.batch_size=8", "sft.max_steps=2",
                 "reward.batch_size=8", "reward.max_steps=2", "policy.batch_size=8", "policy.rollout_batch_size=8",
                 "policy.max_steps=2"]
    work = tmp_path / "tldr_irl"
    _run("tldr_irl", work, overrides, cache)
    done = _done(work)
    assert set(done) == {"sft", "eval0", "r1_sample", "r1_reward", "r1_policy", "r1_eval"}
    _check_onpolicy_phase(work, "r1_policy", 2)
    rows = _logged(work, "r1_policy")
    assert {"loss/value", "val/vpred", "val/clipfrac"} <= rows[0].keys()  # PPO's value head trained
    assert _moved(work / "phases" / "r1_policy" / "model", work / "phases" / "sft" / "model")
    _report_table(work)


def test_ultrachat_irl_rloo_on_a_tiny_model(tiny, cache, tmp_path):
    overrides = tiny_recipe.recipe_overrides("ultrachat_irl", tiny["model"], tiny["tokenizer"], tiny["slices"])
    work = tmp_path / "ultrachat_irl_rloo"
    _run("ultrachat_irl", work, overrides + ["policy.kind=rloo", "run.rounds=1"], cache)
    assert set(_done(work)) == {"eval0", "r1_sample", "r1_reward", "r1_policy", "r1_eval"}
    _check_onpolicy_phase(work, "r1_policy", 2)
    samples = json.loads((work / "phases" / "r1_sample" / "samples.json").read_text())
    assert samples["num_samples"] == 1  # the sample phase draws only the RM's negatives: the policy samples itself
    assert _moved(work / "phases" / "r1_policy" / "model", tiny["model"])
    _report_table(work)


def test_demo_rloo_online_dil_and_ditto(cache, tmp_path):
    rloo = tmp_path / "demo_rloo"
    _run("demo_cpu", rloo, SHRUNK_DEMO + ["run.rounds=1", "policy.kind=rloo", "policy.num_samples=4",
                                          "policy.batch_size=16"], cache)
    _check_onpolicy_phase(rloo, "r1_policy", 3)
    assert "gold" in _report_table(rloo)

    dil = tmp_path / "demo_online_dil"
    _run("demo_cpu", dil, SHRUNK_DEMO + ["policy.kind=online_dil", "run.rounds=2"], cache)
    assert set(_done(dil)) == {"sft", "eval0", "r1_policy", "r1_eval", "r2_policy", "r2_eval"}  # no reward model
    rows = _logged(dil, "r2_policy")
    assert len(rows) == 3 and {"rewards/accuracies", "logps/chosen", "response_length"} <= rows[0].keys()
    _report_table(dil)

    ditto = tmp_path / "demo_ditto"
    _run("demo_cpu", ditto, SHRUNK_DEMO + ["run.method=spin", "policy.pairs=ditto", "policy.num_samples=2",
                                           "policy.objective=dpo", "run.rounds=2", "sample.limit=16"], cache)
    done = _done(ditto)
    # round 1: demo > each of 2 samples; round 2: demo > 2 current + 2 earlier samples, each current > each earlier
    assert done["r1_policy"]["metrics"]["pairs"] == 16 * 2
    assert done["r2_policy"]["metrics"]["pairs"] == 16 * (2 + 2 + 2 * 2)
    _report_table(ditto)
