"""TRL / alignment-handbook recipe names and what each one becomes in jaxalign: the data of the name map.

A TRL recipe is a flat YAML mapping of the trainer's config fields (``learning_rate``, ``loss_type``,
``per_device_train_batch_size``, ...), the model arguments (``model_name_or_path``, ``lora_r``, ...) and the script's
dataset arguments (``dataset_name``, the handbook's ``dataset_mixture``). Every name below falls in one of three kinds:

- mapped: it sets one or more jaxalign keys (the translation is :mod:`jaxalign.trl_recipes.recipe`, datasets
  :mod:`jaxalign.trl_recipes.data`);
- not applicable: it only tunes PyTorch or the Trainer's bookkeeping (kernels, dataloader workers, when to log or
  save) and changes nothing jaxalign trains; it is listed in the table, never fatal;
- refused: it changes what is trained in a way jaxalign cannot reproduce (a loss jaxalign lacks, 4-bit weights,
  NEFTune noise, ...); the run stops with exit code 2 and one paragraph naming every such key.

Defaults are TRL 1.16's (the version jaxalign's parity tests pin): a recipe is run as TRL would run it, so a key the
recipe leaves out takes TRL's default where jaxalign's own default differs (``tests/test_trl_recipes.py`` checks the
values against the installed TRL).
"""
from __future__ import annotations

import dataclasses
from typing import Any

# TRL trainer -> (run.method, the config section its optimisation settings go to)
TRAINERS = {"sft": ("sft", "sft"), "dpo": ("dpo", "policy"), "cpo": ("dpo", "policy"),
            "grpo": ("irl", "policy"), "rloo": ("irl", "policy"), "reward": ("reward", "reward")}
# trainers jaxalign has no counterpart for (arXiv ids: docs/trl_users.md)
REFUSED_TRAINERS = {
    "orpo": "ORPO (odds-ratio preference optimisation) is not an objective jaxalign has",
    "kto": "KTO (unpaired, prospect-theoretic) is not an objective jaxalign has",
    "ppo": "TRL's PPO optimises a given reward model; jaxalign's policy.kind=ppo trains its reward model inside IRL "
           "rounds (run.method=irl), so write that recipe in jaxalign's own sections",
    "online_dpo": "online DPO with a judge is not a method jaxalign has",
    "xpo": "XPO is not a method jaxalign has", "nash_md": "Nash-MD is not a method jaxalign has",
    "gkd": "GKD (on-policy distillation) is not a method jaxalign has",
    "bco": "BCO is not an objective jaxalign has", "prm": "process reward models are not something jaxalign trains",
}
# keys that only one family of trainers has: they tell which trainer wrote a recipe without a --trainer hint
TRAINER_HINTS = {
    "packing": {"sft"}, "packing_strategy": {"sft"}, "dataset_text_field": {"sft"}, "max_seq_length": {"sft"},
    "assistant_only_loss": {"sft"}, "completion_only_loss": {"sft"}, "eval_packing": {"sft"},
    "max_prompt_length": {"dpo", "cpo", "grpo", "rloo"}, "precompute_ref_log_probs": {"dpo"}, "rpo_alpha": {"dpo"},
    "ld_alpha": {"dpo"}, "use_weighting": {"dpo"}, "f_divergence_type": {"dpo"}, "reference_free": {"dpo"},
    "loss_weights": {"dpo"}, "label_smoothing": {"dpo", "cpo"}, "simpo_gamma": {"cpo"}, "cpo_alpha": {"cpo"},
    "num_generations": {"grpo", "rloo"}, "max_completion_length": {"grpo", "rloo"}, "epsilon": {"grpo", "rloo"},
    "epsilon_high": {"grpo", "rloo"}, "scale_rewards": {"grpo"}, "use_bias_correction_kl": {"grpo"},
    "mask_truncated_completions": {"grpo", "rloo"}, "rloo_k": {"rloo"}, "normalize_advantages": {"rloo"},
    "center_rewards_coefficient": {"reward"},
}
# PEFT task types that tell the trainer by their value (lora_task_type: SEQ_CLS is a reward model's head)
LORA_TASK_TYPES = {"SEQ_CLS": {"reward"}}
# PEFT modules_to_save that name a sequence-classification head (PEFT's SEQ_CLS adds both); jaxalign's reward LoRA
# trains the whole head with the adapters
SCORE_HEADS = ("score", "classifier")
LOSS_TYPES = {  # TRL loss_type -> the trainers that have it
    **{k: {"dpo"} for k in ("sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
                            "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft")},
    **{k: {"grpo"} for k in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")},
    "simpo": {"cpo"}, "alphapo": {"cpo"}, "nll": {"sft"}, "dft": {"sft"},
}
DPO_LOSSES = {"sigmoid": "dpo", "hinge": "hinge", "ipo": "ipo", "robust": "robust"}  # TRL loss_type -> objective
GRPO_LOSSES = {"grpo": "sequence", "bnpo": "token", "dapo": "token", "dr_grpo": "constant"}  # -> policy.length_norm

# PEFT module names -> jaxalign's LoRA targets; PEFT's default for Llama / Mistral / Qwen2 is q_proj, v_proj
LORA_MODULES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
                "down_proj": "down"}
