"""LoRA vs full fine-tuning: tokens/s and memory of an SFT and a DPO step at ~100M parameters.

    python benchmarks/lora.py                       # CPU, ~100M Llama, 4 rows x 128 tokens, rank 16 on all 7 targets
    python benchmarks/lora.py --size tiny --reps 5
    python benchmarks/lora.py --gpu --batch 8 --seq 1024    # the same table on the default accelerator

A step is forward, backward, global-norm clipping (1.0) and AdamW, jitted with the trained state donated:

- full: the train state is every parameter and its two AdamW moments; DPO's reference is a separate frozen copy of the
  weights (an extra argument), as TRL's DPOTrainer holds it.
- LoRA: the train state is the adapters and their moments; the base weights are a separate, non-differentiated argument
  (``jaxalign.models.lora.split_trainable``); DPO's reference is that same base with the adapters off, so one copy of
  the base serves policy and reference.

Memory comes from XLA's own accounting of the compiled step (``compiled.memory_analysis()``): arguments (state, frozen
weights, reference, batch), temporaries (activations, gradients, optimizer scratch) and their sum, the step's peak
footprint bound. tokens/s counts the tokens the policy trains on (B*T for SFT; 2 * pairs * T for DPO).
The steps are the engine's (``make_train_step`` with ``StepConfig(lora=...)``, the pipeline's training step).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

BETA = 0.1


def measure(cfg, kind, lora_cfg, params, batch, reps):
    """(tokens/s, step seconds, memory analysis, trainable params, compile seconds, first loss) of one variant, the
    engine's own step (``jaxalign.train.steps.make_train_step``) on one device."""
    import jax
    import numpy as np

    from jaxalign import sharding
    from jaxalign.losses import get_objective
    from jaxalign.models.lora import init_adapters, split_trainable
    from jaxalign.train.optim import OptimConfig, make_optimizer
    from jaxalign.train.state import create_state
    from jaxalign.train.steps import StepConfig, make_train_step

    mesh = sharding.single_device_mesh()
    optimizer, schedule = make_optimizer(OptimConfig(learning_rate=1e-5, warmup_ratio=0.0, schedule="constant",
                                                     max_grad_norm=1.0), 100)
    if kind == "sft":
        step_cfg = StepConfig("sft")
    else:  # full: a separate frozen copy is the reference (TRL's DPOTrainer); LoRA: the base with adapters off
        step_cfg = StepConfig("policy", objective=get_objective("dpo", beta=BETA)[1],
                              reference_logps="in_step" if lora_cfg is None else "base")
    frozen = ref = None
    if lora_cfg is None:
        trainable = jax.tree.map(lambda x: x.copy(), params)
        ref = params if kind == "dpo" else None
    else:
        trainable, frozen = split_trainable(params, init_adapters(cfg, lora_cfg, jax.random.PRNGKey(1)))
        step_cfg = dataclasses.replace(step_cfg, lora=lora_cfg)
    state = create_state(trainable, optimizer, mesh, donate=True)
    extra = step_cfg.extra_args(frozen, ref)
    fn = make_train_step(cfg, step_cfg, optimizer, schedule, mesh, jax.tree.map(lambda x: x.sharding, state), batch,
                         ref, frozen)
    t0 = time.perf_counter()
    compiled = fn.lower(state, batch, *extra).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    n_train = sum(x.size for x in jax.tree.leaves(state.params))
    box = {"s": state}

    def run():
        box["s"], metrics = compiled(box["s"], batch, *extra)
        return float(metrics["loss"])

    first = run()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    ids = batch["input_ids"] if kind == "sft" else batch["chosen_input_ids"]
    rows = ids.shape[0] * (1 if kind == "sft" else 2)
    tokens = rows * (ids.shape[1] - 1)
    return tokens / step_s, step_s, mem, n_train, compile_s, first


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="100m", choices=["tiny", "100m"])
    ap.add_argument("--batch", type=int, default=4, help="sequences per step (DPO: half as many pairs)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--gpu", action="store_true", help="run on the default accelerator, bf16 compute")
    args = ap.parse_args()
    if not args.gpu:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    import numpy as np

    from common import config_100m, print_table, tiny_config
    from jaxalign.models import init_params
    from jaxalign.models.lora import LoraConfig, tree_bytes

    extra = dict(dtype="bfloat16") if args.gpu else {}
    cfg = (config_100m if args.size == "100m" else tiny_config)(**extra)
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.PRNGKey(0))
    rng = np.random.RandomState(0)
    ids = rng.randint(3, cfg.vocab_size, size=(args.batch, args.seq + 1)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[:, :8] = 0
    n = args.batch // 2
    ids[n:2 * n, :8] = ids[:n, :8]  # DPO: chosen row i and rejected row n + i share their 8-token prompt
    sft_batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones_like(ids), "loss_mask": jnp.asarray(mask)}
    pair_batch = {f"{side}_{k}": v[rows] for side, rows in (("chosen", slice(0, n)), ("rejected", slice(n, 2 * n)))
                  for k, v in sft_batch.items()}
    lcfg = LoraConfig(rank=args.rank, alpha=args.alpha)
    dev = jax.devices()[0]
    print(f"device {dev.device_kind}; {cfg.num_params() / 1e6:.1f}M params ({tree_bytes(params) / 2**20:.0f} MiB "
          f"float32); batch {args.batch} x {args.seq}; LoRA rank {args.rank} on {', '.join(lcfg.targets)}",
          flush=True)
    rows = []
    for kind in ("sft", "dpo"):
        for name, lc in (("full", None), ("LoRA", lcfg)):
            batch = sft_batch if kind == "sft" else pair_batch
            tok_s, step_s, mem, n_train, compile_s, loss = measure(cfg, kind, lc, params, batch, args.reps)
            arg, tmp = mem.argument_size_in_bytes, mem.temp_size_in_bytes
            rows.append([kind.upper(), name, f"{n_train / 1e6:.2f}M", f"{tok_s:,.0f}", f"{step_s:.2f}",
                         f"{arg / 2**20:,.0f}", f"{tmp / 2**20:,.0f}", f"{(arg + tmp) / 2**20:,.0f}",
                         f"{compile_s:.0f}", f"{loss:.4f}"])
            print(" | ".join(rows[-1]), flush=True)
    print_table(f"LoRA vs full fine-tuning step ({dev.device_kind}, {cfg.num_params() / 1e6:.1f}M params, "
                f"{args.batch} x {args.seq} tokens, median of {args.reps} steps)",
                ["step", "train", "trainable", "tokens/s", "step s", "arguments MiB", "temporaries MiB",
                 "args + temp MiB", "compile s", "first loss"], rows)


if __name__ == "__main__":
    main()
