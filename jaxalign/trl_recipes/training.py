"""The training keys of a TRL / alignment-handbook recipe -> jaxalign keys: one function per TRL key (or per group of
keys that combine, as the batch size does), each returning the table rows it makes. The table of names and TRL's
defaults is :mod:`jaxalign.trl_recipes.names`; the datasets are :mod:`jaxalign.trl_recipes.data`.
"""
from __future__ import annotations

import os
from typing import Any, Callable

from jaxalign.trl_recipes.names import (ADAMW, AT_DEFAULT_ONLY, DPO_LOSSES, GRPO_LOSSES, LORA_MODULES, NOT_APPLICABLE,
                                PEFT_DEFAULT_TARGETS, SCORE_HEADS, Recipe, Row, not_applicable, refuse)

Handler = Callable[[Recipe, str, Any], list[Row]]
DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32", "bf16": "bfloat16", "fp16": "float16",
          "fp32": "float32", "half": "float16", "float": "float32", None: "float32"}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) or isinstance(v, float) and v.is_integer()


def _to(our: str, convert: Callable[[Any], Any] = lambda v: v) -> Handler:
    """A key that sets one jaxalign key (``{s}`` = the trainer's section)."""
    def handler(r: Recipe, key: str, value: Any) -> list[Row]:
        return [Row(key, value, our.format(s=r.section), convert(value))]
    return handler


def _for(trainers: tuple[str, ...], handler: Handler) -> Handler:
    """A key that belongs to some trainers' configs only; in another trainer's recipe it does nothing."""
    def wrapped(r: Recipe, key: str, value: Any) -> list[Row]:
        if r.trainer not in trainers:
            return [not_applicable(key, value, f"not a setting of TRL's {r.trainer.upper()} trainer")]
        return handler(r, key, value)
    return wrapped


def _partner(r: Recipe, key: str, default: Any) -> Any:
    return r.keys.get(key, default)


# ---- batch: jaxalign's batch_size is the GLOBAL batch of one optimizer step, split into accum_steps micro-batches ----

def _batch(r: Recipe, key: str, value: Any) -> list[Row]:
    per_device = _partner(r, "per_device_train_batch_size", 8)
    processes = _partner(r, "num_processes", 1)
    accum = _partner(r, "gradient_accumulation_steps", 1)
    if not all(_is_int(v) and v >= 1 for v in (per_device, processes, accum)):
        return [refuse(key, value, "batch sizes must be whole numbers >= 1", f"{r.section}.batch_size")]
    per_device, processes, accum = int(per_device), int(processes), int(accum)
    if key == "num_processes":
        return [Row(key, value, note="the GPUs (processes) the recipe was written for; see the batch size")]
    if key == "gradient_accumulation_steps":
        if "per_device_train_batch_size" not in r.keys:
            return [refuse(key, value, "give per_device_train_batch_size with it (the global batch is their "
                                       "product)", f"{r.section}.batch_size")]
        return [Row(key, value, f"{r.section}.accum_steps", accum)]
    shown = "" if "num_processes" in r.keys else " (num_processes not given: 1; pass num_processes=N for N GPUs)"
    rows = [Row(key, value, f"{r.section}.batch_size", per_device * processes * accum,
                note=f"global = {per_device} per device x {processes} processes x {accum} accumulation{shown}")]
    if "gradient_accumulation_steps" not in r.keys:
        rows.append(Row(key, value, f"{r.section}.accum_steps", accum))
    return rows


def _rollout(r: Recipe, key: str, value: Any) -> list[Row]:
    """GRPO / RLOO: sequences sampled per rollout batch (TRL's generation batch, global)."""
    if value is None:
        return [not_applicable(key, value, "the rollout batch is the optimizer step's batch")]
    if key == "steps_per_generation":
        value = _partner(r, "per_device_train_batch_size", 8) * _partner(r, "num_processes", 1) * value
    return [Row(key, r.keys[key], "policy.rollout_batch_size", int(value))]


# ---- precision, memory ------------------------------------------------------------------------------------------

