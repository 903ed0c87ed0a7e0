"""TRL / alignment-handbook recipe files run as written, through the name map (jaxalign/trl_recipes/recipe.py, docs/trl_users.md).

- The real recipe files under tests/data/trl_recipes/ (each with a header naming its repository, path and commit):
  every one maps to the settings its TRL trainer would use (global batch, objective, beta, learning rate, schedule,
  LoRA, data), with the mapping table printed before the run; the ones asking for what jaxalign cannot do exit 2 with
  one paragraph naming each refused key, before anything is compiled.
- TRL names on the command line (``loss_type=ipo beta=0.05``), for a TRL recipe and for a jaxalign recipe; the
  did-you-mean suggestions know TRL names.
- The loss options a user tunes (``policy.label_smoothing``, ``policy.simpo_gamma``, ``policy.clip_high``,
  ``policy.kl_bias_correction``) reach the objective / the on-policy step.
- TRL 1.16's defaults in jaxalign/trl_recipes/names.py against the installed TRL.
- TRL's reward-modelling LoRA example (RewardTrainer -> run.method=reward): the file is one ``trl reward --config``
  reads, it maps to the same settings TRL parses from it, and what the reward trainer does that jaxalign cannot
  (a frozen score head under PEFT, per-row margins) is refused.
- End to end (slow): the zephyr-7b-beta DPO recipe and TRL's reward LoRA example on a tiny random-init Llama and
  local preference slices, through the launcher in a subprocess, with the hub model and dataset replaced by
  overrides.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import tiny_recipe
from jaxalign import config as config_lib
from jaxalign.config import ConfigError
from tiny_recipe import LAUNCHER, REPO

RECIPES = Path(__file__).parent / "data" / "trl_recipes"
HANDBOOK = RECIPES / "alignment-handbook" / "recipes"
ZEPHYR_DPO = HANDBOOK / "zephyr-7b-beta" / "dpo" / "config_full.yaml"
ZEPHYR_SFT = HANDBOOK / "zephyr-7b-beta" / "sft" / "config_full.yaml"
ZEPHYR_QLORA = HANDBOOK / "zephyr-7b-beta" / "dpo" / "config_qlora.yaml"
SMOLLM2_DPO = HANDBOOK / "smollm2" / "dpo" / "config.yaml"
SMOLLM2_SFT = HANDBOOK / "smollm2" / "sft" / "config.yaml"
SMOLLM3_APO = HANDBOOK / "smollm3" / "dpo" / "apo.yaml"
ZEPHYR_ORPO = HANDBOOK / "zephyr-141b-A35b" / "orpo" / "config_full.yaml"
TRL_EXAMPLE = RECIPES / "trl" / "examples" / "cli_configs" / "example_config.yaml"
OPENR1_GRPO = RECIPES / "open-r1" / "recipes" / "Qwen2.5-1.5B-Instruct" / "grpo" / "config_demo.yaml"
TRL_REWARD_LORA = RECIPES / "trl" / "examples" / "scripts" / "reward_modeling_lora.yaml"


def _load(path, overrides=(), trainer=""):
    """(config, the printed table)."""
    shown = []
    cfg = config_lib.load(str(path), list(overrides), trainer=trainer, echo=shown.append)
    return cfg, "\n".join(shown)


def _refused(path, overrides=(), trainer="") -> str:
    with pytest.raises(ConfigError) as e:
        config_lib.load(str(path), list(overrides), trainer=trainer)
    message = str(e.value)
    assert "\n" not in message  # one paragraph
    return message


def _row(table: str, key: str) -> str:
    """The table line that sets jaxalign key ``key``."""
    lines = [line for line in table.splitlines() if f"  {key}  " in line or line.rstrip().endswith(f"  {key}")]
    assert len(lines) == 1, (key, lines)
    return lines[0]


def test_every_stored_recipe_names_its_source():
    files = sorted(RECIPES.rglob("*.yaml"))
    assert len(files) == 10
    for f in files:
        head = f.read_text().splitlines()[0]
        assert head.startswith("# Source: github.com/huggingface/") and "commit" in head, f


# ---- the handbook's zephyr-7b-beta recipes -------------------------------------------------------------------------

def test_zephyr_dpo_maps_to_the_handbook_run():
    """8 per device x 8 GPUs x 2 accumulation = 128 pairs per step, as configs/ultrachat_dpo.yaml took it from the
    same recipe; beta 0.01, lr 5e-7, cosine with 10% warmup, one epoch, DPO's sigmoid loss on the given pairs."""
    cfg, table = _load(ZEPHYR_DPO, ["num_processes=8"])
    p = cfg.policy
    assert (cfg.run.method, p.pairs, cfg.sft.enabled, p.objective) == ("dpo", "dataset", False, "dpo")
    assert (p.batch_size, p.accum_steps, p.beta, p.learning_rate) == (128, 2, 0.01, 5e-7)
    assert (p.schedule, p.warmup_ratio, p.epochs, p.max_steps, p.optimizer) == ("cosine", 0.1, 1, 0, "adamw")
    assert p.label_smoothing == 0.0 and p.build_objective().defaults == {"beta": 0.01, "label_smoothing": 0.0}
    assert (cfg.model.path, cfg.model.dtype, cfg.model.param_dtype, cfg.model.remat) == (
        "alignment-handbook/zephyr-7b-sft-full", "bfloat16", "float32", "full")
    assert (cfg.data.max_length, cfg.data.max_prompt_length, cfg.data.num_proc) == (1024, 512, 12)
    # two splits of one dataset taken whole; test_split_size=2000 held out (the last 2000 rows, used for eval)
    assert (cfg.data.train.source, cfg.data.train.name, cfg.data.train.split) == (
        "HuggingFaceH4/ultrafeedback_binarized", "default", "train_prefs+test_prefs[:-2000]")
    for held in (cfg.data.eval_prefs, cfg.data.eval_prompts):
        assert (held.source, held.split) == ("HuggingFaceH4/ultrafeedback_binarized", "test_prefs[-2000:]")
    assert (cfg.eval.eval_steps, cfg.run.logging_steps, p.save_every, cfg.reliability.keep_checkpoints) == (
        100, 10, 100, 1)
    assert (cfg.run.seed, cfg.run.name, cfg.run.workdir, cfg.run.trackers) == (
        42, "zephyr-7b-dpo-full", "data/zephyr-7b-dpo-full", "")
    assert (cfg.export.push_to_hub, cfg.export.hub_id) == (True, "zephyr-7b-dpo-full")
    # the table: every key of the recipe, the batch arithmetic, what is not applicable
    assert table.startswith("# TRL names -> jaxalign (DPO trainer)")
    assert "global = 8 per device x 8 processes x 2 accumulation" in _row(table, "policy.batch_size")
    assert "n/a: a PyTorch" in next(line for line in table.splitlines() if line.startswith("gradient_checkpointing_kwargs"))
    assert "default" in _row(table, "policy.objective")  # loss_type left out: TRL's sigmoid
    ours = dict(config_lib.to_dict(cfg)["policy"])
    shipped = config_lib.to_dict(config_lib.load("ultrachat_dpo"))["policy"]
    same = ("learning_rate", "optimizer", "schedule", "warmup_ratio", "batch_size", "epochs", "objective", "pairs")
    assert {k: ours[k] for k in same} == {k: shipped[k] for k in same}


