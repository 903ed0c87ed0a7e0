"""Forward and forward+backward tokens/s: jaxalign vs transformers-PyTorch eager on the same weights and batch (CPU).

    python benchmarks/forward_backward.py            # tiny (demo size) and ~100M configs
    python benchmarks/forward_backward.py --sizes tiny
    python benchmarks/forward_backward.py --sizes smollm2   # SmolLM2-135M: its real weights (tests/real_model.py)

Both sides compute the same thing: logits of a [B, T] batch, and for the backward pass the mean next-token NLL and its
gradient with respect to every parameter. Each figure is also shown as a fraction of this CPU's float32 matmul peak
(one large jnp.dot, timed in turn with the contenders), using the MFU formula of jaxalign.flops. The last column is
the ratio jaxalign would reach at exactly that peak: the most any implementation could gain over PyTorch there.

Timing: the best of --reps rounds (x5 at the tiny size) that call jaxalign and PyTorch in turn, after a warm-up, so
both sides see the same load. Still, run it with nothing else going on: on a shared 2-core machine the absolute
figures (and the measured peak) move by 10-30% between runs, the ratios much less.
"""
from __future__ import annotations

import argparse
import tempfile

from common import (TINY_BATCH, config_100m, interleaved_times, peak_matmul, print_table, smollm2_config,
                    smollm2_folder, tiny_config)

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign.flops import flops_per_token
from jaxalign.losses import token_logprobs
from jaxalign.models import Decoder, forward, from_pretrained, save_pretrained


def jax_fns(cfg):
    def loss(params, ids):
        logits = forward(params, cfg, ids[:, :-1])
        return -jnp.mean(token_logprobs(logits, ids[:, 1:]))

    fwd = jax.jit(lambda p, ids: forward(p, cfg, ids))
    fwd_bwd = jax.jit(jax.value_and_grad(loss))
    return fwd, fwd_bwd


def torch_fns(folder):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)

    def fwd(ids):
        with torch.no_grad():
            return model(ids).logits

    def fwd_bwd(ids):
        model.zero_grad(set_to_none=True)
        logits = model(ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        return loss

    return fwd, fwd_bwd


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,100m")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()

    import torch

    torch.manual_seed(0)
    peak_call, peak_flops = peak_matmul()
    print(f"devices: {jax.devices()[0].device_kind} x{len(jax.devices())}, torch threads {torch.get_num_threads()}")
    shapes = {"tiny": (tiny_config(), *TINY_BATCH), "100m": (config_100m(), 4, 256),
              "smollm2": (smollm2_config(), 4, 256)}
    rows = []
    for size in args.sizes.split(","):
        cfg, b, t = shapes[size]
        real = smollm2_folder() if size == "smollm2" else None
        if real is not None:  # the real weights on both sides; the shape is the same either way
            model = from_pretrained(real)
            cfg = model.cfg
            t_fwd, t_fwd_bwd = torch_fns(real)
        else:
            model = Decoder(cfg, rngs=nnx.Rngs(0))
            with tempfile.TemporaryDirectory() as d:
                save_pretrained(model, d)
                t_fwd, t_fwd_bwd = torch_fns(d)
        params = model.param_dict()
        ids_np = np.random.RandomState(0).randint(3, cfg.vocab_size, size=(b, t + 1)).astype(np.int32)
        ids = jnp.asarray(ids_np)
        tids = torch.tensor(ids_np, dtype=torch.long)
        fwd, fwd_bwd = jax_fns(cfg)
        reps = args.reps if size != "tiny" else 5 * args.reps
        best = interleaved_times({
            "j_f": lambda: fwd(params, ids[:, :-1]).block_until_ready(),
            "p_f": lambda: t_fwd(tids[:, :-1]),
            "j_fb": lambda: jax.block_until_ready(fwd_bwd(params, ids)),
            "p_fb": lambda: t_fwd_bwd(tids),
            "peak": peak_call,
        }, reps)
        j_f, p_f, j_fb, p_fb = best["j_f"], best["p_f"], best["j_fb"], best["p_fb"]
        peak = peak_flops / best["peak"]
        print(f"{size}: float32 matmul peak measured between the calls: {peak / 1e9:.1f} GFLOP/s")
        n_tok = b * t
        for name, jt, pt, back in (("forward", j_f, p_f, False), ("forward+backward", j_fb, p_fb, True)):
            j_tps, p_tps = n_tok / jt, n_tok / pt
            frac = j_tps * flops_per_token(cfg, t, backward=back) / peak
            p_frac = p_tps * flops_per_token(cfg, t, backward=back) / peak
            weights = " real" if real is not None else ""
            rows.append([f"{size}{weights} ({cfg.num_params() / 1e6:.1f}M, B={b} T={t})", name, f"{j_tps:,.0f}",
                         f"{p_tps:,.0f}", f"{j_tps / p_tps:.2f}x", f"{100 * frac:.0f}%", f"{100 * p_frac:.0f}%",
                         f"{1 / p_frac:.2f}x"])
    print_table("forward / backward throughput (float32, CPU)",
                ["config", "pass", "jaxalign tok/s", "PyTorch tok/s", "ratio", "jaxalign % of matmul peak",
                 "PyTorch % of peak", "ratio at 100% of peak"], rows)


if __name__ == "__main__":
    main()
