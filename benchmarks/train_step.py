"""Train-step throughput: jaxalign's SFT and DPO steps vs the same loss and optimizer in transformers-PyTorch eager.

    python benchmarks/train_step.py                  # CPU table: tiny (demo size) and ~100M Llama configs
    python benchmarks/train_step.py --sizes tiny
    python benchmarks/train_step.py --sizes smollm2  # SmolLM2-135M: its real weights (tests/real_model.py)
    python benchmarks/train_step.py --gpu            # ~1B Llama, sequence 1024, bf16 compute: step MFU on the device

A step is everything one optimizer update costs: forward, backward, gradient clipping (global norm 1.0) and AdamW.

- SFT: masked next-token NLL summed over the batch's loss tokens / their count (``jaxalign.train.steps`` "sft").
- DPO: sigmoid DPO (beta 0.1) on summed sequence log-probs of chosen and rejected (one concatenated forward), with the
  frozen reference's log-probs computed in the same step (a forward pass without gradient), as TRL's DPOTrainer does.

Both sides start from the same weights (jaxalign's random init written with ``save_pretrained`` and read by
``AutoModelForCausalLM``) and see the same batch (full-length rows, no padding); the first step's losses are shown to
agree. tokens/s counts the tokens the policy trains on (B*T for SFT, 2*B*T for DPO: chosen and rejected). Model FLOPs
follow ``jaxalign.flops``: 6N + attention per trained token, plus 2N + attention per reference token for DPO; "% of
peak" divides the achieved model FLOP/s by this CPU's float32 matmul peak measured in the same run (one large jnp.dot),
or on ``--gpu`` by the device's bf16 dense peak (``jaxalign.flops.PEAK_FLOPS``).

``--gpu`` imports only jax, flax, optax, numpy and jaxalign's models, losses, train steps/state/optim, flops and
sharding (no grain, datasets, tensorboardX, torch), so it runs on an accelerator box with just those installed.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

BETA = 0.1
# ~1.24B parameters, the shape of Llama-3.2-1B; float32 master weights, bfloat16 compute
GPU_CONFIG = dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                  num_heads=32, num_kv_heads=8, head_dim=64, max_position_embeddings=4096, rope_theta=500000.0,
                  norm_eps=1e-5, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  sliding_windows=(None,) * 16, dtype="bfloat16", param_dtype="float32")


# ---- jaxalign -------------------------------------------------------------------------------------------------------
def _median_time(fn, reps: int) -> float:
    import numpy as np

    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def batches(cfg, b: int, t: int, seed: int = 0):
    """An SFT batch of b rows and a DPO batch of b pairs, t + 1 tokens each (inputs are [:, :-1], targets [:, 1:]);
    the first 8 tokens of every row are a prompt (loss mask 0)."""
    import numpy as np

    rng = np.random.RandomState(seed)
    ids = lambda: rng.randint(3, cfg.vocab_size, size=(b, t + 1)).astype(np.int32)  # noqa: E731
    ones = np.ones((b, t + 1), np.int32)
    mask = ones.copy()
    mask[:, :8] = 0
    sft = {"input_ids": ids(), "attention_mask": ones, "loss_mask": mask}
    prompt = ids()[:, :8]
    chosen, rejected = ids(), ids()
    chosen[:, :8] = rejected[:, :8] = prompt
    dpo = {"chosen_input_ids": chosen, "chosen_attention_mask": ones, "chosen_loss_mask": mask,
           "rejected_input_ids": rejected, "rejected_attention_mask": ones, "rejected_loss_mask": mask}
    return sft, dpo


def jax_step(cfg, params, kind: str, host_batch, mesh):
    """A compiled jaxalign train step on ``mesh``; returns (run_once, first_loss, compile_seconds)."""
    import jax

    from jaxalign import sharding
    from jaxalign.train.optim import OptimConfig, make_optimizer
    from jaxalign.train.state import create_state
    from jaxalign.losses import get_objective
    from jaxalign.train.steps import StepConfig, make_train_step

    optimizer, schedule = make_optimizer(OptimConfig(learning_rate=1e-5, warmup_ratio=0.0, schedule="constant"), 1000)
    state = create_state(params, optimizer, mesh)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    ref = None
    if kind == "dpo":
        step_cfg = StepConfig("policy", objective=get_objective("dpo", beta=BETA)[1])
        ref = jax.tree.map(lambda x: x.copy(), state.params)  # a separate frozen copy on the same shardings
    else:
        step_cfg = StepConfig("sft")
    step = make_train_step(cfg, step_cfg, optimizer, schedule, mesh, shardings, host_batch, ref)
    batch = sharding.shard_batch(host_batch, mesh)
    extra = () if ref is None else (ref,)
    box = {"state": state}
    t0 = time.perf_counter()
    box["state"], metrics = step(box["state"], batch, *extra)
    first_loss = float(metrics["loss"])  # on the initial weights (reported before the update)
    compile_s = time.perf_counter() - t0

    def run():
        box["state"], m = step(box["state"], batch, *extra)
        jax.block_until_ready(m)

    return run, first_loss, compile_s


def model_flops(cfg, kind: str, b: int, t: int) -> float:
    from jaxalign.flops import flops_per_token

    if kind == "sft":
        return b * t * flops_per_token(cfg, t)
    return 2 * b * t * (flops_per_token(cfg, t) + flops_per_token(cfg, t, backward=False))


def trained_tokens(kind: str, b: int, t: int) -> int:
    return b * t if kind == "sft" else 2 * b * t


# ---- PyTorch --------------------------------------------------------------------------------------------------------
def torch_step(folder, kind: str, host_batch):
    """The same step in transformers-PyTorch eager (float32): returns (run_once, first_loss)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ref = None
    if kind == "dpo":
        ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
    tb = {k: torch.tensor(v, dtype=torch.long) for k, v in host_batch.items()}

    def seq_logps(m, ids, attn, mask):
        logits = m(input_ids=ids[:, :-1], attention_mask=attn[:, :-1]).logits
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="none")
        return -(nll.view(ids.shape[0], -1) * mask[:, 1:]).sum(-1)

    def loss_fn():
        if kind == "sft":
            mask = tb["loss_mask"]
            return -seq_logps(model, tb["input_ids"], tb["attention_mask"], mask).sum() / mask[:, 1:].sum()
        cat = lambda k: torch.cat([tb[f"chosen_{k}"], tb[f"rejected_{k}"]])  # noqa: E731
        ids, attn, mask = cat("input_ids"), cat("attention_mask"), cat("loss_mask")
        b = tb["chosen_input_ids"].shape[0]
        with torch.no_grad():
            r = seq_logps(ref, ids, attn, mask)
        p = seq_logps(model, ids, attn, mask)
        logits = BETA * ((p[:b] - r[:b]) - (p[b:] - r[b:]))
        return -F.logsigmoid(logits).mean()

    def run():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss.detach())

    first = run()
    return run, first