def _param_dtype(r: Recipe, key: str, value: Any) -> list[Row]:
    if value not in DTYPES:  # "auto": the checkpoint's own dtype, which jaxalign does not read from the hub
        return [refuse(key, value, "name the dtype the weights train in (float32, bfloat16)", "model.param_dtype")]
    return [Row(key, value, "model.param_dtype", DTYPES[value],
                note="transformers' default (float32)" if value is None else "")]


def _compute_dtype(r: Recipe, key: str, value: Any) -> list[Row]:
    if key == "fp16" and not value:
        return [not_applicable(key, value, "bf16 sets the compute dtype")] if "bf16" in r.keys else \
            [Row(key, value, "model.dtype", "float32")]
    if key == "bf16" and not value and r.keys.get("fp16"):
        return [not_applicable(key, value, "fp16 sets the compute dtype")]
    return [Row(key, value, "model.dtype", ("bfloat16" if key == "bf16" else "float16") if value else "float32",
                note="mixed precision: weights in model.param_dtype, matmuls in model.dtype")]


# ---- schedule, optimizer ----------------------------------------------------------------------------------------

def _schedule(r: Recipe, key: str, value: Any) -> list[Row]:
    s = r.section
    if value in ("linear", "cosine"):
        return [Row(key, value, f"{s}.schedule", value)]
    if value == "constant":  # transformers' constant schedule has no warmup, whatever warmup_ratio says
        return [Row(key, value, f"{s}.schedule", "constant"),
                Row(key, value, f"{s}.warmup_ratio", 0.0, note="transformers' constant schedule has no warmup")]
    if value == "constant_with_warmup":
        return [Row(key, value, f"{s}.schedule", "constant")]
    return [refuse(key, value, "jaxalign's schedules are linear, cosine and constant (each after a linear warmup)",
                   f"{s}.schedule")]


def _warmup(r: Recipe, key: str, value: Any) -> list[Row]:
    s = r.section
    if r.keys.get("lr_scheduler_type") == "constant":
        return [not_applicable(key, value, "transformers' constant schedule has no warmup")]
    if key == "warmup_ratio":
        return [Row(key, value, f"{s}.warmup_ratio", float(value))]
    if not value:
        return [not_applicable(key, value, "no warmup")] if "warmup_ratio" in r.keys else \
            [Row(key, value, f"{s}.warmup_ratio", 0.0)]
    if isinstance(value, float) and value < 1:  # transformers 5: a warmup_steps below 1 is a ratio
        return [Row(key, value, f"{s}.warmup_ratio", value)]
    steps = r.keys.get("max_steps", -1)
    if _is_int(value) and _is_int(steps) and steps > 0:
        return [Row(key, value, f"{s}.warmup_ratio", value / steps, note=f"{value} of max_steps={steps}")]
    return [refuse(key, value, "jaxalign warms up for a fraction of the steps (warmup_ratio); a step count needs "
                               "max_steps to become one", f"{s}.warmup_ratio")]


def _optim(r: Recipe, key: str, value: Any) -> list[Row]:
    if value in ADAMW:
        return [Row(key, value, f"{r.section}.optimizer", "adamw", note="AdamW; the kernel is PyTorch's business")]
    if value == "sgd":
        return [Row(key, value, f"{r.section}.optimizer", "sgd")]
    return [refuse(key, value, "jaxalign's optimizers are AdamW and SGD here (8-bit, paged-8-bit, Adafactor, Lion "
                               "and the rest change the update)", f"{r.section}.optimizer")]


def _epochs(r: Recipe, key: str, value: Any) -> list[Row]:
    if not (_is_int(value) and value >= 1):
        return [refuse(key, value, "jaxalign trains whole epochs (or max_steps)", f"{r.section}.epochs")]
    return [Row(key, value, f"{r.section}.epochs", int(value))]


def _max_steps(r: Recipe, key: str, value: Any) -> list[Row]:
    return [Row(key, value, f"{r.section}.max_steps", max(int(value), 0), note="-1 = epochs" if value < 0 else "")]


# ---- the objective ----------------------------------------------------------------------------------------------