def test_without_num_processes_the_batch_is_one_process_and_the_table_says_so():
    cfg, table = _load(ZEPHYR_DPO)
    assert (cfg.policy.batch_size, cfg.policy.accum_steps) == (16, 2)
    assert "num_processes not given: 1" in _row(table, "policy.batch_size")


def test_zephyr_sft_maps_and_shows_what_differs():
    cfg, table = _load(ZEPHYR_SFT, ["num_processes=8"])
    s = cfg.sft
    assert (cfg.run.method, s.enabled, s.batch_size, s.accum_steps, s.learning_rate) == ("sft", True, 128, 1, 2e-5)
    assert (s.schedule, s.warmup_ratio, s.epochs, cfg.model.param_dtype, cfg.model.dtype) == (
        "cosine", 0.1, 1, "bfloat16", "bfloat16")
    assert cfg.data.chat_template.startswith("{% for message in messages %}")
    assert (cfg.data.train.split, cfg.data.train.format, cfg.data.eval_prompts.split) == (
        "train_sft+test_sft[:-1000]", "messages", "test_sft[-1000:]")
    assert (cfg.data.max_length, cfg.data.max_prompt_length) == (2048, 2047)  # max_seq_length; TRL: no prompt limit
    assert cfg.run.trackers == "wandb" and cfg.sft.save_every == 100
    assert "differs: TRL's default puts a conversation's user turns in the loss" in table


def test_zephyr_qlora_maps_lora_and_refuses_4bit():
    message = _refused(ZEPHYR_QLORA)
    assert message.count("(1) ") == 1 and "load_in_4bit=true: jaxalign has no 4-bit base weights" in message
    assert "(2) " not in message
    cfg, table = _load(ZEPHYR_QLORA, ["load_in_4bit=false"])
    lo = cfg.model.lora
    # lora_dropout 0.05 in the file, but DPOConfig's disable_dropout (default true in TRL 1.16) zeroes it once PEFT
    # has wrapped the model, so TRL trains without it
    assert (lo.rank, lo.alpha, lo.dropout, lo.targets) == (128, 128.0, 0.0, ["q", "k", "v", "o", "gate", "up", "down"])
    assert "disable_dropout" in _row(table, "model.lora.dropout")
    assert _load(ZEPHYR_QLORA, ["load_in_4bit=false", "disable_dropout=false"])[0].model.lora.dropout == 0.05
    assert (cfg.policy.batch_size, cfg.policy.accum_steps, cfg.policy.learning_rate) == (16, 4, 5e-6)
    # the older dataset_mixer + dataset_splits: the train split trains, the test split is held out
    assert (cfg.data.train.split, cfg.data.eval_prefs.split) == ("train_prefs", "test_prefs")
    assert "AdamW" in _row(table, "policy.optimizer")  # paged_adamw_32bit: the same update


