"""Shared pieces of the CPU benchmarks: the model sizes, the measured matmul peak, timing, and table printing."""
from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxalign.models import ModelConfig  # noqa: E402


def tiny_config(**kw) -> ModelConfig:
    """The CPU demo's model (configs/demo_cpu.yaml builds it with jaxalign.tasks.demo): vocabulary 128,
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


def smollm2_config(**kw) -> ModelConfig:
    """The shape of SmolLM2-135M-Instruct: 30 layers, hidden 576, 9 query / 3 KV heads (GQA 3), vocab 49152, tied."""
    base = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                num_heads=9, num_kv_heads=3, head_dim=64, max_position_embeddings=8192, rope_theta=100000.0,
                norm_eps=1e-5, tie_word_embeddings=True, sliding_windows=(None,) * 30, pad_token_id=2,
                bos_token_id=1, eos_token_id=2)
    base.update(kw)
    return ModelConfig(**base)


def real_model_module():
    """tests/real_model.py, imported by path (it builds the real SmolLM2 folder); None where its packages are
    missing (then the SmolLM2 rows run on random weights of the same shape)."""
    path = Path(__file__).resolve().parents[1] / "tests" / "real_model.py"
    spec = importlib.util.spec_from_file_location("jaxalign_real_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return None if module.missing_packages() else module


def smollm2_folder() -> Path | None:
    """The real SmolLM2-135M-Instruct safetensors folder (built once into the cache), or None."""
    module = real_model_module()
    return module.smollm2_folder() if module is not None else None


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