def _loss(r: Recipe, key: str, value: Any) -> list[Row]:
    name = value[0] if isinstance(value, list) and len(value) == 1 else value
    if isinstance(name, list):
        return [refuse(key, value, "a weighted sum of losses is not an objective jaxalign has", "policy.objective")]
    if r.trainer == "dpo" and name in DPO_LOSSES:
        return [Row(key, value, "policy.objective", DPO_LOSSES[name])]
    if r.trainer == "cpo" and name == "simpo":
        return [Row(key, value, "policy.objective", "simpo", note="reference-free, mean log-probs")]
    if r.trainer == "grpo" and name in GRPO_LOSSES:
        note = "normalised over the whole batch in TRL; the same with one process and no accumulation"
        return [Row(key, value, "policy.length_norm", GRPO_LOSSES[name], note=note if name == "dapo" else "")]
    if r.trainer == "sft" and name == "nll":
        return [not_applicable(key, value, "jaxalign's SFT loss is the NLL")]
    if r.trainer in ("rloo", "reward"):
        return [not_applicable(key, value, f"not a setting of TRL's {r.trainer.upper()} trainer")]
    return [refuse(key, value, f"jaxalign has no {r.trainer.upper()} loss_type {name!r} (objectives: dpo = sigmoid, "
                               f"hinge, ipo, robust; simpo from CPO; GRPO: grpo, bnpo, dapo, dr_grpo)",
                   "policy.objective")]


def _beta(r: Recipe, key: str, value: Any) -> list[Row]:
    if r.trainer in ("grpo", "rloo"):
        return [Row(key, value, "policy.kl_coef", float(value), note="the KL coefficient")]
    if r.trainer in ("sft", "reward"):
        return [not_applicable(key, value, f"not a setting of TRL's {r.trainer.upper()} trainer")]
    return [Row(key, value, "policy.beta", float(value))]


def _smoothing(r: Recipe, key: str, value: Any) -> list[Row]:
    loss = r.keys.get("loss_type", "sigmoid")
    loss = loss[0] if isinstance(loss, list) and len(loss) == 1 else loss
    if loss in ("hinge", "ipo"):
        return [not_applicable(key, value, f"TRL ignores label_smoothing for loss_type={loss}")]
    if loss == "simpo" and value:
        return [refuse(key, value, "jaxalign's SimPO has no label smoothing", "policy.label_smoothing")]
    if loss == "simpo":
        return [not_applicable(key, value, "no smoothing")]
    return [Row(key, value, "policy.label_smoothing", float(value),
                note="conservative DPO, as TRL 0.x's sigmoid loss (TRL 1.x's ignores label_smoothing)"
                if value and loss == "sigmoid" else "")]


def _simpo_gamma(r: Recipe, key: str, value: Any) -> list[Row]:
    if r.keys.get("loss_type") != "simpo":
        return [not_applicable(key, value, "used by loss_type=simpo only")]
    return [Row(key, value, "policy.simpo_gamma", float(value))]


def _scale_rewards(r: Recipe, key: str, value: Any) -> list[Row]:
    if value in (True, "group"):
        return [Row(key, value, "policy.grpo_scale", True)]
    if value in (False, "none"):
        return [Row(key, value, "policy.grpo_scale", False, note="Dr. GRPO's unscaled advantages")]
    return [refuse(key, value, "jaxalign scales GRPO advantages by the group's std or not at all",
                   "policy.grpo_scale")]


# ---- model, LoRA ------------------------------------------------------------------------------------------------

# trainers whose config has ``disable_dropout`` default true (TRL 1.16: DPOConfig, CPOConfig, RewardConfig); SFT,
# GRPO and RLOO default to false
DROPOUT_OFF_BY_DEFAULT = ("dpo", "cpo", "reward")


def _dropout_off(r: Recipe) -> bool:
    """TRL's DPO, CPO and reward trainers run ``disable_dropout_in_model`` (``disable_dropout``, default true) after
    wrapping the model in PEFT: every ``nn.Dropout``, LoRA's included, is zeroed."""
    if r.trainer in DROPOUT_OFF_BY_DEFAULT:
        return r.keys.get("disable_dropout", True) is not False
    return r.keys.get("disable_dropout", False) is True


