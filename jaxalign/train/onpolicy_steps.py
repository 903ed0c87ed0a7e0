"""The on-policy step's pieces: the rollout's token log-probs (policy, reference) and values, the advantages of a
rollout batch, and the loss the jitted train step (``StepConfig("onpolicy")`` in :mod:`jaxalign.train.steps`)
minimises on each mini-batch — RLOO, GRPO / Dr. GRPO, PPO with a value head.

Layout of a rollout batch of ``R = P x N`` sequences (row ``p * N + j`` is sample ``j`` of prompt ``p``): ``input_ids``,
``attention_mask``, ``loss_mask`` [R, T] (right-padded prompt + sampled response, the mask on the response tokens);
per-token arrays ``old_logps``, ``ref_logps``, ``old_values``, ``returns`` and PPO's ``advantages`` are [R, T - 1],
aligned with the targets ``input_ids[:, 1:]``; RLOO / GRPO ``advantages`` are [R].

Log-probs are of ``logits / temperature`` for the policy and the reference alike, as TRL's PPO / RLOO / GRPO trainers
compute them: the sampled tokens' distribution is the tempered one.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from jaxalign import sharding
from jaxalign.losses import (gae, grpo_advantages, grpo_loss, kl_penalized_rewards, masked_whiten, ppo_policy_loss,
                             ppo_token_rewards, ppo_value_loss, rloo_advantages, token_logprobs)
from jaxalign.models.config import ModelConfig
from jaxalign.models.lora import LoraConfig, join_trainable
from jaxalign.models.value import logits_and_values
from jaxalign.rules import REWARD_KINDS

ONPOLICY_KINDS = REWARD_KINDS  # the kinds this module has a loss for (jaxalign.rules)


@dataclasses.dataclass(frozen=True)
class OnPolicySettings:
    kind: str  # rloo | grpo | ppo
    num_samples: int = 1  # N per prompt (rloo / grpo groups)
    temperature: float = 1.0
    clip: float = 0.2
    clip_high: float | None = None  # DAPO's clip-higher: the ratio's upper bound 1 + clip_high (None = clip)
    kl_coef: float = 0.05
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    grpo_scale: bool = True
    length_norm: str = "sequence"
    whiten_advantages: bool = True
    max_new_tokens: int | None = None  # Dr. GRPO's constant normaliser
    # GRPO: k3 x the ratio pi / pi_old (TRL 1.16's default use_bias_correction_kl=True); False: plain k3
    kl_bias_correction: bool = True

    def __post_init__(self):
        if self.kind not in ONPOLICY_KINDS:
            raise ValueError(f"on-policy kind {self.kind!r}; choose one of {', '.join(ONPOLICY_KINDS)}")


def tempered_token_logps(params, cfg: ModelConfig, input_ids, attention_mask, temperature: float, **fwd):
    """``(log pi_T(y_t | y_<t) [B, T - 1], values [B, T - 1] or None)`` of ``logits / temperature`` (``fwd``: LoRA's
    forward arguments)."""
    logits, values = logits_and_values(params, cfg, input_ids[:, :-1], attention_mask=attention_mask[:, :-1], **fwd)
    if temperature != 1.0:
        logits = logits / jnp.asarray(temperature, logits.dtype)
    return token_logprobs(logits, input_ids[:, 1:]), values


def make_rollout_logps(cfg: ModelConfig, mesh, temperature: float, lora: LoraConfig | None = None) -> Callable:
    """Jitted ``(params, input_ids, attention_mask, frozen=None) -> (token_logps, values)`` for the rollout (no
    gradient): the policy's (values with PPO's head) and the reference's. With ``lora`` the params are the trainable
    tree and ``frozen`` the base they sit on, evaluated as the train step evaluates them (adapters unmerged)."""
    def fn(params, ids, attn, frozen=None):
        fwd = {}
        if lora is not None:
            params, adapters = join_trainable(params, frozen)
            fwd = {"lora": (adapters, lora)}
        with sharding.activate(mesh):
            return tempered_token_logps(params, cfg, ids, attn, temperature, **fwd)

    return jax.jit(fn)


def _whiten(x):
    return (x - jnp.mean(x)) * jax.lax.rsqrt(jnp.var(x) + 1e-8)


def rollout_advantages(s: OnPolicySettings, scores, logps, ref_logps, values, mask):
    """A rollout batch's training targets -> ``(arrays for the batch, rollout metrics)``.

    RLOO: ``score - kl_coef * k1`` per sequence, leave-one-out baseline over each prompt's N samples (TRL RLOOTrainer);
    GRPO: group-relative advantages of the scores, the k3 KL left to the loss; PPO: per-token ``-kl_coef * k1`` plus
    the score on the last token, GAE over the rollout's values, whitened (TRL PPOTrainer)."""
    m = mask.astype(jnp.float32)
    if s.kind == "ppo":
        rewards, metrics = ppo_token_rewards(scores, logps, ref_logps, m, kl_coef=s.kl_coef)
        adv, returns = gae(rewards, values, m, gamma=s.gamma, lam=s.lam)
        if s.whiten_advantages:
            adv = masked_whiten(adv, m)
        return {"advantages": adv, "returns": returns, "old_values": values * m}, metrics
    rewards, metrics = kl_penalized_rewards(scores, logps, ref_logps, m, kl_coef=s.kl_coef)
    if s.kind == "rloo":
        adv = rloo_advantages(rewards.reshape(-1, s.num_samples)).reshape(-1)
        return {"advantages": _whiten(adv) if s.whiten_advantages else adv}, metrics
    # GRPO: the KL is a loss term, so the advantages come from the scores alone; the rollout metrics keep TRL's
    # objective/* (rlhf_reward = score - kl_coef * k1, as logged by the other kinds)
    # TRL's torch.std: Bessel-corrected
    adv = grpo_advantages(scores.reshape(-1, s.num_samples), scale=s.grpo_scale, ddof=1).reshape(-1)
    return {"advantages": adv}, metrics