# ---- SmolLM2 / SmolLM3 ------------------------------------------------------------------------------------------

def test_smollm2_dpo_mixture_maps():
    cfg, _ = _load(SMOLLM2_DPO, ["num_processes=8"])
    p = cfg.policy
    assert (p.batch_size, p.accum_steps, p.beta, p.learning_rate, p.epochs) == (128, 8, 0.5, 1e-6, 3)
    assert (cfg.run.trackers, cfg.export.hub_private, cfg.data.train.split) == (
        "tensorboard,wandb", True, "train_prefs+test_prefs[:-2000]")


def test_smollm2_sft_dataset_name_maps():
    cfg, table = _load(SMOLLM2_SFT)
    assert (cfg.data.train.source, cfg.data.train.name, cfg.data.train.split) == ("HuggingFaceTB/smoltalk", "all",
                                                                                  "train")
    assert (cfg.data.eval_prompts.source, cfg.data.eval_prompts.split) == ("HuggingFaceTB/smoltalk", "test")
    assert (cfg.sft.batch_size, cfg.sft.learning_rate, cfg.sft.epochs, cfg.data.max_length) == (16, 3e-4, 2, 8192)
    assert cfg.sft.save_every == 500 and "default" in _row(table, "sft.save_every")  # save_steps: TRL's default


def test_smollm3_apo_is_refused_in_one_paragraph_naming_each_key():
    message = _refused(SMOLLM3_APO)
    for key in ("model_revision=it-SFT", "dataset_mixture=", "subsamples its datasets", "cosine_with_min_lr",
                "lr_scheduler_kwargs=", "loss_type=apo_zero"):
        assert key in message, key
    assert "use_liger_kernel" not in message and "attn_implementation" not in message  # not applicable, not fatal
    assert "or set data.train.source" in message and "or set model.path" in message


def test_a_refused_trainer_and_an_unknown_one():
    assert "a TRL ORPO recipe" in _refused(ZEPHYR_ORPO)
    assert "is not a TRL trainer jaxalign runs" in _refused(ZEPHYR_DPO, trainer="ppo2")


# ---- the TRL example config, open-r1's GRPO demo -----------------------------------------------------------------

def test_trl_example_config_needs_its_trainer():
    message = _refused(TRL_EXAMPLE)
    assert "cannot tell which TRL trainer" in message and "--trainer" in message
    cfg, table = _load(TRL_EXAMPLE, trainer="sft")
    s = cfg.sft
    assert (cfg.model.path, cfg.data.train.source, s.learning_rate, s.schedule) == (
        "Qwen/Qwen2.5-0.5B", "stanfordnlp/imdb", 1e-4, "cosine")
    # what the file leaves out takes TRL's defaults (3 epochs, batch 8, no warmup, seed 42, bf16, remat)
    assert (s.epochs, s.batch_size, s.warmup_ratio, cfg.run.seed, cfg.model.dtype, cfg.model.remat) == (
        3, 8, 0.0, 42, "bfloat16", "full")
    assert cfg.run.trackers == "" and "default" in _row(table, "sft.epochs")
    same, _ = _load(TRL_EXAMPLE, ["run.method=sft"])  # run.method on the command line says it too
    assert same == cfg


def test_grpo_recipe_maps_to_an_onpolicy_round_and_refuses_reward_functions():
    message = _refused(OPENR1_GRPO)
    for key in ("reward_funcs=", "system_prompt=", "dataset_configs=", "did you mean dataset_config?"):
        assert key in message, key
    cfg, _ = _load(OPENR1_GRPO, ["reward_funcs=null", "system_prompt=null", "dataset_configs=null",
                                 "data.gold_metric=instructions", "epsilon_high=0.28", "loss_type=dr_grpo",
                                 "scale_rewards=none"])
    p = cfg.policy
    assert (cfg.run.method, cfg.run.rounds, cfg.run.phases, p.kind, p.reward) == ("irl", 1, "policy,eval", "grpo",
                                                                                 "gold")
    assert (p.num_samples, p.batch_size, p.accum_steps, cfg.sample.max_new_tokens) == (16, 64, 4, 1024)
    assert (p.clip, p.clip_high, p.kl_coef, p.length_norm, p.grpo_scale) == (0.2, 0.28, 0.0, "constant", False)
    assert (cfg.data.max_prompt_length, cfg.data.max_length, cfg.sample.temperature) == (512, 1536, 1.0)


