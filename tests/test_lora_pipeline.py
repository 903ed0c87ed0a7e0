"""LoRA through the engine and the pipeline: the train step with the base as the reference, exact resume after
SIGTERM, and a run (sft + policy) whose PEFT adapter folder loads onto the base in transformers.

Tiny models and few steps: the library half (adapter math, merge, PEFT files) is tests/test_lora.py's.
"""
from __future__ import annotations

import importlib.util
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import engine_fixtures as fx
from engine_script import _init_params
from jaxalign import sharding
from jaxalign.data.loader import pair_dataset
from jaxalign.losses import get_objective
from jaxalign.models.lora import LoraConfig, init_adapters, split_trainable, tree_bytes
from jaxalign.train.optim import OptimConfig, make_optimizer
from jaxalign.train.state import create_state, param_shardings
from jaxalign.train.steps import StepConfig, make_train_step

CFG = fx.tiny_cfg()


def test_dpo_step_with_the_base_as_reference_equals_an_explicit_frozen_copy():
    """One DPO train step with LoRA: reference = the frozen base with adapters off (``reference_logps="base"``) gives
    the loss, metrics and updated adapters of the same step with a separate frozen copy of the base as the reference
    (1e-5), and its compiled step takes one copy of the base weights fewer."""
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    lcfg = LoraConfig(rank=4, alpha=8)
    adapters = init_adapters(CFG, lcfg, jax.random.PRNGKey(0))
    rng = np.random.RandomState(1)  # B off zero: the policy differs from the reference, the loss is not log 2
    adapters = {k: v + jnp.asarray(0.05 * rng.randn(*v.shape), v.dtype) for k, v in adapters.items()}
    trainable, frozen = split_trainable(_init_params(CFG, "sft"), adapters)
    frozen = jax.device_put(frozen, param_shardings(frozen, mesh))
    copy = jax.tree.map(lambda x: jnp.array(x, copy=True), frozen)
    ds = pair_dataset(fx.pair_examples(8), global_batch_size=8, pad_id=0, buckets=(32,), seed=0, num_epochs=1)
    batch = {k: v for k, v in next(iter(ds)).items() if k != "row_id"}
    optimizer, schedule = make_optimizer(OptimConfig(learning_rate=1e-2, warmup_ratio=0.0), 10)
    objective = get_objective("dpo")[1]

    def run(reference_logps, ref):
        step_cfg = StepConfig("policy", objective=objective, reference_logps=reference_logps, lora=lcfg)
        state = create_state(trainable, optimizer, mesh)
        fn = make_train_step(CFG, step_cfg, optimizer, schedule, mesh, jax.tree.map(lambda x: x.sharding, state),
                             batch, ref, frozen)
        args = (state, sharding.shard_batch(batch, mesh), *step_cfg.extra_args(frozen, ref))
        compiled = fn.lower(*args).compile()  # run the very program measured (one compile)
        new, metrics = compiled(*args)
        return (jax.device_get(new.params), {k: float(v) for k, v in jax.device_get(metrics).items()},
                compiled.memory_analysis().argument_size_in_bytes)

    p1, m1, one = run("base", None)
    p2, m2, two = run("in_step", copy)
    assert abs(m1["loss"] - np.log(2)) > 1e-3
    for k in ("loss", "rewards/chosen", "rewards/rejected", "grad_norm"):
        np.testing.assert_allclose(m1[k], m2[k], rtol=1e-5, atol=1e-7, err_msg=k)
    for k in p2:
        np.testing.assert_allclose(p1[k], p2[k], rtol=1e-5, atol=1e-6, err_msg=k)
    print(f"\nbase {tree_bytes(frozen):,} B; step arguments: base as reference {one:,} B, explicit copy {two:,} B")
    assert two - one == tree_bytes(frozen)


@pytest.mark.slow
def test_lora_resume_after_sigterm_is_bit_identical(tmp_path):
    """A DPO phase training adapters (dropout on, the base as the reference) stopped by SIGTERM after step 5 and
    re-run with the same command ends with the uninterrupted run's adapters, batches and losses, bit for bit; its
    checkpoints hold the adapters and their optimizer state, not the frozen base."""
    from engine_script import (EXIT_PREEMPTED, load_params, read_checkpoint, read_losses, read_rows, reference_run,
                               run_script)

    args = ("--kind", "dpo", "--lora-rank", "4", "--steps", "10", "--save-every", "4")
    reference = reference_run(*args)
    wd = tmp_path / "run"
    p = run_script(wd, *args, "--sigterm-at", "5")
    assert p.returncode == EXIT_PREEMPTED, (p.stdout + p.stderr)[-3000:]
    saved = " ".join(read_checkpoint(wd, 5))  # key paths like [1]['wq_lora_a'] (params), [2][0].mu['wq_lora_a']
    assert "['wq_lora_a']" in saved and "['wq']" not in saved and "['embed']" not in saved, saved
    p = run_script(wd, *args)
    assert p.returncode == 0 and "training from step 5" in p.stdout, (p.stdout + p.stderr)[-3000:]
    ref, got = load_params(reference), load_params(wd)
    assert sorted(ref) == sorted(got) and all(k.endswith(("_lora_a", "_lora_b")) for k in got)
    for k in ref:
        assert np.array_equal(ref[k], got[k]), k
    assert read_rows(wd) == read_rows(reference) and read_losses(wd) == read_losses(reference)


