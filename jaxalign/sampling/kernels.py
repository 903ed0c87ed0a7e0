"""The sampler's device programs: ``prefill`` and ``decode`` (a ``lax.while_loop`` over a preallocated KV cache) and the
per-step token choice they share. Pure functions of arrays plus static settings; :mod:`jaxalign.sampling.sampler`
compiles and drives them, and :mod:`jaxalign.plan` compiles the same functions for a TPU slice.

- ``prefill`` runs the ``B`` left-padded prompts once and samples the first token of each of the ``B * N`` rows (row
  ``b * N + j`` is sample ``j`` of prompt ``b``). Two cache layouts:

  * shared prefix (the default when ``N > 1``): a :class:`SharedKV` — the prompts' K/V once per prompt, ``prefix``
    [layers, B, prompt bucket, ...], and each row's own new tokens, ``suffix`` [layers, B * N, new-token bucket, ...].
    A decode step attends to both with :func:`jaxalign.models.ops.cascade_attention`. Why: a group of ``N`` then
    holds ``P + N * new`` slots instead of ``N * (P + new)``, and a step reads the prompt's keys once per group;
  * unshared: a :class:`~jaxalign.models.decoder.KVCache` of ``prompt bucket + new-token bucket`` slots per prompt,
    repeated ``N`` times along the batch.
- ``decode`` feeds one token per row per step, samples the next, writes it into an output buffer and stops when every
  row has emitted a stop id or ``max_new`` tokens exist. Finished rows keep running (masked) until the whole batch is
  done and cannot affect other rows.

Randomness: row keys are ``fold_in(fold_in(fold_in(key(seed), prompt_index), sample_index), step)``, so a sample
depends only on (seed, its prompt's index, its sample index), not on the batch it lands in.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxalign.models.config import ModelConfig
from jaxalign.models.decoder import KVCache, forward
from jaxalign.sharding import constrain

CACHE_AXES = ("layers", "batch", "cache_length", "kv_heads", "head_dim")
# big matrices are cast to the compute dtype once per call (the decoder casts them at every use anyway, so the
# numbers are identical); norms and biases keep their dtype
CAST_ONCE = ("embed", "lm_head", "wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


class SharedKV(NamedTuple):
    """The shared-prefix cache: ``prefix`` [layers, prompts, prompt bucket, kv_heads, head_dim] holds each prompt's
    K/V once; ``suffix`` [layers, prompts * N, new-token bucket, kv_heads, head_dim] each row's own tokens. Both are
    sharded over the batch axis (a prompt's rows sit on its shard: ``B`` and ``B * N`` split into equal blocks)."""

    prefix: KVCache
    suffix: KVCache


@dataclasses.dataclass(frozen=True)
class DecodeMode:
    """The static (compile-time) part of the sampling settings; temperature and top-p values stay traced.

    ``greedy``: argmax, no randomness; ``top_k``: keep the k most likely tokens (0 = off); ``use_top_p``: apply nucleus
    filtering at the traced ``top_p``.
    """

    greedy: bool
    top_k: int = 0
    use_top_p: bool = False

    @classmethod
    def from_settings(cls, temperature: float, top_p: float = 1.0, top_k: int = 0) -> DecodeMode:
        """Greedy iff ``temperature == 0``, and then top-k / top-p are off; otherwise top-k as given and top-p when
        ``top_p < 1``. The one place these rules live (the sampler and the planner both call it)."""
        greedy = temperature == 0
        return cls(greedy=greedy, top_k=0 if greedy else int(top_k), use_top_p=(not greedy) and top_p < 1.0)


def head_logits(params, cfg: ModelConfig, hidden):
    """Final hidden states [R, H] -> float32 logits [R, V] (the decoder's LM head, for the last position only)."""
    dt = jnp.dtype(cfg.dtype)
    head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    return jnp.einsum("bh,hv->bv", hidden, head.astype(dt)).astype(jnp.float32)


def filter_logits(logits, temperature, top_p, *, top_k: int, use_top_p: bool):
    """Temperature, then top-k, then nucleus filtering (the order transformers applies its warpers).

    Returns ``(values, indices)``: candidate logits (``-inf`` where filtered out) and, when they are a sorted subset,
    the vocabulary ids they stand for (``None`` when ``values`` covers the whole vocabulary in order). Top-p keeps the
    smallest prefix of the tokens sorted by probability whose mass reaches ``top_p`` (a token is kept when the mass
    strictly before it is ``< top_p``; the most likely token is always kept).
    """
    scaled = logits / temperature
    idx = None
    if top_k:
        scaled, idx = jax.lax.top_k(scaled, top_k)  # sorted, descending
    elif use_top_p:
        iota = jnp.broadcast_to(jnp.arange(scaled.shape[-1], dtype=jnp.int32), scaled.shape)
        neg, idx = jax.lax.sort_key_val(-scaled, iota, dimension=-1)
        scaled = -neg
    if use_top_p:
        probs = jax.nn.softmax(scaled, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        keep = (before < top_p).at[..., 0].set(True)
        scaled = jnp.where(keep, scaled, -jnp.inf)
    return scaled, idx


def sample_next(logits, keys, temperature, top_p, mode: DecodeMode):
    """Next token per row and its log-prob under the unfiltered, temperature-1 model distribution."""
    logits = logits.astype(jnp.float32)
    if mode.greedy:
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
        vals, idx = filter_logits(logits, temperature, top_p, top_k=mode.top_k, use_top_p=mode.use_top_p)
        choice = jax.vmap(jax.random.categorical)(keys, vals)
        tok = choice if idx is None else jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]
        tok = tok.astype(jnp.int32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    logp = jnp.take_along_axis(logits, tok[:, None], axis=-1)[:, 0] - logz
    return tok, logp


def step_keys(row_keys, step, mode: DecodeMode):
    """Each row's key for decode step ``step`` (``None`` when greedy: nothing is drawn)."""
    if mode.greedy:
        return None
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, step)


def uses_shared_prefix(num_samples: int, shared_prefix: bool | None) -> bool:
    """The layout a call gets: ``shared_prefix`` when given, else shared exactly when ``num_samples > 1`` (with one
    sample there is nothing to share, and the unshared cache is one buffer)."""
    return num_samples > 1 if shared_prefix is None else bool(shared_prefix)


def prefill(params, ids, mask, prompt_idx, valid, seed, temperature, top_p, *, cfg: ModelConfig, num_samples: int,
            cache_len: int, cache_dtype, mode: DecodeMode, pad_id: int, mesh, shared_prefix: bool | None = None):
    """Prompts [B, P] (left-padded, ``mask`` 1 on tokens) -> (KV cache of ``B * num_samples`` rows, decode state).

    ``prompt_idx`` [B] is each row's index in the caller's prompt list (it seeds the row's key); ``valid`` [B] is
    False on filler rows, which come back finished. The state holds the first sampled token and its log-prob.
    ``cache_len`` is prompt bucket + new-token bucket; the cache is a :class:`SharedKV` (``P`` prefix slots per
    prompt, ``cache_len - P`` suffix slots per row) when :func:`uses_shared_prefix`, else a ``KVCache`` of
    ``cache_len`` slots per row. The state's ``kv_mask`` is the prompt mask [B, P] in the first case, each row's
    valid-slot mask [B * N, cache_len] in the second.
    """
    b, p = ids.shape
    n = num_samples
    shared = uses_shared_prefix(n, shared_prefix)
    mask = mask.astype(jnp.bool_)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    # shared: the prompt is written into a cache of its own length (the prefix); the rows' slots come after it
    prefill_len = p if shared else cache_len
    cache = KVCache(*(constrain(c, CACHE_AXES, mesh) for c in KVCache.zeros(cfg, b, prefill_len, cache_dtype)))
    kv_mask = jnp.concatenate([mask, jnp.ones((b, prefill_len - p), jnp.bool_)], axis=1)
    hidden, cache = forward(params, cfg, ids, positions=positions, attention_mask=mask, cache=cache, cache_index=0,
                            kv_mask=kv_mask, return_hidden=True)
    logits = head_logits(params, cfg, hidden[:, -1])
    lengths = mask.sum(axis=1).astype(jnp.int32)

    if mode.greedy:  # no randomness: a placeholder keeps the state's structure
        row_keys = jnp.zeros((b * n,), jnp.uint32)
    else:
        prompt_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(seed), prompt_idx)
        row_keys = jax.vmap(lambda k: jax.vmap(jax.random.fold_in, in_axes=(None, 0))(k, jnp.arange(n)))(prompt_keys)
        row_keys = row_keys.reshape(b * n)
    if shared:  # the prompt's cache stays one per prompt; each row gets empty slots for its own tokens
        suffix = KVCache(*(constrain(c, CACHE_AXES, mesh)
                           for c in KVCache.zeros(cfg, b * n, cache_len - p, cache_dtype)))
        cache = SharedKV(cache, suffix)
        logits, lengths, valid = (jnp.repeat(x, n, axis=0) for x in (logits, lengths, valid))
    elif n > 1:  # one prefill, N copies of its cache: row b * N + j is sample j of prompt b
        cache = KVCache(*(constrain(jnp.repeat(c, n, axis=1), CACHE_AXES, mesh) for c in cache))
        logits, kv_mask, lengths, valid = (jnp.repeat(x, n, axis=0) for x in (logits, kv_mask, lengths, valid))
    logits = constrain(logits, ("batch", "vocab"), mesh)
    tok, logp = sample_next(logits, step_keys(row_keys, 0, mode), temperature, top_p, mode)
    done = ~valid
    tok = jnp.where(done, pad_id, tok)
    logp = jnp.where(done, 0.0, logp)
    return cache, dict(kv_mask=kv_mask, tok=tok, logp=logp, lengths=lengths, row_keys=row_keys, done=done)


