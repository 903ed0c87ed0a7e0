"""Memory planning for the sampler: the KV cache and the transient buffers are computed from the config, not discovered.

Everything here is arithmetic on shapes (no device work), so a batch size can be chosen — or a request refused —
before anything is compiled.
"""
from __future__ import annotations

import math
import os
from typing import Any

import jax
import numpy as np

from jaxalign.models.config import ModelConfig
from jaxalign.sampling.kernels import uses_shared_prefix
from jaxalign.sharding import batch_shards

GiB = 2**30


def kv_cache_bytes(cfg: ModelConfig, batch: int, length: int, dtype: Any = None) -> int:
    """Bytes of a KV cache for ``batch`` rows of ``length`` slots (all devices together).

    ``bytes = 2 * num_layers * batch * length * num_kv_heads * head_dim * itemsize(dtype)``

    (2 for K and V; ``dtype`` defaults to the config's compute dtype, which is what the sampler stores.) E.g. a
    Llama-3-8B config (32 layers, 8 KV heads of 128) in bfloat16 costs 128 KiB per token: 8 rows of 4096 slots = 4 GiB.
    """
    itemsize = np.dtype(jax.numpy.dtype(dtype or cfg.dtype)).itemsize
    return 2 * cfg.num_layers * batch * length * cfg.num_kv_heads * cfg.head_dim * itemsize


def kv_head_shards(cfg: ModelConfig, mesh) -> int:
    """How many ways the KV heads are split: the tensor axis when it divides ``num_kv_heads``, else 1 (replicated)."""
    t = mesh.shape.get("tensor", 1) if mesh is not None else 1
    return t if t > 1 and cfg.num_kv_heads % t == 0 else 1


def sampling_bytes_per_device(cfg: ModelConfig, *, prompts_per_batch: int, num_samples: int, prompt_len: int,
                              cache_len: int, mesh=None, cache_dtype: Any = None,
                              shared_prefix: bool | None = None) -> dict[str, int]:
    """Planned peak bytes per device for one batch of the sampler (parameters excluded), by part.

    With ``B`` prompts per batch, ``N`` samples, ``R = B * N`` rows, prompt bucket ``P``, cache length ``S`` (prompt
    bucket + new-token bucket), ``L`` layers, split over ``b`` batch shards and ``t`` KV-head shards (``t`` = the
    tensor axis if it divides the KV heads, else 1), and ``KV(rows, slots) = kv_cache_bytes(cfg, rows, slots) /
    (b * t)``. The cache the decode loop carries is, per layout (``shared_prefix``, default shared when ``N > 1``):

    - shared:   ``KV = KV(B, P) + KV(R, S - P)`` — each prompt's K/V once, each row's new tokens;
    - unshared: ``KV = KV(R, S)`` — every row holds a copy of its prompt's K/V.

    The peaks:

    - prefill  = ``KV`` (the cache it returns) + ``KV(B, S)`` when unshared and ``N > 1`` (the prefilled cache,
      alive next to its ``N``-fold copy) + ``4 KV(B, S') / L`` (one-layer slices the layer scan copies; ``S'`` = the
      slots the prompts are written into: ``P`` shared, ``S`` unshared) + 1.25 x (B / b) x
      [P (4 H + 3 F) c + heads P S' 4 x 1.5 / t]: hidden and MLP activations (``c`` = itemsize of the compute dtype)
      and one layer's float32 attention scores (plus part of the probabilities, which XLA mostly fuses); plus the
      sampling transients below (the first token is sampled in the prefill);
    - decode   = ``(1 + 1.5 / L) KV``: the cache carried by the loop and by the decoder's layer scan (donated,
      updated in place: only the new tokens are written), and the one-layer slices attention reads; plus the sampling
      transients ``(R / b) V 32`` bytes (float32 logits, log-softmax, scaled or sorted logits and their ids,
      probabilities, cumulative sums, random bits and Gumbel noise);
    - total    = max(prefill, decode).

    Checked against XLA's ``memory_analysis()`` of the compiled functions on CPU for both layouts
    (tests/test_sampling.py): the plan is an upper bound of each, and the total within 1.5x of XLA's peak (the decode
    term dominates for real models).
    """
    b = batch_shards(mesh)
    t = kv_head_shards(cfg, mesh)
    rows = prompts_per_batch * num_samples
    shared = uses_shared_prefix(num_samples, shared_prefix)
    c = np.dtype(jax.numpy.dtype(cfg.dtype)).itemsize

    def kv_bytes(n_rows: int, slots: int) -> int:
        return kv_cache_bytes(cfg, n_rows, slots, cache_dtype) // (b * t)

    if shared:
        kv = kv_bytes(prompts_per_batch, prompt_len) + kv_bytes(rows, cache_len - prompt_len)
        written, pre_cache = prompt_len, 0
    else:
        kv, written = kv_bytes(rows, cache_len), cache_len
        pre_cache = kv_bytes(prompts_per_batch, cache_len) if num_samples > 1 else 0
    per_prompt = prompt_len * (4 * cfg.hidden_size + 3 * cfg.intermediate_size) * c
    per_prompt += cfg.num_heads * prompt_len * written * 4 * 3 // (2 * t)
    pre_act = int(1.25 * math.ceil(prompts_per_batch / b) * per_prompt)
    transients = math.ceil(rows / b) * cfg.vocab_size * 32
    prefill = kv + pre_cache + int(4 / cfg.num_layers * kv_bytes(prompts_per_batch, written)) + pre_act + transients
    decode = int((1 + 1.5 / cfg.num_layers) * kv) + transients
    return {"kv_cache": kv, "prefill": prefill, "decode": decode, "total": max(prefill, decode)}