@pytest.mark.slow
def test_pipeline_with_lora_exports_merged_weights_and_a_peft_adapter(shared_data, tmp_path):
    """sft + policy (DIL, the base as the reference) with model.lora.rank=4 on a tiny Llama: each phase writes its
    merged model/ and a PEFT adapter/; transformers + PEFT loading adapter/ onto the phase's starting model give the
    logits of jaxalign's merged model (1e-4 x max |logit|)."""
    import json

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import tiny_recipe
    from jaxalign.cli import main
    from jaxalign.models import forward, from_pretrained

    slices = tiny_recipe.write_slices(shared_data, tmp_path / "data", n_train=16, n_test=8)
    model = tiny_recipe.make_tiny_llama(tmp_path / "model")
    work = tmp_path / "run"
    overrides = tiny_recipe.recipe_overrides("ultrachat_dil", model, shared_data / tiny_recipe.TOKENIZER, slices)
    overrides += ["sft.enabled=true", "sft.max_steps=2", "policy.accum_steps=1", "sft.learning_rate=3e-2",
                  "policy.learning_rate=3e-2", "eval.num_prompts=2", "eval.max_new_tokens=2", "eval.heldout_limit=0",
                  "run.trackers=",
                  "data.max_length=64", "data.max_prompt_length=32", "model.lora.rank=4", "model.lora.alpha=8",
                  "model.lora.dropout=0.1"]
    assert main(["--config", "ultrachat_dil", "--workdir", str(work), *overrides]) == 0
    ids = np.random.RandomState(0).randint(3, 32000, size=(2, 12)).astype(np.int32)
    for phase, start in (("sft", model), ("r1_policy", work / "phases" / "sft" / "model")):
        folder = work / "phases" / phase
        conf = json.loads((folder / "adapter" / "adapter_config.json").read_text())
        assert conf["r"] == 4 and conf["base_model_name_or_path"] == str(start)
        merged = from_pretrained(folder / "model", dtype="float32")
        ours = np.asarray(forward(merged.param_dict(), merged.cfg, jnp.asarray(ids)))
        assert np.abs(ours - np.asarray(forward(from_pretrained(start, dtype="float32").param_dict(), merged.cfg,
                                                jnp.asarray(ids)))).max() > 1e-3  # the adapters trained
        base = AutoModelForCausalLM.from_pretrained(start, torch_dtype=torch.float32)
        with torch.no_grad():
            theirs = PeftModel.from_pretrained(base, folder / "adapter")(torch.as_tensor(ids).long()).logits.numpy()
        assert np.abs(theirs - ours).max() <= 1e-4 * np.abs(ours).max(), (phase, np.abs(theirs - ours).max())
    done = json.loads((work / "phases" / "r1_policy" / "done.json").read_text())
    assert done["metrics"]["steps"] == 2


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (the test extra installs it)")
def test_plan_counts_adapters_a_frozen_base_and_no_reference(tmp_path):
    """A tiny DPO policy phase planned for v5e:2x2 with LoRA: the state is the adapters and their two AdamW moments,
    the frozen base (bfloat16) sits beside it, there is no reference copy, and the compiled FLOPs match the analytic
    count without the base's weight gradients."""
    import json

    from jaxalign import plan as plan_lib
    from jaxalign.config import load
    from jaxalign.models.lora import adapter_shapes

    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 512, "intermediate_size": 1024,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 128,
        "vocab_size": 2048, "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "hidden_act": "silu"}))
    cfg = load("ultrachat_dpo", [f"model.path={tmp_path}", "mesh.fsdp=4", "data.max_length=256",
                                 "data.max_prompt_length=128", "policy.batch_size=8", "policy.accum_steps=1",
                                 "model.lora.rank=8", "model.lora.base_dtype=bfloat16"])
    (row,) = plan_lib.plan_recipe(cfg, "v5e:2x2", phases=["policy"], print_fn=lambda *_: None)
    mcfg = plan_lib.model_config(cfg)
    adapters = sum(math.prod(s) for s in adapter_shapes(mcfg, cfg.model.lora.build()).values())
    assert row.reference == 0 and "reference base" in row.detail and "LoRA r=8" in row.detail
    # per chip, sharded 4 ways; the TPU layout pads the rank-8 dims, so the adapters' bytes are bounded, not exact
    full = mcfg.num_params() * 4 / 4
    assert 2 * adapters <= row.opt_state < 0.15 * 2 * full  # AdamW moments of the adapters only
    assert full / 2 <= row.params < 0.6 * full  # the bfloat16 base + the float32 adapters
    assert row.flops == pytest.approx(row.model_flops, rel=0.03) and row.fits
