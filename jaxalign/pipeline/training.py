"""A training phase's common part: a config section's optimizer and loop settings, resumable training into the
phase's directory, and the metrics its done.json keeps."""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.config import ConfigError, Train
from jaxalign.metrics import read_metrics
from jaxalign.models.lora import init_adapters, join_trainable, load_peft_adapter, merge, split_trainable
from jaxalign.pipeline.context import RunContext
from jaxalign.pipeline.phases import Phase
from jaxalign.storage import local_copy
from jaxalign.train.run import train
from jaxalign.train.steps import StepConfig


class Trained(NamedTuple):
    """A phase's result: ``params`` is the complete model (LoRA: the adapters merged into the base), what the phase
    exports and later phases load; ``adapters`` the trained LoRA adapters (None without LoRA)."""

    params: dict[str, jax.Array]
    adapters: dict[str, jax.Array] | None = None


def train_phase(ctx: RunContext, phase: Phase, section: Train, step: StepConfig, params: dict[str, jax.Array],
                examples: Sequence[dict], *, ref_params: dict[str, jax.Array] | None = None,
                heldout: Sequence[dict] | None = None) -> Trained:
    """Train ``params`` (donated) on ``examples`` with ``section``'s settings; resumes from the phase's checkpoints.
    ``heldout`` (default: the context's held-out pairs, or demonstrations for SFT) gives the eval_* metrics.

    With LoRA (``ctx.lora``) ``params`` become the frozen base (in ``model.lora.base_dtype``) and the adapters (fresh,
    or ``model.lora.init_adapter``'s; plus the reward head, which trains fully) are what the state, the optimizer and
    the checkpoints hold."""
    if len(examples) < section.batch_size:
        raise ConfigError(f"phase {phase.name}: {len(examples)} examples do not fill one batch of "
                          f"{phase.kind}.batch_size={section.batch_size}.")
    cfg = ctx.cfg
    settings = section.settings(seed=cfg.run.seed + 1000 * phase.round, run=cfg.run, reliability=cfg.reliability)
    if heldout is None:
        heldout = ctx.heldout_sft if step.kind == "sft" else ctx.heldout_pairs
    frozen = None
    if ctx.lora is not None:
        params, frozen = lora_split(ctx, params, seed=settings.seed, trainable=("score",) if step.kind == "reward" else ())
        step = dataclasses.replace(step, lora=ctx.lora, seed=settings.seed)
    out = train(cfg=ctx.model_cfg, params=params, examples=examples, phase_dir=ctx.workdir.phase(phase),
                mesh=ctx.mesh, step_cfg=step, optim=section.optim(), settings=settings, pad_id=ctx.encoder.pad_id,
                buckets=ctx.buckets, ref_params=ref_params, frozen=frozen, counters=ctx.counters, name=phase.name,
                eval_examples=heldout, eval_every=cfg.eval.eval_steps)
    return Trained(out) if ctx.lora is None else lora_merged(ctx, out, frozen)


def lora_split(ctx: RunContext, params: dict[str, jax.Array], *, seed: int, trainable: tuple[str, ...] = ()
               ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """``(trainable, frozen)`` for a LoRA phase: the starting adapters (:func:`start_adapters`) plus the params named
    in ``trainable`` (the reward head, PPO's value head), and the base in ``model.lora.base_dtype``. A base cast to
    another dtype frees its master-dtype arrays at once (they were donated to the phase), so the devices never hold
    both."""
    adapters = start_adapters(ctx, seed)
    train, frozen = split_trainable(params, adapters, trainable=trainable,
                                    base_dtype=ctx.cfg.model.lora.base_dtype or None)
    for k, v in frozen.items():
        if params[k] is not v:
            params[k].delete()
    return train, frozen


def start_adapters(ctx: RunContext, seed: int) -> dict[str, jax.Array]:
    """The adapters a LoRA phase starts from: ``model.lora.init_adapter``'s PEFT folder when set (its rank, alpha and
    targets were checked against ``model.lora`` when the recipe loaded), else fresh ones drawn from ``seed`` (A as
    PEFT draws it, B zero). A checkpoint of the phase, when there is one, replaces either on resume."""
    folder = ctx.cfg.model.lora.init_adapter
    if not folder:
        return init_adapters(ctx.model_cfg, ctx.lora, jax.random.PRNGKey(seed))
    try:
        adapters, _ = load_peft_adapter(local_copy(folder), ctx.model_cfg)
    except (KeyError, ValueError) as e:  # a layer or a width this model lacks: the folder is another model's adapter
        raise ConfigError(f"model.lora.init_adapter={folder}: its tensors do not fit model.path={ctx.cfg.model.path} "
                          f"({e}).") from None
    return adapters


def lora_merged(ctx: RunContext, trainable: dict[str, jax.Array], frozen: dict[str, jax.Array]) -> Trained:
    """The complete model of a LoRA phase (adapters merged into the base) and its adapters. Merged in the master
    dtype: a bfloat16 base plus the float32 update, so the export is the model that trained."""
    base, adapters = join_trainable(trainable, frozen)
    dtype = jnp.dtype(ctx.model_cfg.param_dtype)
    return Trained(merge({k: v.astype(dtype) for k, v in base.items()}, adapters, ctx.model_cfg, ctx.lora), adapters)


def final_metrics(ctx: RunContext, phase: Phase) -> dict[str, float]:
    """The last logged step's loss / accuracy / margin (and the last held-out evaluation's, as eval_*), mean tokens/s
    over the phase (the first step, which compiles, left out) and the step count."""
    # latest_only: a resumed phase re-logs the steps after its last checkpoint; count each step once
    logged = read_metrics(ctx.workdir.phase(phase) / "tb", latest_only=True)
    rows = [r for r in logged if r.get("split") == "train"]
    if not rows:
        return {}
    last = rows[-1]
    out = {k: last[k] for k in ("loss", "rewards/accuracies", "rewards/margins") if k in last}
    evals = [r for r in logged if r.get("split") == "eval"]
    if evals:
        out.update({f"eval_{k}": evals[-1][k] for k in ("loss", "rewards/accuracies", "rewards/margins",
                                                       "rewards/accuracies_length_matched") if k in evals[-1]})
    out["tokens_per_second"] = float(np.mean([r["tokens_per_second"] for r in rows[1:] or rows]))
    out["steps"] = len(rows)
    return out
