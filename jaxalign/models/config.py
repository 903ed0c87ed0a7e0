"""The decoder's configuration, read from a Hugging Face ``config.json`` through transformers' config classes.

One dataclass covers both families: ``llama`` (Llama 2/3, Mistral, Qwen2/2.5, Qwen3 — RMSNorm, SwiGLU, GQA, RoPE with
optional llama3 scaling, optional qkv bias, optional q/k norm, sliding window) and ``neox`` (GPT-NeoX / Pythia —
LayerNorm with bias, parallel residual, partial rotary, GELU MLP).
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

# model_type in config.json -> family. Everything else is refused with the list below.
SUPPORTED_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gpt_neox": "neox",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast")


class ModelConfigError(ValueError):
    """A checkpoint's config.json or weights cannot be used; the message names the file and the key or tensor."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    rotary_fraction: float = 1.0  # GPT-NeoX rotates only the first fraction of each head
    norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    parallel_residual: bool = False
    activation: str = "silu"
    # per-layer attention window in tokens; None = full attention for that layer
    sliding_windows: tuple[int | None, ...] = ()
    pad_token_id: int | None = None
    # the embedding row that gets no gradient: transformers' Llama / Mistral / Qwen build their embedding as
    # nn.Embedding(padding_idx=pad_token_id), so full fine-tuning there never moves that row (EOS's, where pad == EOS);
    # read from the HF config so jaxalign trains the same weights (GPT-NeoX passes no padding_idx: None)
    embedding_padding_idx: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    # numerics: parameters are stored in param_dtype, computation runs in dtype
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"  # "none" | "full" | "dots" (save matmul outputs, recompute the rest)

    @property
    def family(self) -> str:
        return SUPPORTED_MODEL_TYPES[self.model_type]

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_fraction)

    def replace(self, **kw: Any) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameter count from the shapes (no weights needed)."""
        h, f, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (self.num_heads + 2 * self.num_kv_heads) + self.num_heads * d * h
        if self.qkv_bias:
            attn += d * (self.num_heads + 2 * self.num_kv_heads)
        if self.o_bias:
            attn += h
        if self.family == "neox":
            mlp = 2 * h * f + f + h
            norms = 4 * h
        else:
            mlp = 3 * h * f + (2 * f + h if self.mlp_bias else 0)
            norms = 2 * h + (2 * d if self.qk_norm else 0)
        total = self.num_layers * (attn + mlp + norms) + (2 * h if self.family == "neox" else h)
        if include_embedding:
            total += self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return int(total)

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies, float64, with the checkpoint's scaling (same arithmetic as transformers)."""
        dim = self.rotary_dim
        inv = 1.0 / (self.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
        if self.rope_type == "linear":
            inv = inv / self.rope_factor
        elif self.rope_type == "llama3":
            old = self.rope_original_max_position
            low_wl, high_wl = old / self.rope_low_freq_factor, old / self.rope_high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > low_wl, inv / self.rope_factor, inv)
            smooth = (old / wavelen - self.rope_low_freq_factor) / (self.rope_high_freq_factor - self.rope_low_freq_factor)
            smoothed = (1 - smooth) * scaled / self.rope_factor + smooth * scaled
            medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
            inv = np.where(medium, smoothed, scaled)
        return inv


def _rope_fields(hf: Any, where: str) -> dict[str, Any]:
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    legacy = getattr(hf, "rope_scaling", None)
    if not rope and legacy:
        rope = dict(legacy)
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelConfigError(
            f"{where}: RoPE type {rope_type!r} is not supported by jaxalign's decoder; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}. Convert the checkpoint or pick a model with one of those."
        )
    theta = rope.get("rope_theta", getattr(hf, "rope_theta", None))
    if theta is None:
        theta = getattr(hf, "rotary_emb_base", 10000.0)
    out: dict[str, Any] = {"rope_theta": float(theta), "rope_type": rope_type}
    if rope_type in ("linear", "llama3"):
        out["rope_factor"] = float(rope["factor"])
    if rope_type == "llama3":
        out["rope_low_freq_factor"] = float(rope["low_freq_factor"])
        out["rope_high_freq_factor"] = float(rope["high_freq_factor"])
        out["rope_original_max_position"] = int(rope["original_max_position_embeddings"])
    frac = rope.get("partial_rotary_factor", getattr(hf, "rotary_pct", getattr(hf, "partial_rotary_factor", 1.0)))
    out["rotary_fraction"] = float(frac if frac is not None else 1.0)
    return out


