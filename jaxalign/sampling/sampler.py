"""In-process sampling, the host side: checks, batching, length buckets, the compile cache and the results.

How a call runs:

1. Validate everything on the host (empty prompts, ids outside the vocabulary, prompt + new tokens past the context,
   bad temperature / top-k / top-p) — errors come before anything is compiled.
2. Sort the prompts by length and cut them into fixed-size batches (``batch_size`` prompts, chosen by
   :func:`jaxalign.sampling.memory.plan_batch_size` from a memory budget when not given). Each batch is left-padded to
   a length bucket (:func:`bucket_length`: power of two, at least 16, or the caller's ``prompt_buckets``); the number
   of new tokens is bucketed the same way (``length_buckets``), and the actual ``max_new_tokens`` is a traced loop
   bound. A round of many batches therefore compiles once per bucket, and compiled functions are cached across calls,
   keyed by (config, shapes, static sampling settings, parameter shardings, mesh).
3. Run :func:`jaxalign.sampling.kernels.prefill` then :func:`jaxalign.sampling.kernels.decode` on each batch (the
   prompt is processed once for its ``num_samples`` rows, and by default its KV cache is stored once for them too —
   the shared-prefix layout; no host sync inside the decode loop) and fetch the tokens before the next batch is
   dispatched.

Sharding: with a mesh the prompt/sample rows are split over the ``data`` x ``fsdp`` axes and the KV heads over the
``tensor`` axis (the cache is laid out as ``kernels.CACHE_AXES``); parameters keep the shardings the training engine
gave them on that mesh (or are placed by the decoder's logical axes).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxalign.models.config import ModelConfig
from jaxalign.models.decoder import LOGICAL_AXES
from jaxalign.sampling.kernels import CAST_ONCE, DecodeMode, decode, prefill, uses_shared_prefix
from jaxalign.sampling.memory import (GiB, agreed_budget_bytes, compiled_peak_bytes, default_budget_bytes,
                                      plan_batch_size, shrunk_batch)
from jaxalign.sampling.results import GenerationResult, SamplingStats
from jaxalign.rules import fixed_decode_batch
from jaxalign.sharding import activate, batch_shards, global_array, named_sharding, to_host

_COMPILED: dict[Any, Any] = {}
_MAX_COMPILED = 64  # oldest compiled functions are dropped past this many


# ---- compiled-function cache ---------------------------------------------------------------------------------------

def _spec(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def _compile(key, fn, args, mesh, donate=()):
    """AOT-compile ``fn`` for ``args`` once per ``key``; returns (compiled, seconds spent compiling)."""
    hit = _COMPILED.get(key)
    if hit is not None:
        return hit, 0.0
    t0 = time.perf_counter()
    ctx = activate(mesh) if mesh is not None else contextlib.nullcontext()
    with ctx:
        compiled = jax.jit(fn, donate_argnums=donate).lower(*jax.tree.map(_spec, args)).compile()
    _COMPILED[key] = compiled
    while len(_COMPILED) > _MAX_COMPILED:
        _COMPILED.pop(next(iter(_COMPILED)))
    return compiled, time.perf_counter() - t0


def clear_compile_cache() -> None:
    _COMPILED.clear()


def compile_cache_size() -> int:
    return len(_COMPILED)


def compiled_functions() -> dict[Any, Any]:
    """A copy of the compile cache: key ``(kind, cfg, params, ids shape, N, cache length, ...)`` -> compiled function
    (``kind`` "prefill" / "decode"), e.g. to read ``memory_analysis()`` of what a call compiled."""
    return dict(_COMPILED)


# ---- host side -----------------------------------------------------------------------------------------------------

def bucket_length(n: int, buckets: Sequence[int] | None = None, minimum: int = 16, what: str = "length") -> int:
    """The padded length a length ``n`` compiles at: the smallest of ``buckets`` that holds it, or without buckets
    the next power of two, at least ``minimum``. ``what`` ("prompt" / "length") names the setting in the error raised
    when ``n`` is longer than every bucket."""
    if buckets:
        for b in sorted(buckets):
            if b >= n:
                return int(b)
        raise ValueError(f"sampling: {what} {n} is longer than the largest of {what}_buckets={sorted(buckets)}.")
    return max(minimum, 1 << max(0, (n - 1).bit_length()))


def _mesh_of(params) -> Mesh | None:
    for x in jax.tree.leaves(params):
        s = getattr(x, "sharding", None)
        if isinstance(s, NamedSharding) and s.mesh.size > 1:
            return s.mesh
    return None


def _place_params(params, mesh, dtype) -> dict[str, jax.Array]:
    """Params on the mesh (keeping shardings already there), big matrices cast to the compute dtype once."""
    out = {}
    for name, x in params.items():
        if mesh is not None:
            s = getattr(x, "sharding", None)
            if not (isinstance(x, jax.Array) and isinstance(s, NamedSharding) and s.mesh == mesh):
                x = jax.device_put(x, named_sharding(LOGICAL_AXES[name], x.shape, mesh))
        else:
            x = jnp.asarray(x)
        if name in CAST_ONCE and x.dtype != dtype:
            x = x.astype(dtype)  # jitted by jax per dtype pair; keeps the input sharding
        out[name] = x
    return out


def _put(host: np.ndarray, mesh):
    return jnp.asarray(host) if mesh is None else global_array(host, mesh)


def stop_id_buffer(stops: Sequence[int]) -> np.ndarray:
    """Stop ids padded with -1 to a power of two, at least 8 long: the decode program compiles once for any number of
    stop ids up to that."""
    out = np.full(max(8, 1 << max(0, (len(stops) - 1).bit_length())), -1, np.int32)
    out[:len(stops)] = stops
    return out


def _check(cfg: ModelConfig, prompts, *, max_new_tokens, temperature, top_p, top_k, stop_ids, num_samples,
           batch_size) -> tuple[list[list[int]], tuple[int, ...]]:
    """All input checks, on the host, before any compilation."""
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"sampling: max_new_tokens must be an integer >= 1, got {max_new_tokens!r}.")
    if not (isinstance(temperature, (int, float, np.floating)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"sampling: temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}.")
    if not (isinstance(top_p, (int, float, np.floating)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"sampling: top_p must be in (0, 1] (1 = no nucleus filtering), got {top_p!r}.")
    if not isinstance(top_k, (int, np.integer)) or not 0 <= top_k <= cfg.vocab_size:
        raise ValueError(f"sampling: top_k must be an integer in [0, vocab_size={cfg.vocab_size}] (0 = off), "
                         f"got {top_k!r}.")
    if not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"sampling: num_samples must be an integer >= 1, got {num_samples!r}.")
    if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
        raise ValueError(f"sampling: batch_size must be an integer >= 1 or None, got {batch_size!r}.")
    if isinstance(prompts, np.ndarray) and prompts.ndim == 2:
        prompts = list(prompts)
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"sampling: prompts must be a list of token-id lists, got {type(prompts).__name__}.")
    out = []
    context = cfg.max_position_embeddings
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)) or not hasattr(p, "__len__"):
            raise ValueError(f"sampling: prompt {i} is not a list of token ids ({type(p).__name__}); tokenize first.")
        ids = [int(t) for t in p]
        if not ids:
            raise ValueError(f"sampling: prompt {i} is empty; every prompt needs at least one token (e.g. BOS).")
        bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"sampling: prompt {i} has token ids outside [0, vocab_size={cfg.vocab_size}): {bad[:5]}.")
        if len(ids) > context:
            raise ValueError(f"sampling: prompt {i} has {len(ids)} tokens, longer than the model's context of "
                             f"{context} positions (max_position_embeddings); truncate it.")
        if len(ids) + max_new_tokens > context:
            raise ValueError(
                f"sampling: prompt {i} ({len(ids)} tokens) + max_new_tokens={max_new_tokens} = "
                f"{len(ids) + max_new_tokens} positions would overflow the model's context / KV cache of {context} "
                f"positions; lower max_new_tokens to at most {context - len(ids)} or truncate the prompt.")
        out.append(ids)
    stops = tuple(int(s) for s in stop_ids)
    bad = [s for s in stops if not 0 <= s < cfg.vocab_size]
    if bad:
        raise ValueError(f"sampling: stop ids outside [0, vocab_size={cfg.vocab_size}): {bad}.")
    return out, stops


def _model_parts(model, cfg):
    if hasattr(model, "param_dict") and hasattr(model, "cfg"):
        return model.param_dict(), cfg or model.cfg
    if isinstance(model, tuple) and len(model) == 2 and isinstance(model[1], ModelConfig):
        return model
    if isinstance(model, dict):
        if cfg is None:
            raise ValueError("sampling: a parameter dict needs cfg=ModelConfig (or pass a Decoder / (params, cfg)).")
        return model, cfg
    raise ValueError(f"sampling: expected a Decoder, (params, cfg) or a param dict with cfg=, got {type(model).__name__}.")


def generate(model, prompts, *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             stop_ids: Sequence[int] = (), seed: int = 0, num_samples: int = 1, cfg: ModelConfig | None = None,
             stop_at_eos: bool = True, mesh: Mesh | None = None, batch_size: int | None = None,
             memory_budget_bytes: int | None = None, max_rows: int | None = None, show_progress: bool = True,
             prompt_buckets: Sequence[int] | None = None, length_buckets: Sequence[int] | None = None,
             cache_dtype: Any = None, shared_prefix: bool | None = None) -> GenerationResult:
    """Sample continuations of ragged ``prompts`` (lists of token ids) from a causal LM.

    ``model`` is a :class:`~jaxalign.models.Decoder`, a ``(params, cfg)`` pair, or a param dict with ``cfg=`` (so a
    training engine can sample from its current parameter tree).

    Sampling: ``temperature=0`` is greedy (argmax; ``top_k``/``top_p``/``seed`` unused). Otherwise logits are divided
    by ``temperature``, then restricted to the ``top_k`` most likely tokens (0 = off), then to the smallest set whose
    probability reaches ``top_p`` (1 = off), and a token is drawn from what is left. Stopping: a row ends after its first
    token in ``stop_ids`` (plus the model's ``eos_token_id`` when ``stop_at_eos``) — that stop token is included in
    the row's tokens — or after ``max_new_tokens`` tokens; the loop ends when all rows have ended.

    Returns a :class:`GenerationResult`: ``tokens[i * num_samples + j]`` is sample ``j`` of prompt ``i`` (prompt
    excluded), ``logprobs`` the matching per-token log-probabilities **under the model distribution**: the
    log-softmax of the raw logits (temperature 1, before top-k/top-p filtering) at the chosen token — the quantity a
    policy-gradient or DPO step needs — not the log-probability under the filtered, tempered sampling distribution.
    ``.samples(i)`` / ``.grouped_tokens`` give the samples per prompt; ``.stats`` tokens, wall and compile time.

    Reproducibility: the same ``seed`` gives the same samples; a sample depends only on (seed, prompt index, sample
    index), not on batch composition or mesh shape (up to float rounding differences between shapes).

    Other options: ``mesh`` (default: the mesh the params live on, else one device) shards rows over data x fsdp and KV
    heads over tensor; ``batch_size`` prompts per batch (default: :func:`~jaxalign.sampling.memory.plan_batch_size`
    with ``memory_budget_bytes`` per device, default 90% of free device memory, and at most ``max_rows`` rows of
    prompts x samples, default 256 on CPU and no cap on accelerators; a planned batch is then checked against what
    XLA compiled for it, :func:`~jaxalign.sampling.memory.compiled_peak_bytes`, and shrunk until that fits the
    budget, before anything runs); ``prompt_buckets`` / ``length_buckets`` the padded prompt / new-token lengths to
    compile for (default powers of two from 16); ``cache_dtype`` the KV-cache dtype (default the config's compute
    dtype); ``shared_prefix`` the KV-cache layout (default: shared when ``num_samples > 1``; see
    :mod:`jaxalign.sampling.kernels`): a prompt's K/V stored once for its samples, each sample keeping only its own
    tokens' K/V — same tokens and log-probs (up to float rounding), a smaller cache and fewer bytes read per step.
    """
    params, cfg = _model_parts(model, cfg)
    return generate_from_params(
        params, cfg, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        stop_ids=stop_ids, seed=seed, num_samples=num_samples, stop_at_eos=stop_at_eos, mesh=mesh,
        batch_size=batch_size, memory_budget_bytes=memory_budget_bytes, max_rows=max_rows,
        show_progress=show_progress, prompt_buckets=prompt_buckets, length_buckets=length_buckets,
        cache_dtype=cache_dtype, shared_prefix=shared_prefix)


def generate_from_params(params: dict[str, Any], cfg: ModelConfig, prompts, *, max_new_tokens: int,
                         temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, stop_ids: Sequence[int] = (),
                         seed: int = 0, num_samples: int = 1, stop_at_eos: bool = True, mesh: Mesh | None = None,
                         batch_size: int | None = None, memory_budget_bytes: int | None = None,
                         max_rows: int | None = None, show_progress: bool = True,
                         prompt_buckets: Sequence[int] | None = None, length_buckets: Sequence[int] | None = None,
                         cache_dtype: Any = None, shared_prefix: bool | None = None) -> GenerationResult:
    """:func:`generate` on a parameter dict and its config (same arguments and result)."""
    t_start = time.perf_counter()
    prompts, stops = _check(cfg, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            top_k=top_k, stop_ids=stop_ids, num_samples=num_samples, batch_size=batch_size)
    if stop_at_eos and cfg.eos_token_id is not None:
        eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, (tuple, list)) else (cfg.eos_token_id,)
        stops = tuple(dict.fromkeys(stops + tuple(int(e) for e in eos)))
    n_prompts, n = len(prompts), int(num_samples)
    stats = SamplingStats(num_prompts=n_prompts, num_samples=n)
    if not prompts:
        stats.wall_s = time.perf_counter() - t_start
        return GenerationResult([], [], [], n, stats)
    if cfg.remat != "none":
        cfg = cfg.replace(remat="none")
    mesh = mesh if mesh is not None else _mesh_of(params)
    mode = DecodeMode.from_settings(temperature, top_p, top_k)
    pad_id = int(cfg.pad_token_id) if cfg.pad_token_id is not None else 0
    cache_dtype = jnp.dtype(cache_dtype or cfg.dtype)
    shared = uses_shared_prefix(n, shared_prefix)

    out_len = bucket_length(max_new_tokens, length_buckets, what="length")
    max_prompt_bucket = bucket_length(max(len(p) for p in prompts), prompt_buckets, what="prompt")
    shards = batch_shards(mesh)
    planned = batch_size is None
    if planned:
        budget = memory_budget_bytes if memory_budget_bytes is not None else default_budget_bytes(params)
        budget = agreed_budget_bytes(budget, mesh)
        if max_rows is None:  # CPU keeps a cap: its steps grow with the rows, so bigger batches mostly add memory
            max_rows = 256 if jax.default_backend() == "cpu" else n_prompts * n
        batch_size = plan_batch_size(cfg, num_prompts=n_prompts, prompt_len=max_prompt_bucket,
                                     cache_len=max_prompt_bucket + out_len, num_samples=n, budget_bytes=budget,
                                     mesh=mesh, cache_dtype=cache_dtype, max_rows=max_rows, shared_prefix=shared)
    else:
        batch_size = fixed_decode_batch(batch_size, n_prompts, shards)

    params = _place_params(params, mesh, jnp.dtype(cfg.dtype))
    param_key = tuple((k, v.shape, str(v.dtype), getattr(v, "sharding", None)) for k, v in sorted(params.items()))
    stats.prompts_per_batch, stats.rows_per_batch = batch_size, batch_size * n
    settings = dict(mode=mode, pad_id=pad_id, mesh=mesh)
    # spelled out as (name, value) pairs so that a cache key can be searched by setting
    static_key = (*dataclasses.asdict(mode).items(), ("pad_id", pad_id), ("mesh", mesh), ("shared_prefix", shared))
    scalars = [_put(np.asarray(v, dt), mesh) for v, dt in
               ((seed % 2**32, np.uint32), (max(float(temperature), 1e-6), np.float32), (top_p, np.float32))]
    seed_a, temp_a, top_p_a = scalars
    max_new_a = _put(np.asarray(max_new_tokens, np.int32), mesh)
    stop_host = stop_id_buffer(stops)
    stop_a = jax.device_put(stop_host, NamedSharding(mesh, PartitionSpec()) if mesh is not None else None)

    order = sorted(range(n_prompts), key=lambda i: -len(prompts[i]))  # similar lengths share a batch
    tokens: list[Any] = [None] * (n_prompts * n)
    logprobs: list[Any] = [None] * (n_prompts * n)
    stopped: list[bool] = [False] * (n_prompts * n)

    def collect(members, outputs):
        out_tok, out_lp, n_gen, done, steps = (to_host(x) for x in outputs)
        stats.decode_steps += int(steps)
        for bi, pi in enumerate(members):
            for j in range(n):
                r, k = bi * n + j, pi * n + j
                m = int(n_gen[r])
                tokens[k] = out_tok[r, :m].tolist()
                logprobs[k] = out_lp[r, :m].tolist()
                stopped[k] = bool(done[r])
                stats.generated_tokens += m

    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_prompts * n, desc="sampling", unit="sample", disable=not show_progress, leave=False)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        bar = contextlib.nullcontext()

    def batch_inputs(members: list[int], size: int):
        """The batch's prompt bucket and its left-padded ids, mask, prompt indices and valid rows (host arrays)."""
        p_len = bucket_length(max(len(prompts[i]) for i in members), prompt_buckets, what="prompt")
        ids = np.full((size, p_len), pad_id, np.int32)
        mask = np.zeros((size, p_len), np.int32)
        prompt_idx = np.zeros((size,), np.int32)
        valid = np.zeros((size,), np.bool_)
        for bi in range(size):
            pi = members[bi] if bi < len(members) else members[0]  # filler rows: a copy, finished at once
            ids[bi, p_len - len(prompts[pi]):] = prompts[pi]
            mask[bi, p_len - len(prompts[pi]):] = 1
            prompt_idx[bi] = pi
            valid[bi] = bi < len(members)
        return p_len, ids, mask, prompt_idx, valid

    def programs(p_len: int, args):
        """The compiled prefill and decode for a batch shaped like ``args`` (the decode from the prefill's output
        shapes, so both exist before either runs)."""
        cache_len, ids = p_len + out_len, args[1]
        key = ("prefill", cfg, param_key, ids.shape, n, cache_len, str(cache_dtype), *static_key)
        fn = lambda *a: prefill(*a, cfg=cfg, num_samples=n, cache_len=cache_len,  # noqa: E731
                                cache_dtype=cache_dtype, shared_prefix=shared, **settings)
        run_prefill, dt = _compile(key, fn, args, mesh)
        stats.compile_s += dt
        stats.compiles += dt > 0
        dspecs = (params, *run_prefill.out_info, temp_a, top_p_a, max_new_a, stop_a)
        key = ("decode", cfg, param_key, ids.shape, n, cache_len, str(cache_dtype), out_len, stop_host.shape,
               *static_key)
        fn = lambda *a: decode(*a, cfg=cfg, prompt_len=p_len, out_len=out_len, **settings)  # noqa: E731
        run_decode, dt = _compile(key, fn, dspecs, mesh, donate=(1,))
        stats.compile_s += dt
        stats.compiles += dt > 0
        return run_prefill, run_decode

    def device_args(ids, mask, prompt_idx, valid):
        return (params, _put(ids, mesh), _put(mask, mesh), _put(prompt_idx, mesh), _put(valid, mesh), seed_a, temp_a,
                top_p_a)

    if planned:
        # The plan above is shape arithmetic checked against XLA on CPU; an accelerator's compiler may need more (on
        # TPU the 7B plans needed about a second cache copy). Before anything runs, check the first batch (the
        # longest prompts: the largest bucket) by what XLA compiled, and shrink the batch until it fits the budget.
        for _ in range(3):
            p_len, *host = batch_inputs(order[:batch_size], batch_size)
            need = compiled_peak_bytes(*programs(p_len, device_args(*host)))
            if need is None:
                break
            smaller = shrunk_batch(batch_size, need, budget, shards)
            if smaller == batch_size:
                break
            if smaller == 0:
                raise ValueError(
                    f"sampling: one batch of {shards} prompt(s) x {n} sample(s) (prompt bucket {p_len} + {out_len} "
                    f"new tokens) compiles to {need * shards / batch_size / GiB:.2f} GiB per device by XLA's "
                    f"memory_analysis(), over the budget of {budget / GiB:.2f} GiB (the shape-based plan allowed "
                    f"{batch_size} prompts). Lower max_new_tokens, num_samples or the prompt length, use a mesh with "
                    f"more devices, or pass batch_size / memory_budget_bytes.")
            stats.shrunk_from = stats.shrunk_from or batch_size
            batch_size = smaller
        stats.prompts_per_batch, stats.rows_per_batch = batch_size, batch_size * n
    with bar:
        for start in range(0, n_prompts, batch_size):
            members = order[start:start + batch_size]
            p_len, ids, mask, prompt_idx, valid = batch_inputs(members, batch_size)
            stats.prompt_tokens += sum(len(prompts[i]) for i in members)
            args = device_args(ids, mask, prompt_idx, valid)
            run_prefill, run_decode = programs(p_len, args)
            cache_len = p_len + out_len
            cache, state = run_prefill(*args)
            dargs = (params, cache, state, temp_a, top_p_a, max_new_a, stop_a)
            outputs, cache = run_decode(*dargs)
            del cache, state, dargs
            stats.num_batches += 1
            stats.buckets.append((p_len, cache_len))
            # fetched before the next batch is dispatched: overlapping them would let two KV caches coexist (the
            # next prefill's cache is allocated at dispatch) and break the memory plan
            collect(members, outputs)
            bar.update(len(members) * n)
    stats.wall_s = time.perf_counter() - t_start
    return GenerationResult(tokens, logprobs, stopped, n, stats)