# ---- TRL names on the command line; did-you-mean --------------------------------------------------------------------

def test_trl_names_override_a_trl_recipe_and_jaxalign_keys_win():
    cfg, table = _load(ZEPHYR_DPO, ["loss_type=ipo", "beta=0.05", "per_device_train_batch_size=2",
                                    "policy.learning_rate=1e-6"])
    p = cfg.policy
    assert (p.objective, p.beta, p.batch_size, p.accum_steps, p.learning_rate) == ("ipo", 0.05, 4, 2, 1e-6)
    assert "replaced: policy.learning_rate is set explicitly" in _row(table, "policy.learning_rate")


def test_trl_names_override_a_jaxalign_recipe():
    shown = []
    cfg = config_lib.load("ultrachat_dpo", ["loss_type=robust", "label_smoothing=0.2", "beta=0.05"],
                          echo=shown.append)
    p = cfg.policy
    assert (p.objective, p.label_smoothing, p.beta, p.batch_size, cfg.run.seed) == ("robust", 0.2, 0.05, 128, 42)
    assert "policy.objective" in shown[0] and "default" not in shown[0]  # no TRL defaults for a jaxalign recipe


def test_did_you_mean_knows_trl_names():
    with pytest.raises(ConfigError, match=r"unknown config key 'lerning_rate'\. Did you mean learning_rate"):
        config_lib.load("demo_cpu", ["lerning_rate=1e-5"])


def test_a_jaxalign_key_lifts_the_refusal_it_replaces(tmp_path):
    cfg, table = _load(SMOLLM3_APO, ["model.path=/models/smollm3", "data.train.source=prefs.jsonl",
                                     "policy.schedule=cosine", "loss_type=sigmoid"])
    assert (cfg.model.path, cfg.data.train.source, cfg.policy.schedule, cfg.policy.objective) == (
        "/models/smollm3", "prefs.jsonl", "cosine", "dpo")
    assert "replaced: data.train.source replaces the recipe's datasets" in table


# ---- the loss options a user tunes ---------------------------------------------------------------------------------

def test_loss_options_reach_the_objective():
    import jax.numpy as jnp
    import numpy as np

    from jaxalign.losses.preference import dpo_loss, simpo_loss

    pc, pr, rc, rr = (jnp.array(v) for v in ([-3.0, -1.0], [-4.0, -0.5], [-3.5, -1.2], [-3.0, -0.7]))
    cfg = config_lib.load("ultrachat_dpo", ["policy.label_smoothing=0.2", "policy.beta=0.3"])
    fn = cfg.policy.step().objective.fn
    got = fn(pc, pr, rc, rr, **cfg.policy.build_objective().defaults)[0]
    want = dpo_loss(pc, pr, rc, rr, beta=0.3, label_smoothing=0.2)[0]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    simpo = config_lib.load("ultrachat_dpo", ["policy.objective=simpo", "policy.simpo_gamma=1.25"])
    o = simpo.policy.build_objective()
    assert o.defaults == {"beta": 0.1, "gamma": 1.25}  # the recipe's beta
    np.testing.assert_allclose(o.fn(pc, pr, **o.defaults)[0], simpo_loss(pc, pr, beta=0.1, gamma=1.25)[0])
    with pytest.raises(ConfigError, match=r"policy.label_smoothing=0.1: policy.objective=ipo has no label_smoothing"):
        config_lib.load("ultrachat_dpo", ["policy.objective=ipo", "policy.label_smoothing=0.1"])
    with pytest.raises(ConfigError, match=r"policy.label_smoothing=0.7: a rate of flipped labels"):
        config_lib.load("ultrachat_dpo", ["policy.label_smoothing=0.7"])


def test_onpolicy_options_reach_the_step_settings():
    from jaxalign.pipeline.onpolicy import settings_of

    cfg = config_lib.load("demo_cpu", ["policy.kind=grpo", "policy.clip_high=0.28", "policy.kl_bias_correction=false",
                                       "policy.rollout_batch_size=32"])
    s = settings_of(cfg)
    assert (s.clip, s.clip_high, s.kl_bias_correction) == (0.2, 0.28, False)
    assert settings_of(config_lib.load("demo_cpu", ["policy.kind=grpo", "policy.rollout_batch_size=32"])).clip_high \
        is None  # 0 = the symmetric clip


def test_clip_high_changes_the_grpo_loss_as_trl_epsilon_high():
    import jax.numpy as jnp

    from jaxalign.losses.onpolicy import grpo_loss

    logp = jnp.log(jnp.array([[1.5, 1.1]]))  # ratio 1.5 and 1.1 against old log-probs of 0
    old, mask, adv = jnp.zeros((1, 2)), jnp.ones((1, 2)), jnp.array([1.0])
    sym = grpo_loss(logp, old, old, adv, mask, clip=0.2, kl_coef=0.0)[0]
    high = grpo_loss(logp, old, old, adv, mask, clip=0.2, clip_high=0.28, kl_coef=0.0)[0]
    assert float(sym) == pytest.approx(-(1.2 + 1.1) / 2) and float(high) == pytest.approx(-(1.28 + 1.1) / 2)


