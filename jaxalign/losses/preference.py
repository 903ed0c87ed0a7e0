"""Pairwise preference losses on sequence log-probabilities: the DPO family and SimPO.

Inputs are per-sequence log-probs [B] (`sequence_logprobs`), any float dtype; the math runs in float32. Each loss is
the batch mean and comes back beside TRL-named metrics (``rewards/chosen`` = beta * (policy - ref) log-ratio, ...) so
curves overlay TRL runs.
"""
from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxalign.losses.numerics import as_float32

DPO_VARIANTS = ("sigmoid", "ipo", "hinge", "robust")


def preference_metrics(chosen_rewards: jax.Array, rejected_rewards: jax.Array, policy_chosen: ArrayLike,
                       policy_rejected: ArrayLike) -> dict[str, jax.Array]:
    """TRL DPOTrainer's metric names. Accuracy is strict (ties count as wrong), as ``chosen > rejected`` in TRL."""
    chosen_rewards, rejected_rewards = jax.lax.stop_gradient((chosen_rewards, rejected_rewards))
    return {
        "rewards/chosen": jnp.mean(chosen_rewards),
        "rewards/rejected": jnp.mean(rejected_rewards),
        "rewards/margins": jnp.mean(chosen_rewards - rejected_rewards),
        "rewards/accuracies": jnp.mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
        "logps/chosen": jnp.mean(jax.lax.stop_gradient(policy_chosen)),
        "logps/rejected": jnp.mean(jax.lax.stop_gradient(policy_rejected)),
    }


def _check_range(name: str, value: float | jax.Array, lo: float, hi: float, hi_open: bool = False) -> None:
    # Only concrete Python numbers are checked: a traced hyper-parameter (swept under vmap) passes through.
    if isinstance(value, numbers.Real) and not (lo <= value and (value < hi if hi_open else value <= hi)):
        raise ValueError(f"{name} must be in [{lo}, {hi}{')' if hi_open else ']'}, got {value}")


def dpo_loss(policy_chosen: ArrayLike, policy_rejected: ArrayLike, ref_chosen: ArrayLike, ref_rejected: ArrayLike, *,
             beta: float | jax.Array = 0.1, variant: str = "sigmoid",
             label_smoothing: float | jax.Array = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DPO and its TRL variants on the log-ratio margin ``d = (pc - rc) - (pr - rr)``.

    - ``sigmoid``: ``-(1-eps) logsig(beta d) - eps logsig(-beta d)``; eps = 0 is DPO (Rafailov et al. 2023, eq. 7),
      eps > 0 is conservative DPO (cDPO, Mitchell 2023). TRL ``loss_type="sigmoid"``.
    - ``ipo``: ``(d - 1/(2 beta))^2`` (Azar et al. 2023, beta plays IPO's tau); TRL feeds it MEAN log-probs.
    - ``hinge``: ``relu(1 - beta d)`` (SLiC, Zhao et al. 2023). TRL ``loss_type="hinge"``.
    - ``robust``: ``(-(1-eps) logsig(beta d) + eps logsig(-beta d)) / (1 - 2 eps)``, unbiased under label flips with
      rate eps (rDPO, Chowdhury et al. 2024). TRL ``loss_type="robust"``; eps must be < 1/2.

    Matches TRL ``DPOTrainer.dpo_loss`` (losses and ``rewards/*`` metrics). SPIN is the ``sigmoid`` variant with the
    demonstration as chosen, the previous iterate's sample as rejected and the previous iterate as reference. Returns
    ``(mean loss, metrics)``; inputs [B] log-probs (sum reduction for DPO as in the paper and TRL).
    """
    if variant not in DPO_VARIANTS:
        raise ValueError(f"unknown dpo variant {variant!r}; valid: {', '.join(DPO_VARIANTS)}")
    _check_range("label_smoothing", label_smoothing, 0.0, 0.5, hi_open=(variant == "robust"))
    if variant == "ipo" and isinstance(beta, numbers.Real) and beta <= 0:
        raise ValueError(f"ipo needs beta > 0 (it targets a margin of 1/(2 beta)), got {beta}")
    pc, pr, rc, rr = as_float32(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    u_w, u_l = pc - rc, pr - rr
    d = u_w - u_l
    eps = label_smoothing
    if variant == "sigmoid":
        losses = -(1.0 - eps) * jax.nn.log_sigmoid(beta * d) - eps * jax.nn.log_sigmoid(-beta * d)
    elif variant == "robust":
        losses = (-(1.0 - eps) * jax.nn.log_sigmoid(beta * d) + eps * jax.nn.log_sigmoid(-beta * d)) / (1.0 - 2.0 * eps)
    elif variant == "hinge":
        losses = jax.nn.relu(1.0 - beta * d)
    else:
        losses = (d - 1.0 / (2.0 * beta)) ** 2
    return jnp.mean(losses), preference_metrics(beta * u_w, beta * u_l, pc, pr)


def simpo_loss(policy_chosen: ArrayLike, policy_rejected: ArrayLike, *, beta: float | jax.Array = 2.0,
               gamma: float | jax.Array = 0.5) -> tuple[jax.Array, dict[str, jax.Array]]:
    """SimPO (Meng et al. 2024), reference-free: ``-logsig(beta (mlp_w - mlp_l) - gamma)``.

    Inputs are MEAN (length-normalised) policy log-probs. ``gamma`` is the target reward margin itself, as in
    the SimPO paper (arXiv 2405.14734) and TRL's CPOTrainer (``loss_type="simpo"``, ``simpo_gamma``). The SimPO authors'
    SimPOTrainer takes ``gamma_beta_ratio`` instead and computes ``-logsig(beta (d - gamma_beta_ratio))``: pass
    ``gamma = beta * gamma_beta_ratio`` to reproduce one of their recipes. Metrics follow TRL: rewards = beta * mean
    log-prob.
    """
    pc, pr = as_float32(policy_chosen, policy_rejected)
    losses = -jax.nn.log_sigmoid(beta * (pc - pr) - gamma)
    return jnp.mean(losses), preference_metrics(beta * pc, beta * pr, pc, pr)
