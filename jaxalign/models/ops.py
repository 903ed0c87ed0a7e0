"""The decoder's building blocks: norms, activations, RoPE, attention and its masks, and the projections — with the
platform-specific forms (XLA:CPU gets causal block skipping and a projection backward it runs well; accelerators the
plain einsums), chosen by the platform the program is traced for (:func:`target_platform`)."""
from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
import numpy as np

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite, so a fully masked (padding) row gives no NaN


def rms_norm(x, scale, eps):
    # transformers: normalise in float32, cast back, then multiply by the weight
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * xf.astype(x.dtype)


def layer_norm(x, scale, bias, eps):
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def activation(name: str, x):
    if name == "silu":
        return jax.nn.silu(x)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    return jax.nn.gelu(x, approximate=True)


def rope(x, positions, inv_freq, rotary_dim):
    """Rotate the first ``rotary_dim`` features of each head (rotate-half convention, as transformers)."""
    ang = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, rot/2]
    emb = jnp.concatenate([ang, ang], axis=-1)[:, :, None, :]  # [B, T, 1, rot]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    x_rot = (x_rot.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)
    return jnp.concatenate([x_rot, x_pass], axis=-1) if x_pass.shape[-1] else x_rot


def attention(q, k, v, mask, dtype, causal_block: int | None = None):
    """q [B,T,N,D], k/v [B,S,K,D], mask [B,T,S] bool -> [B,T,N,D]. GQA by grouping query heads per KV head.

    On GPU in half precision the fused cuDNN kernel (flash attention) is used: it never materialises the [T, S]
    score matrix, which the einsum form below does (fine on CPU and for the parity tests, memory-bound on a GPU).

    ``causal_block``: the mask is causal on slots (query slot i sees key slots <= i, S == T). Queries are then taken
    in blocks of this many rows and each block scores only the keys up to its last row: the keys it skips are all
    masked anyway, so close to half the score and value matmuls disappear (PyTorch's CPU SDPA skips them too).
    """
    if dtype in (jnp.bfloat16, jnp.float16) and platform() == "gpu":
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="cudnn")
    t = q.shape[1]
    if causal_block and t > causal_block:
        outs = []
        for lo in range(0, t, causal_block):
            hi = min(lo + causal_block, t)
            outs.append(attention(q[:, lo:hi], k[:, :hi], v[:, :hi], mask[:, lo:hi, :hi], dtype))
        return jnp.concatenate(outs, axis=1)
    b, t, n, d = q.shape
    kh = k.shape[2]
    q = q.reshape(b, t, kh, n // kh, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) / np.sqrt(d).astype(np.float32)
    scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, n, d)


def cascade_attention(q, prefix_k, prefix_v, prefix_mask, k, v, mask, dtype):
    """Attention of ``B * G`` query rows over a prefix shared by each group of ``G`` rows plus each row's own keys.

    q [B*G, T, N, D] (row ``b * G + j`` is member ``j`` of group ``b``); prefix_k/v [B, P, K, D] and prefix_mask
    [B, T, P], one per group; k/v [B*G, S, K, D] and mask [B*G, T, S], one per row. Equal to :func:`attention` over
    the concatenated keys ``[prefix_k[b], k[r]]``, computed as two partial softmaxes merged exactly (the cascade /
    Hydragen decomposition, Juravsky et al. 2024): with ``m_i`` the partial max score, ``l_i = sum exp(s - m_i)`` and
    ``o_i`` the partial (normalised) output,

        m = max(m1, m2);  out = (e^{m1-m} l1 o1 + e^{m2-m} l2 o2) / (e^{m1-m} l1 + e^{m2-m} l2).

    Why: the prefix keys are read once per group and all ``G * T * N / K`` queries of a group meet them in one
    batched matmul per (group, KV head), instead of once per row from ``G`` copies of the prompt's cache. A part
    with every key masked (a sliding window past the whole prompt) has ``m_i = MASK_VALUE`` and weighs
    ``e^{MASK_VALUE - m} = 0``, as its keys do in the plain softmax; the row's own part always holds the query's slot.
    """
    r, t, n, d = q.shape
    b, _, kh, _ = prefix_k.shape
    g, h = r // b, n // kh
    root_d = np.sqrt(d).astype(np.float32)  # divided, not multiplied, as in attention(): the same rounding

    def partial(scores, vals, spec):
        m = jnp.max(scores, axis=-1, keepdims=True)
        p = jnp.exp(scores - m)
        l = jnp.sum(p, axis=-1, keepdims=True)
        o = jnp.einsum(spec, (p / l).astype(dtype), vals, preferred_element_type=jnp.float32)
        return m, l, o

    # shared part, grouped: [B, G, T, K, h, .] so (group, KV head) are the matmul's batch dims
    qg = q.reshape(b, g, t, kh, h, d)
    s1 = jnp.einsum("bjtkhd,bskd->bjtkhs", qg, prefix_k, preferred_element_type=jnp.float32) / root_d
    s1 = jnp.where(prefix_mask[:, None, :, None, None, :], s1, MASK_VALUE)
    m1, l1, o1 = (x.reshape(r, t, kh, h, -1) for x in partial(s1, prefix_v, "bjtkhs,bskd->bjtkhd"))
    # per-row part
    s2 = jnp.einsum("btkhd,bskd->btkhs", q.reshape(r, t, kh, h, d), k, preferred_element_type=jnp.float32) / root_d
    s2 = jnp.where(mask[:, :, None, None, :], s2, MASK_VALUE)
    m2, l2, o2 = partial(s2, v, "btkhs,bskd->btkhd")
    m = jnp.maximum(m1, m2)
    w1, w2 = jnp.exp(m1 - m) * l1, jnp.exp(m2 - m) * l2
    out = (w1 * o1 + w2 * o2) / (w1 + w2)
    return out.astype(dtype).reshape(r, t, n, d)