def _lora_dropout(r: Recipe, key: str, value: Any, default: bool = False) -> Row:
    if _dropout_off(r):
        return Row(key, value, "model.lora.dropout", 0.0, note="disable_dropout (TRL's default: true) zeroes LoRA's "
                                                               "dropout too")
    return Row(key, value, "model.lora.dropout", 0.05 if default else float(value),
               note="TRL's default lora_dropout" if default else "")


def _lora(r: Recipe, key: str, value: Any) -> list[Row]:
    if not r.keys.get("use_peft"):
        return [not_applicable(key, value, "use_peft is false")] if key != "use_peft" else \
            [Row(key, value, "model.lora.rank", 0, note="full fine-tuning")]
    k = r.keys
    if key == "use_peft":
        return [Row(key, value, "model.lora.rank", int(k.get("lora_r", 16)),
                    note="" if "lora_r" in k else "PEFT's default r = 16")] + \
            ([Row(key, value, "model.lora.alpha", 32.0, note="TRL's default lora_alpha")] if "lora_alpha" not in k
             else []) + \
            ([_lora_dropout(r, key, value, default=True)] if "lora_dropout" not in k else []) + \
            ([Row(key, value, "model.lora.targets", PEFT_DEFAULT_TARGETS, note="PEFT's default for Llama / "
                                                                             "Mistral / Qwen2")]
             if not k.get("lora_target_modules") else [])
    if key == "lora_r":
        return [Row(key, value, note="see use_peft")]
    if key == "lora_alpha":
        return [Row(key, value, "model.lora.alpha", float(value))]
    if key == "lora_dropout":
        return [_lora_dropout(r, key, value)]
    modules = value if isinstance(value, list) else [value]
    if modules in (["all-linear"], ["all_linear"]):
        return [Row(key, value, "model.lora.targets", list(LORA_MODULES.values()))]
    unknown = [m for m in modules if m not in LORA_MODULES]
    if unknown:
        return [refuse(key, value, f"modules {unknown} are not projections jaxalign adapts "
                                   f"({', '.join(LORA_MODULES)})", "model.lora.targets")]
    return [Row(key, value, "model.lora.targets", [LORA_MODULES[m] for m in modules])]


def head_trains_in_peft(r: Recipe) -> bool:
    """Whether TRL's PEFT model trains the reward model's score head: ``lora_task_type: SEQ_CLS`` (PEFT adds the head
    to ``modules_to_save``) or the head named in ``lora_modules_to_save``."""
    saved = r.keys.get("lora_modules_to_save") or []
    saved = saved if isinstance(saved, list) else [saved]
    return str(r.keys.get("lora_task_type") or "CAUSAL_LM").upper() == "SEQ_CLS" or bool(set(saved) & set(SCORE_HEADS))


def _lora_task_type(r: Recipe, key: str, value: Any) -> list[Row]:
    if r.trainer != "reward":
        return [not_applicable(key, value, NOT_APPLICABLE[key])]
    if not r.keys.get("use_peft"):
        return [not_applicable(key, value, "use_peft is false")]
    if value is None:  # cleared on the command line: TRL's default, CAUSAL_LM (the differs row of the trainer)
        return [not_applicable(key, value, "not set")]
    if head_trains_in_peft(r):
        return [not_applicable(key, value, "as jaxalign does: the score head trains with the adapters")]
    return [refuse(key, value, "with this task type PEFT leaves the reward model's score head frozen (a fresh head "
                               "stays at its random init); jaxalign's reward LoRA trains the head with the adapters, "
                               "as lora_task_type SEQ_CLS does (what TRL's reward_modeling.py example passes)")]


def _modules_to_save(r: Recipe, key: str, value: Any) -> list[Row]:
    allowed, why = AT_DEFAULT_ONLY[key]
    modules = value if isinstance(value, list) else [value]
    if value in allowed:
        return [not_applicable(key, value, "as jaxalign does")]
    if r.trainer == "reward" and set(modules) <= set(SCORE_HEADS):
        return [not_applicable(key, value, "as jaxalign does: the score head trains with the adapters")]
    return [refuse(key, value, why + (" (and the score head, in a reward model)" if r.trainer == "reward" else ""))]


def _disable_dropout(r: Recipe, key: str, value: Any) -> list[Row]:
    if r.keys.get("use_peft"):
        return [Row(key, value, note="see model.lora.dropout")]
    return [not_applicable(key, value, NOT_APPLICABLE[key])]