# ---- TRL's reward-modelling LoRA example: RewardTrainer -> run.method=reward -----------------------------------------

def _reward_variant(tmp_path, drop=(), **changes) -> Path:
    """The reward example with keys dropped or changed, written where its path names no trainer."""
    keys = {k: v for k, v in yaml.safe_load(TRL_REWARD_LORA.read_text()).items() if k not in drop}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**keys, **changes}))
    return path


def test_trl_reward_lora_example_maps_to_a_reward_run():
    """The Bradley-Terry reward model of TRL's LoRA example: lr 1e-4, 8 pairs per step, one epoch, PEFT r=32 / alpha
    16 on q_proj / v_proj with the score head trained (SEQ_CLS), held-out pairs of the test split every 50 steps."""
    cfg, table = _load(TRL_REWARD_LORA)
    r = cfg.reward
    assert (cfg.run.method, cfg.run.round_phases(cfg.policy.kind), cfg.sft.enabled) == ("reward", ["reward"], False)
    assert (r.learning_rate, r.batch_size, r.accum_steps, r.epochs, r.max_steps) == (1e-4, 8, 1, 1, 0)
    # what the file leaves out takes RewardConfig's defaults: linear, no warmup, no centring, save_steps 500
    assert (r.schedule, r.warmup_ratio, r.center_coef, r.margin, r.save_every, r.optimizer) == (
        "linear", 0.0, 0.0, 0.0, 500, "adamw")
    lo = cfg.model.lora
    # LoRA dropout: TRL's disable_dropout (default true) zeroes PEFT's lora_dropout after wrapping the model
    assert (lo.rank, lo.alpha, lo.dropout, lo.targets) == (32, 16.0, 0.0, ["q", "v"])
    assert (cfg.model.path, cfg.model.dtype, cfg.model.param_dtype, cfg.model.remat) == (
        "Qwen/Qwen2-0.5B-Instruct", "bfloat16", "float32", "full")
    assert (cfg.data.train.source, cfg.data.train.split, cfg.data.train.format) == (
        "trl-lib/ultrafeedback_binarized", "train", "auto")
    assert (cfg.data.eval_prefs.source, cfg.data.eval_prefs.split) == ("trl-lib/ultrafeedback_binarized", "test")
    assert cfg.data.eval_prompts.source == ""  # TRL's reward trainer generates nothing
    assert (cfg.data.max_length, cfg.data.max_prompt_length, cfg.data.completion_end) == (2048, 2047, "template")
    assert (cfg.eval.eval_steps, cfg.run.logging_steps, cfg.run.seed, cfg.run.name) == (
        50, 10, 42, "Qwen2-0.5B-Reward-LoRA")
    assert table.startswith("# TRL names -> jaxalign (REWARD trainer)")
    assert "0.0001" in _row(table, "reward.learning_rate") and "default" not in _row(table, "reward.learning_rate")
    assert "default" in _row(table, "reward.schedule") and "zeroes LoRA's dropout" in _row(table, "model.lora.dropout")
    lines = table.splitlines()
    assert "differs: TRL's reward trainer drops a pair" in "\n".join(lines)
    assert any(line.startswith("margin (column)") and "n/a:" in line and "reward.margin" in line for line in lines)
    assert any(line.startswith("lora_task_type") and "n/a: as jaxalign does" in line for line in lines)


def test_the_reward_example_is_a_file_trl_reward_reads_and_maps_to_what_it_parses():
    """``trl reward --config`` (TRL 1.16's parser, unknown keys fatal) reads the stored file; jaxalign's settings are
    the ones TRL parses from it."""
    pytest.importorskip("trl")
    from trl.scripts.reward import make_parser

    script, args, model, _ = make_parser().parse_args_and_config(
        ["--config", str(TRL_REWARD_LORA), "--use_cpu", "true"], fail_with_unknown_args=True)  # no GPU here
    cfg, _ = _load(TRL_REWARD_LORA)
    assert (cfg.model.path, cfg.data.train.source) == (model.model_name_or_path, script.dataset_name)
    assert (cfg.data.train.split, cfg.data.eval_prefs.split) == (script.dataset_train_split, script.dataset_test_split)
    assert (cfg.reward.learning_rate, cfg.reward.batch_size, cfg.reward.epochs) == (
        args.learning_rate, args.per_device_train_batch_size, args.num_train_epochs)
    assert (cfg.data.max_length, cfg.eval.eval_steps, cfg.reward.center_coef) == (
        args.max_length, args.eval_steps, args.center_rewards_coefficient or 0.0)
    assert (cfg.model.lora.rank, cfg.model.lora.alpha, model.use_peft, model.lora_task_type) == (
        model.lora_r, model.lora_alpha, True, "SEQ_CLS")
    assert args.disable_dropout and cfg.model.lora.dropout == 0.0


