"""DIL: alignment as imitation of the chosen-response distribution (Xiao et al., "On a Connection Between Imitation
Learning and RLHF", ICLR 2025; code: github.com/tengxiao1/DIL, ``scripts/dpo_trainer.py``, ``DPOTrainer.dpo_loss``).

The policy's implicit density ratio ``r_theta = exp(u)``, ``u = lp_theta - lp_ref``, is fitted to
``pi_chosen / pi_ref`` by Bregman density-ratio estimation: chosen responses are numerator samples, rejected ones
denominator samples. The authors feed MEAN token log-probs and apply no beta.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxalign.losses.numerics import as_float32
from jaxalign.losses.preference import preference_metrics

DIL_VARIANTS = ("lsif", "ukl", "bce", "lsif_ref_free")

# exp() is continued linearly (matching value and slope) past this argument. Reason: LSIF's exp(2 u_l) overflows
# float32 at u_l ~ 44, so a log-ratio of 50 would give inf/nan. Linear continuation keeps the loss and its gradient
# finite, still increasing and convex, and its gradient non-zero (a clip would silence the very runaway sample that
# most needs pushing down). exp(50) ~ 5e21 leaves 1e16 of float32 headroom for batch sums; mean-log-prob ratios (the
# authors' setting, |u| of a few units) and sum-log-prob ratios up to |u| = 25 never reach it.
EXP_CAP = 50.0


def capped_exp(x: jax.Array | float) -> jax.Array:
    """exp(x) for x <= EXP_CAP, continued linearly (same value and slope at the cap) above it."""
    safe = jnp.exp(jnp.minimum(x, EXP_CAP))
    return jnp.where(x <= EXP_CAP, safe, safe * (1.0 + (x - EXP_CAP)))


def dil_loss(policy_chosen: ArrayLike, policy_rejected: ArrayLike, ref_chosen: ArrayLike, ref_rejected: ArrayLike, *,
             variant: str = "lsif", beta: float | jax.Array = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DIL density-ratio losses on ``u_w = pc - rc``, ``u_l = pr - rr`` (batch mean):

    - ``lsif``: ``-exp(beta u_w) + 0.5 exp(2 beta u_l)`` (least-squares importance fitting; the authors' recipe).
    - ``ukl``: ``-beta u_w + exp(beta u_l)`` (unnormalised KL / KLIEP). The authors' code writes ``-pc`` for the first
      term: same gradient, value shifted by ``mean(rc)``; we keep ``-u_w`` so the loss does not depend on the
      reference's level and is 1 at ``pi = pi_ref``.
    - ``bce``: ``-logsig(beta u_w) - logsig(-beta u_l)`` (logistic-regression ratio estimation).
    - ``lsif_ref_free``: LSIF with the reference dropped (``u_w = pc``, ``u_l = pr``); ``ref_*`` are ignored. From the
      authors' development branch, not their released trainer.

    ``beta`` scales the log-ratio (``r_theta = exp(beta u)``); the authors' code has no beta, i.e. ``beta = 1`` (the
    default) reproduces it exactly. ``beta != 1`` gives the beta-scaled forms of their development branch (not in the
    released trainer; our reading), e.g. UKL ``-beta u_w + exp(beta u_l)``. exp is continued linearly past an argument
    of ``EXP_CAP`` = 50 (see above). DPO is the same estimation with a contrastive (InfoNCE) objective: `dpo_loss`.

    Metrics use TRL's names with TRL's meaning (``rewards/*`` = beta * log-ratio); the authors' trainer logged the
    policy log-probs under ``rewards/*``, which are here ``logps/*``.
    """
    if variant not in DIL_VARIANTS:
        raise ValueError(f"unknown dil variant {variant!r}; valid: {', '.join(DIL_VARIANTS)}")
    pc, pr, rc, rr = as_float32(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    if variant == "lsif_ref_free":
        rc, rr = jnp.zeros_like(rc), jnp.zeros_like(rr)
    z_w, z_l = beta * (pc - rc), beta * (pr - rr)
    if variant in ("lsif", "lsif_ref_free"):
        losses = -capped_exp(z_w) + 0.5 * capped_exp(2.0 * z_l)
    elif variant == "ukl":
        losses = -z_w + capped_exp(z_l)
    else:
        losses = -jax.nn.log_sigmoid(z_w) - jax.nn.log_sigmoid(-z_l)
    return jnp.mean(losses), preference_metrics(z_w, z_l, pc, pr)
