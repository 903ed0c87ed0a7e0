"""On-policy policy steps (jaxalign.pipeline.onpolicy) on the demo task's SFT'd tiny model.

- With a fixed, known reward — the demo task's gold metric (jaxalign.tasks.demo.gold_score) in place of a
  reward model — RLOO, GRPO and PPO each raise the mean reward of their fresh samples within a few dozen rollout
  batches (fixed seeds): the mean of the last 5 batches beats the first 5 by a clear margin. The curves are printed.
- The logged metrics keep their definitions: objective/rlhf_reward = scores - kl_coef * kl (RLOO, PPO), the first
  update of a rollout batch is at ratio 1 (clipfrac 0 with one inner epoch), PPO logs value metrics.
- A phase stopped after some rollout batches and run again resumes from its checkpoint to the same final weights.
- The phase logs through the phase settings' trackers like every training phase: with ``run.trackers=tensorboard,wandb``
  the wandb run holds what tensorboard holds, every ``run.logging_steps``-th rollout batch and the last.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from jaxalign import config as config_lib
from jaxalign.data.sources import load_records
from jaxalign.metrics import read_metrics
from jaxalign.pipeline import onpolicy, sft
from jaxalign.pipeline.context import build_context
from jaxalign.tasks.demo import gold_score
from jaxalign.pipeline.phases import Phase
from jaxalign.pipeline.runner import Pipeline
from test_trackers import offline_wandb, read_tensorboard, read_wandb  # noqa: F401  (offline_wandb: a fixture)

BASE = ["run.show_progress=false", "run.rounds=1", "sample.max_new_tokens=8", "sample.temperature=1.0",
        "policy.learning_rate=5e-4", "policy.schedule=constant", "policy.warmup_ratio=0", "policy.kl_coef=0.01",
        "policy.epochs=100", "policy.save_every=100", "reliability.async_checkpointing=false"]


@pytest.mark.parametrize("overrides, message", [
    (["policy.kind=grpo", "policy.num_samples=1"], "at least 2"),
    (["policy.kind=ppo", "run.phases=sample,policy,eval"], "'reward' (after 'sample') must come before 'policy'"),
    (["policy.kind=online_dil", "policy.objective=dpo"], "choose a dil_* objective"),
    (["policy.kind=rloo", "run.method=dpo", "policy.pairs=dataset"], "on-policy steps run in IRL / SPIN rounds"),
    (["policy.kind=rloo", "policy.num_samples=3"], "multiple of policy.batch_size=32"),
    (["policy.kind=sac"], "choose one of 'pairs', 'rloo', 'grpo', 'ppo', 'online_dil'"),
])
def test_bad_onpolicy_combinations_are_refused_when_loading(overrides, message):
    with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
        config_lib.load("demo_cpu", overrides)


def test_onpolicy_rounds():
    from jaxalign.pipeline.phases import plan

    assert [p.name for p in plan(config_lib.load("demo_cpu", ["policy.kind=rloo", "run.rounds=1"]))] == [
        "sft", "eval0", "r1/sample", "r1/reward", "r1/policy", "r1/eval"]
    # online DIL samples inside its policy phase and trains no reward model
    assert [p.name for p in plan(config_lib.load("demo_cpu", ["policy.kind=online_dil", "run.rounds=1"]))] == [
        "sft", "eval0", "r1/policy", "r1/eval"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo task's assets and SFT model (a shortened SFT: room left for the reward to rise)."""
    work = tmp_path_factory.mktemp("onpolicy_demo")
    cfg = config_lib.load("demo_cpu", BASE)
    pipe = Pipeline(cfg, work)
    ctx = build_context(cfg, pipe.workdir, pipe.phases)
    sft_phase = next(p for p in pipe.phases if p.kind == "sft")
    ctx.workdir.phase(sft_phase).mkdir(parents=True, exist_ok=True)
    sft.run(ctx, sft_phase)
    records, _ = load_records(cfg.data.train.source, split=cfg.data.train.split)
    prompts = {r.index: r.prompt[-1].content for r in records}

    def gold(rows, responses):
        return np.asarray([gold_score(prompts[r.row_id], ctx.tokenizer.decode(t, skip_special_tokens=True).strip())
                           for r, t in zip(rows, responses)], np.float32)

    return ctx, gold