def _sliding_windows(hf: Any, num_layers: int) -> tuple[int | None, ...]:
    window = getattr(hf, "sliding_window", None)
    layer_types = getattr(hf, "layer_types", None)
    if layer_types:
        return tuple(window if t == "sliding_attention" and window else None for t in layer_types)
    if getattr(hf, "use_sliding_window", True) is False:
        return (None,) * num_layers
    return (window,) * num_layers if window else (None,) * num_layers


def config_from_hf(hf: Any, *, where: str = "config.json", **overrides: Any) -> ModelConfig:
    """Translate a transformers ``PretrainedConfig`` into a :class:`ModelConfig`."""
    model_type = getattr(hf, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelConfigError(
            f"{where}: model_type {model_type!r} (architectures {getattr(hf, 'architectures', None)}) is not "
            f"supported. jaxalign's decoder covers: {', '.join(sorted(SUPPORTED_MODEL_TYPES))} (Llama 2/3, Mistral, "
            f"Qwen2/2.5, Qwen3, GPT-NeoX/Pythia)."
        )
    h = int(hf.hidden_size)
    n = int(hf.num_attention_heads)
    head_dim = getattr(hf, "head_dim", None) or h // n
    num_layers = int(hf.num_hidden_layers)
    act = getattr(hf, "hidden_act", "silu")
    if act not in SUPPORTED_ACTIVATIONS:
        raise ModelConfigError(f"{where}: hidden_act {act!r} is not supported; supported: {SUPPORTED_ACTIVATIONS}.")
    neox = SUPPORTED_MODEL_TYPES[model_type] == "neox"
    fields: dict[str, Any] = dict(
        model_type=model_type,
        vocab_size=int(hf.vocab_size),
        hidden_size=h,
        intermediate_size=int(hf.intermediate_size),
        num_layers=num_layers,
        num_heads=n,
        num_kv_heads=int(getattr(hf, "num_key_value_heads", None) or n),
        head_dim=int(head_dim),
        max_position_embeddings=int(getattr(hf, "max_position_embeddings", 4096)),
        norm_eps=float(getattr(hf, "layer_norm_eps" if neox else "rms_norm_eps", 1e-5 if neox else 1e-6)),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        # qwen2 hard-codes q/k/v biases; llama, qwen3 and gpt_neox put attention_bias on q/k/v and o alike
        qkv_bias=bool(getattr(hf, "attention_bias", False)) or model_type == "qwen2",
        o_bias=bool(getattr(hf, "attention_bias", False)) and model_type in ("llama", "qwen3", "gpt_neox"),
        mlp_bias=bool(getattr(hf, "mlp_bias", False)) or neox,
        qk_norm=model_type == "qwen3",
        parallel_residual=bool(getattr(hf, "use_parallel_residual", False)) if neox else False,
        activation=act,
        sliding_windows=(None,) * num_layers if neox else _sliding_windows(hf, num_layers),
        pad_token_id=getattr(hf, "pad_token_id", None),
        embedding_padding_idx=None if neox else getattr(hf, "pad_token_id", None),
        bos_token_id=getattr(hf, "bos_token_id", None),
        eos_token_id=getattr(hf, "eos_token_id", None),
    )
    if isinstance(fields["eos_token_id"], list):
        fields["eos_token_id"] = tuple(fields["eos_token_id"])
    fields.update(_rope_fields(hf, where))
    fields.update(overrides)
    return ModelConfig(**fields)


def load_config(path: str | Path, **overrides: Any) -> ModelConfig:
    """Read ``path/config.json`` (or a config.json path) with transformers' AutoConfig."""
    from transformers import AutoConfig

    path = Path(path)
    cfg_file = path if path.name.endswith(".json") else path / "config.json"
    if not cfg_file.is_file():
        raise ModelConfigError(f"{cfg_file}: no config.json found; a model folder needs config.json and *.safetensors.")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelConfigError(f"{cfg_file}: not valid JSON ({e}).") from None
    if raw.get("model_type") not in SUPPORTED_MODEL_TYPES:
        # refuse before transformers tries to import an unknown architecture
        raise ModelConfigError(
            f"{cfg_file}: model_type {raw.get('model_type')!r} (architectures {raw.get('architectures')}) is not "
            f"supported. jaxalign's decoder covers: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}."
        )
    try:
        hf = AutoConfig.from_pretrained(str(cfg_file.parent))
    except Exception as e:  # transformers raises many kinds; the user needs the file and the reason
        raise ModelConfigError(f"{cfg_file}: transformers could not read this config ({type(e).__name__}: {e}).") from None
    return config_from_hf(hf, where=str(cfg_file), **overrides)
