"""The on-policy training loop (RLOO / GRPO / PPO / online DIL): each step is one rollout batch the policy draws from
its current weights, then ``inner_epochs`` passes of shuffled mini-batches of it through the jitted train step.

It is :func:`jaxalign.train.loop.drive` with rollouts where the pair loop has a dataset, so an on-policy phase resumes,
stops on preemption, checkpoints and logs (trackers, logging steps, wandb run) exactly as the pair phases do. Only the
train state is checkpointed: a rollout batch's prompts and sampling seed are functions of its index, so a resumed
phase redoes the batches after its last checkpoint exactly as the first attempt did them. What a rollout is (sampling,
scoring, advantages) is the caller's: :mod:`jaxalign.pipeline.onpolicy`.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import numpy as np
from etils import epath

from jaxalign import sharding
from jaxalign.models.config import ModelConfig
from jaxalign.train.loop import drive, finite
from jaxalign.train.optim import OptimConfig, make_optimizer
from jaxalign.train.run import PhaseSettings
from jaxalign.train.state import create_state
from jaxalign.train.steps import StepConfig, make_train_step

# mini-batch order of step k: np.random.default_rng(settings.seed + SHUFFLE_STRIDE * k), a function of k for resume
SHUFFLE_STRIDE = 104729


@dataclasses.dataclass(frozen=True)
class Rollout:
    """One rollout batch, ready for the update."""

    batch: dict[str, np.ndarray]  # host arrays, a row per sequence: the mini-batches are cut from these
    # the rollout's own (objective/*, response_length ...); a name the update's mean also has (objective/entropy) is
    # logged with the rollout's value, not the steps' copy of it
    metrics: dict[str, float]
    tokens: int  # sampled tokens, the numerator of tokens_per_second


def train_onpolicy(
    *,
    cfg: ModelConfig,
    params: dict[str, jax.Array],
    rollout: Callable[[Any, int], Rollout],
    phase_dir: str | epath.PathLike,
    mesh,
    step_cfg: StepConfig,
    optim: OptimConfig,
    settings: PhaseSettings,
    total_steps: int,
    rollout_size: int,
    inner_epochs: int,
    ref_params: dict[str, jax.Array] | None = None,
    frozen: dict[str, jax.Array] | None = None,
    counters: dict[str, int] | None = None,
    name: str | None = None,
) -> dict[str, jax.Array]:
    """Train ``params`` (donated) for ``total_steps`` rollout batches; resumable like :func:`jaxalign.train.run.train`.

    ``rollout(state, step)`` draws rollout batch ``step`` (1-based) of ``rollout_size`` sequences from the state's
    current weights; mini-batches are ``settings.global_batch_size`` sequences. ``frozen``: with LoRA, the base under
    the state's adapters (a step argument, not checkpointed); ``ref_params`` the reference's weights where the step
    takes them. A step's metrics are the mean over its finite mini-batches, then the rollout's own, then
    ``tokens_per_second`` (sampling and update together)."""
    phase_dir = epath.Path(phase_dir)
    name = name or phase_dir.name
    counters = counters if counters is not None else {}
    size = settings.global_batch_size
    per_rollout = inner_epochs * (rollout_size // size)
    optimizer, schedule = make_optimizer(optim, total_steps * per_rollout)
    state = create_state(params, optimizer, mesh, donate=True)
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    ref = ref_params if step_cfg.takes_reference_params else None
    extra = step_cfg.extra_args(frozen, ref)
    step_fn = None  # compiled for the first mini-batch's shapes

    with settings.outputs(phase_dir, total_steps=total_steps, desc=name) as (checkpointer, writer):

        def update(state, batch: dict[str, np.ndarray], step: int):
            nonlocal step_fn
            rng = np.random.default_rng(settings.seed + SHUFFLE_STRIDE * step)
            rows = len(next(iter(batch.values())))
            sums: dict[str, float] = {}
            count = done = 0
            for _ in range(inner_epochs):
                perm = rng.permutation(rows)
                for start in range(0, rows, size):
                    mb = {k: v[perm[start:start + size]] for k, v in batch.items()}
                    if step_fn is None:
                        step_fn = make_train_step(cfg, step_cfg, optimizer, schedule, mesh, state_sharding, mb, ref,
                                                  frozen)
                    state, metrics = step_fn(state, sharding.shard_batch(mb, mesh), *extra)
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    done += 1
                    if not finite(name, step, metrics, skip=settings.skip_nonfinite, checkpointer=checkpointer,
                                  counters=counters, where=f" (mini-batch {done} of {per_rollout})"):
                        continue
                    count += 1
                    for k, v in metrics.items():
                        sums[k] = sums.get(k, 0.0) + v
            return state, {k: v / max(count, 1) for k, v in sums.items()}

        def advance(state, step: int):
            t0 = time.perf_counter()
            drawn = rollout(state, step)
            state, metrics = update(state, drawn.batch, step)
            metrics.update(drawn.metrics)
            metrics["tokens_per_second"] = drawn.tokens / (time.perf_counter() - t0)
            return state, metrics

        state = drive(phase=name, state=state, advance=advance, total_steps=total_steps, checkpointer=checkpointer,
                      writer=writer, save_every=settings.save_every)
    return state.params