def default_budget_bytes(params: Any = None) -> int:
    """Bytes per device the sampler may use: 90% of the device's limit minus what is in use now.

    Accelerators report ``memory_stats()``; the CPU does not, and gets a quarter of the host's RAM split over its
    local devices (at most 8 GiB per device).
    """
    dev = jax.local_devices()[0]
    stats = None
    try:
        stats = dev.memory_stats()
    except Exception:  # some backends raise instead of returning None
        stats = None
    if stats and stats.get("bytes_limit"):
        budget = int(0.9 * stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        if params is not None:  # host (numpy) parameters will be copied to the device too
            budget -= sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(params)
                          if not isinstance(x, jax.Array)) // max(1, jax.local_device_count())
        return max(budget, 0)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 16 * GiB
    return int(min(ram // 4 // max(1, jax.local_device_count()), 8 * GiB))


def agreed_budget_bytes(budget_bytes: int, mesh=None) -> int:
    """The smallest of the processes' budgets when ``mesh`` spans several processes (else ``budget_bytes``): every
    process must plan the same batch, i.e. compile the same programs, or the collectives in them would never meet,
    and each measures its own free memory. A collective: every process of the mesh calls it, as they call the
    sampler. Exchanged in MiB (int32 without jax's x64 mode)."""
    if mesh is None or len({d.process_index for d in mesh.devices.flat}) < 2:
        return budget_bytes
    from jax.experimental import multihost_utils

    mib = multihost_utils.process_allgather(np.asarray([budget_bytes // 2**20], np.int32))
    return int(np.min(np.asarray(mib))) * 2**20


def compiled_peak_bytes(prefill, decode) -> int | None:
    """Peak bytes per device of one sampler batch by XLA's own accounting of its compiled prefill and decode
    (``memory_analysis()``; parameters excluded, they are resident before and after):

    - prefill: its outputs (the KV cache and the decode state it hands on) + its temporaries;
    - decode:  those same buffers (its donated arguments) + its temporaries + outputs not aliased to a donated buffer.

    What :func:`sampling_bytes_per_device` models from shapes (tests/test_sampling.py checks that it bounds these on
    CPU); an accelerator's compiler may need more (the 7B plans in docs/plan_tables.md needed about a second cache copy on
    TPU), which is why the sampler checks a planned batch against this before running it."""
    pm, dm = prefill.memory_analysis(), decode.memory_analysis()
    if pm is None or dm is None:  # a backend without the analysis
        return None
    carried = pm.output_size_in_bytes
    return max(carried + pm.temp_size_in_bytes,
               carried + dm.temp_size_in_bytes + dm.output_size_in_bytes - dm.alias_size_in_bytes)


def shrunk_batch(batch: int, need_bytes: float, budget_bytes: float, shards: int) -> int:
    """The batch scaled by ``budget / need`` (the part of the bytes that grows with the batch), rounded down to a
    multiple of ``shards``: the next size to try when a compiled batch needs more than it may use. 0 when not even
    ``shards`` prompts would fit by that scaling. Used by the sampler at run time and by ``--plan``, so both shrink
    alike."""
    if need_bytes <= budget_bytes:
        return batch
    return max(int(batch * max(budget_bytes, 0) / max(need_bytes, 1.0)) // shards * shards, 0)


def plan_batch_size(cfg: ModelConfig, *, num_prompts: int, prompt_len: int, cache_len: int, num_samples: int = 1,
                    budget_bytes: int, mesh=None, cache_dtype: Any = None, max_rows: int = 256,
                    shared_prefix: bool | None = None) -> int:
    """Prompts per batch: the largest multiple of the batch shards whose :func:`sampling_bytes_per_device` total fits
    ``budget_bytes``, at most ``max_rows`` rows (prompts x samples, rounded up to the batch shards; always at least one
    prompt per batch shard, even when ``num_samples > max_rows``) and no more than needed for ``num_prompts``. Raises
    ``ValueError`` (before any compilation) when even the smallest batch does not fit. ``shared_prefix``: the cache
    layout (default shared when ``num_samples > 1``, as the sampler's).
    """
    b = batch_shards(mesh)

    def fits(n: int) -> bool:
        need = sampling_bytes_per_device(cfg, prompts_per_batch=n, num_samples=num_samples, prompt_len=prompt_len,
                                         cache_len=cache_len, mesh=mesh, cache_dtype=cache_dtype,
                                         shared_prefix=shared_prefix)["total"]
        return need <= budget_bytes

    if not fits(b):
        need = sampling_bytes_per_device(cfg, prompts_per_batch=b, num_samples=num_samples, prompt_len=prompt_len,
                                         cache_len=cache_len, mesh=mesh, cache_dtype=cache_dtype,
                                         shared_prefix=shared_prefix)
        raise ValueError(
            f"sampling: one batch of {b} prompt(s) x {num_samples} sample(s) with a {cache_len}-slot KV cache (prompt "
            f"bucket {prompt_len} + new tokens) needs {need['total'] / GiB:.2f} GiB per device "
            f"(KV cache {need['kv_cache'] / GiB:.2f} GiB = kv_cache_bytes formula), over the budget of "
            f"{budget_bytes / GiB:.2f} GiB. Lower max_new_tokens, num_samples or the prompt length, use a mesh with "
            f"more devices, or raise memory_budget_bytes.")
    cap = max(b, math.ceil(min(num_prompts, max(1, max_rows // num_samples)) / b) * b)
    lo, hi = 1, cap // b  # in units of b; binary search on the monotone fits()
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid * b):
            lo = mid
        else:
            hi = mid - 1
    return lo * b
