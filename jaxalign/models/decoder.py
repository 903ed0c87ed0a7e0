"""One decoder for the Llama family (Llama 2/3, Mistral, Qwen2/2.5, Qwen3) and GPT-NeoX (Pythia).

Layer weights are stacked along a leading ``layers`` axis and the forward pass is a ``lax.scan`` over them: compile
time does not grow with depth (a 32-layer 7B step compiles as fast as a 2-layer one), rematerialisation is one
``jax.checkpoint`` around the scanned body, and the KV cache is scanned alongside. (On CPU, without a cache, the scan is
unrolled; see :func:`forward`.)

The NNX module :class:`Decoder` holds the parameters; :func:`forward` is the pure function it calls, usable directly
with a parameter dict inside jitted train and sampling steps.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign.models import ops
from jaxalign.models.config import ModelConfig
from jaxalign.models.lora_layer import LoraApply, lora_delta
from jaxalign.sharding import constrain

# Logical axes of every parameter (see jaxalign.sharding.RULES). Names are the keys of the param dict.
LOGICAL_AXES: dict[str, tuple[str | None, ...]] = {
    "embed": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "final_norm": ("embed",),
    "final_norm_bias": ("embed",),
    "attn_norm": ("layers", "embed"),
    "attn_norm_bias": ("layers", "embed"),
    "mlp_norm": ("layers", "embed"),
    "mlp_norm_bias": ("layers", "embed"),
    "wq": ("layers", "embed", "heads", "head_dim"),
    "wk": ("layers", "embed", "kv_heads", "head_dim"),
    "wv": ("layers", "embed", "kv_heads", "head_dim"),
    "bq": ("layers", "heads", "head_dim"),
    "bk": ("layers", "kv_heads", "head_dim"),
    "bv": ("layers", "kv_heads", "head_dim"),
    "q_norm": ("layers", "head_dim"),
    "k_norm": ("layers", "head_dim"),
    "wo": ("layers", "heads", "head_dim", "embed"),
    "bo": ("layers", "embed"),
    "w_gate": ("layers", "embed", "mlp"),
    "w_up": ("layers", "embed", "mlp"),
    "b_gate": ("layers", "mlp"),
    "b_up": ("layers", "mlp"),
    "w_down": ("layers", "mlp", "embed"),
    "b_down": ("layers", "embed"),
}
TOP_LEVEL = ("embed", "lm_head", "final_norm", "final_norm_bias")
# norm scales and biases: AdamW leaves them undecayed, as transformers' Trainer does (its decay excludes names with
# "bias" or "norm"), so a weight_decay set in a recipe decays the same parameters as in a TRL run
NO_WEIGHT_DECAY = frozenset(name for name in LOGICAL_AXES if "norm" in name or name.startswith("b"))
# the per-layer weights, stacked on a leading "layers" axis and scanned over; anything else a caller keeps in the same
# dict (a reward head, say) is not the decoder's business
LAYER_NAMES = tuple(name for name, axes in LOGICAL_AXES.items() if axes[0] == "layers")


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every parameter of ``cfg`` (the layer-stacked layout)."""
    L, H, F, N, K, D, V = (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                           cfg.head_dim, cfg.vocab_size)
    s: dict[str, tuple[int, ...]] = {
        "embed": (V, H), "final_norm": (H,), "attn_norm": (L, H), "mlp_norm": (L, H),
        "wq": (L, H, N, D), "wk": (L, H, K, D), "wv": (L, H, K, D), "wo": (L, N, D, H),
        "w_up": (L, H, F), "w_down": (L, F, H),
    }
    if not cfg.tie_word_embeddings:
        s["lm_head"] = (H, V)
    if cfg.family == "neox":
        s.update(final_norm_bias=(H,), attn_norm_bias=(L, H), mlp_norm_bias=(L, H))
    else:
        s["w_gate"] = (L, H, F)
    if cfg.qkv_bias:
        s.update(bq=(L, N, D), bk=(L, K, D), bv=(L, K, D))
    if cfg.o_bias:
        s["bo"] = (L, H)
    if cfg.mlp_bias:
        s.update(b_up=(L, F), b_down=(L, H))
        if cfg.family != "neox":
            s["b_gate"] = (L, F)
    if cfg.qk_norm:
        s.update(q_norm=(L, D), k_norm=(L, D))
    return s


