"""The device mesh and the logical-axis rules that place every parameter and activation on it.

The mesh has three named axes, any of them of size 1:

- ``data``: pure data parallelism (parameters replicated);
- ``fsdp``: data parallelism with parameters and optimizer state sharded (ZeRO-3 style);
- ``tensor``: Megatron-style tensor parallelism over heads and the MLP hidden dimension.

Parameters and activations name their dimensions with logical axes ("embed", "heads", "batch", ...); ``RULES`` maps
each logical axis to mesh axes. A dimension whose size does not divide by the mesh axes it maps to is replicated instead
(e.g. 2 KV heads on a tensor axis of 4), so every config runs on every mesh; the planner reports what that costs.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxalign import rules

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "layers": None,
    "cache_length": None,
}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over all devices of all processes; one size may be -1 (= the rest).

    Axis types are ``Auto`` so sharding propagates as in ``pjit`` (JAX 0.10's ``make_mesh`` defaults to Explicit).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one of data/fsdp/tensor may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices do not divide by fsdp*tensor*data={known} (one axis = -1)")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh: data*fsdp*tensor = {sizes[0]}*{sizes[1]}*{sizes[2]} = {math.prod(sizes)} but there are "
            f"{len(devices)} devices; set one of them to -1 to take the rest."
        )
    if len(devices) == len(jax.devices()) and devices == list(jax.devices()):
        return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    return Mesh(np.array(devices).reshape(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def single_device_mesh() -> Mesh:
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


def spec_for(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Mapping[str, Any] = RULES) -> P:
    """PartitionSpec for an array of ``shape`` whose dimensions have the given logical names.

    Mesh axes of size 1 are dropped, a mesh axis is used at most once, and a dimension that does not divide by its mesh
    axes falls back to replication.
    """
    used: set[str] = set()
    out = []
    for name, dim in zip(logical, shape):
        target = rules.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1 and a not in used)
        size = math.prod(mesh.shape[a] for a in axes) if axes else 1
        if not axes or dim % size:
            out.append(None)
            continue
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    return P(*out)


def named_sharding(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules=RULES) -> NamedSharding:
    return NamedSharding(mesh, spec_for(logical, shape, mesh, rules))


def tree_shardings(shapes: Any, logical: Any, mesh: Mesh, rules=RULES) -> Any:
    """Map a tree of arrays (or ShapeDtypeStructs) and a matching tree of logical-axis tuples to NamedShardings."""
    return jax.tree.map(
        lambda x, axes: named_sharding(axes, x.shape, mesh, rules),
        shapes,
        logical,
        is_leaf=lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x),
    )


def batch_sharding(mesh: Mesh, ndim: int, rules=RULES) -> NamedSharding:
    """Sharding of a host batch: leading dim over the batch axes, the rest replicated."""
    batch_axes = tuple(a for a in (rules["batch"] or ()) if mesh.shape.get(a, 1) > 1)
    lead = None if not batch_axes else (batch_axes[0] if len(batch_axes) == 1 else batch_axes)
    return NamedSharding(mesh, P(lead, *([None] * (ndim - 1))))


def batch_shards(mesh: Mesh | None, rules=RULES) -> int:
    """How many ways the batch is split: the product of the mesh axes ``batch`` maps to (data x fsdp); 1 without a
    mesh."""
    if mesh is None:
        return 1
    return math.prod(mesh.shape[a] for a in (rules["batch"] or ()) if a in mesh.shape)


def batch_split_problem(name: str, batch_size: int, accum_steps: int, mesh: Mesh | None) -> str | None:
    """:func:`jaxalign.rules.batch_split_problem` on ``mesh``'s batch shards (the run and the planner ask this)."""
    return rules.batch_split_problem(name, batch_size, accum_steps, batch_shards(mesh),
                                     mesh.shape if mesh is not None else None)


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh, rules=RULES) -> dict[str, jax.Array]:
    """Turn each process's local batch into global arrays sharded over the batch axes.

    Each process passes only its own rows (``jax.make_array_from_process_local_data``); on one process that is the whole
    batch.
    """
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim, rules), v)
    return out


def global_array(host: np.ndarray, mesh: Mesh, rules=RULES) -> jax.Array:
    """A global array from the WHOLE host array, which every process holds (built identically on every host): the
    leading dim sharded over the batch axes (a scalar replicated); each process keeps only its shards."""
    host = np.asarray(host)
    sharding = batch_sharding(mesh, host.ndim, rules) if host.ndim else NamedSharding(mesh, P())
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def global_batch(batch: Mapping[str, np.ndarray], mesh: Mesh, rules=RULES) -> dict[str, jax.Array]:
    """:func:`global_array` of every entry (evaluation batches, scoring: data every process builds whole)."""
    return {k: global_array(v, mesh, rules) for k, v in batch.items()}


# ---- activation constraints -------------------------------------------------------------------------------------
# The decoder calls ``constrain(x, ("batch", "length", "embed"))`` on its residual stream; inside ``activate(mesh)``
# that becomes a sharding constraint, elsewhere (eager use, tests on one device) it is the identity.
_ACTIVE: list[tuple[Mesh, Mapping[str, Any]]] = []


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Mapping[str, Any] = RULES) -> Iterator[None]:
    _ACTIVE.append((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.pop()


def constrain(x: jax.Array, logical: Sequence[str | None], mesh: Mesh | None = None) -> jax.Array:
    """Constrain ``x`` to the sharding of its logical axes on ``mesh`` (with ``RULES``), or, without one, on the mesh
    (and rules) ``activate`` made active; the identity when there is neither."""
    if mesh is not None:
        rules = RULES
    elif _ACTIVE:
        mesh, rules = _ACTIVE[-1]
    else:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(logical, x.shape, mesh, rules))


def to_host(x: Any) -> np.ndarray:
    """The whole of a (possibly sharded) array as one numpy array on this host.

    An array spread over several processes is gathered from all of them (``process_allgather``), so then every
    process must make the same call; a fully addressable array (or a numpy one) is copied without communication.
    """
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
