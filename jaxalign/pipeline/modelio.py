"""Reading and writing the pipeline's models: the policy (a causal LM) and the reward model, as HF safetensors
folders in the work directory — the hand-off between phases and what users load."""
from __future__ import annotations

import jax
from etils import epath
from jax.experimental import multihost_utils

from jaxalign.models import read_params, read_reward_params, save_params
from jaxalign.pipeline.context import RunContext
from jaxalign.pipeline.phases import Phase
from jaxalign.storage import local_copy


def load_policy(ctx: RunContext, folder: epath.PathLike) -> dict[str, jax.Array]:
    """A causal LM's parameters, placed on the run's mesh (a bucket folder is read from a cached local copy)."""
    return read_params(local_copy(folder), ctx.model_cfg, mesh=ctx.mesh)


def load_reward(ctx: RunContext, folder: epath.PathLike, *, seed: int = 0) -> dict[str, jax.Array]:
    """A reward model (a trained one, or a backbone with a fresh head drawn from ``seed``) on the run's mesh."""
    return read_reward_params(folder, ctx.model_cfg, mesh=ctx.mesh, seed=seed)


def save_model(ctx: RunContext, params: dict[str, jax.Array], phase: Phase, *, reward: bool = False) -> epath.Path:
    """Write the phase's final model to ``phases/<phase>/model`` (every process joins the gather; process 0 writes;
    a bucket work directory gets a local folder uploaded)."""
    out = ctx.workdir.phase(phase) / "model"
    if jax.process_count() > 1:
        params = {k: multihost_utils.process_allgather(v, tiled=True) for k, v in params.items()}
    if jax.process_index() == 0:
        save_params(params, ctx.model_cfg, out, head="sequence_classification" if reward else "causal_lm")
    return out
