"""Hugging Face safetensors in and out: the only model format jaxalign reads or writes.

Loading reads ``config.json`` with transformers' config classes and the (possibly sharded) ``*.safetensors`` lazily,
one tensor at a time. Given a mesh, each layer's tensor is placed straight into its sharded layout and written into the
layer-stacked device array in place (a donated update), so the host never holds more than one checkpoint tensor —
a 7B model loads on hosts that could not hold it twice.

Saving writes ``config.json`` plus ``model.safetensors`` (or ``model-0000k-of-0000n.safetensors`` with an index above
``max_shard_bytes``) that ``transformers.AutoModelFor{CausalLM,SequenceClassification}.from_pretrained`` load.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.models.config import ModelConfig, ModelConfigError, load_config
from jaxalign.models.decoder import LAYER_NAMES, LOGICAL_AXES, TOP_LEVEL, param_shapes
from jaxalign.models.hf_names import (hf_prefix, hf_to_layer, hf_top_names, layer_sources, layer_to_hf,
                                     lm_head_name)
from jaxalign.storage import is_remote, local_copy, staging_dir, upload_folder

# ---- reading safetensors -------------------------------------------------------------------------------------------

class SafetensorsCheckpoint:
    """Lazy access to the tensors of a folder of safetensors files (single file or sharded with an index)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ModelConfigError(f"{index}: not a valid safetensors index ({e}).") from None
        else:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise ModelConfigError(
                    f"{folder}: no *.safetensors weights found (jaxalign reads safetensors only; convert a .bin "
                    f"checkpoint with transformers' save_pretrained(safe_serialization=True))."
                )
            weight_map = {}
            for f in files:
                for k in self._open(f, safe_open).keys():
                    weight_map[k] = f.name
        self.weight_map: dict[str, str] = weight_map
        self._handles: dict[str, Any] = {}
        self._safe_open = safe_open

    def _open(self, path: Path, safe_open=None):
        safe_open = safe_open or self._safe_open
        if not path.is_file():
            raise ModelConfigError(f"{path}: safetensors file listed in the checkpoint is missing.")
        try:
            return safe_open(str(path), framework="numpy")
        except Exception as e:  # safetensors raises SafetensorError for truncated / corrupt headers
            raise ModelConfigError(
                f"{path}: cannot read this safetensors file ({type(e).__name__}: {e}); it may be truncated or "
                f"corrupt — re-download or re-save the checkpoint."
            ) from None

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        if name not in self.weight_map:
            raise ModelConfigError(
                f"{self.folder}: tensor {name!r} is missing from the checkpoint (the config asks for it; "
                f"{len(self.weight_map)} tensors present)."
            )
        fname = self.weight_map[name]
        if fname not in self._handles:
            self._handles[fname] = self._open(self.folder / fname)
        try:
            t = self._handles[fname].get_tensor(name)
        except Exception as e:
            raise ModelConfigError(
                f"{self.folder / fname}: tensor {name!r} could not be read ({type(e).__name__}: {e}); the file may "
                f"be truncated."
            ) from None
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise ModelConfigError(
                f"{self.folder / fname}: tensor {name!r} has shape {tuple(t.shape)} but config.json implies "
                f"{tuple(shape)}; the weights and the config do not belong together."
            )
        return t


def _hf_shape(cfg: ModelConfig, name: str) -> tuple[int, ...]:
    """Expected HF shape of the tensor that holds layer param ``name``."""
    H, N, K, D, F = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    if cfg.family == "neox" and name in ("wq", "wk", "wv"):
        return (3 * N * D, H)
    if cfg.family == "neox" and name in ("bq", "bk", "bv"):
        return (3 * N * D,)
    return {
        "wq": (N * D, H), "wk": (K * D, H), "wv": (K * D, H), "bq": (N * D,), "bk": (K * D,), "bv": (K * D,),
        "wo": (H, N * D), "bo": (H,), "w_gate": (F, H), "w_up": (F, H), "w_down": (H, F),
        "b_gate": (F,), "b_up": (F,), "b_down": (H,), "attn_norm": (H,), "mlp_norm": (H,), "attn_norm_bias": (H,),
        "mlp_norm_bias": (H,), "q_norm": (D,), "k_norm": (D,),
    }[name]


@lru_cache(maxsize=None)
def _set_layer_fn(sharding):
    # one compiled in-place update per (shape, sharding); the stacked array is donated so no second copy is made
    return jax.jit(lambda stacked, layer, i: stacked.at[i].set(layer.astype(stacked.dtype)),
                   donate_argnums=0, out_shardings=sharding)