def _run(demo, name: str, *, prompts: int, **policy):
    """``name``'s phase on a fixed set of ``prompts`` training prompts, every rollout batch covering all of them (so
    the curve compares the same prompts step after step)."""
    ctx, gold = demo
    ctx.cfg.policy = dataclasses.replace(ctx.cfg.policy, **policy)
    ctx.cfg.sample = dataclasses.replace(ctx.cfg.sample, limit=prompts)
    phase = Phase(f"{name}/policy", "policy", 1)
    ctx.workdir.phase(phase).mkdir(parents=True, exist_ok=True)
    metrics = onpolicy.run(ctx, phase, reward_fn=gold)
    rows = [r for r in read_metrics(ctx.workdir.phase(phase) / "tb", latest_only=True) if r["split"] == "train"]
    return metrics, rows, ctx.workdir.phase(phase)


def _check_rise(name: str, rows, margin: float):
    curve = [(r["step"], r["objective/scores"]) for r in rows]
    print(f"\n{name}: (rollout batch, mean gold reward of its fresh samples)")
    print(" ".join(f"({s},{v:.3f})" for s, v in curve))
    first, last = np.mean([v for _, v in curve[:5]]), np.mean([v for _, v in curve[-5:]])
    print(f"{name}: first 5 {first:.3f} -> last 5 {last:.3f}")
    assert last > first + margin, (name, first, last)


@pytest.mark.slow
def test_rloo_raises_a_fixed_reward(demo):
    _, rows, _ = _run(demo, "rloo", prompts=32, kind="rloo", num_samples=4, rollout_batch_size=128, batch_size=64,
                      max_steps=20, inner_epochs=1)
    for r in rows:  # KL folded into the reward (k1), as logged
        assert r["objective/rlhf_reward"] == pytest.approx(r["objective/scores"] - 0.01 * r["objective/kl"], abs=1e-4)
    _check_rise("rloo", rows, 0.1)


@pytest.mark.slow
def test_grpo_raises_a_fixed_reward(demo):
    _, rows, _ = _run(demo, "grpo", prompts=32, kind="grpo", num_samples=4, rollout_batch_size=128, batch_size=64,
                      max_steps=20, inner_epochs=2)
    assert any(r["policy/clipfrac"] > 0 for r in rows)  # the second pass is off-policy: the clip acts
    _check_rise("grpo", rows, 0.1)


@pytest.mark.slow
def test_ppo_raises_a_fixed_reward(demo):
    # 4 passes x 2 mini-batches per rollout batch: a smaller learning rate than RLOO / GRPO's single update
    _, rows, _ = _run(demo, "ppo", prompts=64, kind="ppo", num_samples=1, rollout_batch_size=64, batch_size=32,
                      max_steps=20, inner_epochs=4, learning_rate=2e-4)
    for r in rows:
        assert {"loss/value", "val/vpred", "val/clipfrac", "policy/approxkl"} <= r.keys()
    assert rows[-1]["val/vpred"] > rows[0]["val/vpred"]  # the zero-initialised value head learns the returns
    # one sample per prompt: the value head, not a group, is the baseline, and the rise is slower than RLOO / GRPO's;
    # its curve is chaotic (a float-level change to the step flips samples a few batches on), hence a lower margin
    _check_rise("ppo", rows, 0.03)


