"""The train state (step, params, optimizer state) and its placement on the mesh."""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxalign import sharding
from jaxalign.models.lora import trainable_logical_axes


class TrainState(NamedTuple):
    step: jax.Array
    params: dict[str, jax.Array]
    opt_state: Any


def param_shardings(params: dict[str, Any], mesh) -> dict[str, NamedSharding]:
    """By each param's logical axes; LoRA adapters by their base matrix's (``adapter_logical_axes``)."""
    axes = trainable_logical_axes(params)
    return {k: sharding.named_sharding(axes[k], v.shape, mesh) for k, v in params.items()}


def state_shardings(abstract_state: TrainState, mesh) -> TrainState:
    """Shardings for a state: params by their logical axes; optimizer moments like the param they belong to."""
    p_shard = param_shardings(abstract_state.params, mesh)
    replicated = NamedSharding(mesh, P())

    def for_opt_leaf(path, leaf):
        # optax moments (mu, nu, ...) hold one dict keyed like params; find the param name on the path
        for entry in reversed(path):
            key = getattr(entry, "key", None)
            if isinstance(key, str) and key in p_shard and tuple(leaf.shape) == tuple(abstract_state.params[key].shape):
                return p_shard[key]
        return replicated

    opt = jax.tree_util.tree_map_with_path(for_opt_leaf, abstract_state.opt_state)
    return TrainState(replicated, p_shard, opt)


def create_state(params: dict[str, jax.Array], optimizer: optax.GradientTransformation, mesh, *,
                 donate: bool = False) -> TrainState:
    """A fresh state with params placed by their logical axes and optimizer state initialised in place (sharded).

    With ``donate=True`` the params are consumed: their device buffers are donated to the state (which aliases them),
    so a phase holds one copy of the weights, not the loaded one next to the state's (the pipeline does this). Device
    arrays passed in are deleted afterwards (host arrays are first copied to the devices, and only that copy is
    donated). The default keeps the caller's arrays usable.
    """
    abstract = jax.eval_shape(lambda p: TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p)), params)
    shardings = state_shardings(abstract, mesh)
    params = jax.device_put(params, shardings.params)
    init = jax.jit(lambda p: TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p)), out_shardings=shardings,
                   donate_argnums=0 if donate else ())
    return init(params)