def _place(host: np.ndarray, sharding, dtype) -> jax.Array:
    host = host.astype(dtype, copy=False)
    if sharding is None:
        return jnp.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def read_params(folder: Path, cfg: ModelConfig, *, mesh=None, prefix_override: str | None = None,
                include_lm_head: bool = True) -> dict[str, jax.Array]:
    """Read the backbone (and LM head) params of ``cfg`` from ``folder`` in the stacked layout."""
    from jaxalign.sharding import named_sharding

    ckpt = SafetensorsCheckpoint(folder)
    shapes = param_shapes(cfg)
    if not include_lm_head:
        shapes.pop("lm_head", None)
    dtype = jnp.dtype(cfg.param_dtype)
    top = hf_top_names(cfg)
    if prefix_override is not None:
        top = {k: v.replace(hf_prefix(cfg), prefix_override, 1) for k, v in top.items()}
    if "lm_head" in shapes:
        top["lm_head"] = lm_head_name(cfg)
    out: dict[str, jax.Array] = {}
    for name, shape in shapes.items():
        sharding = None if mesh is None else named_sharding(LOGICAL_AXES[name], shape, mesh)
        if name in TOP_LEVEL:
            hf_shape = (shape[1], shape[0]) if name == "lm_head" else shape
            t = ckpt.get(top[name], hf_shape)
            out[name] = _place(t.T if name == "lm_head" else t, sharding, dtype)
            continue
        layer_sharding = None if mesh is None else named_sharding(LOGICAL_AXES[name][1:], shape[1:], mesh)
        pre = (prefix_override or hf_prefix(cfg)) + "layers.{}." + layer_sources(cfg, name)
        if mesh is None:
            out[name] = jnp.asarray(np.stack([
                hf_to_layer(cfg, name, ckpt.get(pre.format(i), _hf_shape(cfg, name))).astype(dtype)
                for i in range(cfg.num_layers)]))
            continue
        stacked = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()
        update = _set_layer_fn(sharding)
        for i in range(cfg.num_layers):
            layer = hf_to_layer(cfg, name, ckpt.get(pre.format(i), _hf_shape(cfg, name)))
            stacked = update(stacked, _place(np.ascontiguousarray(layer), layer_sharding, dtype), i)
            del layer
        out[name] = stacked
    return out


def resolve_model_folder(path: str | Path) -> Path:
    """A local folder, a bucket folder (``gs://...``, copied once into a local cache), or a hub id resolved through
    huggingface_hub's cache / download."""
    if is_remote(path):
        return local_copy(path)
    p = Path(path)
    if p.is_dir():
        return p
    if p.exists() or str(path).startswith((".", "/")) or str(path).count("/") != 1:
        raise ModelConfigError(f"{path}: model folder not found (expected a directory with config.json and "
                               f"*.safetensors, or a hub id like 'org/name').")
    from jaxalign.models.hub import download_model

    try:
        # config, tokenizer files and chat template, and one copy of the weights (safetensors; never the .bin twin)
        return download_model(str(path))
    except ModelConfigError as e:
        raise ModelConfigError(f"{path}: {e}") from None
    except Exception as e:
        raise ModelConfigError(f"{path}: could not fetch this hub model ({type(e).__name__}: {e}). Pass a local "
                               f"folder, or check the id and your network / HF_TOKEN.") from None


def from_pretrained(path: str | Path, *, dtype: str | None = None, param_dtype: str | None = None, mesh=None,
                    remat: str | None = None):
    """Load a causal LM (``Decoder``) from a local folder or hub id; with ``mesh``, straight into sharded arrays."""
    from jaxalign.models.decoder import Decoder

    folder = resolve_model_folder(path)
    overrides = {k: v for k, v in dict(dtype=dtype, param_dtype=param_dtype, remat=remat).items() if v is not None}
    cfg = load_config(folder, **overrides)
    params = read_params(folder, cfg, mesh=mesh)
    return Decoder(cfg, params)


# ---- writing -------------------------------------------------------------------------------------------------------

def _hf_config_dict(cfg: ModelConfig, architecture: str) -> dict[str, Any]:
    """A config.json transformers reads back to the same architecture and numbers."""
    from transformers import AutoConfig

    rope: dict[str, Any] = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type in ("linear", "llama3"):
        rope["factor"] = cfg.rope_factor
    if cfg.rope_type == "llama3":
        rope.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_position)
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
        hidden_act=cfg.activation, pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id,
        eos_token_id=list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id,
        architectures=[architecture],
    )
    if cfg.family == "neox":
        rope["partial_rotary_factor"] = cfg.rotary_fraction
        extra = dict(layer_norm_eps=cfg.norm_eps, use_parallel_residual=cfg.parallel_residual,
                     attention_bias=cfg.qkv_bias, rope_parameters=rope, rotary_pct=cfg.rotary_fraction,
                     rotary_emb_base=cfg.rope_theta)
    else:
        extra = dict(num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
                     rope_parameters=rope, rope_theta=cfg.rope_theta)
        if cfg.rope_type != "default":
            extra["rope_scaling"] = rope
        if cfg.model_type in ("llama", "qwen3"):
            extra["attention_bias"] = cfg.qkv_bias
        if cfg.model_type == "llama":
            extra["mlp_bias"] = cfg.mlp_bias
        windows = {w for w in cfg.sliding_windows if w}
        if windows:
            extra["sliding_window"] = windows.pop()
            if cfg.model_type in ("qwen2", "qwen3"):
                extra["use_sliding_window"] = True
                extra["layer_types"] = ["sliding_attention" if w else "full_attention" for w in cfg.sliding_windows]
        elif cfg.model_type == "mistral":
            extra["sliding_window"] = None
    hf = AutoConfig.for_model(cfg.model_type, **common, **extra)
    d = hf.to_dict()
    d["torch_dtype"] = d["dtype"] = cfg.param_dtype
    return d


