"""One attention layer on CPU: jaxalign's full einsum form, its causal-block form (what the decoder uses on CPU when
there is no KV cache) and PyTorch's SDPA (is_causal=True), forward and forward+backward.

    python benchmarks/attention.py                       # B=4 T=256, 12 heads of 64 (the ~100M config's layer)
    python benchmarks/attention.py --batch 32 --seq 32 --heads 4 --kv-heads 2 --head-dim 32   # the demo's layer

The backward is of sum(out * w) for a fixed random w, with respect to q, k and v. The "max |grad diff|" column
compares each jaxalign form's gradients with the full form's.
"""
from __future__ import annotations

import argparse

from common import interleaved_times, print_table

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.models.ops import attention, attention_mask, causal_block


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    import torch

    b, t, n, kh, d = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    r = np.random.RandomState(0)
    q_np = r.randn(b, t, n, d).astype(np.float32)
    k_np, v_np = (r.randn(b, t, kh, d).astype(np.float32) for _ in range(2))
    w_np = r.randn(b, t, n, d).astype(np.float32)
    q, k, v, w = map(jnp.asarray, (q_np, k_np, v_np, w_np))
    idx = jnp.arange(t)
    mask = attention_mask(idx, idx, jnp.ones((b, t), bool), 10**9)

    fns, grads = {}, {}
    cb = causal_block(t)
    blocked = f"jaxalign causal blocks of {cb}" + (" (T fits one: = full)" if t <= cb else "")
    for name, block in (("jaxalign full", None), (blocked, cb)):
        def attend(q, k, v, block=block):
            return attention(q, k, v, mask, jnp.float32, causal_block=block)

        fwd = jax.jit(attend)
        bwd = jax.jit(jax.grad(lambda q, k, v, attend=attend: jnp.sum(attend(q, k, v) * w), argnums=(0, 1, 2)))
        fns[(name, "forward")] = lambda fwd=fwd: fwd(q, k, v).block_until_ready()
        fns[(name, "forward+backward")] = lambda bwd=bwd: jax.block_until_ready(bwd(q, k, v))
        grads[name] = bwd(q, k, v)

    tq, tk, tv = (torch.tensor(x).transpose(1, 2).contiguous().requires_grad_() for x in (q_np, k_np, v_np))
    tw = torch.tensor(w_np).transpose(1, 2)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    gqa = dict(enable_gqa=True) if kh != n else {}

    def t_fwd():
        with torch.no_grad():
            return sdpa(tq, tk, tv, is_causal=True, **gqa)

    def t_bwd():
        for x in (tq, tk, tv):
            x.grad = None
        (sdpa(tq, tk, tv, is_causal=True, **gqa) * tw).sum().backward()

    fns[("PyTorch SDPA (is_causal)", "forward")] = t_fwd
    fns[("PyTorch SDPA (is_causal)", "forward+backward")] = t_bwd
    best = interleaved_times(fns, args.reps)

    full = grads["jaxalign full"]
    rows = []
    for (name, kind), sec in best.items():
        diff = "–"
        if name in grads and kind == "forward+backward":
            diff = f"{max(float(jnp.max(jnp.abs(a - e))) for a, e in zip(grads[name], full)):.1e}"
        rows.append([name, kind, f"{sec * 1e3:.1f}", diff])
    print_table(f"one attention layer, float32 CPU: B={b} T={t} heads {n} (KV {kh}) x {d}; best of {args.reps}, "
                f"called in turn", ["implementation", "pass", "ms", "max |grad diff| vs full"], rows)


if __name__ == "__main__":
    main()
