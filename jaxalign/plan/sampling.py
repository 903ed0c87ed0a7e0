"""The sampling phases' plan: the prefill and the decode step compiled for the slice with the batch the sampler
would pick (or ``sample.batch_size``), their memory, KV cache, FLOPs and time per generated token.

The numbers come from the rules the run uses: the samples per prompt (:func:`jaxalign.rules.candidates_per_prompt`),
the prompts a round answers (:func:`jaxalign.rules.round_prompts`), a fixed batch
(:func:`jaxalign.rules.fixed_decode_batch`) and a planned one (the sampler's own
:func:`jaxalign.sampling.memory.plan_batch_size`, with the HBM left after the weights as its budget)."""
from __future__ import annotations

import dataclasses

from jaxalign.plan.phases import (PhaseRow, abstract_params, compile_and_measure, compiled_bytes, sds, tree_bytes)
from jaxalign.plan.hours import decode_bytes_read
from jaxalign.plan.report import FIT_MARGIN
from jaxalign.plan.tpu import Slice

UNKNOWN_PROMPTS = 10_000  # prompts per round planned when neither sample.limit nor data.train.limit bounds them
# the run-time sampler checks a planned batch by what XLA compiled up to 3 times, shrinking it after each check
# (jaxalign.sampling.sampler.generate_from_params), so it may run a batch shrunk 3 times: the plan compiles that one too
SHRINKS = 3


def prefill_flops(mcfg, batch: int, prompt: int, cache_len: int) -> float:
    """Matmul FLOPs of the sampler's prefill: the layers on ``prompt`` tokens attending over all ``cache_len`` slots
    (the cache is allocated at full length), the LM head on the last position only."""
    from jaxalign.flops import matmul_params

    head = mcfg.hidden_size * mcfg.vocab_size
    layers = 2 * (matmul_params(mcfg) - head) * prompt
    attn = 4 * mcfg.num_layers * prompt * cache_len * mcfg.num_heads * mcfg.head_dim
    return batch * (layers + attn + 2 * head)


@dataclasses.dataclass(frozen=True)
class SamplerShape:
    """What a sampling phase draws, from the config alone: ``prompts`` per round (or eval), ``samples`` per prompt,
    the decoding settings and the compiled lengths (prompt bucket ``prompt_len`` + new-token bucket ``out_len``)."""

    label: str  # "sample" | "eval sampling"
    prompts: int
    samples: int
    temperature: float
    max_new: int
    prompt_len: int
    out_len: int

    @property
    def cache_len(self) -> int:
        return self.prompt_len + self.out_len


def sampler_shape(cfg, phase: str) -> SamplerShape:
    """The sample phase draws :func:`~jaxalign.rules.candidates_per_prompt` responses for each of the round's
    :func:`~jaxalign.rules.round_prompts` prompts (DITTO draws N too); eval draws one for each of ``eval.num_prompts``.
    Prompts fill ``data.max_prompt_length`` (the sampler compiles the bucket of its longest prompt)."""
    from jaxalign.rules import candidates_per_prompt, round_prompts
    from jaxalign.sampling.sampler import bucket_length

    if phase == "sample":
        label, prompts, n = "sample", round_prompts(cfg) or UNKNOWN_PROMPTS, candidates_per_prompt(cfg)
        temperature, max_new = cfg.sample.temperature, cfg.sample.max_new_tokens
    else:
        label, prompts, n = "eval sampling", cfg.eval.num_prompts, 1
        temperature, max_new = cfg.eval.temperature, cfg.eval.max_new_tokens
    return SamplerShape(label, prompts, n, temperature, max_new, bucket_length(cfg.data.max_prompt_length,
                                                                                 what="prompt"),
                        bucket_length(max_new, what="length"))


def sampler_weights(mcfg, mesh) -> tuple[dict, dict]:
    """Abstract ``(masters, params)`` a sampling phase holds: the ``param_dtype`` weights it loaded and the copies the
    sampler casts to the compute dtype once (:data:`jaxalign.sampling.kernels.CAST_ONCE`)."""
    from jaxalign.sampling.kernels import CAST_ONCE

    return abstract_params(mcfg, mesh), abstract_params(
        mcfg, mesh, dtype=lambda k: mcfg.dtype if k in CAST_ONCE else mcfg.param_dtype)


def sampler_budget(mcfg, mesh, sl: Slice) -> int:
    """Bytes per chip a sampler batch may use: FIT_MARGIN of the chip's HBM less both copies of the weights."""
    masters, params = sampler_weights(mcfg, mesh)
    return int(FIT_MARGIN * sl.chip.hbm - compiled_bytes(masters) - compiled_bytes(params))


