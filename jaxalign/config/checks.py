"""Checks of a config's values and of their combination, run when a recipe is loaded — before anything is read,
loaded or compiled — so a run that cannot work fails in a second with every problem named, not after hours.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from jaxalign.data.formats import FORMATS
from jaxalign.losses import OBJECTIVES, PAIR_RULES
from jaxalign.metrics import TrackerError, check_trackers
from jaxalign.models.config import ModelConfigError
from jaxalign.models.lora import TARGETS as LORA_TARGETS, peft_adapter_settings
# the method -> phases table and the policy kinds are the run's rules, re-exported here for the schema
from jaxalign.rules import (DEFAULT_ROUND, GIVEN_PAIRS_METHODS, METHODS, ONE_ROUND_METHODS,  # noqa: F401
                            ONLINE_ROUND, POLICY_KINDS, REWARD_KINDS, batch_split_problem, rollout_samples_per_prompt)
from jaxalign.tasks import SCORERS


class ConfigError(ValueError):
    """A config file, key or value that cannot work; the message names it and the valid choices."""


ROUND_PHASES = ("sample", "reward", "policy", "eval")


# ---- checking values and their combination ------------------------------------------------------------------------

DTYPES = ("float32", "bfloat16", "float16")
CHOICES = {
    "run.method": METHODS,
    "model.dtype": DTYPES,
    "model.param_dtype": DTYPES,
    "model.remat": ("none", "full", "dots"),
    "data.gold_metric": ("",) + tuple(SCORERS),
    "data.completion_end": ("eos", "template"),
    "policy.reduce": ("", "sum", "mean"),
    "policy.reference": ("sft", "previous"),
    "policy.pairs": ("best_of_n", "demo_vs_sample", "dataset", "ditto"),
    "policy.kind": POLICY_KINDS,
    "policy.reward": ("rm", "gold"),
    "policy.length_norm": ("sequence", "token", "constant"),
    "reward.loss": ("bradley_terry", "afd_discriminator"),
    "export.dtype": ("",) + DTYPES,
    "optimizer": ("adamw", "rmsprop", "sgd"),  # sft / reward / policy
    "schedule": ("cosine", "linear", "constant"),
}


def validate(cfg, where: str = "config", origin: Callable[[str], str | None] | None = None) -> None:
    """Check every value and the combinations that would otherwise fail mid-run (after hours of compute), before
    anything is loaded or compiled; raises ConfigError naming the key, the value and what is allowed. The phase order
    is checked here too; paths, datasets and the mesh when the run is prepared. ``origin(key)`` says where a key's
    value was set ("from the command line", "from <file>", "the default"), added to its problem."""
    problems: list[str] = []

    def need(ok: bool, key: str, value: Any, what: str) -> None:
        if not ok:
            source = origin(key) if origin is not None else None
            problems.append(f"{key}={value!r}: {what}" + (f" ({source})" if source else ""))

    def choice(key: str, value: Any, allowed) -> None:
        need(value in allowed, key, value, f"choose one of {', '.join(repr(a) for a in allowed)}")

    def number(key: str, value: float, *, low: float | None = None, high: float | None = None,
               low_open: bool = False) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            need(False, key, value, "must be a finite number")
        elif low is not None and (value <= low if low_open else value < low):
            need(False, key, value, f"must be {'>' if low_open else '>='} {low}")
        elif high is not None and value > high:
            need(False, key, value, f"must be <= {high}")

    for key, allowed in CHOICES.items():
        if "." in key:
            section, name = key.split(".")
            choice(key, getattr(getattr(cfg, section), name), allowed)
    need(bool(cfg.run.name.strip()), "run.name", cfg.run.name, "must not be empty (it names the work directory)")
    number("run.rounds", cfg.run.rounds, low=1)
    number("run.seed", cfg.run.seed, low=0, high=2**31 - 1)
    sizes = (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    for name, size in zip(("data", "fsdp", "tensor"), sizes):
        need(size == -1 or size >= 1, f"mesh.{name}", size, "must be >= 1, or -1 for all remaining devices")
    need(sizes.count(-1) <= 1, "mesh", dict(zip(("data", "fsdp", "tensor"), sizes)), "at most one axis may be -1")
    d = cfg.data
    number("data.max_length", d.max_length, low=2)
    need(1 <= d.max_prompt_length < max(d.max_length, 2), "data.max_prompt_length", d.max_prompt_length,
         f"must be >= 1 and leave room for a response within data.max_length={d.max_length}")
    for name in ("train", "eval_prompts", "eval_prefs"):
        ds = getattr(d, name)
        choice(f"data.{name}.format", ds.format, ("auto",) + tuple(FORMATS))
        number(f"data.{name}.limit", ds.limit, low=0)
        need(bool(ds.split.strip()), f"data.{name}.split", ds.split, "must name a split, e.g. train")
    for section in ("sft", "reward", "policy"):
        t = getattr(cfg, section)
        choice(f"{section}.optimizer", t.optimizer, CHOICES["optimizer"])
        choice(f"{section}.schedule", t.schedule, CHOICES["schedule"])
        number(f"{section}.learning_rate", t.learning_rate, low=0.0, low_open=True)
        number(f"{section}.warmup_ratio", t.warmup_ratio, low=0.0, high=1.0)
        number(f"{section}.weight_decay", t.weight_decay, low=0.0)
        number(f"{section}.max_grad_norm", t.max_grad_norm, low=0.0)
        number(f"{section}.batch_size", t.batch_size, low=1)
        number(f"{section}.accum_steps", t.accum_steps, low=1)
        if t.batch_size >= 1 and t.accum_steps >= 1:  # the mesh's shards are checked when the run is prepared
            need(batch_split_problem(section, t.batch_size, t.accum_steps, 1) is None, f"{section}.batch_size",
                 t.batch_size,
                 f"must be a multiple of {section}.accum_steps={t.accum_steps} (batch_size is the whole batch of "
                 f"an optimizer step, split into accum_steps micro-batches)")
        number(f"{section}.epochs", t.epochs, low=1)
        number(f"{section}.max_steps", t.max_steps, low=0)
        number(f"{section}.save_every", t.save_every, low=1)
    _check_lora(cfg, need, number)
    number("reward.margin", cfg.reward.margin)
    number("reward.center_coef", cfg.reward.center_coef, low=0.0)
    p = cfg.policy
    need(p.beta == -1 or (math.isfinite(p.beta) and p.beta > 0), "policy.beta", p.beta,
         "must be > 0, or -1 for the objective's default")
    number("policy.num_samples", p.num_samples, low=1)
    number("policy.rollout_batch_size", p.rollout_batch_size, low=0)
    number("policy.inner_epochs", p.inner_epochs, low=1)
    number("policy.clip", p.clip, low=0.0, low_open=True)
    number("policy.kl_coef", p.kl_coef, low=0.0)
    number("policy.vf_coef", p.vf_coef, low=0.0)
    number("policy.gamma", p.gamma, low=0.0, high=1.0)
    number("policy.lam", p.lam, low=0.0, high=1.0)
    number("policy.missing_eos_penalty", p.missing_eos_penalty, low=0.0)
    number("policy.clip_high", p.clip_high, low=0.0)
    _check_objective_options(p, need)
    if p.kind != "pairs":
        _check_onpolicy(cfg, need)
    if p.reward == "gold":
        need(bool(cfg.data.gold_metric) or cfg.run.demo_task, "policy.reward", p.reward,
             "the gold reward is data.gold_metric's scorer: name one (" + ", ".join(SCORERS) + ")")
    if cfg.run.method == "irl" and p.pairs == "best_of_n" and p.kind == "pairs":
        need(p.num_samples >= 2, "policy.num_samples", p.num_samples,
             "best-of-N pairs need at least 2 samples per prompt")
    choice("policy.pair_rule", p.pair_rule, tuple(PAIR_RULES))
    if p.objective not in OBJECTIVES:
        choice("policy.objective", p.objective, tuple(sorted(OBJECTIVES)))
    elif p.reduce in ("", "sum", "mean"):
        try:
            p.build_objective()
        except ValueError as e:
            problems.append(f"policy.objective={p.objective!r}: {e}")
    s = cfg.sample
    number("sample.max_new_tokens", s.max_new_tokens, low=1)
    number("sample.temperature", s.temperature, low=0.0)
    number("sample.top_p", s.top_p, low=0.0, high=1.0, low_open=True)
    number("sample.top_k", s.top_k, low=0)
    number("sample.batch_size", s.batch_size, low=0)
    number("sample.limit", s.limit, low=0)
    need(s.negative_temperature == -1 or (math.isfinite(s.negative_temperature) and s.negative_temperature >= 0),
         "sample.negative_temperature", s.negative_temperature, "must be >= 0, or -1 to reuse the policy samples")
    e = cfg.eval
    number("eval.num_prompts", e.num_prompts, low=1)
    number("eval.max_new_tokens", e.max_new_tokens, low=1)
    number("eval.temperature", e.temperature, low=0.0)
    number("eval.table_rows", e.table_rows, low=0)
    number("eval.best_of_n", e.best_of_n, low=0)
    number("eval.eval_steps", e.eval_steps, low=0)
    number("eval.heldout_limit", e.heldout_limit, low=0)
    number("reliability.keep_checkpoints", cfg.reliability.keep_checkpoints, low=1)
    number("run.logging_steps", cfg.run.logging_steps, low=1)
    number("data.num_proc", cfg.data.num_proc, low=1)
    try:
        check_trackers(cfg.run.trackers)
    except TrackerError as e:
        problems.append(f"run.trackers={cfg.run.trackers!r}: {e}")
    if not problems:
        _check_round(cfg, problems)
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems) + ".")


def _check_lora(cfg, need, number) -> None:
    """model.lora: the adapters' settings; with rank > 0, the phases that train adapters; an init_adapter folder
    whose adapter_config.json declares the same rank, alpha and targets."""
    lo = cfg.model.lora
    need(isinstance(lo.rank, int) and lo.rank >= 0, "model.lora.rank", lo.rank,
         "the adapter rank must be an integer >= 0 (0 = LoRA off, full fine-tuning; 8-64 is usual)")
    number("model.lora.alpha", lo.alpha, low=0.0, low_open=True)
    need(isinstance(lo.dropout, float) and 0.0 <= lo.dropout < 1.0, "model.lora.dropout", lo.dropout,
         "a dropout rate on the adapter inputs in [0, 1)")
    unknown = [t for t in lo.targets if t not in LORA_TARGETS] if isinstance(lo.targets, list) else [lo.targets]
    need(not unknown and (bool(lo.targets) or not lo.rank), "model.lora.targets", lo.targets,
         f"name the projections that get adapters, a non-empty list of {', '.join(LORA_TARGETS)} (unknown: "
         f"{unknown or 'none'}; a target the model lacks, e.g. gate on GPT-NeoX, is skipped)")
    need(lo.base_dtype in ("",) + DTYPES, "model.lora.base_dtype", lo.base_dtype,
         f"the frozen base's dtype: '' (= model.param_dtype) or one of {', '.join(DTYPES)}")
    if lo.init_adapter:
        try:
            r, alpha, targets = peft_adapter_settings(lo.init_adapter)
        except ModelConfigError as e:
            need(False, "model.lora.init_adapter", lo.init_adapter,
                 f"not a usable PEFT LoRA adapter folder: {str(e).rstrip('.')}")
            return
        # the adapters are loaded as they are: a different shape or scale would not be the adapter that was saved
        same = (r == lo.rank and math.isclose(alpha, lo.alpha, rel_tol=1e-6)
                and set(targets) == set(lo.targets))
        need(same, "model.lora.init_adapter", lo.init_adapter,
             f"the adapter has r={r}, alpha={alpha:g} and targets {','.join(targets)} (adapter_config.json) but "
             f"model.lora has rank={lo.rank}, alpha={lo.alpha:g} and targets {','.join(map(str, lo.targets))}: set "
             f"model.lora.rank, alpha and targets to the adapter's")


def _check_objective_options(p, need) -> None:
    """policy.label_smoothing / simpo_gamma: in range, and for an objective that has the option (-1 = its default)."""
    for key, hparam, ok, what in (
            ("label_smoothing", "label_smoothing", lambda v: 0.0 <= v < 0.5, "a rate of flipped labels in [0, 0.5)"),
            ("simpo_gamma", "gamma", lambda v: 0.0 <= v, "a target margin >= 0")):
        value = getattr(p, key)
        if value == -1:
            continue
        need(math.isfinite(value) and ok(value), f"policy.{key}", value, f"{what}, or -1 for the objective's default")
        if p.objective in OBJECTIVES:
            has = sorted(n for n, o in OBJECTIVES.items() if hparam in o.defaults)
            need(hparam in OBJECTIVES[p.objective].defaults, f"policy.{key}", value,
                 f"policy.objective={p.objective} has no {hparam}; the objectives that do: {', '.join(has)}")


def _check_onpolicy(cfg, need) -> None:
    """policy.kind=rloo / grpo / ppo / online_dil: sample counts and batch sizes that divide."""
    p = cfg.policy
    need(cfg.run.method in ("irl", "spin"), "policy.kind", p.kind,
         f"on-policy steps run in IRL / SPIN rounds; run.method={cfg.run.method} trains once on given data")
    if p.kind in ("rloo", "grpo"):
        need(p.num_samples >= 2, "policy.num_samples", p.num_samples,
             f"policy.kind={p.kind} compares each prompt's samples with each other: at least 2")
    if p.kind == "online_dil":
        need(p.objective.startswith("dil_"), "policy.objective", p.objective,
             "policy.kind=online_dil trains DIL's density-ratio losses: choose a dil_* objective")
    n = rollout_samples_per_prompt(cfg)
    rollout = p.rollout_batch_size or p.batch_size
    need(rollout % p.batch_size == 0 and rollout % n == 0, "policy.rollout_batch_size", p.rollout_batch_size,
         f"a rollout batch of {rollout} sequences must be a multiple of policy.batch_size={p.batch_size} (the "
         f"mini-batch) and of the {n} samples per prompt")


def _check_round(cfg, problems: list[str]) -> None:
    """The method, its pairs and the round's phase order fit together (first problem only: it names the fix)."""
    method, pairs = cfg.run.method, cfg.policy.pairs
    kind = cfg.policy.kind
    order = cfg.run.round_phases(kind)
    text = ",".join(order)

    def fail(msg: str) -> None:
        problems.append(msg)

    for k in order:
        if k not in ROUND_PHASES:
            return fail(f"run.phases: {k!r} is not a round phase; use {', '.join(ROUND_PHASES)}")
    if len(set(order)) != len(order):
        return fail(f"run.phases={text}: each phase may appear once per round (they share the round's directory "
                    f"names)")
    if method == "reward":
        if "reward" not in order or {"sample", "policy"} & set(order):
            return fail(f"run.phases={text}: run.method=reward trains a reward model on data.train's preference "
                        f"pairs, so its round is 'reward' (optionally followed by 'eval'), with no sample or policy "
                        f"phase (use run.method=irl for a reward model on sampled pairs)")
        return None
    if kind != "pairs":  # the policy phase samples itself; the pair settings do not apply
        if ("policy" in order and kind in REWARD_KINDS and cfg.policy.reward == "rm"
                and "reward" not in order[: order.index("policy")]):
            return fail(f"run.phases={text}: policy.kind={kind} optimises this round's reward model, so 'reward' "
                        f"(after 'sample') must come before 'policy' (sample,reward,policy,eval); policy.kind="
                        f"online_dil needs none")
    else:
        # method / pairs mismatches first: their message names the fix better than the phase-order checks below
        if method in ("dil", "dpo") and pairs != "dataset":
            return fail(f"run.method={method} trains on given preference pairs: set policy.pairs=dataset (or use "
                        f"run.method=irl / spin for sampled pairs)")
        if method == "spin" and pairs == "best_of_n":
            return fail("run.method=spin pairs the demonstration with the previous iterate's sample: set "
                        "policy.pairs=demo_vs_sample (SPIN has no reward model)")
        if "policy" in order:
            before = order[: order.index("policy")]
            if pairs in ("best_of_n", "demo_vs_sample", "ditto") and "sample" not in before:
                return fail(f"run.phases={text}: the policy phase uses sampled responses (policy.pairs={pairs}) but "
                            f"no sample phase comes before it in the round")
            if pairs == "best_of_n" and cfg.policy.reward == "rm" and "reward" not in before:
                return fail(f"run.phases={text}: policy before any reward model in the round — policy.pairs="
                            f"best_of_n scores samples with this round's reward model, so 'reward' must come before "
                            f"'policy' (IRL: sample,reward,policy,eval), or policy.reward=gold scores them with the "
                            f"gold metric")
    if "reward" in order and "sample" not in order[: order.index("reward")]:
        return fail(f"run.phases={text}: the reward phase trains on (demonstration, own sample) pairs, so 'sample' "
                    f"must come before 'reward'")
    return None
