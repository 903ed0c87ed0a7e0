"""Per-token and per-sequence log-probabilities from logits.

`token_logprobs` is the one place a [B, T, V] tensor is touched, so it is written for memory. The target log-prob is
``x[target] - logsumexp(x)``, both float32 reductions over the vocabulary, so a bf16 input is never upcast as a whole:
XLA:GPU/TPU fuse the upcast into the reductions; XLA:CPU does not (it materialises a float32 [B, T, V] copy, and
hoists a per-tile upcast out of a plain loop), so on CPU the rows go through in tiles of ~2**24 elements
(`jax.lax.platform_dependent` picks the path at lowering). The memory and time this saves, and what it costs on an
accelerator: docs/performance.md.

A custom VJP keeps the backward pass to one elementwise op, ``g * (one_hot - softmax)``, written in the logits' dtype:
plain autodiff of ``logsumexp`` keeps ``exp(x - max)`` (float32 [B, T, V]) alive between the passes, and gathering with
``take_along_axis`` turns the gradient into a scatter, which is slow on CPU (docs/performance.md).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

# About 2**24 float32 elements (64 MiB) per CPU tile: few loop trips, and the two tiles XLA keeps alive are noise next
# to the logits themselves.
_TILE_ELEMENTS = 1 << 24


def _logprob_rows(x: jax.Array, targets: jax.Array, with_top1: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    x = x.astype(jnp.float32)
    vocab = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    # where, not x * one_hot: a vocabulary masked with -inf would give 0 * -inf = nan.
    target_logit = jnp.sum(jnp.where(vocab == targets[..., None], x, 0.0), axis=-1)
    lse = jax.nn.logsumexp(x, axis=-1)
    # Only SFT's token accuracy wants top-1; token_logprobs skips the extra max.
    top1 = (target_logit >= jnp.max(x, axis=-1)).astype(jnp.float32) if with_top1 else jnp.zeros_like(lse)
    return target_logit - lse, lse, top1


def _tiled_rows(rows: jax.Array, targets: jax.Array, with_top1: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """[N, V] logits, [N] targets -> [N] log-probs, logsumexp, top-1, a tile of rows at a time."""
    n, v = rows.shape
    tile = max(1, min(n, _TILE_ELEMENTS // max(v, 1)))
    if tile == n:
        return _logprob_rows(rows, targets, with_top1)
    num_tiles = -(-n // tile)

    def body(i: jax.Array, carry: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, ...]:
        # The barrier ties the logits to the loop counter; without it XLA (CPU) hoists the bf16->f32 upcast of the
        # whole tensor out of the loop, which is exactly the [B, T, V] float32 copy this loop exists to avoid.
        # jax 0.10's lax.optimization_barrier has no annotations at all (jax's types are inline), so every call to it
        # is an untyped call under disallow_untyped_calls
        full, _ = jax.lax.optimization_barrier((rows, i))  # type: ignore[no-untyped-call]
        # dynamic_slice clamps the last tile's start to n - tile, so a ragged end recomputes a few rows instead of
        # padding (which would copy the logits).
        start = i * tile
        stats = _logprob_rows(
            jax.lax.dynamic_slice_in_dim(full, start, tile), jax.lax.dynamic_slice_in_dim(targets, start, tile),
            with_top1,
        )
        return tuple(jax.lax.dynamic_update_slice_in_dim(c, s, start, 0) for c, s in zip(carry, stats))

    zeros = jnp.zeros((n,), jnp.float32)
    # fori_loop's init_val / result are unannotated in jax (Any): the carry keeps init's structure, three [N] arrays
    out: tuple[jax.Array, jax.Array, jax.Array] = jax.lax.fori_loop(0, num_tiles, body, (zeros, zeros, zeros))
    return out


def _forward(logits: jax.Array, targets: jax.Array, with_top1: bool) -> tuple[jax.Array, ...]:
    v = logits.shape[-1]
    rows, flat_targets = logits.reshape(-1, v), targets.reshape(-1).astype(jnp.int32)
    # XLA:CPU materialises the float32 upcast (and keeps it through a loop) unless tiled; XLA:GPU/TPU fuse the upcast
    # into the reductions, where tiling only adds loop overhead (figures: docs/performance.md).
    stats = jax.lax.platform_dependent(
        rows, flat_targets,
        cpu=lambda r, t: _tiled_rows(r, t, with_top1),
        default=lambda r, t: _logprob_rows(r, t, with_top1),
    )
    return tuple(s.reshape(targets.shape) for s in stats)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _core(logits: jax.Array, targets: jax.Array, with_top1: bool) -> tuple[jax.Array, jax.Array]:
    logps, _, top1 = _forward(logits, targets, with_top1)
    return logps, top1


def _core_fwd(logits: jax.Array, targets: jax.Array,
              with_top1: bool) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]:
    logps, lse, top1 = _forward(logits, targets, with_top1)
    # Residuals: the caller's logits (alive anyway) and a [B, T] lse; nothing of size V is added.
    return (logps, top1), (logits, targets, lse)


def _core_bwd(with_top1: bool, res: tuple[jax.Array, jax.Array, jax.Array],
              cotangents: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
    logits, targets, lse = res
    g = cotangents[0]  # top-1 is piecewise constant: no gradient
    x = logits.astype(jnp.float32)
    vocab = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    hit = (vocab == targets[..., None].astype(jnp.int32)).astype(jnp.float32)
    grad = g[..., None].astype(jnp.float32) * (hit - jnp.exp(x - lse[..., None]))
    return grad.astype(logits.dtype), None


_core.defvjp(_core_fwd, _core_bwd)


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """``log_softmax(logits)[..., targets]`` in float32, shape ``targets.shape`` ([B, T]).

    ``logits[:, t]`` scores ``targets[:, t]``: the caller shifts (targets = input_ids[:, 1:] against logits[:, :-1]).
    Any dtype; bf16 is upcast tile by tile, never as a whole. Targets outside ``[0, V)`` (a -100 pad label) give
    ``-logsumexp``, finite, to be masked out by `sequence_logprobs`.

    Differentiable in ``logits`` through a custom VJP (first order: ``jax.jvp`` / Hessians are not supported).
    Matches ``torch.gather(logits.log_softmax(-1), 2, labels[..., None])`` in TRL's ``get_batch_logps``.
    """
    _check_shapes(logits, targets)
    return _core(logits, targets, False)[0]


def token_logprobs_and_top1(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(token_logprobs(logits, targets), top1)`` from one pass over the logits; ``top1`` is 1.0 where the target
    holds the largest logit (ties count as hits) and 0.0 elsewhere, for SFT's token accuracy."""
    _check_shapes(logits, targets)
    return _core(logits, targets, True)


