"""Shared pieces of the CPU benchmarks: the model sizes, the measured matmul peak, timing, and table printing."""
from __future__ import annotations

import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxalign.models import ModelConfig  # noqa: E402


def tiny_config(**kw) -> ModelConfig:
    """The CPU demo's model (configs/demo_cpu.yaml builds it with jaxalign.pipeline.demo_task): vocabulary 128,
    hidden 128, two layers, 4 query / 2 KV heads. Use it with :data:`TINY_BATCH`, the demo's batch shape."""
    base = dict(model_type="llama", vocab_size=128, hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=32, max_position_embeddings=128, sliding_windows=(None,) * 2,
                pad_token_id=0, bos_token_id=1, eos_token_id=2)
    base.update(kw)
    return ModelConfig(**base)


# the demo's train batch: batch_size 32, max_length 32 (configs/demo_cpu.yaml)
TINY_BATCH = (32, 32)


def config_100m(**kw) -> ModelConfig:
    """~110M parameters (GPT-2-small-like Llama): 12 layers, hidden 768, vocab 32000."""
    base = dict(model_type="llama", vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=12,
                num_heads=12, num_kv_heads=12, head_dim=64, max_position_embeddings=2048,
                sliding_windows=(None,) * 12, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    base.update(kw)
    return ModelConfig(**base)


def peak_matmul(n: int = 2048):
    """``(call, flops)``: one large float32 ``jnp.dot`` on this CPU, the roofline the tables compare to."""
    a = jnp.asarray(np.random.RandomState(0).randn(n, n).astype(np.float32))
    f = jax.jit(lambda x: x @ x)
    return (lambda: f(a).block_until_ready()), 2 * n**3


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    """This CPU's float32 matmul FLOP/s: the best of ``reps`` timings of :func:`peak_matmul`."""
    call, flops = peak_matmul(n)
    return flops / interleaved_times({"dot": call}, reps)["dot"]


def interleaved_times(fns: dict, reps: int) -> dict:
    """Best wall time of each of ``fns`` (name -> callable) over ``reps`` rounds that call them in turn.

    On a shared machine the load drifts over minutes; calling the contenders alternately puts them under the same
    load, and the best of several calls is the least disturbed one (as ``timeit`` advises).
    """
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: min(ts) for name, ts in times.items()}


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [header] + [[f"{c:,.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(cells[0], widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