PEFT_DEFAULT_TARGETS = ["q", "v"]
ADAMW = ("adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw_torch_xla", "adamw_torch_npu_fused",
         "adamw_apex_fused", "paged_adamw_32bit")

_TORCH = "a PyTorch / accelerate runtime setting"
_BOOKKEEPING = "Trainer bookkeeping; jaxalign logs, checkpoints and resumes by its own run.* / <section>.* keys"
NOT_APPLICABLE = {
    **dict.fromkeys((
        "gradient_checkpointing_kwargs", "attn_implementation", "use_liger_kernel", "ddp_timeout",
        "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
        "dataloader_prefetch_factor", "torch_compile", "torch_compile_backend", "torch_compile_mode", "tf32",
        "fsdp", "fsdp_config", "deepspeed", "ddp_find_unused_parameters", "ddp_backend", "ddp_bucket_cap_mb",
        "local_rank", "padding_free", "pad_to_multiple_of", "activation_offloading", "ds3_gather_for_generation",
        "use_vllm", "vllm_mode", "vllm_gpu_memory_utilization", "vllm_tensor_parallel_size", "vllm_server_host",
        "vllm_server_port", "vllm_server_base_url", "vllm_server_timeout", "vllm_enable_sleep_mode",
        "vllm_importance_sampling_correction", "vllm_device", "vllm_dtype", "vllm_max_model_len",
        "vllm_enable_prefix_caching", "cache_implementation", "precompute_ref_batch_size",
        "torch_empty_cache_steps", "skip_memory_metrics", "use_cpu", "bf16_full_eval", "fp16_full_eval",
        "half_precision_backend", "auto_find_batch_size", "average_tokens_across_devices", "ignore_bias_buffers",
        "model_init_kwargs", "cast_lm_head_to_fp32", "use_transformers_paged"), _TORCH),
    **dict.fromkeys((
        "log_level", "log_level_replica", "log_on_each_node", "logging_dir", "logging_strategy", "logging_first_step",
        "logging_nan_inf_filter", "overwrite_output_dir", "do_train", "do_eval", "do_predict",
        "per_device_eval_batch_size", "eval_accumulation_steps", "eval_delay", "eval_on_start", "save_strategy",
        "save_safetensors", "save_only_model", "save_on_each_node", "hub_strategy", "hub_token", "hub_revision",
        "resume_from_checkpoint", "remove_unused_columns", "load_best_model_at_end", "metric_for_best_model",
        "greater_is_better", "prediction_loss_only", "include_tokens_per_second", "include_num_input_tokens_seen",
        "log_completions", "num_completions_to_print", "log_unique_prompts", "wandb_log_unique_prompts",
        "generate_during_eval", "dataset_streaming", "streaming", "push_to_hub_organization",
        "hub_always_push", "num_generations_eval"), _BOOKKEEPING),
    "trust_remote_code": "jaxalign implements the architectures it loads; no code from the hub runs",
    "disable_dropout": "jaxalign's decoders have no dropout (LoRA's is model.lora.dropout)",
    "shuffle_dataset": "row order only; jaxalign shuffles every epoch with run.seed",
    "data_seed": "row order only; jaxalign shuffles with run.seed", "group_by_length": "row order only",
    "lora_task_type": "jaxalign's adapters are a causal LM's", "discopop_tau": "used by loss_type=discopop only",
    "dataset_text_field": "jaxalign reads conversational data (messages, prompt / completion, preference pairs); "
                          "a plain-text dataset is refused when it is read",
}
# keys honoured only at these values (TRL's defaults, or ones jaxalign does the same as); any other value is refused
# with the reason given
AT_DEFAULT_ONLY: dict[str, tuple[tuple[Any, ...], str]] = {
    "load_in_4bit": ((False, None), "jaxalign has no 4-bit base weights (model.lora.base_dtype=bfloat16 halves the "
                                    "frozen base instead)"),
    "load_in_8bit": ((False, None), "jaxalign has no 8-bit base weights"),
    "use_dora": ((False, None), "DoRA adapters are not jaxalign's LoRA"),
    "use_rslora": ((False, None), "rank-stabilised LoRA scales by alpha / sqrt(r), jaxalign's LoRA by alpha / r"),
    "lora_modules_to_save": ((None, []), "jaxalign's LoRA trains adapters only"),
    "lora_target_parameters": ((None, []), "jaxalign's LoRA adapts the projections in model.lora.targets"),
    "neftune_noise_alpha": ((None,), "NEFTune's embedding noise is not in jaxalign's SFT step"),
    "sync_ref_model": ((False,), "TR-DPO's reference updates are not jaxalign's (policy.reference=sft / previous)"),
    "rpo_alpha": ((None,), "RPO's NLL term is not in jaxalign's DPO objective"),
    "ld_alpha": ((None,), "LD-DPO's length weighting is not in jaxalign's DPO objective"),
    "use_weighting": ((False, None), "WPO's weighting is not in jaxalign's DPO objective"),
    "f_divergence_type": (("reverse_kl",), "jaxalign's DPO is the reverse-KL one"),
    "reference_free": ((False, None), "reference-free DPO is not an objective jaxalign has (SimPO is)"),
    "loss_weights": ((None,), "a weighted sum of losses is not an objective jaxalign has"),
    "truncation_mode": (("keep_start",), "jaxalign keeps each response's start (and a prompt's end)"),
    "delta": ((None,), "two-sided GRPO clipping is not in jaxalign's GRPO loss"),
    "importance_sampling_level": (("token",), "jaxalign's GRPO ratio is per token"),
    "top_entropy_quantile": ((1.0, 1), "entropy masking is not in jaxalign's GRPO loss"),
    "entropy_coef": ((0.0, 0), "an entropy bonus is not in jaxalign's on-policy losses"),
    "mask_truncated_completions": ((False,), "jaxalign scores truncated samples (policy.missing_eos_penalty)"),
    "reward_weights": ((None,), "jaxalign scores with one reward"),
    "reward_clip_range": ((None,), "jaxalign does not clip rewards"),
    "min_p": ((None,), "jaxalign's sampler has temperature, top_p and top_k"),
    "repetition_penalty": ((1.0, 1), "jaxalign's sampler has no repetition penalty"),
    "eos_token": ((None,), "jaxalign ends turns with the tokenizer's EOS"),
    "chat_template_path": ((None,), "give the template itself as data.chat_template"),
    "optim_args": ((None, ""), "jaxalign's optimizers take no extra arguments"),
    "adam_beta1": ((0.9,), "jaxalign's AdamW uses beta1 = 0.9"),
    "adam_beta2": ((0.999,), "jaxalign's AdamW uses beta2 = 0.999"),
    "adam_epsilon": ((1e-8,), "jaxalign's AdamW uses epsilon = 1e-8"),
    "lr_scheduler_kwargs": ((None, {}, ""), "jaxalign's schedules take no extra arguments"),
    "model_revision": (("main", None), "jaxalign loads a hub model's main revision (or give a local folder as "
                                       "model.path)"),
    "cpo_alpha": ((0.0, 0), "CPO's behaviour-cloning term is not in jaxalign's SimPO objective (SimPO is "
                            "cpo_alpha=0)"),
    "tools": ((None, []), "jaxalign renders no tool schemas"),
    "pad_token": ((None,), "deprecated in TRL 1.1; jaxalign pads with the tokenizer's own pad token (else EOS), so "
                           "give a tokenizer that has the one you want"),
}
# jaxalign keys whose explicit setting replaces what a refused AT_DEFAULT_ONLY key asked for ({s}: the section)
AT_DEFAULT_LIFTED_BY = {"model_revision": ("model.path",), "lr_scheduler_kwargs": ("{s}.schedule",),
                        "chat_template_path": ("data.chat_template",), "pad_token": ("model.tokenizer",)}
