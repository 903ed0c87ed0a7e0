"""PPO's value head: a scalar per token, ``V_t = v . h_t`` on the final (normed) hidden states of the policy's own
backbone, so one forward gives the policy's logits and its values.

Shared backbone (TRL's former ``AutoModelForCausalLMWithValueHead``) rather than TRL PPOTrainer's separate value model
initialised from the reward model: the rollout and the update already hold the policy, its optimizer state, the
reference and the reward model on the devices, and a second trained backbone would add its weights, gradients and
AdamW moments again. The head starts at zero (a fresh head on the SFT backbone): the first values are 0 and the value
loss sends no gradient into the shared backbone until the head has learnt something.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxalign.models.config import ModelConfig
from jaxalign.models.decoder import forward
from jaxalign.sharding import constrain, named_sharding

VALUE_AXES = ("embed",)  # logical sharding axes of the head
VALUE_HEAD = "value_head"  # its key in the policy's parameter dict


def init_value_head(cfg: ModelConfig, mesh=None) -> jax.Array:
    head = jnp.zeros((cfg.hidden_size,), jnp.dtype(cfg.param_dtype))
    return head if mesh is None else jax.device_put(head, named_sharding(VALUE_AXES, head.shape, mesh))


def without_value_head(params: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The causal LM alone (what the sampler and the saved model see)."""
    return {k: v for k, v in params.items() if k != VALUE_HEAD}


def logits_and_values(params, cfg: ModelConfig, input_ids, *, attention_mask=None, **fwd):
    """``(logits [B, T, V], values [B, T] float32)`` from one forward; values are None without a value head.
    ``fwd``: the decoder forward's LoRA arguments (``lora=``, ``dropout_rng=``)."""
    if VALUE_HEAD not in params:
        return forward(params, cfg, input_ids, attention_mask=attention_mask, **fwd), None
    hidden = forward(params, cfg, input_ids, attention_mask=attention_mask, return_hidden=True, **fwd)
    head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    logits = constrain(jnp.einsum("bth,hv->btv", hidden, head.astype(hidden.dtype)), ("batch", "length", "vocab"))
    values = jnp.einsum("bth,h->bt", hidden.astype(jnp.float32), params[VALUE_HEAD].astype(jnp.float32))
    return logits, values