def _remat(r: Recipe, key: str, value: Any) -> list[Row]:
    return [Row(key, value, "model.remat", "full" if value else "none")]


# ---- run, logging, checkpoints, export --------------------------------------------------------------------------

def _output_dir(r: Recipe, key: str, value: Any) -> list[Row]:
    rows = [Row(key, value, "run.workdir", str(value))]
    if "run_name" not in r.keys:
        rows.append(Row(key, value, "run.name", os.path.basename(str(value).rstrip("/")) or "run"))
    return rows


def _trackers(r: Recipe, key: str, value: Any) -> list[Row]:
    names = value if isinstance(value, list) else [value] if value else []
    names = [str(n).lower() for n in names]
    if "all" in names:
        names = ["tensorboard", "wandb"]
    kept = [n for n in names if n in ("tensorboard", "wandb")]
    dropped = [n for n in names if n not in kept and n != "none"]
    return [Row(key, value, "run.trackers", ",".join(kept),
                note=f"jaxalign logs to tensorboard / wandb (and metrics.jsonl); not: {', '.join(dropped)}"
                if dropped else "")]


def _every(our: str) -> Handler:
    def handler(r: Recipe, key: str, value: Any) -> list[Row]:
        if not (_is_int(value) and value >= 1):
            return [not_applicable(key, value, f"a fraction of the run; jaxalign's {our.format(s=r.section)} "
                                               "counts steps")]
        return [Row(key, value, our.format(s=r.section), int(value))]
    return handler


def _eval_strategy(r: Recipe, key: str, value: Any) -> list[Row]:
    if str(value).lower() == "steps":
        if "eval_steps" in r.keys:
            return [Row(key, value, note="see eval_steps")]
        steps = r.keys.get("logging_steps", 10)
        return [Row(key, value, "eval.eval_steps", int(steps), note="transformers: eval_steps = logging_steps")]
    return [not_applicable(key, value, "jaxalign evaluates held-out data every eval.eval_steps and at the end")]


def _eval_steps(r: Recipe, key: str, value: Any) -> list[Row]:
    if str(r.keys.get("eval_strategy", r.keys.get("evaluation_strategy", "no"))).lower() != "steps":
        return [not_applicable(key, value, "eval_strategy is not steps")]
    return _every("eval.eval_steps")(r, key, value)


def _sft_switch(r: Recipe, key: str, value: Any) -> list[Row]:
    """assistant_only_loss / completion_only_loss: jaxalign's SFT trains the assistant turns (completions) only."""
    if value is False:
        return [refuse(key, value, "jaxalign's SFT trains the assistant turns only; it has no loss on prompt tokens")]
    return [not_applicable(key, value, "jaxalign's SFT trains the assistant turns (completions) only")]


def _packing_strategy(r: Recipe, key: str, value: Any) -> list[Row]:
    if value == "wrapped":
        return [refuse(key, value, "jaxalign packs whole documents with segment-masked attention; wrapping cuts "
                                   "them across rows", "sft.pack")]
    return [not_applicable(key, value, "which documents share a row; each attends to itself only either way")]


def _max_length(r: Recipe, key: str, value: Any) -> list[Row]:
    if not (_is_int(value) and value >= 2):
        return [refuse(key, value, "jaxalign needs a sequence length bound", "data.max_length")]
    rows = [Row(key, value, "data.max_length", int(value))]
    if r.trainer == "reward":
        rows.append(Row(key, value, status="differs",
                        note="TRL's reward trainer drops a pair whose chosen or rejected sequence is longer; jaxalign "
                             "keeps it, cut to fit (the prompt keeps its end, the response its start), and its data "
                             "report counts the cut rows"))
    return rows


def _optional_float(our: str, none: float) -> Handler:
    return _to(our, lambda v: none if v is None else float(v))