def init_params(cfg: ModelConfig, key: jax.Array, std: float = 0.02) -> dict[str, jax.Array]:
    """Random init as transformers does it (normal(0, std) matrices, ones for norm scales, zeros for biases)."""
    shapes = param_shapes(cfg)
    keys = dict(zip(sorted(shapes), jax.random.split(key, len(shapes))))
    dtype = jnp.dtype(cfg.param_dtype)
    out = {}
    for name, shape in shapes.items():
        if name in ("final_norm", "attn_norm", "mlp_norm", "q_norm", "k_norm"):
            out[name] = jnp.ones(shape, dtype)
        elif name.startswith("b") or name.endswith("_bias"):
            out[name] = jnp.zeros(shape, dtype)
        else:
            out[name] = (std * jax.random.normal(keys[name], shape, jnp.float32)).astype(dtype)
    return out


class KVCache(NamedTuple):
    """Keys and values for every layer: ``[layers, batch, cache_length, kv_heads, head_dim]``."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, length: int, dtype: Any = None) -> "KVCache":
        shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
        dt = jnp.dtype(dtype or cfg.dtype)
        return cls(jnp.zeros(shape, dt), jnp.zeros(shape, dt))


# ---- building blocks ---------------------------------------------------------------------------------------------

def _layer(cfg: ModelConfig, inv_freq, x, p, window, positions, q_idx, kv_idx, kv_valid, seg, cache_kv, cache_index,
           lora: LoraApply | None = None, lora_key=None, prefix=None):
    dt = jnp.dtype(cfg.dtype)
    c = lambda name: p[name].astype(dt)  # noqa: E731 - fp32 master weights, compute in cfg.dtype

    def _proj_w(spec, y, name):
        out = ops.proj(spec, y, c(name))
        if lora is not None and name + "_lora_a" in p:
            out = out + lora_delta(name, y, p, lora, lora_key, dt, ops.proj)
        return out

    if cfg.family == "neox":
        h = ops.layer_norm(x, p["attn_norm"], p["attn_norm_bias"], cfg.norm_eps)
    else:
        h = ops.rms_norm(x, p["attn_norm"], cfg.norm_eps)
    q = _proj_w("bth,hnd->btnd", h, "wq")
    k = _proj_w("bth,hkd->btkd", h, "wk")
    v = _proj_w("bth,hkd->btkd", h, "wv")
    if cfg.qkv_bias:
        q, k, v = q + c("bq"), k + c("bk"), v + c("bv")
    if cfg.qk_norm:
        q = ops.rms_norm(q, p["q_norm"], cfg.norm_eps)
        k = ops.rms_norm(k, p["k_norm"], cfg.norm_eps)
    q = ops.rope(q, positions, inv_freq, cfg.rotary_dim)
    k = ops.rope(k, positions, inv_freq, cfg.rotary_dim)
    q = constrain(q, ("batch", "length", "heads", "head_dim"))

    new_cache = None
    if cache_kv is not None:
        # cache_kv = (all layers' keys, all layers' values, this layer): write only the new tokens, in place
        ck, cv, layer = cache_kv
        ck = jax.lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), (layer, 0, cache_index, 0, 0))
        cv = jax.lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), (layer, 0, cache_index, 0, 0))
        new_cache = (ck, cv)
        k, v = ck[layer].astype(dt), cv[layer].astype(dt)
    mask = ops.attention_mask(q_idx, kv_idx, kv_valid, window, seg, seg)
    if prefix is not None:
        # this layer's shared prompt keys / values [G, P, K, D] and the prompt mask [G, P]; prompt slot j is slot j
        # of the unshared layout, so the causal and window masks read the same slot indices as there
        pk, pv, p_valid = prefix
        p_mask = ops.attention_mask(q_idx, jnp.arange(pk.shape[1]), p_valid, window)
        attn = ops.cascade_attention(q, pk.astype(dt), pv.astype(dt), p_mask, k, v, mask, dt)
    else:
        # skip the masked upper triangle where that pays (XLA:CPU; docs/performance.md); with a cache, keys are
        # cache slots
        block = ops.causal_block(q.shape[1]) if cache_kv is None and ops.platform() == "cpu" else None
        attn = ops.attention(q, k, v, mask, dt, causal_block=block)
    attn = _proj_w("btnd,ndh->bth", attn, "wo")
    if cfg.o_bias:
        attn = attn + c("bo")

    def mlp(y):
        up = _proj_w("bth,hf->btf", y, "w_up")
        if cfg.mlp_bias:
            up = up + c("b_up")
        if cfg.family == "neox":
            act = ops.activation(cfg.activation, up)
        else:
            gate = _proj_w("bth,hf->btf", y, "w_gate")
            if cfg.mlp_bias:
                gate = gate + c("b_gate")
            act = ops.activation(cfg.activation, gate) * up
        act = constrain(act, ("batch", "length", "mlp"))
        out = _proj_w("btf,fh->bth", act, "w_down")
        return out + c("b_down") if cfg.mlp_bias else out

    if cfg.family == "neox":
        if cfg.parallel_residual:
            x = x + attn + mlp(ops.layer_norm(x, p["mlp_norm"], p["mlp_norm_bias"], cfg.norm_eps))
        else:
            x = x + attn
            x = x + mlp(ops.layer_norm(x, p["mlp_norm"], p["mlp_norm_bias"], cfg.norm_eps))
    else:
        x = x + attn
        x = x + mlp(ops.rms_norm(x, p["mlp_norm"], cfg.norm_eps))
    return constrain(x, ("batch", "length", "embed")), new_cache


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def forward(
    params: dict[str, jax.Array],
    cfg: ModelConfig,
    input_ids: jax.Array,
    *,
    positions: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    cache: KVCache | None = None,
    cache_index: jax.Array | int | None = None,
    kv_mask: jax.Array | None = None,
    prefix: KVCache | None = None,
    prefix_mask: jax.Array | None = None,
    return_hidden: bool = False,
    lora: tuple[dict[str, jax.Array], Any] | None = None,
    dropout_rng: jax.Array | None = None,
):
    """Logits ``[B, T, V]`` (or final hidden states ``[B, T, H]`` with ``return_hidden``) for ``input_ids [B, T]``.

    - ``attention_mask [B, T]``: 1 for real tokens, 0 for padding (left or right). Positions default to the running count
      of real tokens, so a left-padded row gives the same logits as the unpadded row.
    - ``segment_ids [B, T]``: packed documents attend only within their segment (pass ``positions`` restarting per doc).
    - ``cache``: decoding. The new tokens are written at slots ``cache_index .. cache_index + T - 1`` of the cache and
      attend to every earlier slot whose ``kv_mask [B, S]`` entry is true. Returns ``(logits, new_cache)``.
    - ``prefix`` (with ``cache``): shared-prefix decoding. ``prefix`` holds the keys / values of ``G`` prompts
      ``[layers, G, P, kv_heads, head_dim]`` (``prefix_mask [G, P]`` true on their tokens), shared by the ``B / G``
      consecutive rows of each group; ``cache`` then holds only each row's own tokens, its slot ``i`` standing for
      slot ``P + i`` of the unshared layout (so ``cache_index`` counts from the end of the prompt, and ``kv_mask``
      defaults to all slots). Attention is :func:`jaxalign.models.ops.cascade_attention`.
    - ``lora=(adapters, lora_cfg)``: LoRA adapters (``jaxalign.models.lora.init_adapters``) added to their base
      projections as ``W x + (alpha / r) B (A x)`` inside the layer loop; ``lora_cfg`` needs ``.scale`` and
      ``.dropout``. ``dropout_rng`` turns on dropout of the adapter inputs (training); without it there is none.
      ``lora=None`` (or no adapters) is the plain forward, op for op.
    """
    b, t = input_ids.shape
    dt = jnp.dtype(cfg.dtype)
    if attention_mask is None:
        attention_mask = jnp.ones((b, t), jnp.bool_)
    attention_mask = attention_mask.astype(jnp.bool_)
    if positions is None:
        positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
    if cache is None:
        q_idx = kv_idx = jnp.arange(t)
        kv_valid = attention_mask
        cache_index = 0
    else:
        start = 0 if prefix is None else prefix.k.shape[2]
        q_idx = start + cache_index + jnp.arange(t)
        kv_idx = start + jnp.arange(cache.k.shape[2])
        kv_valid = jnp.ones((b, cache.k.shape[2]), jnp.bool_) if kv_mask is None else kv_mask.astype(jnp.bool_)
    inv_freq = jnp.asarray(cfg.inv_freq(), jnp.float32)
    big = np.iinfo(np.int32).max
    windows = jnp.asarray([w if w else big for w in (cfg.sliding_windows or (None,) * cfg.num_layers)], jnp.int32)

    # gather from a table sharded only over the vocabulary (its fsdp dim all-gathered like any FSDP weight), so the
    # partitioner does not have to re-shard the gather's output to the batch layout by replication
    table = constrain(params["embed"], ("vocab", None))
    x = jnp.take(table, input_ids, axis=0).astype(dt)
    if cfg.embedding_padding_idx is not None:
        x = jnp.where((input_ids == cfg.embedding_padding_idx)[..., None], jax.lax.stop_gradient(x), x)
    x = constrain(x, ("batch", "length", "embed"))
    layer_params = {k: v for k, v in params.items() if k in LAYER_NAMES}
    lora_apply, layer_keys = None, None
    if lora is not None and lora[0]:
        adapters, lora_cfg = lora
        # the adapters are stacked over layers like the base, so they ride in the same scanned slice per layer
        layer_params = {**layer_params, **adapters}
        lora_apply = LoraApply(float(lora_cfg.scale), float(lora_cfg.dropout))
        if dropout_rng is not None and lora_apply.dropout > 0.0:
            layer_keys = jax.random.split(dropout_rng, cfg.num_layers)

    def body(x, xs):
        p, window, key = xs
        return _layer(cfg, inv_freq, x, p, window, positions, q_idx, kv_idx, kv_valid, segment_ids, None, 0,
                      lora_apply, key)[0], None

    def cached_body(carry, xs):
        # the cache rides in the carry and is updated in place per layer: as scanned inputs/outputs it would be
        # copied into a second buffer at every decode step (twice the cache memory, a full cache copy per token)
        x, ck, cv = carry
        p, window, layer, key, pkv = xs
        shared = None if pkv is None else (*pkv, prefix_mask.astype(jnp.bool_))
        x, (ck, cv) = _layer(cfg, inv_freq, x, p, window, positions, q_idx, kv_idx, kv_valid, segment_ids,
                             (ck, cv, layer), cache_index, lora_apply, key, shared)
        return (x, ck, cv), None

    if cfg.remat != "none":
        if cfg.remat not in _REMAT_POLICIES:
            raise ValueError(f"remat={cfg.remat!r}; choose one of none, {', '.join(_REMAT_POLICIES)}")
        body = jax.checkpoint(body, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
    # On XLA:CPU the layer loop costs per-layer weight slices, stacked residual and gradient writes and their zero
    # fills, more than unrolling it costs in compile time (docs/performance.md). Accelerators keep the loop: there,
    # depth-independent compile time matters and the loop's overhead does not. With a cache (prefill, decode) CPU keeps
    # it too: unrolled, a decode step's small matmuls read each layer's weights through static slices several times
    # slower than from the loop's per-layer slice (docs/performance.md, the decode-step profile).
    unroll = cfg.num_layers if ops.platform() == "cpu" and cache is None else 1
    if cache is None:
        x, _ = jax.lax.scan(body, x, (layer_params, windows, layer_keys), unroll=unroll)
    else:
        # the prefix is only read, so unlike the cache it can be a scanned input: nothing is written back per step
        pkv = None if prefix is None else (prefix.k, prefix.v)
        (x, ck, cv), _ = jax.lax.scan(cached_body, (x, cache.k, cache.v),
                                      (layer_params, windows, jnp.arange(cfg.num_layers), layer_keys, pkv),
                                      unroll=unroll)
        new_kv = (ck, cv)

    if cfg.family == "neox":
        x = ops.layer_norm(x, params["final_norm"], params["final_norm_bias"], cfg.norm_eps)
    else:
        x = ops.rms_norm(x, params["final_norm"], cfg.norm_eps)
    if return_hidden:
        out = x
    else:
        head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
        out = ops.proj("bth,hv->btv", x, head.astype(dt))
        out = constrain(out, ("batch", "length", "vocab"))
    if cache is None:
        return out
    return out, KVCache(*new_kv)


class Decoder(nnx.Module):
    """A causal LM. ``model(input_ids, **kw)`` returns logits; see :func:`forward` for the keyword arguments."""

    def __init__(self, cfg: ModelConfig, params: dict[str, jax.Array] | None = None, *, rngs: nnx.Rngs | None = None):
        self.cfg = cfg
        if params is None:
            params = init_params(cfg, (rngs or nnx.Rngs(0)).params())
        self.params = nnx.Dict({k: nnx.Param(v) for k, v in params.items()})

    HF_HEAD = "causal_lm"  # what save_pretrained writes: *ForCausalLM

    def param_dict(self) -> dict[str, jax.Array]:
        return {k: v[...] for k, v in self.params.items()}

    def __call__(self, input_ids, **kw):
        return forward(self.param_dict(), self.cfg, input_ids, **kw)
