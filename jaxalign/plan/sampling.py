"""The sampling phases' plan: the prefill and the decode step compiled for the slice with the batch the sampler
would pick (or ``sample.batch_size``), their memory, KV cache, FLOPs and time per generated token."""
from __future__ import annotations

import math

from jaxalign.plan.phases import (PhaseRow, abstract_params, compile_and_measure, compiled_bytes, sds, tree_bytes)
from jaxalign.plan.hours import decode_bytes_read, largest_batch
from jaxalign.plan.report import FIT_MARGIN
from jaxalign.plan.tpu import Slice


def prefill_flops(mcfg, batch: int, prompt: int, cache_len: int) -> float:
    """Matmul FLOPs of the sampler's prefill: the layers on ``prompt`` tokens attending over all ``cache_len`` slots
    (the cache is allocated at full length), the LM head on the last position only."""
    from jaxalign.flops import matmul_params

    head = mcfg.hidden_size * mcfg.vocab_size
    layers = 2 * (matmul_params(mcfg) - head) * prompt
    attn = 4 * mcfg.num_layers * prompt * cache_len * mcfg.num_heads * mcfg.head_dim
    return batch * (layers + attn + 2 * head)


def plan_sampler(cfg, mcfg, mesh, sl: Slice, *, phase: str) -> list[PhaseRow]:
    import jax
    import jax.numpy as jnp

    from jaxalign import sharding
    from jaxalign.flops import flops_per_token
    from jaxalign.rules import candidates_per_prompt
    from jaxalign.sampling.kernels import CACHE_AXES, CAST_ONCE, DecodeMode, decode, prefill, uses_shared_prefix
    from jaxalign.sampling.memory import sampling_bytes_per_device, shrunk_batch
    from jaxalign.sampling.sampler import bucket_length, stop_id_buffer

    scfg = mcfg.replace(remat="none")
    if phase == "sample":
        n = candidates_per_prompt(cfg)  # the sample phase's own count (DITTO draws N too)
        temperature, max_new = cfg.sample.temperature, cfg.sample.max_new_tokens
    else:
        n, temperature, max_new = 1, cfg.eval.temperature, cfg.eval.max_new_tokens
    mode = DecodeMode.from_settings(temperature, cfg.sample.top_p, cfg.sample.top_k)  # as the runner's generate
    settings = dict(mode=mode, pad_id=int(mcfg.pad_token_id) if mcfg.pad_token_id is not None else 0, mesh=mesh)
    P = bucket_length(cfg.data.max_prompt_length, what="prompt")
    out_len = bucket_length(max_new, what="length")
    cache_len = P + out_len
    cdt = jnp.dtype(mcfg.dtype)
    masters = abstract_params(mcfg, mesh)
    params = abstract_params(mcfg, mesh, dtype=lambda k: mcfg.dtype if k in CAST_ONCE else mcfg.param_dtype)
    outside = compiled_bytes(masters)
    shards = sharding.batch_shards(mesh)
    prompts = cfg.eval.num_prompts if phase == "eval" else (cfg.sample.limit or 10_000)
    # the decode batch that fills the HBM left after the weights (the compute-dtype copies and the loaded masters):
    # the largest multiple of the batch shards whose sampling_bytes_per_device fits FIT_MARGIN of the chip, with no
    # row cap (as the run-time sampler on an accelerator; it caps a batch at 256 rows on CPU only)
    budget = int(FIT_MARGIN * sl.chip.hbm - outside - compiled_bytes(params))
    size = dict(prompt_len=P, cache_len=cache_len, num_samples=n, mesh=mesh, cache_dtype=cdt)
    largest = largest_batch(lambda b: sampling_bytes_per_device(scfg, prompts_per_batch=b, **size)["total"] <= budget,
                            shards, prompts)
    # the same search with the repeated layout (every sample holding a copy of its prompt's KV), for comparison
    unshared = largest_batch(lambda b: sampling_bytes_per_device(scfg, prompts_per_batch=b, shared_prefix=False,
                                                                 **size)["total"] <= budget,
                             shards, prompts) if n > 1 else 0
    if cfg.sample.batch_size:
        B = math.ceil(cfg.sample.batch_size / shards) * shards
        how = "sample.batch_size"
    else:
        B = largest or shards  # none fits: plan one prompt per shard (the row says it does not fit)
        how = "planned: largest that fits"

    shared_layout = uses_shared_prefix(n, None)

    def compile_at(B: int, how: str) -> list[PhaseRow]:
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        bs = lambda nd: sharding.batch_sharding(mesh, nd)  # noqa: E731
        pargs = (params, sds((B, P), jnp.int32, bs(2)), sds((B, P), jnp.int32, bs(2)), sds((B,), jnp.int32, bs(1)),
                 sds((B,), jnp.bool_, bs(1)), sds((), jnp.uint32, rep), sds((), jnp.float32, rep),
                 sds((), jnp.float32, rep))
        # the sampler's default layout: prefix [B, P] + suffix [B n, new] slots when n > 1, else [B n, P + new]
        kv_rows_slots = [(B, P), (B * n, out_len)] if shared_layout else [(B * n, cache_len)]
        kv_shapes = [(mcfg.num_layers, r, s, mcfg.num_kv_heads, mcfg.head_dim) for r, s in kv_rows_slots]
        kv = sum(2 * tree_bytes([sds(x, cdt, sharding.named_sharding(CACHE_AXES, x, mesh))]) for x in kv_shapes)
        label = "sample" if phase == "sample" else "eval sampling"
        detail = f"{B} prompts x {n} samples ({how}), prompt {P} + {out_len} new, temperature {temperature:g}"
        rows = []
        pre = PhaseRow(f"{label}: prefill", detail, hbm=sl.chip.hbm)
        pre.info = dict(label=label, prompts=prompts, samples=n, batch=B, batch_source=how, largest_batch=largest,
                        unshared_batch=unshared, max_new=max_new, prompt_len=P, cache_len=cache_len,
                        bytes_read=decode_bytes_read(scfg, B, n, P, cache_len, mesh, cdt, shared_layout))
        pre.params, pre.outside = compiled_bytes(params), outside

        def prefill_fn(*a):
            return prefill(*a, cfg=scfg, num_samples=n, cache_len=cache_len, cache_dtype=cdt, **settings)

        def jit_in_mesh(fn, donate=()):
            class _Build:  # lower() inside activate(mesh), as sampler._compile does
                def lower(self, *a):
                    with sharding.activate(mesh):
                        return jax.jit(fn, donate_argnums=donate).lower(*a)
            return _Build()

        compiled = compile_and_measure(pre, sl, mcfg, lambda: jit_in_mesh(prefill_fn), pargs, tokens=B * P, seq_len=P,
                                       backward=False, kv=kv)
        pre.model_flops = prefill_flops(mcfg, B, P, P if shared_layout else cache_len) / len(sl.devices)
        rows.append(pre)
        dec = PhaseRow(f"{label}: decode", f"{B * n} rows, one token per step, cache {cache_len}", hbm=sl.chip.hbm)
        dec.params, dec.outside, dec.info = pre.params, outside, pre.info
        if compiled is None:
            dec.verdict = "not compiled (prefill does not fit)"
            dec.total, dec.kv_cache, dec.exact = pre.total, kv, False
            rows.append(dec)
            return rows
        cache_out, state_out = jax.tree.map(lambda s: sds(s.shape, s.dtype, s.sharding), compiled.out_info)
        dargs = (params, cache_out, state_out, sds((), jnp.float32, rep), sds((), jnp.float32, rep),
                 sds((), jnp.int32, rep), sds(stop_id_buffer(()).shape, jnp.int32, rep))

        def decode_fn(*a):
            return decode(*a, cfg=scfg, prompt_len=P, out_len=out_len, **settings)

        compile_and_measure(dec, sl, mcfg, lambda: jit_in_mesh(decode_fn, donate=(1,)), dargs, tokens=B * n,
                            seq_len=cache_len, backward=False, kv=kv)
        dec.model_flops = B * n * flops_per_token(mcfg, cache_len, backward=False) / len(sl.devices)
        rows.append(dec)
        return rows

    # the memory model (sampling_bytes_per_device) is checked against XLA on CPU; on TPU the compiled decode may need
    # more (e.g. a second copy of the cache): shrink a planned batch to what the compiled program says fits, twice
    for attempt in range(3):
        rows = compile_at(B, how)
        worst = max(rows, key=lambda r: r.total)
        if cfg.sample.batch_size or attempt == 2 or worst.total <= FIT_MARGIN * worst.hbm:
            return rows
        fixed = worst.params + worst.outside
        smaller = shrunk_batch(B, worst.total - fixed, FIT_MARGIN * worst.hbm - fixed, shards)
        if not 0 < smaller < B:
            return rows
        B, how = smaller, f"planned: {largest} did not fit compiled, shrunk to the compiled bytes"
    return rows