def decode(params, cache, state, temperature, top_p, max_new, stop_ids, *, cfg: ModelConfig, prompt_len: int,
           out_len: int, mode: DecodeMode, pad_id: int, mesh):
    """Continue every row of ``prefill``'s state for up to ``max_new`` tokens (traced) in an ``out_len`` buffer.

    Returns ``((tokens [R, out_len], logprobs [R, out_len], generated counts [R], stopped [R], steps), cache)``;
    ``stop_ids`` is padded with -1. The cache is returned only so that a donated input buffer is reused in place by
    the loop (no second copy). The layout is ``prefill``'s: a :class:`SharedKV` decodes with the prefix shared.
    """
    tok, done, lengths, kv_mask, row_keys = (state[k] for k in ("tok", "done", "lengths", "kv_mask", "row_keys"))
    rows = tok.shape[0]

    def is_stop(t):
        return jnp.any(t[:, None] == stop_ids[None, :], axis=-1)

    out_tok = jnp.full((rows, out_len), pad_id, jnp.int32).at[:, 0].set(tok)
    out_lp = jnp.zeros((rows, out_len), jnp.float32).at[:, 0].set(state["logp"])
    n_gen = (~done).astype(jnp.int32)
    done = done | is_stop(tok)

    def cond(c):
        step, _, _, done, *_ = c
        return (step < max_new) & ~jnp.all(done)  # all rows stopped (or filler): the loop ends early

    shared = isinstance(cache, SharedKV)

    def step_logits(tok, step, cache):
        # token ``step - 1`` sits at position prompt_length + step - 1 and slot prompt_bucket + step - 1 (in the
        # shared layout: suffix slot step - 1, which stands for that slot)
        pos = (lengths + step - 1)[:, None]
        if shared:
            logits, suffix = forward(params, cfg, tok[:, None], positions=pos, cache=cache.suffix,
                                     cache_index=step - 1, prefix=cache.prefix, prefix_mask=kv_mask)
            return logits, SharedKV(cache.prefix, KVCache(*(constrain(x, CACHE_AXES, mesh) for x in suffix)))
        logits, cache = forward(params, cfg, tok[:, None], positions=pos, cache=cache,
                                cache_index=prompt_len + step - 1, kv_mask=kv_mask)
        return logits, KVCache(*(constrain(x, CACHE_AXES, mesh) for x in cache))

    def body(c):
        step, cache, tok, done, n_gen, out_tok, out_lp = c
        logits, cache = step_logits(tok, step, cache)
        new, lp = sample_next(logits[:, 0], step_keys(row_keys, step, mode), temperature, top_p, mode)
        new = jnp.where(done, pad_id, new)
        lp = jnp.where(done, 0.0, lp)
        out_tok = jax.lax.dynamic_update_slice(out_tok, new[:, None], (0, step))
        out_lp = jax.lax.dynamic_update_slice(out_lp, lp[:, None], (0, step))
        n_gen = n_gen + (~done).astype(jnp.int32)
        done = done | is_stop(new)
        return step + 1, cache, new, done, n_gen, out_tok, out_lp

    init = (jnp.int32(1), cache, tok, done, n_gen, out_tok, out_lp)
    steps, cache, _, done, n_gen, out_tok, out_lp = jax.lax.while_loop(cond, body, init)
    return (out_tok, out_lp, n_gen, done, steps), cache
