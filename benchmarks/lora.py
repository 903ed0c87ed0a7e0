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
The model code is ``jaxalign.models.forward`` with ``lora=(adapters, cfg)``; the engine's step does not take adapters
yet, so the steps are built here with optax.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

BETA = 0.1


def build_step(cfg, kind, lora_cfg, optimizer):
    """``step(trainable, opt_state, frozen, ref, batch) -> (trainable, opt_state, loss)``, jitted, state donated."""
    import jax
    import optax

    from jaxalign.losses import dpo_loss, sequence_logprobs, sft_loss, token_logprobs
    from jaxalign.models import forward
    from jaxalign.models.lora import join_trainable

    def logits_of(params, lora, ids):
        return forward(params, cfg, ids[:, :-1], lora=lora)

    def loss_fn(trainable, frozen, ref, batch):
        if lora_cfg is None:
            params, lora = trainable, None
        else:
            params, adapters = join_trainable(trainable, frozen)
            lora = (adapters, lora_cfg)
        ids, mask = batch["input_ids"], batch["loss_mask"]
        if kind == "sft":
            return sft_loss(logits_of(params, lora, ids), ids[:, 1:], mask[:, 1:])[0]
        pol = sequence_logprobs(token_logprobs(logits_of(params, lora, ids), ids[:, 1:]), mask[:, 1:])
        # LoRA: the reference is the policy's own base with adapters off; full: the separate frozen copy
        ref_params = params if lora_cfg is not None else ref
        r = jax.lax.stop_gradient(sequence_logprobs(token_logprobs(logits_of(ref_params, None, ids), ids[:, 1:]),
                                                    mask[:, 1:]))
        n = ids.shape[0] // 2
        return dpo_loss(pol[:n], pol[n:], r[:n], r[n:], beta=BETA)[0]

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(trainable, opt_state, frozen, ref, batch):
        frozen = jax.lax.stop_gradient(frozen)
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, ref, batch)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return step


def measure(cfg, kind, lora_cfg, params, batch, reps):
    """(tokens/s, step seconds, memory analysis, trainable params, compile seconds, first loss) of one variant."""
    import jax
    import numpy as np
    import optax

    from jaxalign.models.lora import init_adapters, split_trainable

    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-5))
    if lora_cfg is None:
        trainable, frozen = jax.tree.map(lambda x: x.copy(), params), {}
        ref = params if kind == "dpo" else {}
    else:
        adapters = init_adapters(cfg, lora_cfg, jax.random.PRNGKey(1))
        trainable, frozen = split_trainable(params, adapters)
        ref = {}
    opt_state = optimizer.init(trainable)
    step = build_step(cfg, kind, lora_cfg, optimizer)
    t0 = time.perf_counter()
    compiled = step.lower(trainable, opt_state, frozen, ref, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    n_train = sum(x.size for x in jax.tree.leaves(trainable))
    box = {"s": (trainable, opt_state)}

    def run():
        t, o, loss = compiled(*box["s"], frozen, ref, batch)
        box["s"] = (t, o)
        return float(loss)

    first = run()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    rows = batch["input_ids"].shape[0]
    tokens = rows * (batch["input_ids"].shape[1] - 1)
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
    batch = {"input_ids": jnp.asarray(ids), "loss_mask": jnp.asarray(mask)}
    lcfg = LoraConfig(rank=args.rank, alpha=args.alpha)
    dev = jax.devices()[0]
    print(f"device {dev.device_kind}; {cfg.num_params() / 1e6:.1f}M params ({tree_bytes(params) / 2**20:.0f} MiB "
          f"float32); batch {args.batch} x {args.seq}; LoRA rank {args.rank} on {', '.join(lcfg.targets)}",
          flush=True)
    rows = []
    for kind in ("sft", "dpo"):
        for name, lc in (("full", None), ("LoRA", lcfg)):
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