# keys of recipes written for other scripts (open-r1's GRPO) that decide what is trained
REFUSED = {
    "reward_funcs": "jaxalign scores on-policy samples with data.gold_metric's scorer (policy.reward=gold) or a "
                    "reward model trained in an IRL round",
    "reward_model_name_or_path": "jaxalign trains its reward model in the round (or scores with data.gold_metric)",
    "reward_model_path": "jaxalign trains its reward model in the round (or scores with data.gold_metric)",
    "system_prompt": "jaxalign adds no system prompt to the data",
    "dataset_prompt_column": "jaxalign reads the prompt from the data format's own columns",
}

# TRL 1.16's defaults where they differ from jaxalign's own, per trainer (applied to keys a recipe leaves out)
_COMMON = {"lr_scheduler_type": "linear", "warmup_ratio": 0.0, "num_train_epochs": 3,
           "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "seed": 42, "logging_steps": 10,
           "save_steps": 500, "bf16": True, "gradient_checkpointing": True, "report_to": "none"}
_ONPOLICY = {"max_completion_length": 512, "temperature": 1.0, "epsilon": 0.2, "num_iterations": 1}
TRL_DEFAULTS = {
    "sft": {**_COMMON, "max_length": 1024, "learning_rate": 2e-5},
    "dpo": {**_COMMON, "max_length": 1024, "learning_rate": 1e-6, "beta": 0.1, "loss_type": "sigmoid",
            "label_smoothing": 0.0},
    "cpo": {**_COMMON, "max_length": 1024, "learning_rate": 1e-6, "beta": 0.1, "loss_type": "sigmoid",
            "label_smoothing": 0.0, "simpo_gamma": 0.5, "cpo_alpha": 1.0},
    "grpo": {**_COMMON, **_ONPOLICY, "learning_rate": 1e-6, "beta": 0.0, "num_generations": 8, "loss_type": "dapo",
             "scale_rewards": "group", "use_bias_correction_kl": True},
    "rloo": {**_COMMON, **_ONPOLICY, "learning_rate": 1e-6, "beta": 0.05, "num_generations": 2,
             "normalize_advantages": False},
    # center_rewards_coefficient None = jaxalign's reward.center_coef 0; disable_dropout True: see model.lora.dropout
    "reward": {**_COMMON, "max_length": 1024, "learning_rate": 1e-4},
}
DEFAULT_ALIASES = {"max_length": ("max_seq_length",), "num_generations": ("rloo_k",), "bf16": ("fp16",)}

