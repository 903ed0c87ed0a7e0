"""Sequence-level KL and entropy estimates from the log-probs of sampled tokens, for the policy steps' logs.

Tokens are sampled from the policy ``q = pi_theta``; the target is ``KL[q || p]`` with ``p = pi_ref``. Per token, with
``log r = log p - log q`` (Schulman, "Approximating KL Divergence", 2020):

- k1 = ``-log r`` = ``log q - log p``: unbiased, high variance, can be negative per sample (TRL's ``objective/kl``);
- k2 = ``(log r)^2 / 2``: biased, low variance, always >= 0;
- k3 = ``(r - 1) - log r``: unbiased, low variance, always >= 0 (the GRPO / "k3" estimator).

Sequence values are sums over the masked tokens (the KL between sequence distributions is the sum of the per-token
conditional KLs). ``entropy`` is ``-sum log q`` of the sampled tokens: an unbiased estimate of the sequence entropy.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxalign.losses.dil import capped_exp
from jaxalign.losses.numerics import as_float32


def token_kl(policy_token_logps: ArrayLike, ref_token_logps: ArrayLike) -> dict[str, jax.Array]:
    """Per-token ``{"k1", "k2", "k3", "entropy"}``, each shaped like the inputs (float32), unmasked.

    For the on-policy losses, which need the estimators per token (GRPO's k3 penalty, PPO's per-token k1 reward).
    ``r`` in k3 uses the linearly continued exp of `dil.capped_exp`, so a token whose ``log r`` exceeds 50 gives a
    large finite value instead of inf.
    """
    q, p = as_float32(policy_token_logps, ref_token_logps)
    log_r = p - q
    return {
        "k1": -log_r,
        "k2": 0.5 * log_r**2,
        "k3": capped_exp(log_r) - 1.0 - log_r,
        "entropy": -q,
    }


def sequence_kl(policy_token_logps: ArrayLike, ref_token_logps: ArrayLike, mask: ArrayLike) -> dict[str, jax.Array]:
    """Per-sequence ``{"k1", "k2", "k3", "entropy"}``, each [B], from [B, T] sampled-token log-probs.

    ``policy_token_logps`` must be the log-probs of the distribution that produced the tokens (the sampler's, at its
    temperature), else k1 / k3 estimate nothing in particular. The per-token values are `token_kl`'s.
    """
    m = jnp.asarray(mask).astype(jnp.float32)
    per_token = token_kl(policy_token_logps, ref_token_logps)
    return {k: jnp.sum(jnp.where(m != 0, v * m, 0.0), axis=-1) for k, v in per_token.items()}