def test_reward_recipes_are_told_by_their_keys(tmp_path):
    anonymous = _reward_variant(tmp_path)  # recipe.yaml: lora_task_type SEQ_CLS says a reward model
    assert _load(anonymous)[0].run.method == "reward"
    cfg, table = _load(_reward_variant(tmp_path, center_rewards_coefficient=0.01))
    assert (cfg.run.method, cfg.reward.center_coef) == ("reward", 0.01)
    assert "0.01" in _row(table, "reward.center_coef")
    bare = _reward_variant(tmp_path, drop=("lora_task_type",))
    assert "cannot tell which TRL trainer" in _refused(bare) and "reward" in _refused(bare)
    assert _load(bare, trainer="reward")[0].run.method == "reward"
    assert _load(bare, ["run.method=reward"])[0].run.method == "reward"
    # TRL names on a jaxalign recipe that runs run.method=reward
    cfg = config_lib.load("hh_helpful_prefs", ["run.method=reward", "center_rewards_coefficient=0.01"])
    assert (cfg.reward.center_coef, cfg.policy.learning_rate) == (0.01, 1e-4)
    assert config_lib.load(str(TRL_REWARD_LORA), ["center_rewards_coefficient=null"]).reward.center_coef == 0.0


def test_reward_recipe_settings_that_differ_from_other_trainers(tmp_path):
    # loss_type / beta / max_prompt_length are not RewardConfig's: the reward trainer never reads them (they
    # are DPO's, so the trainer is named)
    cfg, table = _load(TRL_REWARD_LORA, ["beta=0.5", "loss_type=ipo", "max_prompt_length=64"], trainer="reward")
    assert (cfg.policy.beta, cfg.data.max_prompt_length) == (-1.0, 2047)
    for key in ("beta", "loss_type", "max_prompt_length"):
        assert any(line.startswith(key) and "n/a: not a setting of TRL's REWARD trainer" in line
                   for line in table.splitlines()), key
    # disable_dropout: false keeps PEFT's lora_dropout (0.05 by default)
    assert _load(TRL_REWARD_LORA, ["disable_dropout=false"])[0].model.lora.dropout == 0.05
    assert _load(TRL_REWARD_LORA, ["disable_dropout=false", "lora_dropout=0.1"])[0].model.lora.dropout == 0.1
    # full fine-tuning: the backbone and the head
    assert _load(TRL_REWARD_LORA, ["use_peft=false"])[0].model.lora.rank == 0
    # the head named in modules_to_save trains under CAUSAL_LM as under SEQ_CLS
    cfg, table = _load(_reward_variant(tmp_path, drop=("lora_task_type",), lora_modules_to_save=["score"]),
                       trainer="reward")
    assert cfg.model.lora.rank == 32 and "differs" not in next(
        line for line in table.splitlines() if line.startswith("lora_modules_to_save"))
    # lora_task_type left out: TRL's CAUSAL_LM freezes the head; shown, not fatal (as assistant_only_loss for SFT)
    _, table = _load(_reward_variant(tmp_path, drop=("lora_task_type",)), trainer="reward")
    assert "differs: TRL's default CAUSAL_LM leaves the score head frozen" in table
    _, table = _load(TRL_REWARD_LORA, ["lora_task_type=null"])  # cleared on the command line: the same
    assert "differs: TRL's default CAUSAL_LM leaves the score head frozen" in table


def test_reward_recipe_refusals_name_each_key(tmp_path):
    message = _refused(TRL_REWARD_LORA, ["lora_task_type=CAUSAL_LM", "pad_token=<pad>"])
    assert "(1) lora_task_type=CAUSAL_LM: with this task type PEFT leaves the reward model's score head " \
        "frozen" in message
    assert "(2) pad_token=<pad>: deprecated in TRL 1.1" in message and "or set model.tokenizer" in message
    assert "(3) " not in message
    # modules_to_save beyond the head: the head trains (so CAUSAL_LM is fine), lm_head is not jaxalign's to train
    message = _refused(TRL_REWARD_LORA, ["lora_task_type=CAUSAL_LM", "lora_modules_to_save=[score,lm_head]"])
    assert message.count("(1) ") == 1 and "(2) " not in message
    assert "(1) lora_modules_to_save=[\"score\", \"lm_head\"]: jaxalign's LoRA trains adapters only" in message
    # per-row margins: a mixture whose columns name TRL's margin column
    mixture = _reward_variant(tmp_path, drop=("dataset_name",), datasets=[
        {"path": "my/prefs", "split": "train", "columns": ["chosen", "rejected", "margin"]}])
    message = _refused(mixture)
    assert "margin (column)=[\"chosen\", \"rejected\", \"margin\"]: TRL's reward trainer subtracts each row's " \
        "margin column" in message and "or set reward.margin" in message
    cfg = config_lib.load(str(mixture), ["reward.margin=0.5"])  # one constant margin instead: lifted
    assert (cfg.reward.margin, cfg.data.train.source, cfg.data.train.split) == (0.5, "my/prefs", "train")
    plain = _reward_variant(tmp_path, drop=("dataset_name",), datasets=[
        {"path": "my/prefs", "split": "train", "columns": ["chosen", "rejected"]}])
    assert config_lib.load(str(plain)).data.train.source == "my/prefs"


