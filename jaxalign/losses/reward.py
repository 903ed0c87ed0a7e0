"""Reward-model losses: Bradley-Terry (preferences, and IRL's demonstration-vs-sample pairs) and AfD's discriminator."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxalign.losses.numerics import as_float32


def bradley_terry_loss(chosen_rewards: ArrayLike, rejected_rewards: ArrayLike, *, margin: ArrayLike = 0.0,
                       center_coef: float | jax.Array = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``L = -mean logsig(r_w - r_l - margin) + center_coef * mean((r_w + r_l)^2)``.

    Bradley-Terry reward modelling as in InstructGPT / TRL ``RewardTrainer`` (``margin`` per pair or scalar, as
    Llama-2's margin loss; ``center_coef`` is TRL's ``center_rewards_coefficient``, Eisenstein et al. 2023). The IRL
    paper ("From Demonstrations to Rewards") uses the same loss with the demonstration as ``r_w`` and the current
    policy's sample as ``r_l``. Rewards are scalars [B] from the reward head.
    """
    r_w, r_l, margin = as_float32(chosen_rewards, rejected_rewards, margin)
    loss = -jnp.mean(jax.nn.log_sigmoid(r_w - r_l - margin)) + center_coef * jnp.mean((r_w + r_l) ** 2)
    r_w, r_l = jax.lax.stop_gradient((r_w, r_l))
    return loss, {
        "rewards/chosen": jnp.mean(r_w),
        "rewards/rejected": jnp.mean(r_l),
        "rewards/margins": jnp.mean(r_w - r_l),
        "rewards/accuracies": jnp.mean((r_w > r_l).astype(jnp.float32)),
    }


def afd_discriminator_loss(positive_logits: ArrayLike,
                           negative_logits: ArrayLike) -> tuple[jax.Array, dict[str, jax.Array]]:
    """AfD's discriminator (Alignment from Demonstrations, Sun & van der Schaar 2024): demonstrations are
    positives, policy samples negatives, ``D = sigmoid(logit)``, maximise ``E_demo log D + E_pi log(1 - D)``:

    ``L = -mean logsig(logit_pos) - mean logsig(-logit_neg)``

    (each class averaged over its own batch, so the two sets may differ in size; this is twice the BCE of a balanced
    concatenated batch). The reward for the policy step is the logit itself, ``log D - log(1 - D)``.
    Metrics: ``accuracy`` (mean of the per-class accuracies, threshold logit 0), ``accuracy/positive``,
    ``accuracy/negative``, ``rewards/positive``, ``rewards/negative``, ``rewards/margins``.
    """
    pos, neg = as_float32(positive_logits, negative_logits)
    loss = -jnp.mean(jax.nn.log_sigmoid(pos)) - jnp.mean(jax.nn.log_sigmoid(-neg))
    pos, neg = jax.lax.stop_gradient((pos, neg))
    acc_pos = jnp.mean((pos > 0).astype(jnp.float32))
    acc_neg = jnp.mean((neg < 0).astype(jnp.float32))
    return loss, {
        "accuracy": 0.5 * (acc_pos + acc_neg),
        "accuracy/positive": acc_pos,
        "accuracy/negative": acc_neg,
        "rewards/positive": jnp.mean(pos),
        "rewards/negative": jnp.mean(neg),
        "rewards/margins": jnp.mean(pos) - jnp.mean(neg),
    }
