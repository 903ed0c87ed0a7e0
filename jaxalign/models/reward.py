"""A scalar reward head on the decoder backbone, read from and written as ``AutoModelForSequenceClassification``.

The reward of a sequence is ``score . h_last`` where ``h_last`` is the final (normed) hidden state of the token
transformers' sequence-classification heads pool: the rightmost one that is not the config's ``pad_token_id`` (the
rightmost attended token when the config has none). Where pad == EOS (SmolLM2-Instruct, or a tokenizer given EOS as
pad, as TRL does) that is the token before a closing EOS, in transformers and here alike; the export keeps that
pad id so transformers scores the exported model as it trained (``jaxalign.models.export``). A reward model's parameters are
the decoder's (without the LM head) plus ``score`` [H]; :func:`read_reward_params` is the one way the pipeline loads
one (the reward phase's initialisation, pair scoring and evaluation alike) and
``jaxalign.models.save_params(..., head="sequence_classification")`` the one way it is written.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign.models.config import ModelConfig, load_config
from jaxalign.models.decoder import forward, init_params
from jaxalign.models.hf_io import SafetensorsCheckpoint, read_params, resolve_model_folder
from jaxalign.sharding import named_sharding

SCORE_AXES = ("embed",)  # logical sharding axes of the head


def last_token_index(attention_mask: jax.Array) -> jax.Array:
    """Index of the rightmost real token of each row (works for left and right padding)."""
    t = attention_mask.shape[1]
    return t - 1 - jnp.argmax(jnp.flip(attention_mask.astype(jnp.int32), axis=1), axis=1)


def reward_forward(params, cfg: ModelConfig, input_ids, *, attention_mask=None, **kw) -> jax.Array:
    """Scalar rewards ``[B]`` (float32)."""
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, jnp.bool_)
    hidden = forward(params, cfg, input_ids, attention_mask=attention_mask, return_hidden=True, **kw)
    pooled = attention_mask if cfg.pad_token_id is None else attention_mask & (input_ids != cfg.pad_token_id)
    last = jnp.take_along_axis(hidden, last_token_index(pooled)[:, None, None], axis=1)[:, 0]
    return jnp.einsum("bh,h->b", last.astype(jnp.float32), params["score"].astype(jnp.float32))


def init_score(cfg: ModelConfig, key: jax.Array) -> jax.Array:
    # std 1/sqrt(H+1), as the IRL authors' reward-model code initialises the value head
    return (jax.random.normal(key, (cfg.hidden_size,), jnp.float32) / np.sqrt(cfg.hidden_size + 1)).astype(
        jnp.dtype(cfg.param_dtype))


def is_reward_checkpoint(folder: Path) -> bool:
    archs = json.loads((Path(folder) / "config.json").read_text()).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in archs)


def read_reward_params(folder: str | Path, cfg: ModelConfig, *, mesh=None, seed: int = 0) -> dict[str, jax.Array]:
    """A reward model's parameters from a sequence-classification checkpoint, or from a causal-LM backbone with a
    freshly initialised head (``seed``) — how every round's RM starts from the SFT model."""
    folder = resolve_model_folder(folder)
    params = read_params(folder, cfg, mesh=mesh, include_lm_head=False)
    if is_reward_checkpoint(folder):
        score = SafetensorsCheckpoint(folder).get("score.weight", (1, cfg.hidden_size)).reshape(-1)
    else:
        score = np.asarray(init_score(cfg, jax.random.PRNGKey(seed)))
    score = jnp.asarray(score, jnp.dtype(cfg.param_dtype))
    if mesh is not None:
        score = jax.device_put(score, named_sharding(SCORE_AXES, score.shape, mesh))
    params["score"] = score
    return params


class RewardModel(nnx.Module):
    """``rm(input_ids, attention_mask=...)`` returns rewards ``[B]``."""

    HF_HEAD = "sequence_classification"  # what save_pretrained writes

    def __init__(self, cfg: ModelConfig, params: dict | None = None, *, rngs: nnx.Rngs | None = None):
        self.cfg = cfg
        if params is None:
            key = (rngs or nnx.Rngs(0)).params()
            params = init_params(cfg, key)
            params.pop("lm_head", None)
            params["score"] = init_score(cfg, jax.random.fold_in(key, 1))
        self.params = nnx.Dict({k: nnx.Param(v) for k, v in params.items()})

    def param_dict(self):
        return {k: v[...] for k, v in self.params.items()}

    def __call__(self, input_ids, **kw):
        return reward_forward(self.param_dict(), self.cfg, input_ids, **kw)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, mesh=None, seed: int = 0, **overrides) -> "RewardModel":
        """From a sequence-classification checkpoint, or from a causal LM backbone with a freshly initialised head."""
        folder = resolve_model_folder(path)
        cfg = load_config(folder, **{k: v for k, v in overrides.items() if v is not None})
        return cls(cfg, read_reward_params(folder, cfg, mesh=mesh, seed=seed))