# ---- TRL's defaults as written in jaxalign/trl_recipes/names.py ------------------------------------------------------------

def test_trl_defaults_match_the_installed_trl():
    trl = pytest.importorskip("trl")
    from jaxalign.trl_recipes import names
    from jaxalign.trl_recipes.names import TRL_DEFAULTS

    classes = {"sft": trl.SFTConfig, "dpo": trl.DPOConfig, "grpo": trl.GRPOConfig, "rloo": trl.RLOOConfig,
               "reward": trl.RewardConfig}
    ours_only = {"warmup_ratio", "bf16"}  # transformers 5 folds warmup_ratio into warmup_steps; bf16 None -> True
    for trainer, cls in classes.items():
        fields = {f.name: f.default for f in dataclasses.fields(cls)}
        for key, value in TRL_DEFAULTS[trainer].items():
            if key in ours_only:
                continue
            theirs = fields[key]
            theirs = theirs[0] if isinstance(theirs, list) and len(theirs) == 1 else theirs
            if key == "loss_type" and theirs is dataclasses.MISSING:  # DPO's is a default_factory: ["sigmoid"]
                theirs = next(f for f in dataclasses.fields(cls) if f.name == key).default_factory()[0]
            assert theirs == value, (trainer, key, theirs, value)
    assert {f.name: f.default for f in dataclasses.fields(trl.SFTConfig)}["warmup_steps"] == 0  # no warmup
    reward = {f.name: f.default for f in dataclasses.fields(trl.RewardConfig)}
    # left out of TRL_DEFAULTS["reward"] because jaxalign's own defaults are TRL's: no centring term, AdamW, clipping
    # at 1, no weight decay; disable_dropout (true) is what zeroes model.lora.dropout in a reward recipe
    assert (reward["center_rewards_coefficient"], reward["weight_decay"], reward["max_grad_norm"]) == (None, 0.0, 1.0)
    ours = config_lib.Config().reward
    assert (ours.center_coef, ours.margin, ours.weight_decay, ours.max_grad_norm, ours.optimizer) == (
        0.0, 0.0, 0.0, 1.0, "adamw")
    assert reward["disable_dropout"] is True and reward["optim"] in names.ADAMW


# ---- bad input through the launcher: exit 2, one paragraph, nothing compiled ----------------------------------------

def test_launcher_refuses_with_exit_2_and_prints_the_table_first(capsys, tmp_path):
    from jaxalign import cli

    rc = cli.main(["--config", str(SMOLLM3_APO), "--workdir", str(tmp_path / "w")])
    out, err = capsys.readouterr()
    assert rc == 2 and not (tmp_path / "w").exists()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("jaxalign: error: ") and "loss_type=apo_zero" in lines[0]
    assert out.startswith("# TRL names -> jaxalign (DPO trainer)") and "# resolved config" not in out


def test_launcher_refuses_a_reward_recipe_key_with_exit_2(capsys, tmp_path):
    """A reward recipe that keeps TRL's default CAUSAL_LM task type while naming it: the frozen score head PEFT would
    leave is not jaxalign's reward LoRA, so the launcher stops (exit 2) with the reason, the table printed first."""
    from jaxalign import cli

    rc = cli.main(["--config", str(TRL_REWARD_LORA), "--workdir", str(tmp_path / "w"), "lora_task_type=CAUSAL_LM"])
    out, err = capsys.readouterr()
    assert rc == 2 and not (tmp_path / "w").exists()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("jaxalign: error: ")
    assert "(1) lora_task_type=CAUSAL_LM: with this task type PEFT leaves the reward model's score head frozen" in \
        lines[0] and "(2) " not in lines[0]
    assert out.startswith("# TRL names -> jaxalign (REWARD trainer)") and "# resolved config" not in out