# names the translation handles itself (besides the tables above); with them, every name a TRL recipe may hold
MAPPED = (
    "model_name_or_path", "tokenizer_name_or_path", "torch_dtype", "dtype", "bf16", "fp16", "chat_template",
    "dataset_mixture", "datasets", "test_split_size", "dataset_mixer", "dataset_splits", "dataset_name",
    "dataset_config", "dataset_train_split", "dataset_test_split", "dataset_num_proc", "learning_rate",
    "lr_scheduler_type", "warmup_ratio", "warmup_steps", "num_train_epochs", "max_steps",
    "per_device_train_batch_size", "gradient_accumulation_steps", "num_processes", "beta", "loss_type",
    "label_smoothing", "max_length", "max_seq_length", "max_prompt_length", "num_generations", "rloo_k",
    "max_completion_length", "temperature", "top_p", "top_k", "epsilon", "epsilon_high", "num_iterations",
    "num_ppo_epochs", "scale_rewards", "use_bias_correction_kl", "normalize_advantages", "missing_eos_penalty",
    "generation_batch_size", "steps_per_generation", "simpo_gamma", "gradient_checkpointing", "seed", "output_dir",
    "run_name", "report_to", "logging_steps", "save_steps", "save_total_limit", "eval_strategy",
    "evaluation_strategy", "eval_steps", "push_to_hub", "hub_model_id", "hub_private_repo", "use_peft", "lora_r",
    "lora_alpha", "lora_dropout", "lora_target_modules", "weight_decay", "max_grad_norm", "optim", "packing",
    "packing_strategy", "assistant_only_loss", "completion_only_loss", "precompute_ref_log_probs", "disable_tqdm",
    "center_rewards_coefficient",
)


