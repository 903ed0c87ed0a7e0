"""LoRA adapters for the decoder: the config, their init and sharding axes, merging, PEFT files out and in, and the
split of a train state into trainable adapters and a frozen base.

An adapted projection computes ``W x + (alpha / r) B (A x)`` (Hu et al. 2021, "LoRA", eq. 3; PEFT's ``LoraLayer``).
Adapters live in a flat dict beside the base params, stacked over layers like their base matrix:
``<param>_lora_a`` holds A with the base matrix's input dims then the rank (``wq_lora_a`` [layers, embed, r],
``wo_lora_a`` [layers, heads, head_dim, r]) and ``<param>_lora_b`` holds B with the rank then the output dims
(``wq_lora_b`` [layers, r, heads, head_dim]). :func:`jaxalign.models.decoder.forward` applies them with
``lora=(adapters, lora_cfg)`` (the per-layer term is in :mod:`jaxalign.models.lora_layer`); :func:`merge` folds them
into the weights for export and sampling.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from jaxalign.models.config import ModelConfig, ModelConfigError
from jaxalign.models.axes import param_axes
from jaxalign.models.decoder import LOGICAL_AXES, param_shapes
from jaxalign.models.lora_layer import LORA_SPECS

# config name -> the base param it adapts
TARGETS: dict[str, str] = {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "gate": "w_gate", "up": "w_up",
                           "down": "w_down"}
SUFFIX_A, SUFFIX_B = "_lora_a", "_lora_b"
# the rank dim is small: replicated on every mesh (no rule maps it; see jaxalign.sharding.spec_for)
RANK_AXIS = "lora_rank"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """``rank`` 0 = LoRA off. ``targets``: which projections get adapters (a target the model lacks, e.g. ``gate`` on
    GPT-NeoX, is skipped). ``dropout``: rate on each adapter's input while training."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = tuple(TARGETS)

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown:
            raise ValueError(f"lora.targets: unknown {unknown}; choose from {', '.join(TARGETS)}")
        if self.rank < 0 or int(self.rank) != self.rank:
            raise ValueError(f"lora.rank must be an integer >= 0 (0 = off), got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.rank and not self.targets:
            raise ValueError("lora.targets is empty but lora.rank > 0")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def is_adapter(name: str) -> bool:
    return name.endswith((SUFFIX_A, SUFFIX_B))


def _in_dims(base: str) -> int:
    """How many leading (after ``layers``) dims of base matrix ``base`` are its input: wo reads [heads, head_dim]."""
    return len(LORA_SPECS[base][0].split(",")[0]) - 2  # the input operand's letters minus b, t


def _adapted(model_cfg: ModelConfig, lora_cfg: LoraConfig) -> list[str]:
    shapes = param_shapes(model_cfg)
    return [TARGETS[t] for t in lora_cfg.targets if TARGETS[t] in shapes] if lora_cfg.enabled else []


def adapter_shapes(model_cfg: ModelConfig, lora_cfg: LoraConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every adapter array (empty when LoRA is off)."""
    shapes, r, out = param_shapes(model_cfg), lora_cfg.rank, {}
    for base in _adapted(model_cfg, lora_cfg):
        s, k = shapes[base], _in_dims(base)
        out[base + SUFFIX_A] = (s[0], *s[1:1 + k], r)
        out[base + SUFFIX_B] = (s[0], r, *s[1 + k:])
    return out


def adapter_logical_axes(adapters: dict[str, Any]) -> dict[str, tuple[str | None, ...]]:
    """Logical axes of each adapter: A keeps its base matrix's input axes, B its output axes, so FSDP / tensor
    sharding of an adapter follows the base matrix it adapts; the rank axis is replicated."""
    out = {}
    for name in adapters:
        base = name[: -len(SUFFIX_A)]
        axes, k = LOGICAL_AXES[base], _in_dims(base)
        out[name] = (*axes[:1 + k], RANK_AXIS) if name.endswith(SUFFIX_A) else (axes[0], RANK_AXIS, *axes[1 + k:])
    return out


def trainable_logical_axes(tree: dict[str, Any]) -> dict[str, tuple[str | None, ...]]:
    """Logical axes of a dict mixing adapters and plain params (the ``trainable`` half of :func:`split_trainable`)."""
    return {**param_axes({k: v for k, v in tree.items() if not is_adapter(k)}),
            **adapter_logical_axes({k: v for k, v in tree.items() if is_adapter(k)})}


def init_adapters(model_cfg: ModelConfig, lora_cfg: LoraConfig, key: jax.Array) -> dict[str, jax.Array]:
    """A as PEFT initialises ``lora_A`` (``kaiming_uniform_(a=sqrt(5))``: U(-1/sqrt(fan_in), 1/sqrt(fan_in))),
    B zero, so the adapted model starts as the base model."""
    dtype = jnp.dtype(model_cfg.param_dtype)
    out = {}
    for name, shape in adapter_shapes(model_cfg, lora_cfg).items():
        if name.endswith(SUFFIX_B):
            out[name] = jnp.zeros(shape, dtype)
            continue
        bound = 1.0 / math.sqrt(math.prod(shape[1:-1]))
        sub = jax.random.fold_in(key, sorted(TARGETS.values()).index(name[: -len(SUFFIX_A)]))
        out[name] = jax.random.uniform(sub, shape, jnp.float32, -bound, bound).astype(dtype)
    return out


def delta(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``scale * A B`` in the stacked layout: the update LoRA adds to its base matrix (float32)."""
    k, m = a.ndim - 2, b.ndim - 2
    ins, outs = "ijk"[:k], "mnp"[:m]
    return scale * jnp.einsum(f"l{ins}r,lr{outs}->l{ins}{outs}", a.astype(jnp.float32), b.astype(jnp.float32))


def merge(params: dict[str, jax.Array], adapters: dict[str, jax.Array], model_cfg: ModelConfig,
          lora_cfg: LoraConfig) -> dict[str, jax.Array]:
    """Params with each adapter folded in, ``W + (alpha / r) A B`` (in each base matrix's dtype)."""
    out = dict(params)
    for name in adapters:
        if name.endswith(SUFFIX_A):
            base = name[: -len(SUFFIX_A)]
            w = params[base]
            if w.shape[0] != model_cfg.num_layers:
                raise ValueError(f"merge: {base} has {w.shape[0]} layers, the config {model_cfg.num_layers}")
            out[base] = (w.astype(jnp.float32) + delta(adapters[name], adapters[base + SUFFIX_B],
                                                       lora_cfg.scale)).astype(w.dtype)
    return out


# ---- the trainable / frozen split ------------------------------------------------------------------------------------

def split_trainable(params: dict[str, jax.Array], adapters: dict[str, jax.Array], *, trainable: tuple[str, ...] = (),
                    base_dtype: Any = None) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """``(trainable, frozen)``: the adapters plus the params named in ``trainable`` (e.g. the reward head's
    ``score``), and the rest of the params, cast to ``base_dtype`` when given (a bf16 frozen base halves its memory;
    the forward computes in ``cfg.dtype`` either way). The train state holds only ``trainable`` and its optimizer
    state; pass ``frozen`` to the step as a separate, non-differentiated argument."""
    missing = [k for k in trainable if k not in params]
    if missing:
        raise KeyError(f"split_trainable: {missing} not in params")
    train = {**adapters, **{k: params[k] for k in trainable}}
    frozen = {k: v for k, v in params.items() if k not in trainable}
    if base_dtype is not None:
        frozen = {k: v.astype(base_dtype) for k, v in frozen.items()}
    return train, frozen


def join_trainable(trainable: dict[str, jax.Array], frozen: dict[str, jax.Array]
                   ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Inverse of :func:`split_trainable`: ``(params, adapters)`` for ``forward(params, ..., lora=(adapters, cfg))``."""
    params = dict(frozen)
    params.update({k: v for k, v in trainable.items() if not is_adapter(k)})
    return params, {k: v for k, v in trainable.items() if is_adapter(k)}


def tree_bytes(tree: Any) -> int:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


# ---- PEFT files ------------------------------------------------------------------------------------------------------

_LLAMA_MODULES = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
                  "wo": "self_attn.o_proj", "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj",
                  "w_down": "mlp.down_proj"}
_NEOX_MODULES = {"wo": "attention.dense", "w_up": "mlp.dense_h_to_4h", "w_down": "mlp.dense_4h_to_h"}
_NEOX_QKV = "attention.query_key_value"


def _layer_prefix(cfg: ModelConfig) -> str:
    return "base_model.model." + ("gpt_neox." if cfg.family == "neox" else "model.") + "layers.{}."


def _peft_tensors(adapters: dict[str, np.ndarray], cfg: ModelConfig, r: int):
    """(PEFT key, tensor) pairs: ``lora_A.weight`` [r, in] and ``lora_B.weight`` [out, r] per layer and module."""
    pre = _layer_prefix(cfg)
    modules = _NEOX_MODULES if cfg.family == "neox" else _LLAMA_MODULES
    for i in range(cfg.num_layers):
        for base, module in modules.items():
            if base + SUFFIX_A not in adapters:
                continue
            a, b = adapters[base + SUFFIX_A][i], adapters[base + SUFFIX_B][i]
            yield pre.format(i) + module + ".lora_A.weight", a.reshape(-1, r).T
            yield pre.format(i) + module + ".lora_B.weight", b.reshape(r, -1).T
        if cfg.family == "neox" and any(f"w{c}{SUFFIX_A}" in adapters for c in "qkv"):
            # one fused Linear holds q, k and v (rows [head, (q|k|v), head_dim]); three rank-r adapters on it are one
            # rank-3r adapter with A stacked and B block-diagonal (alpha 3x alpha keeps alpha / r)
            n, d, h = cfg.num_heads, cfg.head_dim, cfg.hidden_size
            fa, fb = np.zeros((3 * r, h), np.float32), np.zeros((n, 3, d, 3 * r), np.float32)
            for j, c in enumerate("qkv"):
                if f"w{c}{SUFFIX_A}" in adapters:
                    fa[j * r:(j + 1) * r] = adapters[f"w{c}{SUFFIX_A}"][i].T
                    fb[:, j, :, j * r:(j + 1) * r] = adapters[f"w{c}{SUFFIX_B}"][i].transpose(1, 2, 0)
            dt = adapters[next(iter(adapters))].dtype
            yield pre.format(i) + _NEOX_QKV + ".lora_A.weight", fa.astype(dt)
            yield pre.format(i) + _NEOX_QKV + ".lora_B.weight", fb.reshape(n * 3 * d, 3 * r).astype(dt)


def save_peft_adapter(adapters: dict[str, jax.Array], lora_cfg: LoraConfig, model_cfg: ModelConfig,
                      folder: str | Path, *, base_model_name_or_path: str | None = None,
                      task_type: str = "CAUSAL_LM", score: jax.Array | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` that ``peft.PeftModel.from_pretrained(base,
    folder)`` loads onto the transformers model of ``model_cfg``. ``score`` (a reward model's head [H], trained in
    full beside the adapters) makes it a sequence-classification adapter: the head goes in as PEFT's
    ``modules_to_save`` (``base_model.model.score.weight``, as PEFT itself saves a ``SEQ_CLS`` model), for an
    ``AutoModelForSequenceClassification`` base with one label."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    host = {k: np.asarray(jax.device_get(v)) for k, v in adapters.items()}
    r = lora_cfg.rank
    tensors = {k: np.ascontiguousarray(v) for k, v in _peft_tensors(host, model_cfg, r)}
    modules = _NEOX_MODULES if model_cfg.family == "neox" else _LLAMA_MODULES
    targets = [modules[k[: -len(SUFFIX_A)]].split(".")[-1] for k in host if k.endswith(SUFFIX_A) and
               k[: -len(SUFFIX_A)] in modules]
    rank_pattern, alpha_pattern = {}, {}
    if any(k.endswith(_NEOX_QKV + ".lora_A.weight") for k in tensors):
        targets.append("query_key_value")
        rank_pattern["query_key_value"], alpha_pattern["query_key_value"] = 3 * r, 3 * lora_cfg.alpha
    config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": lora_cfg.alpha, "lora_dropout": lora_cfg.dropout, "target_modules": sorted(targets),
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
        "inference_mode": True,
    }
    if score is not None:
        tensors["base_model.model.score.weight"] = np.asarray(jax.device_get(score)).reshape(1, -1)
        config.update(task_type="SEQ_CLS", modules_to_save=["score"])
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return folder


# PEFT's module name (the last part of its path) -> the model.lora targets that module holds
PEFT_MODULE_TARGETS: dict[str, tuple[str, ...]] = {
    module.split(".")[-1]: tuple(t for t, b in TARGETS.items() if b == base)
    for base, module in (*_LLAMA_MODULES.items(), *_NEOX_MODULES.items())}
PEFT_MODULE_TARGETS[_NEOX_QKV.split(".")[-1]] = ("q", "k", "v")


def _adapter_config(folder: str | Path) -> dict[str, Any]:
    """A PEFT folder's adapter_config.json, refused unless it is plain LoRA (a bucket folder is read in place)."""
    path = epath.Path(folder) / "adapter_config.json"
    try:
        conf = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # ValueError: bad JSON, or a path no filesystem takes (a NUL byte)
        raise ModelConfigError(f"{path}: cannot read it ({e}).") from None
    if conf.get("peft_type") != "LORA" or conf.get("use_dora") or conf.get("fan_in_fan_out"):
        raise ModelConfigError(f"{folder}: only plain LoRA adapters are supported (peft_type LORA, no DoRA, "
                               f"fan_in_fan_out false); got {conf.get('peft_type')}.")
    return conf


def _alpha(conf: dict[str, Any]) -> float:
    # rsLoRA scales by alpha / sqrt(r); the same update with alpha / r needs alpha * sqrt(r)
    return float(conf["lora_alpha"]) * (math.sqrt(int(conf["r"])) if conf.get("use_rslora") else 1.0)


def peft_adapter_settings(folder: str | Path) -> tuple[int, float, tuple[str, ...]]:
    """``(r, alpha, targets)`` that a PEFT LoRA folder's adapter_config.json declares, in ``LoraConfig``'s terms:
    alpha such that the update is ``(alpha / r) B A`` (rsLoRA's ``lora_alpha / sqrt(r)`` folded in, as
    :func:`load_peft_adapter` reads it) and the targets as ``model.lora.targets`` names, from ``target_modules``
    (plain names, or the module paths PEFT saves for ``all-linear``). Reads only the JSON file."""
    conf = _adapter_config(folder)
    modules = conf.get("target_modules")
    if not isinstance(modules, list):
        raise ModelConfigError(f"{folder}: target_modules is {modules!r}, not a list of module names (a pattern "
                               f"cannot be matched to model.lora.targets; PEFT saves a list when given one).")
    names = {m.split(".")[-1] for m in modules}
    unknown = sorted(names - PEFT_MODULE_TARGETS.keys())
    if unknown:
        raise ModelConfigError(f"{folder}: target_modules {unknown} are not projections jaxalign adapts (it adapts "
                               f"{', '.join(PEFT_MODULE_TARGETS)}).")
    held = {t for n in names for t in PEFT_MODULE_TARGETS[n]}
    return int(conf["r"]), _alpha(conf), tuple(t for t in TARGETS if t in held)


def load_peft_adapter(folder: str | Path, model_cfg: ModelConfig) -> tuple[dict[str, jax.Array], LoraConfig]:
    """Read a PEFT LoRA adapter folder (ours, or PEFT's own ``save_pretrained``) into ``(adapters, lora_cfg)``."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    conf = _adapter_config(folder)
    r, alpha = int(conf["r"]), _alpha(conf)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    modules = _NEOX_MODULES if model_cfg.family == "neox" else _LLAMA_MODULES
    pre = _layer_prefix(model_cfg)
    shapes = param_shapes(model_cfg)
    out: dict[str, list[np.ndarray]] = {}
    targets = []
    for base, module in modules.items():
        key = pre.format(0) + module + ".lora_A.weight"
        if key not in tensors:
            continue
        targets.append(next(t for t, p in TARGETS.items() if p == base))
        k = _in_dims(base)
        s = shapes[base]
        for i in range(model_cfg.num_layers):
            a = tensors[pre.format(i) + module + ".lora_A.weight"]
            b = tensors[pre.format(i) + module + ".lora_B.weight"]
            if a.shape[0] != r or b.shape[1] != r:
                raise ModelConfigError(f"{folder}: {module} of layer {i} has rank {a.shape[0]}, config r={r} "
                                       f"(per-module ranks are not supported).")
            out.setdefault(base + SUFFIX_A, []).append(a.T.reshape(*s[1:1 + k], r))
            out.setdefault(base + SUFFIX_B, []).append(b.T.reshape(r, *s[1 + k:]))
    if model_cfg.family == "neox" and pre.format(0) + _NEOX_QKV + ".lora_A.weight" in tensors:
        n, d = model_cfg.num_heads, model_cfg.head_dim
        for i in range(model_cfg.num_layers):
            fa = tensors[pre.format(i) + _NEOX_QKV + ".lora_A.weight"]
            fb = tensors[pre.format(i) + _NEOX_QKV + ".lora_B.weight"].reshape(n, 3, d, -1)
            blocks = [fb[:, j, :, j * r:(j + 1) * r] for j in range(3)]
            off = [np.abs(fb[:, j, :, : j * r]).max(initial=0) + np.abs(fb[:, j, :, (j + 1) * r:]).max(initial=0)
                   for j in range(3)]
            if fa.shape[0] != 3 * r or max(off) > 0:
                raise ModelConfigError(f"{folder}: the fused query_key_value adapter of layer {i} is not three "
                                       f"rank-{r} q/k/v adapters (rank {fa.shape[0]}, block-diagonal B needed).")
            for j, c in enumerate("qkv"):
                out.setdefault(f"w{c}{SUFFIX_A}", []).append(fa[j * r:(j + 1) * r].T)
                out.setdefault(f"w{c}{SUFFIX_B}", []).append(blocks[j].transpose(2, 0, 1))
        targets += ["q", "k", "v"]
    if not out:
        raise ModelConfigError(f"{folder}: no LoRA tensors for this model's layers (expected keys like "
                               f"{pre.format(0)}<module>.lora_A.weight).")
    dtype = jnp.dtype(model_cfg.param_dtype)
    adapters = {k: jnp.asarray(np.stack(v), dtype) for k, v in out.items()}
    lcfg = LoraConfig(rank=r, alpha=alpha, dropout=float(conf.get("lora_dropout", 0.0)),
                      targets=tuple(t for t in TARGETS if t in targets))
    return adapters, lcfg