def _run_on_tiny_model(shared_data, tmp_path, recipe, overrides: list[str]) -> tuple[Path, str]:
    """``recipe`` as written on a tiny Llama, its dataset a local folder with a train and a test split (as the hub
    one): (work directory, the launcher's output); the run must succeed."""
    slices = tiny_recipe.write_slices(shared_data, tmp_path / "slices")
    data = tmp_path / "prefs"
    data.mkdir()
    shutil.copy(slices["prefs_train"], data / "train.jsonl")
    shutil.copy(slices["prefs_test"], data / "test.jsonl")
    model = tiny_recipe.make_tiny_llama(tmp_path / "model")
    work = tmp_path / "run"
    overrides = [f"model_name_or_path={model}", f"model.tokenizer={shared_data / tiny_recipe.TOKENIZER}",
                 f"dataset_name={data}", *overrides]
    proc = subprocess.run([sys.executable, str(LAUNCHER), "--config", str(recipe), "--workdir", str(work),
                           *overrides], cwd=REPO, env=tiny_recipe.subprocess_env(tmp_path / "jax_cache"),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return work, proc.stdout


# ---- end to end: the zephyr DPO recipe on a tiny model ---------------------------------------------------------------

@pytest.mark.slow
def test_zephyr_dpo_recipe_runs_end_to_end_on_a_tiny_model(shared_data, tmp_path):
    work, out = _run_on_tiny_model(shared_data, tmp_path, ZEPHYR_DPO, [
        "max_length=128", "max_prompt_length=64", "per_device_train_batch_size=4", "max_steps=2", "eval_steps=1",
        "push_to_hub=false", "data.train.limit=32", "eval.num_prompts=8", "eval.max_new_tokens=8",
        "run.show_progress=false"])
    assert out.index("# TRL names -> jaxalign (DPO trainer)") < out.index("# resolved config")
    assert "global = 4 per device x 1 processes x 2 accumulation" in out
    assert "replaced by" not in out and "refused" not in out
    done = {p.parent.name: json.loads(p.read_text()) for p in (work / "phases").glob("*/done.json")}
    assert set(done) == {"eval0", "r1_policy", "r1_eval"}, sorted(done)
    metrics = done["r1_policy"]["metrics"]
    assert metrics["steps"] == 2 and metrics["pairs"] == 32 and metrics["loss"] == metrics["loss"]
    assert "eval_loss" in metrics  # the held-out pairs of the test split, every eval_steps=1 steps
    written = yaml.safe_load((work / "run.yaml").read_text())
    assert (written["policy"]["objective"], written["policy"]["beta"], written["policy"]["learning_rate"]) == (
        "dpo", 0.01, 5e-7)
    assert (written["policy"]["batch_size"], written["policy"]["accum_steps"], written["model"]["remat"]) == (
        8, 2, "full")
    assert (written["data"]["train"]["split"], written["data"]["eval_prefs"]["split"]) == ("train", "test")


# ---- end to end: TRL's reward LoRA example on a tiny model -----------------------------------------------------------

@pytest.mark.slow
def test_trl_reward_lora_example_runs_end_to_end_on_a_tiny_model(shared_data, tmp_path):
    """run.method=reward from the recipe as written: the reward phase trains the LoRA adapters and the score head on
    the train split's pairs and logs held-out metrics on the test split's pairs every eval_steps=1 steps."""
    work, out = _run_on_tiny_model(shared_data, tmp_path, TRL_REWARD_LORA, [
        "max_length=128", "per_device_train_batch_size=4", "max_steps=2", "eval_steps=1", "data.train.limit=32",
        "eval.num_prompts=8", "eval.max_new_tokens=8", "run.show_progress=false"])
    assert out.index("# TRL names -> jaxalign (REWARD trainer)") < out.index("# resolved config")
    assert "global = 4 per device x 1 processes x 1 accumulation" in out
    assert "replaced by" not in out and "refused" not in out
    done = {p.parent.name: json.loads(p.read_text()) for p in (work / "phases").glob("*/done.json")}
    assert set(done) == {"r1_reward"}, sorted(done)  # a reward run trains no policy: no eval0
    metrics = done["r1_reward"]["metrics"]
    assert metrics["steps"] == 2 and metrics["loss"] == metrics["loss"]
    for key in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"):  # the test split's pairs
        assert key in metrics and metrics[key] == metrics[key], key
    logged = [json.loads(line) for line in (work / "phases" / "r1_reward" / "tb" / "metrics.jsonl").read_text()
              .splitlines()]
    assert len([r for r in logged if r.get("split") == "eval"]) >= 2  # every step (eval_steps=1) and at the end
    written = yaml.safe_load((work / "run.yaml").read_text())
    assert (written["run"]["method"], written["reward"]["learning_rate"], written["reward"]["batch_size"]) == (
        "reward", 1e-4, 4)
    assert (written["model"]["lora"]["rank"], written["model"]["lora"]["alpha"], written["model"]["lora"]["dropout"]) \
        == (32, 16.0, 0.0)
    assert (written["data"]["train"]["split"], written["data"]["eval_prefs"]["split"], written["eval"]["eval_steps"],
            written["data"]["completion_end"]) == ("train", "test", 1, "template")
    assert (work / "phases" / "r1_reward" / "model").is_dir()
