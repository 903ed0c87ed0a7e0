"""A training phase's common part: a config section's optimizer and loop settings, resumable training into the
phase's directory, and the metrics its done.json keeps."""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from jaxalign.config import ConfigError, Train
from jaxalign.metrics import read_metrics
from jaxalign.pipeline.context import RunContext
from jaxalign.pipeline.phases import Phase
from jaxalign.train.run import train
from jaxalign.train.steps import StepConfig


def train_phase(ctx: RunContext, phase: Phase, section: Train, step: StepConfig, params: dict[str, jax.Array],
                examples: Sequence[dict], *, ref_params: dict[str, jax.Array] | None = None,
                heldout: Sequence[dict] | None = None) -> dict[str, jax.Array]:
    """Train ``params`` (donated) on ``examples`` with ``section``'s settings; resumes from the phase's checkpoints.
    ``heldout`` (default: the context's held-out pairs, or demonstrations for SFT) gives the eval_* metrics."""
    if len(examples) < section.batch_size:
        raise ConfigError(f"phase {phase.name}: {len(examples)} examples do not fill one batch of "
                          f"{phase.kind}.batch_size={section.batch_size}.")
    cfg = ctx.cfg
    settings = section.settings(seed=cfg.run.seed + 1000 * phase.round, run=cfg.run, reliability=cfg.reliability)
    if heldout is None:
        heldout = ctx.heldout_sft if step.kind == "sft" else ctx.heldout_pairs
    return train(cfg=ctx.model_cfg, params=params, examples=examples, phase_dir=ctx.workdir.phase(phase),
                 mesh=ctx.mesh, step_cfg=step, optim=section.optim(), settings=settings, pad_id=ctx.encoder.pad_id,
                 buckets=ctx.buckets, ref_params=ref_params, counters=ctx.counters, name=phase.name,
                 eval_examples=heldout, eval_every=cfg.eval.eval_steps)


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
        out.update({f"eval_{k}": evals[-1][k] for k in ("loss", "rewards/accuracies", "rewards/margins")
                    if k in evals[-1]})
    out["tokens_per_second"] = float(np.mean([r["tokens_per_second"] for r in rows[1:] or rows]))
    out["steps"] = len(rows)
    return out