def decode_batch(cfg, scfg, shape: SamplerShape, mesh, budget: float) -> tuple[int, str, int, int]:
    """``(prompts per batch, how it was chosen, largest that fits, largest that fits unshared)`` as the run-time
    sampler picks them: ``sample.batch_size`` through :func:`~jaxalign.rules.fixed_decode_batch`, else the sampler's
    :func:`~jaxalign.sampling.memory.plan_batch_size` for ``budget`` bytes per chip with no row cap (as on an
    accelerator; the sampler caps a batch at 256 rows on CPU only); one prompt per batch shard when none fits (the
    row then says it does not fit). ``scfg``: the model config the sampler runs (remat off)."""
    import jax.numpy as jnp

    from jaxalign import sharding
    from jaxalign.rules import fixed_decode_batch
    from jaxalign.sampling.memory import plan_batch_size

    n, prompts, shards = shape.samples, shape.prompts, sharding.batch_shards(mesh)
    size = dict(num_prompts=prompts, prompt_len=shape.prompt_len, cache_len=shape.cache_len, num_samples=n,
                budget_bytes=budget, mesh=mesh, cache_dtype=jnp.dtype(scfg.dtype), max_rows=prompts * n)

    def largest(shared_prefix=None) -> int:
        try:
            return plan_batch_size(scfg, shared_prefix=shared_prefix, **size)
        except ValueError:  # not even one prompt per batch shard fits
            return 0

    fits = largest()
    # the same search with the repeated layout (every sample holding a copy of its prompt's KV), for comparison
    unshared = largest(shared_prefix=False) if n > 1 else 0
    if cfg.sample.batch_size:
        return fixed_decode_batch(cfg.sample.batch_size, prompts, shards), "sample.batch_size", fits, unshared
    return fits or shards, "planned: largest that fits", fits, unshared


def settle_batch(B: int, how: str, compile_at, *, fixed: bool, largest: int, shards: int) -> list[PhaseRow]:
    """Compile at ``B`` (``compile_at(B, how) -> rows``); a planned batch whose compiled programs need more than
    FIT_MARGIN of the chip is shrunk to what they say fits (:func:`jaxalign.sampling.memory.shrunk_batch`, as the
    run-time sampler does with XLA's bytes) and compiled again, up to :data:`SHRINKS` times."""
    from jaxalign.sampling.memory import shrunk_batch

    for attempt in range(SHRINKS + 1):
        rows = compile_at(B, how)
        worst = max(rows, key=lambda r: r.total)
        if fixed or attempt == SHRINKS or worst.total <= FIT_MARGIN * worst.hbm:
            return rows
        base = worst.params + worst.outside
        smaller = shrunk_batch(B, worst.total - base, FIT_MARGIN * worst.hbm - base, shards)
        if not 0 < smaller < B:
            return rows
        B, how = smaller, f"planned: {largest} did not fit compiled, shrunk to the compiled bytes"
    return rows


def plan_sampler(cfg, mcfg, mesh, sl: Slice, *, phase: str) -> list[PhaseRow]:
    import jax
    import jax.numpy as jnp

    from jaxalign import sharding
    from jaxalign.flops import flops_per_token
    from jaxalign.sampling.kernels import CACHE_AXES, DecodeMode, decode, prefill, uses_shared_prefix
    from jaxalign.sampling.sampler import stop_id_buffer

    scfg = mcfg.replace(remat="none")
    shape = sampler_shape(cfg, phase)
    n, temperature, max_new, prompts = shape.samples, shape.temperature, shape.max_new, shape.prompts
    mode = DecodeMode.from_settings(temperature, cfg.sample.top_p, cfg.sample.top_k)  # as the runner's generate
    settings = dict(mode=mode, pad_id=int(mcfg.pad_token_id) if mcfg.pad_token_id is not None else 0, mesh=mesh)
    P, out_len, cache_len = shape.prompt_len, shape.out_len, shape.cache_len
    cdt = jnp.dtype(mcfg.dtype)
    masters, params = sampler_weights(mcfg, mesh)
    outside = compiled_bytes(masters)
    shards = sharding.batch_shards(mesh)
    # the decode batch that fills the HBM left after the weights (the compute-dtype copies and the loaded masters)
    B, how, largest, unshared = decode_batch(cfg, scfg, shape, mesh, sampler_budget(mcfg, mesh, sl))

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
        label = shape.label
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
    # more (e.g. a second copy of the cache): shrink a planned batch to what the compiled program says fits
    return settle_batch(B, how, compile_at, fixed=bool(cfg.sample.batch_size), largest=largest, shards=shards)