def make_rollout_advantages(s: OnPolicySettings) -> Callable:
    return jax.jit(lambda *a: rollout_advantages(s, *a))


def onpolicy_loss_fn(params, cfg: ModelConfig, batch, s: OnPolicySettings, **fwd):
    """The mini-batch loss: RLOO's clipped REINFORCE on sequence log-probs, GRPO's token loss with the k3 KL term,
    or PPO's clipped policy loss + ``vf_coef`` x clipped value loss (``fwd``: LoRA's forward arguments)."""
    logp, values = tempered_token_logps(params, cfg, batch["input_ids"], batch["attention_mask"], s.temperature,
                                        **fwd)
    mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
    old = batch["old_logps"]
    if s.kind == "rloo":  # TRL RLOOTrainer: the ratio of whole-sequence probabilities
        seq, old_seq = (jnp.sum(jnp.where(mask != 0, x, 0.0), axis=-1, keepdims=True) for x in (logp, old))
        ones = jnp.ones_like(seq)
        loss, metrics = ppo_policy_loss(seq, old_seq, batch["advantages"][:, None], ones, clip=s.clip,
                                        clip_high=s.clip_high)
    elif s.kind == "grpo":
        loss, metrics = grpo_loss(logp, old, batch["ref_logps"], batch["advantages"], mask, clip=s.clip,
                                  clip_high=s.clip_high, kl_coef=s.kl_coef, length_norm=s.length_norm,
                                  max_len=s.max_new_tokens, kl_bias_correction=s.kl_bias_correction)
    else:
        policy, metrics = ppo_policy_loss(logp, old, batch["advantages"], mask, clip=s.clip, clip_high=s.clip_high)
        value, vmetrics = ppo_value_loss(values, batch["old_values"], batch["returns"], mask, clip=s.clip)
        loss = policy + s.vf_coef * value
        metrics = {**metrics, **vmetrics}
    return loss, {"loss": loss, **metrics}
