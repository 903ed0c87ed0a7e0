"""Parameter names between jaxalign's stacked layout and Hugging Face checkpoints, per model family: the top-level
tensors, each layer's tensors and the reshapes / transposes between the two layouts (used to read and to write)."""
from __future__ import annotations

import numpy as np

from jaxalign.models.config import ModelConfig


def hf_prefix(cfg: ModelConfig) -> str:
    return "gpt_neox." if cfg.family == "neox" else "model."


def hf_top_names(cfg: ModelConfig) -> dict[str, str]:
    """jaxalign top-level param -> HF tensor name (backbone part, i.e. without the LM head)."""
    pre = hf_prefix(cfg)
    if cfg.family == "neox":
        return {"embed": pre + "embed_in.weight", "final_norm": pre + "final_layer_norm.weight",
                "final_norm_bias": pre + "final_layer_norm.bias"}
    return {"embed": pre + "embed_tokens.weight", "final_norm": pre + "norm.weight"}


def lm_head_name(cfg: ModelConfig) -> str:
    return "embed_out.weight" if cfg.family == "neox" else "lm_head.weight"


def layer_sources(cfg: ModelConfig, name: str) -> str:
    """HF tensor suffix (after ``{prefix}layers.{i}.``) that holds jaxalign layer param ``name``."""
    if cfg.family == "neox":
        return {
            "attn_norm": "input_layernorm.weight", "attn_norm_bias": "input_layernorm.bias",
            "mlp_norm": "post_attention_layernorm.weight", "mlp_norm_bias": "post_attention_layernorm.bias",
            "wq": "attention.query_key_value.weight", "wk": "attention.query_key_value.weight",
            "wv": "attention.query_key_value.weight", "bq": "attention.query_key_value.bias",
            "bk": "attention.query_key_value.bias", "bv": "attention.query_key_value.bias",
            "wo": "attention.dense.weight", "bo": "attention.dense.bias",
            "w_up": "mlp.dense_h_to_4h.weight", "b_up": "mlp.dense_h_to_4h.bias",
            "w_down": "mlp.dense_4h_to_h.weight", "b_down": "mlp.dense_4h_to_h.bias",
        }[name]
    return {
        "attn_norm": "input_layernorm.weight", "mlp_norm": "post_attention_layernorm.weight",
        "wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight",
        "bq": "self_attn.q_proj.bias", "bk": "self_attn.k_proj.bias", "bv": "self_attn.v_proj.bias",
        "q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight",
        "wo": "self_attn.o_proj.weight", "bo": "self_attn.o_proj.bias",
        "w_gate": "mlp.gate_proj.weight", "w_up": "mlp.up_proj.weight", "w_down": "mlp.down_proj.weight",
        "b_gate": "mlp.gate_proj.bias", "b_up": "mlp.up_proj.bias", "b_down": "mlp.down_proj.bias",
    }[name]


def hf_to_layer(cfg: ModelConfig, name: str, t: np.ndarray) -> np.ndarray:
    """One HF layer tensor -> this layer's slice of jaxalign param ``name``."""
    H, N, K, D = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if cfg.family == "neox" and name in ("wq", "wk", "wv", "bq", "bk", "bv"):
        j = "qkv".index(name[1])
        # fused rows are laid out [head, (q|k|v), head_dim]
        if name[0] == "w":
            return t.reshape(N, 3, D, H)[:, j].transpose(2, 0, 1)
        return t.reshape(N, 3, D)[:, j]
    if name in ("wq", "wk", "wv"):
        return t.T.reshape(H, N if name == "wq" else K, D)
    if name in ("bq", "bk", "bv"):
        return t.reshape(N if name == "bq" else K, D)
    if name == "wo":
        return t.T.reshape(N, D, H)
    if name in ("w_gate", "w_up", "w_down"):
        return t.T
    return t


def layer_to_hf(cfg: ModelConfig, layer: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This layer's jaxalign params -> HF tensor suffix -> tensor (inverse of :func:`hf_to_layer`)."""
    H, N, D = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    out: dict[str, np.ndarray] = {}
    if cfg.family == "neox":
        w = np.stack([layer["wq"], layer["wk"], layer["wv"]], axis=2)  # [H, N, 3, D]
        out["attention.query_key_value.weight"] = w.reshape(H, N * 3 * D).T
        if "bq" in layer:
            out["attention.query_key_value.bias"] = np.stack([layer["bq"], layer["bk"], layer["bv"]], 1).reshape(-1)
    for name, v in layer.items():
        if cfg.family == "neox" and name in ("wq", "wk", "wv", "bq", "bk", "bv"):
            continue
        if name in ("wq", "wk", "wv"):
            v = v.reshape(H, -1).T
        elif name in ("bq", "bk", "bv"):
            v = v.reshape(-1)
        elif name == "wo":
            v = v.reshape(N * D, H).T
        elif name in ("w_gate", "w_up", "w_down"):
            v = v.T
        out[layer_sources(cfg, name)] = v
    return {k: np.ascontiguousarray(v) for k, v in out.items()}