def _check_shapes(logits: jax.Array, targets: jax.Array) -> None:
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {logits.shape} and targets {targets.shape} must agree on all but the last axis")


def sequence_logprobs(token_logps: ArrayLike, mask: ArrayLike, reduce: str = "sum") -> jax.Array:
    """Reduce per-token log-probs [B, T] to per-sequence [B] over the positions where ``mask`` is non-zero.

    ``reduce="sum"``: DPO paper, TRL DPOTrainer, SPIN, the IRL reward code. ``reduce="mean"``: divided by the number of
    masked tokens, as TRL's ``get_batch_logps(average_log_prob=True)`` that the DIL authors use for every loss, SimPO
    and TRL's IPO. ``mask`` may be bool, int or float (a float mask weights tokens and the mean divides by its sum).
    Masked positions are dropped with ``where`` so a -inf / nan there cannot leak; an all-masked row gives 0, not nan.
    """
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
    lp = jnp.asarray(token_logps).astype(jnp.float32)
    m = jnp.asarray(mask).astype(jnp.float32)
    total = jnp.sum(jnp.where(m != 0, lp * m, 0.0), axis=-1)
    if reduce == "sum":
        return total
    count = jnp.sum(m, axis=-1)
    return total / jnp.where(count != 0, count, 1.0)
