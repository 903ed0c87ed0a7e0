"""Supervised fine-tuning (behaviour cloning) loss; also AfD's forward-KL objective."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxalign.losses.logprobs import token_logprobs_and_top1


def sft_loss(logits: jax.Array, targets: jax.Array, mask: ArrayLike) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Token-mean negative log-likelihood over the masked tokens of the whole batch:

    ``L = -sum_{b,t} m_bt log pi(y_bt | x, y_<t) / sum_{b,t} m_bt``

    (completion-only when ``mask`` covers the assistant tokens). A long answer weighs more than a short one, as in TRL's
    SFTTrainer and Hugging Face's causal-LM loss (mean over non -100 labels). ``logits[:, t]`` scores ``targets[:, t]``
    (the caller shifts); ``mask`` may be bool / int / float. An all-masked batch gives 0, not nan.

    Metrics (TRL SFTTrainer names): ``mean_token_accuracy`` (target is the top-1 logit), ``num_tokens`` (masked tokens
    in this batch).
    """
    logps, top1 = token_logprobs_and_top1(logits, targets)
    m = jnp.asarray(mask).astype(jnp.float32)
    count = jnp.sum(m)
    denom = jnp.where(count != 0, count, 1.0)
    loss = -jnp.sum(jnp.where(m != 0, logps * m, 0.0)) / denom
    accuracy = jnp.sum(jnp.where(m != 0, top1 * m, 0.0)) / denom
    return loss, {"mean_token_accuracy": jax.lax.stop_gradient(accuracy), "num_tokens": count}
