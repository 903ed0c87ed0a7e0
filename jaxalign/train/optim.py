"""Optimizers and learning-rate schedules (optax), configured by plain values from a recipe."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxalign.models.decoder import NO_WEIGHT_DECAY


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"  # adamw | rmsprop | sgd
    learning_rate: float = 1e-5
    schedule: str = "cosine"  # cosine | linear | constant
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 disables clipping


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Warm up linearly for ``warmup_ratio`` of the steps, then decay (as TRL / the alignment-handbook recipes do)."""
    total_steps = max(1, int(total_steps))
    warmup = int(round(cfg.warmup_ratio * total_steps))
    decay_steps = max(1, total_steps - warmup)
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(cfg.learning_rate, decay_steps)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(cfg.learning_rate, 0.0, decay_steps)
    elif cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.learning_rate)
    else:
        raise ValueError(f"schedule={cfg.schedule!r}; choose cosine, linear or constant")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warmup), after], [warmup])


def weight_decay_mask(params) -> Any:
    """True for the parameters AdamW decays: all but norm scales and biases (``NO_WEIGHT_DECAY``), as transformers'
    Trainer decays; a tree other than a name -> array dict is decayed everywhere."""
    if isinstance(params, Mapping):
        return {k: k not in NO_WEIGHT_DECAY for k in params}
    return jax.tree.map(lambda _: True, params)


def make_optimizer(cfg: OptimConfig, total_steps: int, *, mu_dtype: str = ""
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The section's optimizer and schedule; ``mu_dtype`` keeps AdamW's first moment in that dtype (the plan's
    memory variants)."""
    schedule = make_schedule(cfg, total_steps)
    if cfg.name == "adamw":
        opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                          mu_dtype=jnp.dtype(mu_dtype) if mu_dtype else None, mask=weight_decay_mask)
    elif cfg.name == "rmsprop":
        # the IRL authors' TL;DR reward model and PPO runs use RMSprop
        opt = optax.rmsprop(schedule, decay=cfg.b2, eps=cfg.eps)
    elif cfg.name == "sgd":
        opt = optax.sgd(schedule)
    else:
        raise ValueError(f"optimizer={cfg.name!r}; choose adamw, rmsprop or sgd")
    if cfg.max_grad_norm and cfg.max_grad_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), opt)
    return opt, schedule