def trl_names() -> tuple[str, ...]:
    """Every TRL / handbook name the map knows (for the did-you-mean suggestions of an unknown key)."""
    return tuple(sorted(set(MAPPED) | set(NOT_APPLICABLE) | set(AT_DEFAULT_ONLY) | set(REFUSED)))


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the mapping table: a TRL key and what it became. ``status``: ``mapped``, ``default`` (the key was
    absent and TRL's default was applied), ``n/a`` (not applicable), ``refused``, ``replaced`` (the user's own
    jaxalign key sets what this TRL key would have), ``differs`` (TRL's behaviour that jaxalign does not reproduce,
    shown, not fatal: docs/trl_users.md). ``lifted_by``: jaxalign keys whose explicit setting replaces a refused
    key's effect (a refusal is lifted when the user sets one of them)."""

    trl_key: str
    trl_value: Any
    our_key: str = ""
    our_value: Any = None
    status: str = "mapped"
    note: str = ""
    lifted_by: tuple[str, ...] = ()


def refuse(key: str, value: Any, why: str, *lifted_by: str) -> Row:
    return Row(key, value, status="refused", note=why, lifted_by=tuple(lifted_by))


def not_applicable(key: str, value: Any, why: str) -> Row:
    return Row(key, value, status="n/a", note=why)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What the translation reads: the TRL keys (the file's, then the command line's TRL names), the trainer, and the
    jaxalign keys the user sets explicitly (they win over anything mapped, and lift refusals)."""

    keys: dict[str, Any]
    trainer: str
    given: frozenset = frozenset()
    from_command_line: frozenset = frozenset()  # TRL keys typed on the command line
    defaults: bool = True  # a whole TRL recipe: TRL's defaults fill what it leaves out (not for overrides alone)

    @property
    def section(self) -> str:
        """The jaxalign section that trains: sft, reward or policy."""
        return TRAINERS[self.trainer][1]

    @property
    def pairs(self) -> bool:
        """A policy trained on given preference pairs (held-out pairs and prompts both mean something)."""
        return self.trainer in ("dpo", "cpo")

    @property
    def held_out(self) -> tuple[str, ...]:
        """The data.* roles a recipe's held-out split fills: pairs for the pair trainers' curves (and the reward
        model's), prompts for the answers of the trainers that generate (the reward trainer generates none)."""
        if self.trainer == "reward":
            return ("eval_prefs",)
        return ("eval_prefs", "eval_prompts") if self.pairs else ("eval_prompts",)