@pytest.mark.slow
def test_a_resumed_phase_ends_with_the_same_weights(demo):
    """4 rollout batches straight vs 2 (a checkpoint) then a re-run to 4 from that checkpoint: the same samples are
    drawn and the same weights come out (the constant schedule does not depend on the phase length)."""
    from safetensors.numpy import load_file

    kw = dict(prompts=32, kind="grpo", num_samples=4, rollout_batch_size=32, batch_size=16, inner_epochs=2,
              save_every=2)
    _, straight, a = _run(demo, "straight", max_steps=4, **kw)
    _run(demo, "resumed", max_steps=2, **kw)
    _, resumed, b = _run(demo, "resumed", max_steps=4, **kw)
    assert [r["objective/scores"] for r in resumed] == [r["objective/scores"] for r in straight]
    wa, wb = load_file(str(a / "model" / "model.safetensors")), load_file(str(b / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_rloo_and_ppo_train_lora_adapters_on_the_frozen_base(demo):
    """model.lora with the on-policy kinds: the state and its checkpoints hold the adapters (+ PPO's value head), not
    the base; the reference is the base with the adapters off, so the first rollout batch's KL (B = 0: the adapted
    policy is the base exactly) is 0; the phase exports the merged model and a PEFT adapter folder. Online DIL's pair
    step runs on the same split with the base as its reference."""
    import json

    import jax
    import orbax.checkpoint as ocp
    from safetensors.numpy import load_file

    ctx, _ = demo
    saved_lora, saved_cfg = ctx.lora, ctx.cfg.model.lora
    ctx.cfg.model.lora = dataclasses.replace(saved_cfg, rank=4, alpha=8.0)
    ctx.lora = ctx.cfg.model.lora.build()
    try:
        kw = dict(prompts=32, num_samples=4, rollout_batch_size=64, batch_size=32, inner_epochs=1, save_every=1,
                  learning_rate=5e-3)
        _, rows, folder = _run(demo, "lora_rloo", kind="rloo", max_steps=3, **kw)
        _, ppo_rows, ppo_folder = _run(demo, "lora_ppo", kind="ppo", max_steps=2,
                                       **{**kw, "num_samples": 1, "rollout_batch_size": 32})
        _, dil_rows, dil_folder = _run(demo, "lora_dil", kind="online_dil", objective="dil_lsif", max_steps=2,
                                       **{**kw, "num_samples": 1, "rollout_batch_size": 32})
    finally:
        ctx.lora, ctx.cfg.model.lora = saved_lora, saved_cfg
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    assert rows[-1]["objective/kl"] > 1e-4  # the adapters moved the policy away from the base
    assert {"loss/value", "val/vpred"} <= ppo_rows[0].keys()
    assert len(dil_rows) == 2 and all(np.isfinite(r["loss"]) for r in dil_rows)
    for where, extra in ((folder, set()), (ppo_folder, {"value_head"}), (dil_folder, set())):
        ckpt = where / "checkpoints" / str(max(int(p.name) for p in (where / "checkpoints").iterdir()
                                               if p.name.isdigit())) / "state"
        tree = ocp.PyTreeCheckpointer().metadata(ckpt).item_metadata.tree
        saved = " ".join(jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(tree)[0])
        assert "['wq_lora_a']" in saved and "['wq']" not in saved and "['embed']" not in saved, saved
        assert all(f"['{k}']" in saved for k in extra), saved
        merged = load_file(str(where / "model" / "model.safetensors"))
        assert not any("value" in k for k in merged)
        conf = json.loads((where / "adapter" / "adapter_config.json").read_text())
        assert conf["r"] == 4 and conf["lora_alpha"] == 8.0


@pytest.mark.slow
def test_onpolicy_metrics_reach_every_tracker(demo, offline_wandb):
    pytest.importorskip("wandb")
    ctx, _ = demo
    saved = ctx.cfg.run
    ctx.cfg.run = dataclasses.replace(saved, trackers="tensorboard,wandb", logging_steps=2, name="trackers",
                                      wandb_project="jaxalign-test")
    try:
        _, rows, folder = _run(demo, "trackers", prompts=32, kind="rloo", num_samples=4, rollout_batch_size=32,
                               batch_size=16, max_steps=3, inner_epochs=1)
    finally:
        ctx.cfg.run = saved
    (run_file,) = offline_wandb.glob("wandb/offline-run-*/run-*.wandb")
    wb, tb = read_wandb(run_file), read_tensorboard(folder / "tb")
    assert {step for _, step in tb} == {2, 3}  # every second rollout batch and the last
    assert {"train/loss", "train/objective/scores", "train/objective/kl", "train/tokens_per_second"} <= {
        key for key, _ in tb}
    assert sorted(wb) == sorted(tb)
    logged = {(f"train/{k}", r["step"]): v for r in rows for k, v in r.items() if k not in ("step", "split", "time")}
    for key, value in wb.items():
        assert value == pytest.approx(logged[key], rel=1e-12, abs=0), key  # wandb keeps the double
        assert tb[key] == np.float32(value), key  # tensorboard's simple_value is a float32