# ---- CPU table ------------------------------------------------------------------------------------------------------
def cpu_main(args):
    from common import TINY_BATCH, config_100m, matmul_peak, print_table, smollm2_config, smollm2_folder, tiny_config

    import jax
    import torch
    from flax import nnx

    from transformers.utils import logging as hf_logging

    from jaxalign import sharding
    from jaxalign.models import Decoder, from_pretrained, save_pretrained

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    peak = matmul_peak()
    print(f"devices: {jax.devices()[0].device_kind} x{len(jax.devices())} (jaxalign runs on 1), torch threads "
          f"{torch.get_num_threads()}; measured float32 matmul peak {peak / 1e9:.1f} GFLOP/s", flush=True)
    shapes = {"tiny": (tiny_config(), *TINY_BATCH), "100m": (config_100m(), 4, 256),
              "smollm2": (smollm2_config(), 4, 256)}
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    rows = []
    for size in args.sizes.split(","):
        cfg, b, t = shapes[size]
        real = smollm2_folder() if size == "smollm2" else None
        model = from_pretrained(real) if real is not None else Decoder(cfg, rngs=nnx.Rngs(0))
        cfg = model.cfg
        params = model.param_dict()
        sft, dpo = batches(cfg, b, t)
        dpo = {k: v[: max(1, b // 2)] for k, v in dpo.items()}  # b/2 pairs: the same number of sequences as SFT
        reps = args.reps * (5 if size == "tiny" else 1)
        with tempfile.TemporaryDirectory() as folder:
            if real is not None:  # PyTorch reads the same real weights
                folder = real
            else:
                save_pretrained(model, folder)
            for kind, batch in (("sft", sft), ("dpo", dpo)):
                nb = batch[next(iter(batch))].shape[0]
                j_run, j_loss, compile_s = jax_step(cfg, params, kind, batch, mesh)
                p_run, p_loss = torch_step(folder, kind, batch)
                j_t, p_t = _median_time(j_run, reps), _median_time(p_run, reps)
                tok = trained_tokens(kind, nb, t)
                fl = model_flops(cfg, kind, nb, t)
                weights = " real" if real is not None else ""
                rows.append([f"{size}{weights} ({cfg.num_params() / 1e6:.1f}M)", kind.upper(),
                             f"{nb}{' pairs' if kind == 'dpo' else ''} x {t}", f"{tok / j_t:,.0f}",
                             f"{tok / p_t:,.0f}", f"{p_t / j_t:.2f}x", f"{100 * fl / j_t / peak:.0f}%",
                             f"{100 * fl / p_t / peak:.0f}%", f"{abs(j_loss - p_loss):.1e}", f"{compile_s:.1f}"])
                print(" | ".join(rows[-1]), flush=True)
    print_table(f"train step throughput (float32, CPU, matmul peak {peak / 1e9:.1f} GFLOP/s; tokens/s = trained "
                f"tokens / median step time)",
                ["config", "step", "batch", "jaxalign tok/s", "PyTorch tok/s", "ratio", "jaxalign % of matmul peak",
                 "PyTorch % of peak", "|loss diff| step 1", "jaxalign compile s"], rows)


# ---- GPU ------------------------------------------------------------------------------------------------------------
def gpu_main(args):
    import jax

    from jaxalign import sharding
    from jaxalign.flops import device_peak_flops
    from jaxalign.models import ModelConfig, init_params

    heavy = sorted(m for m in ("grain", "datasets", "tensorboardX", "torch") if m in sys.modules)
    if heavy:
        print(f"warning: {heavy} got imported; the GPU path should not need them")
    dev = jax.devices()[0]
    peak = device_peak_flops(dev)
    print(f"device: {dev.device_kind} x{len(jax.devices())} (the step runs on 1); bf16 dense peak "
          f"{(peak or 0) / 1e12:.0f} TFLOP/s; jax {jax.__version__}")
    cfg = ModelConfig(**{**GPU_CONFIG, "remat": args.remat})
    t = args.seq
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.PRNGKey(0))
    sft, dpo = batches(cfg, args.batch, t)
    dpo = {k: v[: max(1, args.batch // 2)] for k, v in dpo.items()}
    rows = []
    for kind, batch in (("sft", sft), ("dpo", dpo)):
        nb = batch[next(iter(batch))].shape[0]
        run, loss, compile_s = jax_step(cfg, params, kind, batch, mesh)
        step_t = _median_time(run, args.reps)
        tok = trained_tokens(kind, nb, t)
        fl = model_flops(cfg, kind, nb, t)
        mem = dev.memory_stats() or {}
        rows.append([f"~1B Llama ({cfg.num_params() / 1e9:.2f}B)", kind.upper(),
                     f"{nb}{' pairs' if kind == 'dpo' else ''} x {t}", args.remat, f"{1e3 * step_t:.0f}",
                     f"{tok / step_t:,.0f}", f"{100 * fl / step_t / peak:.1f}%" if peak else "n/a",
                     f"{mem.get('peak_bytes_in_use', 0) / 2**30:.1f}", f"{loss:.3f}", f"{compile_s:.0f}"])
        print(" | ".join(rows[-1]), flush=True)
    from common import print_table

    print_table(f"train step MFU on {dev.device_kind} (bf16 compute, float32 master weights and AdamW)",
                ["config", "step", "batch", "remat", "step ms", "tokens/s", "MFU", "peak GiB", "loss", "compile s"],
                rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,100m", help="CPU: tiny, 100m and/or smollm2")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--gpu", action="store_true", help="~1B Llama on the default accelerator")
    ap.add_argument("--seq", type=int, default=1024, help="--gpu: sequence length")
    ap.add_argument("--batch", type=int, default=8, help="--gpu: SFT rows (DPO uses half as many pairs)")
    ap.add_argument("--remat", default="dots", choices=["none", "dots", "full"], help="--gpu: rematerialisation")
    args = ap.parse_args()
    if args.gpu:
        # benchmarks/common.py defaults JAX_PLATFORMS to cpu for the CPU tables; the GPU run wants the accelerator
        os.environ.setdefault("JAX_PLATFORMS", "")
        args.reps = max(args.reps, 5)
        gpu_main(args)
    else:
        cpu_main(args)


if __name__ == "__main__":
    main()