HANDLERS: dict[str, Handler] = {
    "model_name_or_path": _to("model.path"), "tokenizer_name_or_path": _to("model.tokenizer"),
    "torch_dtype": _param_dtype, "dtype": _param_dtype, "bf16": _compute_dtype, "fp16": _compute_dtype,
    "gradient_checkpointing": _remat, "chat_template": _to("data.chat_template", lambda v: v or ""),
    "dataset_num_proc": _to("data.num_proc", lambda v: int(v or 1)),
    "max_length": _max_length, "max_seq_length": _max_length,
    "max_prompt_length": _for(("sft", "dpo", "cpo", "grpo", "rloo"), _to("data.max_prompt_length", int)),
    "learning_rate": _to("{s}.learning_rate", float), "weight_decay": _to("{s}.weight_decay", float),
    "max_grad_norm": _to("{s}.max_grad_norm", lambda v: float(v or 0.0)), "lr_scheduler_type": _schedule,
    "warmup_ratio": _warmup, "warmup_steps": _warmup, "optim": _optim, "num_train_epochs": _epochs,
    "max_steps": _max_steps, "per_device_train_batch_size": _batch, "gradient_accumulation_steps": _batch,
    "num_processes": _batch, "seed": _to("run.seed", int),
    "loss_type": _loss, "beta": _beta, "label_smoothing": _for(("dpo", "cpo"), _smoothing),
    "simpo_gamma": _for(("cpo",), _simpo_gamma),
    "precompute_ref_log_probs": _for(("dpo",), _to("policy.precompute_reference", bool)),
    "num_generations": _for(("grpo", "rloo"), _to("policy.num_samples", int)),
    "rloo_k": _for(("rloo",), _to("policy.num_samples", int)),
    "max_completion_length": _for(("grpo", "rloo"), _to("sample.max_new_tokens", int)),
    "temperature": _for(("grpo", "rloo"), _to("sample.temperature", float)),
    "top_p": _for(("grpo", "rloo"), _to("sample.top_p", float)),
    "top_k": _for(("grpo", "rloo"), _to("sample.top_k", lambda v: int(v or 0))),
    "epsilon": _for(("grpo", "rloo"), _to("policy.clip", float)),
    "epsilon_high": _for(("grpo", "rloo"), _optional_float("policy.clip_high", 0.0)),
    "num_iterations": _for(("grpo", "rloo"), _to("policy.inner_epochs", int)),
    "num_ppo_epochs": _for(("rloo",), _to("policy.inner_epochs", int)),
    "scale_rewards": _for(("grpo",), _scale_rewards),
    "use_bias_correction_kl": _for(("grpo",), _to("policy.kl_bias_correction", bool)),
    "normalize_advantages": _for(("rloo",), _to("policy.whiten_advantages", bool)),
    "missing_eos_penalty": _for(("grpo", "rloo"), _optional_float("policy.missing_eos_penalty", 0.0)),
    "generation_batch_size": _for(("grpo", "rloo"), _rollout),
    "steps_per_generation": _for(("grpo", "rloo"), _rollout),
    "center_rewards_coefficient": _for(("reward",), _optional_float("reward.center_coef", 0.0)),
    "use_peft": _lora, "lora_r": _lora, "lora_alpha": _lora, "lora_dropout": _lora, "lora_target_modules": _lora,
    "lora_task_type": _lora_task_type, "lora_modules_to_save": _modules_to_save, "disable_dropout": _disable_dropout,
    "output_dir": _output_dir, "run_name": _to("run.name", str), "report_to": _trackers,
    "logging_steps": _every("run.logging_steps"), "save_steps": _every("{s}.save_every"),
    "save_total_limit": _every("reliability.keep_checkpoints"), "eval_strategy": _eval_strategy,
    "evaluation_strategy": _eval_strategy, "eval_steps": _eval_steps,
    "push_to_hub": _to("export.push_to_hub", bool), "hub_model_id": _to("export.hub_id", str),
    "hub_private_repo": lambda r, k, v: [not_applicable(k, v, "export.hub_private stays true")] if v is None else
    [Row(k, v, "export.hub_private", bool(v))],
    "packing": _for(("sft",), _to("sft.pack", bool)), "packing_strategy": _for(("sft",), _packing_strategy),
    "assistant_only_loss": _for(("sft",), _sft_switch), "completion_only_loss": _for(("sft",), _sft_switch),
    "disable_tqdm": _to("run.show_progress", lambda v: not v),
}