def causal_block(t: int) -> int:
    """Query rows per causal block: at least 64 (smaller matmuls lose more than the skipped work saves on CPU), at
    most 8 blocks (each is its own group of matmuls in the program)."""
    return max(64, -(-t // 8 // 64) * 64)


# The platform the traced program is compiled for: the default backend, unless a caller compiles for another one
# (jaxalign.plan traces on a CPU host for a TPU slice). jax.lax.platform_dependent would decide at lowering instead,
# but under autodiff XLA:CPU then drops the barrier _proj_cpu relies on.
_TARGET_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("jaxalign_target_platform", default=None)


@contextlib.contextmanager
def target_platform(platform: str):
    """Trace the decoder for ``platform`` ("cpu", "gpu", "tpu") whatever the default backend is."""
    token = _TARGET_PLATFORM.set(platform)
    try:
        yield
    finally:
        _TARGET_PLATFORM.reset(token)


def platform() -> str:
    return _TARGET_PLATFORM.get() or jax.default_backend()


def proj(spec: str, x, w):
    """``jnp.einsum(spec, x, w)`` for a projection; on XLA:CPU through ``_proj_cpu`` (see there)."""
    if platform() == "cpu":
        return _proj_cpu(spec, x, w)
    return jnp.einsum(spec, x, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _proj_cpu(spec, x, w):
    return jnp.einsum(spec, x, w)


def _proj_cpu_fwd(spec, x, w):
    return jnp.einsum(spec, x, w), (x, w)


def _proj_cpu_bwd(spec, res, dy):
    # Same gradients as autodiff, but the incoming cotangent is materialised first. Otherwise XLA:CPU fuses the
    # elementwise backward that produces it (SwiGLU's, the norms') with the transpose the weight-gradient matmul
    # wants, into one untiled loop reading several arrays in transposed order (its cost: docs/performance.md).
    # The weight gradient is written x-first ("bth,btf->hf"): autodiff's transpose rule writes it cotangent-first
    # and then transposes, which makes XLA:CPU lay the cotangent out transposed again, barrier or not.
    x, w = res
    lhs, rest = spec.split(",")
    rhs, out = rest.split("->")
    dy = jax.lax.optimization_barrier(dy)
    return (jnp.einsum(f"{out},{rhs}->{lhs}", dy, w).astype(x.dtype),
            jnp.einsum(f"{lhs},{out}->{rhs}", x, dy).astype(w.dtype))


_proj_cpu.defvjp(_proj_cpu_fwd, _proj_cpu_bwd)


def attention_mask(q_idx, kv_idx, kv_valid, window, q_seg=None, kv_seg=None):
    """Causal mask on slot indices (index gaps equal position gaps for contiguous rows), padding and sliding window."""
    m = (kv_idx[None, None, :] <= q_idx[None, :, None]) & kv_valid[:, None, :]
    m = m & (q_idx[None, :, None] - kv_idx[None, None, :] < window)
    if q_seg is not None:
        m = m & (q_seg[:, :, None] == kv_seg[:, None, :])
    return m
