"""The GPU figures in one call: SFT and DPO train-step MFU of a ~1B Llama at sequence 1024 in bf16, and the sampler's
batch-1 decode as a percentage of the HBM roofline.

    python benchmarks/mfu_gpu.py                     # on a machine with a GPU (jax[cuda] installed)
    python benchmarks/mfu_gpu.py --batch 16          # SFT rows (DPO: half as many pairs)
    JAX_PLATFORMS=cpu python benchmarks/mfu_gpu.py --smoke   # a tiny config on CPU: checks the script runs

It is the two measurements the other scripts make, run back to back on the default JAX device:
``train_step.py --gpu`` (MFU = model FLOPs of the trained tokens / step time / the device's bf16 dense peak, the
formula of ``jaxalign.flops.mfu``; the DPO step also runs the frozen reference forward, which MFU does not count) and
``sampler.py --gpu-roofline`` (decode step time against (weight bytes + KV bytes) / measured copy bandwidth).
Imports only jax, flax, optax, numpy and jaxalign.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# a ~0.3M-parameter stand-in for --smoke (same code paths, seconds on a CPU)
SMOKE_CONFIG = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512, rope_theta=10000.0,
                    norm_eps=1e-5, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                    dtype="bfloat16", param_dtype="float32")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8, help="SFT rows (DPO uses half as many pairs)")
    ap.add_argument("--remat", default="dots", choices=["none", "dots", "full"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--smoke", action="store_true", help="tiny config, short sequence: check the script on a CPU")
    args = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "")  # common.py defaults to cpu for the CPU tables
    import sampler
    import train_step

    if args.smoke:
        train_step.GPU_CONFIG = {**SMOKE_CONFIG, "sliding_windows": (None,) * SMOKE_CONFIG["num_layers"]}
        sampler.GPU_CONFIG = dict(SMOKE_CONFIG)
        args.seq, args.batch, args.reps = 64, 4, 2
    import jax

    if jax.default_backend() != "gpu" and not args.smoke:
        raise SystemExit(f"no GPU: the default JAX backend is {jax.default_backend()!r}. Install jax[cuda] on a GPU "
                         f"machine (pip install -e '.[cuda]'), or pass --smoke to check the script on a CPU.")
    train_step.gpu_main(args)
    sampler.gpu_roofline(args.decode_batches, 128 if not args.smoke else 16, args.reps)


if __name__ == "__main__":
    main()
