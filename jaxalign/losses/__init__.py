"""Alignment losses as pure functions of arrays: SFT, Bradley-Terry / IRL rewards, the DPO family, SimPO, DIL, AfD, and
the on-policy (PPO / GRPO / RLOO) math.

Imports nothing but jax and numpy, so other JAX code can use it alone. Every loss takes per-sequence (or per-token)
log-probabilities or rewards, computes in float32 whatever the input dtype, works under ``jit`` / ``vmap`` / ``grad``,
and returns ``(batch-mean loss, metrics)`` with TRL's metric names. Formulas, papers and the reference code each
matches: docs/losses.md and each function's docstring.

- `logprobs`: `token_logprobs`, `sequence_logprobs` (sum | mean)
- `numerics`: `as_float32` (the float32 upcast every loss applies to its inputs)
- `sft`: `sft_loss`
- `reward`: `bradley_terry_loss`, `afd_discriminator_loss`
- `preference`: `dpo_loss` (sigmoid / cDPO, ipo, hinge, robust), `simpo_loss`
- `dil`: `dil_loss` (lsif, ukl, bce, lsif_ref_free)
- `kl`: `sequence_kl`, `token_kl` (Schulman's k1 / k2 / k3, entropy)
- `onpolicy`: `rloo_advantages`, `grpo_advantages` (GRPO / Dr. GRPO), `gae`, `masked_mean`, `masked_whiten`,
  `kl_penalized_rewards` (RLOO), `ppo_token_rewards` (PPO), `ppo_policy_loss`, `ppo_value_loss`,
  `grpo_loss` (GRPO / DAPO / Dr. GRPO normalisers), `rloo_loss`
- `pairs`: `PAIR_RULES` (max_min, max_random)
- `registry`: `OBJECTIVES`, `get_objective("dpo" | "ipo" | "dil_lsif" | "simpo" | ...)`
"""
from jaxalign.losses.dil import DIL_VARIANTS, dil_loss
from jaxalign.losses.kl import sequence_kl, token_kl
from jaxalign.losses.logprobs import sequence_logprobs, token_logprobs, token_logprobs_and_top1
from jaxalign.losses.numerics import as_float32
from jaxalign.losses.onpolicy import (LENGTH_NORMS, gae, grpo_advantages, grpo_loss, kl_penalized_rewards,
                                      masked_mean, masked_whiten, ppo_policy_loss, ppo_token_rewards, ppo_value_loss,
                                      rloo_advantages, rloo_loss)
from jaxalign.losses.pairs import PAIR_RULES, max_min, max_random
from jaxalign.losses.preference import DPO_VARIANTS, dpo_loss, preference_metrics, simpo_loss
from jaxalign.losses.registry import OBJECTIVES, Objective, get_objective
from jaxalign.losses.reward import afd_discriminator_loss, bradley_terry_loss
from jaxalign.losses.sft import sft_loss

__all__ = [
    "DIL_VARIANTS",
    "DPO_VARIANTS",
    "LENGTH_NORMS",
    "OBJECTIVES",
    "Objective",
    "PAIR_RULES",
    "afd_discriminator_loss",
    "as_float32",
    "bradley_terry_loss",
    "dil_loss",
    "dpo_loss",
    "gae",
    "get_objective",
    "grpo_advantages",
    "grpo_loss",
    "kl_penalized_rewards",
    "masked_mean",
    "masked_whiten",
    "max_min",
    "max_random",
    "ppo_policy_loss",
    "ppo_token_rewards",
    "ppo_value_loss",
    "preference_metrics",
    "rloo_advantages",
    "rloo_loss",
    "sequence_kl",
    "sequence_logprobs",
    "sft_loss",
    "simpo_loss",
    "token_kl",
    "token_logprobs",
    "token_logprobs_and_top1",
]
