"""jaxalign.sharding's helpers shared by the engine and the sampler: batch_shards, constrain, to_host."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from engine_script import free_port, script_env
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxalign.sharding import activate, batch_shards, constrain, make_mesh, named_sharding, shard_batch, to_host

CACHE_AXES = ("layers", "batch", "cache_length", "kv_heads", "head_dim")


@pytest.mark.parametrize("shape, want", [((8, 1, 1), 8), ((2, 2, 2), 4), ((1, 8, 1), 8), ((1, 1, 8), 1)])
def test_batch_shards_counts_data_times_fsdp(shape, want):
    assert batch_shards(make_mesh(*shape)) == want


def test_batch_shards_without_a_mesh_is_one():
    assert batch_shards(None) == 1


def _constrained_to(fn, x, mesh, spec) -> bool:
    out = jax.jit(fn).lower(x).compile().output_shardings
    return out.is_equivalent_to(NamedSharding(mesh, spec), x.ndim)


def test_constrain_uses_the_given_mesh_else_the_active_one_else_nothing():
    x = jnp.zeros((2, 8, 4, 8, 3))
    mesh, other = make_mesh(2, 2, 2), make_mesh(1, 1, 8)
    want = P(None, ("data", "fsdp"), None, "tensor", None)
    assert named_sharding(CACHE_AXES, x.shape, mesh).spec == want
    assert _constrained_to(lambda a: constrain(a, CACHE_AXES, mesh), x, mesh, want)
    assert not _constrained_to(lambda a: a + 1, x, mesh, want)  # the check can tell: unconstrained is not sharded
    with activate(mesh):
        assert _constrained_to(lambda a: constrain(a, CACHE_AXES), x, mesh, want)
    with activate(other):  # an explicit mesh wins over the active one
        assert _constrained_to(lambda a: constrain(a, CACHE_AXES, mesh), x, mesh, want)
        assert _constrained_to(lambda a: constrain(a, CACHE_AXES), x, other, P(None, None, None, "tensor", None))
    assert constrain(x, CACHE_AXES) is x  # no mesh anywhere: the identity


def test_to_host_returns_the_whole_array_on_one_process():
    mesh = make_mesh(2, 2, 2)
    host = np.arange(8 * 5, dtype=np.float32).reshape(8, 5)
    x = shard_batch({"x": host}, mesh)["x"]
    assert len(x.sharding.device_set) == 8 and x.is_fully_addressable
    out = to_host(x)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_array_equal(out, host)
    np.testing.assert_array_equal(to_host(host), host)  # numpy passes through


_TWO_PROCESS_SCRIPT = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    port, pid = sys.argv[1], int(sys.argv[2])
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    from jaxalign.sharding import make_mesh, shard_batch, to_host
    full = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
    x = shard_batch({"x": full[pid * 4:(pid + 1) * 4]}, make_mesh(-1, 1, 1))["x"]  # each process: its 4 rows
    assert not x.is_fully_addressable
    np.testing.assert_array_equal(to_host(x), full)
    print(f"OK {pid}")  # one write: gloo logs to the same descriptor
""")


def test_to_host_gathers_an_array_spread_over_two_processes():
    env = script_env(devices=4)
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESS_SCRIPT, str(port), str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"OK {i}" in out.splitlines(), (out + err)[-3000:]