def _iter_hf_tensors(cfg: ModelConfig, params: dict[str, jax.Array],
                     with_lm_head: bool) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, tensor) pairs, one layer at a time, so saving holds one layer on the host."""
    pre = hf_prefix(cfg)
    for name, hf in hf_top_names(cfg).items():
        yield hf, np.asarray(jax.device_get(params[name]))
    layer_names = [k for k in params if k in LAYER_NAMES]
    for i in range(cfg.num_layers):
        layer = {k: np.asarray(jax.device_get(params[k][i])) for k in layer_names}
        for suffix, t in layer_to_hf(cfg, layer).items():
            yield f"{pre}layers.{i}.{suffix}", t
    if with_lm_head and not cfg.tie_word_embeddings:
        yield lm_head_name(cfg), np.asarray(jax.device_get(params["lm_head"])).T


def write_checkpoint(folder: str | Path, config: dict[str, Any], tensors: Iterator[tuple[str, np.ndarray]],
                     max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write config.json and safetensors shards (with an index when more than one) from a stream of tensors. A bucket
    folder (``gs://...``) is written locally, then uploaded (safetensors writes local files only)."""
    from safetensors.numpy import save_file

    if is_remote(folder):
        with staging_dir() as local:
            write_checkpoint(local, config, tensors, max_shard_bytes)
            return upload_folder(local, folder)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in list(folder.glob("model*.safetensors")) + list(folder.glob("model.safetensors.index.json")):
        old.unlink()
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    written: list[tuple[str, list[str]]] = []
    total = 0

    def flush(final: bool):
        nonlocal size
        idx = len(written) + 1
        fname = f"model-{idx:05d}.safetensors"
        save_file(shards[0], str(folder / fname), metadata={"format": "pt"})
        written.append((fname, list(shards[0])))
        shards[0] = {}
        size = 0

    for name, t in tensors:
        t = np.ascontiguousarray(t)  # safetensors writes the raw buffer: a transposed view would be saved scrambled
        nbytes = t.nbytes
        if shards[0] and size + nbytes > max_shard_bytes:
            flush(False)
        shards[0][name] = t
        size += nbytes
        total += nbytes
    if shards[0] or not written:
        flush(True)
    n = len(written)
    if n == 1:
        (folder / written[0][0]).rename(folder / "model.safetensors")
    else:
        weight_map = {}
        for i, (fname, names) in enumerate(written, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            (folder / fname).rename(folder / final)
            weight_map.update({k: final for k in names})
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return folder


HF_ARCHITECTURES = {
    "causal_lm": {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM", "gpt_neox": "GPTNeoXForCausalLM"},
    "sequence_classification": {"llama": "LlamaForSequenceClassification",
                                "mistral": "MistralForSequenceClassification",
                                "qwen2": "Qwen2ForSequenceClassification",
                                "qwen3": "Qwen3ForSequenceClassification",
                                "gpt_neox": "GPTNeoXForSequenceClassification"},
}


def save_params(params: dict[str, jax.Array], cfg: ModelConfig, path: str | Path, *, head: str = "causal_lm",
                max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write a parameter dict as a transformers checkpoint folder.

    ``head="causal_lm"`` writes ``*ForCausalLM`` (the LM head, untied or tied); ``head="sequence_classification"``
    writes ``*ForSequenceClassification`` with one label, its ``score.weight`` taken from ``params["score"]`` (the
    reward model of :mod:`jaxalign.models.reward`). Every process may call it; only process 0 writes, after the
    parameters are gathered from all hosts.
    """
    if head not in HF_ARCHITECTURES:
        raise ValueError(f"head={head!r}; choose one of {', '.join(HF_ARCHITECTURES)}")
    config = _hf_config_dict(cfg, HF_ARCHITECTURES[head][cfg.model_type])
    if head == "sequence_classification":
        config["num_labels"] = 1
        config["id2label"], config["label2id"] = {"0": "LABEL_0"}, {"LABEL_0": 0}

    def tensors():
        yield from _iter_hf_tensors(cfg, params, with_lm_head=head == "causal_lm")
        if head == "sequence_classification":
            yield "score.weight", np.asarray(jax.device_get(params["score"])).reshape(1, -1)

    return write_checkpoint(path, config, tensors(), max_shard_bytes)


def save_pretrained(model, path: str | Path, *, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write ``model`` (a ``Decoder`` or ``RewardModel``: its ``HF_HEAD`` names the head) as a transformers-loadable
    checkpoint folder."""
    return save_params(model.param_dict(), model.cfg, path, head=model.HF_HEAD, max_shard_bytes=max_shard_bytes)
