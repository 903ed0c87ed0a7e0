"""On-policy RL math: advantages (RLOO, GRPO / Dr. GRPO, GAE), KL-shaped rewards, and the PPO / GRPO / REINFORCE
losses, as pure functions of per-token or per-sequence log-probs, rewards and values.

Layout: ``[B, T]`` token arrays with ``mask`` 1 on response tokens (contiguous per row), ``[B]`` sequence arrays, and
``[P, N]`` rewards for N samples of each of P prompts (row ``p * N + j`` of a flattened batch is sample ``j`` of prompt
``p``, as `jaxalign.sampling.generate` returns them). Everything runs in float32 whatever the input dtype; masked
positions are dropped with ``where``, so junk there is harmless and gets no gradient. Advantages, old log-probs, old
values and returns are constants of the losses (``stop_gradient``), as in TRL where they come from the rollout.
Metric names are TRL's (PPOTrainer / RLOOTrainer / GRPOTrainer) where it has one.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxalign.losses.kl import sequence_kl, token_kl

LENGTH_NORMS = ("sequence", "token", "constant")


def _f32(*xs: ArrayLike) -> tuple[jax.Array, ...]:
    return tuple(jnp.asarray(x).astype(jnp.float32) for x in xs)


def _mask(mask: ArrayLike) -> jax.Array:
    return jnp.asarray(mask).astype(jnp.float32)


def _on_mask(m: jax.Array, *xs: ArrayLike) -> tuple[jax.Array, ...]:
    """float32 inputs with 0 off the mask: junk there (-inf padding log-probs) would otherwise turn the zero
    cotangent of a ``where`` into nan through exp / square."""
    return tuple(jnp.where(m != 0, x, 0.0) for x in _f32(*xs))


def _masked_sum(x: jax.Array, m: jax.Array, axis: int | tuple[int, ...] | None = None) -> jax.Array:
    return jnp.sum(jnp.where(m != 0, x * m, 0.0), axis=axis)


def masked_mean(x: ArrayLike, mask: ArrayLike, axis: int | tuple[int, ...] | None = None) -> jax.Array:
    """``sum(m x) / sum(m)`` over ``axis`` (all tokens of the batch by default: TRL's ``masked_mean``); 0 where the
    mask is empty instead of nan."""
    m = _mask(mask)
    count = jnp.sum(m, axis=axis)
    return _masked_sum(jnp.asarray(x).astype(jnp.float32), m, axis) / jnp.where(count != 0, count, 1.0)


def masked_whiten(x: ArrayLike, mask: ArrayLike, *, shift_mean: bool = True,
                  eps: float | jax.Array = 1e-8) -> jax.Array:
    """``(x - mean) / sqrt(var + eps)`` with the masked mean and the Bessel-corrected masked variance over every mask
    token of the batch (TRL ``masked_whiten``, which PPOTrainer applies to the GAE advantages); ``shift_mean=False``
    adds the mean back. Masked positions come back 0."""
    m = _mask(mask)
    (x,) = _on_mask(m, x)
    mean = masked_mean(x, m)
    n = jnp.sum(m)
    var = masked_mean((x - mean) ** 2, m) * n / jnp.maximum(n - 1.0, 1.0)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    return jnp.where(m != 0, out if shift_mean else out + mean, 0.0)


# ---- advantages -------------------------------------------------------------------------------------------------


def _group_offsets(rewards: ArrayLike) -> jax.Array:
    """Rewards minus each group's first reward: the advantages are shift-invariant, and a group that ties becomes
    exact zeros, whose advantages are then exactly 0 (float32 ``sum(r) / N`` of N equal rewards is not always equal
    to them, and GRPO's division by ``std + eps`` would blow the rounding up to ~1e-3)."""
    (r,) = _f32(rewards)
    return r - r[..., :1]


def rloo_advantages(rewards: ArrayLike) -> jax.Array:
    """REINFORCE leave-one-out: ``A_i = r_i - mean_{j != i} r_j`` over each prompt's N samples, ``rewards [P, N]``.

    Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback";
    TRL ``RLOOTrainer`` (``baseline = (rlhf_reward.sum(0) - rlhf_reward) / (rloo_k - 1)``). Needs N >= 2. The
    advantages of a prompt sum to zero.
    """
    r = _group_offsets(rewards)
    n = r.shape[-1]
    if n < 2:
        raise ValueError(f"rloo_advantages needs at least 2 samples per prompt, got {n}")
    baseline = (jnp.sum(r, axis=-1, keepdims=True) - r) / (n - 1)
    return r - baseline


def grpo_advantages(rewards: ArrayLike, *, scale: bool = True, eps: float | jax.Array = 1e-4,
                    ddof: int = 0) -> jax.Array:
    """Group-relative advantages over each prompt's N samples, ``rewards [P, N]``:
    ``(r - mean) / (std + eps)``, or Dr. GRPO's ``r - mean`` with ``scale=False``.

    GRPO: Shao et al. 2024, "DeepSeekMath" (eq. for outcome supervision); Dr. GRPO: Liu et al. 2025, "Understanding
    R1-Zero-Like Training", which drops the std division as a difficulty bias. ``std`` is the population std
    (``ddof=0``); TRL ``GRPOTrainer`` uses torch's Bessel-corrected ``std``, i.e. ``ddof=1``.
    """
    r = _group_offsets(rewards)
    centred = r - jnp.mean(r, axis=-1, keepdims=True)
    if not scale:
        return centred
    n = r.shape[-1]
    std = jnp.sqrt(jnp.sum(centred**2, axis=-1, keepdims=True) / max(n - ddof, 1))
    return centred / (std + eps)


def gae(rewards: ArrayLike, values: ArrayLike, mask: ArrayLike, *, gamma: float | jax.Array = 1.0,
        lam: float | jax.Array = 0.95) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over ``[B, T]`` per-token rewards and values -> ``(advantages, returns)``.

    ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lam A_{t+1}``, ``returns = A + V`` (Schulman et
    al. 2016). Rewards and values off the mask count as 0, so the episode ends after a row's last response token
    (``V`` past it is 0) and nothing past it contributes; both outputs are 0 off the mask. TRL ``PPOTrainer``'s
    reversed loop (``lastgaelam``), whose TL;DR PPO recipe the IRL authors ran; here a reversed ``lax.scan`` over time.
    TRL then whitens the advantages: `masked_whiten`.
    """
    m = _mask(mask)
    r, v = _on_mask(m, rewards, values)
    next_v = jnp.concatenate([v[:, 1:], jnp.zeros_like(v[:, :1])], axis=1)
    delta = r + gamma * next_v - v

    def step(carry: jax.Array, d: jax.Array) -> tuple[jax.Array, jax.Array]:
        carry = d + gamma * lam * carry
        return carry, carry

    _, adv = jax.lax.scan(step, jnp.zeros_like(delta[:, 0]), delta.T, reverse=True)
    adv = jnp.where(m != 0, adv.T, 0.0)
    return adv, jnp.where(m != 0, adv + v, 0.0)


# ---- KL-shaped rewards (rollout side) ---------------------------------------------------------------------------


def _rollout_metrics(scores: jax.Array, kl: jax.Array, entropy: jax.Array, non_score: jax.Array,
                     total: jax.Array) -> dict[str, jax.Array]:
    return jax.lax.stop_gradient({
        "objective/kl": jnp.mean(kl),
        "objective/entropy": jnp.mean(entropy),
        "objective/non_score_reward": jnp.mean(non_score),
        "objective/rlhf_reward": jnp.mean(total),
        "objective/scores": jnp.mean(scores),
    })


def kl_penalized_rewards(scores: ArrayLike, policy_token_logps: ArrayLike, ref_token_logps: ArrayLike,
                         mask: ArrayLike, *, kl_coef: float | jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-sequence ``score - kl_coef * sum_t k1_t`` with ``k1 = log pi - log pi_ref`` over the response tokens
    -> ``(rewards [B], metrics)``: the KL folded into the reward, as TRL ``RLOOTrainer`` does before `rloo_advantages`.

    ``policy_token_logps`` must be the sampling policy's (`jaxalign.sampling.generate`'s ``logprobs``). Metrics are
    TRL's rollout ones: ``objective/kl`` (mean sequence k1), ``objective/entropy`` (mean ``-sum log pi``),
    ``objective/non_score_reward``, ``objective/rlhf_reward``, ``objective/scores``.
    """
    (s,) = _f32(scores)
    est = sequence_kl(policy_token_logps, ref_token_logps, mask)
    non_score = -kl_coef * est["k1"]
    total = s + non_score
    return total, _rollout_metrics(s, est["k1"], est["entropy"], non_score, total)


def ppo_token_rewards(scores: ArrayLike, policy_token_logps: ArrayLike, ref_token_logps: ArrayLike,
                      mask: ArrayLike, *, kl_coef: float | jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-token PPO rewards ``[B, T]``: ``-kl_coef * k1_t`` on every response token, plus the sequence ``score`` on
    the row's last response token; 0 off the mask -> ``(rewards, metrics)`` (metrics as `kl_penalized_rewards`).

    TRL ``PPOTrainer`` (``non_score_reward = -kl_coef * kl``; ``rewards[[actual_start, actual_end]] += scores``),
    except that TRL puts the score one position past the last token when there is room (``sequence_lengths_p1``, a
    padding position its value loss also covers); here it sits on the last response token, so `gae` needs no extra
    position. The rows' sums equal `kl_penalized_rewards`.
    """
    (s,) = _f32(scores)
    m = _mask(mask)
    per_token = token_kl(*_on_mask(m, policy_token_logps, ref_token_logps))
    non_score = jnp.where(m != 0, -kl_coef * per_token["k1"] * m, 0.0)
    # the last response token is the mask position with no mask after it
    after = jnp.cumsum(m[:, ::-1], axis=1)[:, ::-1] - m
    last = (m != 0) & (after == 0)
    rewards = non_score + jnp.where(last, s[:, None], 0.0)
    kl = _masked_sum(per_token["k1"], m, -1)
    entropy = _masked_sum(per_token["entropy"], m, -1)
    # rlhf_reward from the parts, not the row sums: an empty row has nowhere to put its score
    return rewards, _rollout_metrics(s, kl, entropy, -kl_coef * kl, s - kl_coef * kl)


# ---- losses -----------------------------------------------------------------------------------------------------


def _token_advantages(m: jax.Array, advantages: ArrayLike) -> jax.Array:
    (a,) = _f32(advantages)
    a = a[:, None] if a.ndim == m.ndim - 1 else a
    return jax.lax.stop_gradient(jnp.where(m != 0, a, 0.0))


def _clipped_surrogate(
    m: jax.Array, logp: ArrayLike, old_logp: ArrayLike, advantages: ArrayLike, clip: float | jax.Array,
    clip_high: float | jax.Array | None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Per-token ``max(-A r, -A clip(r, 1 - clip, 1 + clip_high))`` and the pieces the metrics need."""
    lp, old = _on_mask(m, logp, old_logp)
    old = jax.lax.stop_gradient(old)
    a = _token_advantages(m, advantages)
    log_ratio = lp - old
    ratio = jnp.exp(log_ratio)
    unclipped = -a * ratio
    clipped = -a * jnp.clip(ratio, 1.0 - clip, 1.0 + (clip if clip_high is None else clip_high))
    return jnp.maximum(unclipped, clipped), (clipped > unclipped).astype(jnp.float32), ratio, log_ratio, old


def _policy_metrics(m: jax.Array, clipfrac: jax.Array, ratio: jax.Array, log_ratio: jax.Array,
                    old: jax.Array) -> dict[str, jax.Array]:
    return jax.lax.stop_gradient({
        "policy/clipfrac": masked_mean(clipfrac, m),
        "policy/approxkl": 0.5 * masked_mean(log_ratio**2, m),
        "val/ratio": masked_mean(ratio, m),
        "objective/entropy": jnp.mean(_masked_sum(-old, m, -1)),
    })


def ppo_policy_loss(logp: ArrayLike, old_logp: ArrayLike, advantages: ArrayLike, mask: ArrayLike, *,
                    clip: float | jax.Array = 0.2,
                    clip_high: float | jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO's clipped surrogate, token level: ``masked_mean(max(-A r, -A clip(r, 1 - clip, 1 + clip)))`` with
    ``r = exp(logp - old_logp)`` over every mask token of the batch -> ``(loss, metrics)``.

    Schulman et al. 2017; TRL ``PPOTrainer`` (``pg_loss = masked_mean(pg_loss_max, ~padding_mask)``). ``advantages``
    [B, T] (GAE) or [B] (one per sequence, broadcast over its tokens). ``clip_high`` (default ``clip``) is DAPO's
    decoupled upper bound. TRL RLOOTrainer's loss is this on sequence log-probs: ``logp[:, None]``,
    ``old_logp[:, None]``, a mask of ones. Metrics: ``loss/policy``, ``policy/clipfrac`` (fraction of tokens where the
    clipped branch is taken), ``policy/approxkl`` (``0.5 (logp - old)^2``, TRL's, here a masked mean),
    ``val/ratio`` (mean ratio, TRL's name), ``objective/entropy`` (mean ``-sum old_logp``: the sampling policy's
    sequence-entropy estimate).
    """
    m = _mask(mask)
    per_token, *pieces = _clipped_surrogate(m, logp, old_logp, advantages, clip, clip_high)
    loss = masked_mean(per_token, m)
    return loss, {"loss/policy": jax.lax.stop_gradient(loss), **_policy_metrics(m, *pieces)}


def ppo_value_loss(values: ArrayLike, old_values: ArrayLike, returns: ArrayLike, mask: ArrayLike, *,
                   clip: float | jax.Array = 0.2) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO's clipped value loss: ``0.5 masked_mean(max((v - R)^2, (clip(v, v_old - clip, v_old + clip) - R)^2))``
    -> ``(loss, metrics)``.

    TRL ``PPOTrainer`` (``vf_loss = 0.5 * masked_mean(vf_loss_max, ...)``, ``cliprange_value``). Metrics:
    ``loss/value``, ``val/clipfrac`` (fraction of tokens where the clipped branch is larger), ``val/vpred`` (mean
    prediction) and ``val/error`` (mean ``(v - R)^2``), as TRL's.
    """
    m = _mask(mask)
    v, v_old, ret = _on_mask(m, values, old_values, returns)
    v_old, ret = jax.lax.stop_gradient((v_old, ret))
    unclipped = (v - ret) ** 2
    clipped = (jnp.clip(v, v_old - clip, v_old + clip) - ret) ** 2
    loss = 0.5 * masked_mean(jnp.maximum(unclipped, clipped), m)
    return loss, jax.lax.stop_gradient({
        "loss/value": loss,
        "val/clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), m),
        "val/vpred": masked_mean(v, m),
        "val/error": masked_mean(unclipped, m),
    })


def grpo_loss(logp: ArrayLike, old_logp: ArrayLike, ref_logp: ArrayLike, advantages: ArrayLike, mask: ArrayLike, *,
              clip: float | jax.Array = 0.2, clip_high: float | jax.Array | None = None,
              kl_coef: float | jax.Array = 0.04,
              length_norm: str = "sequence", max_len: int | None = None,
              kl_bias_correction: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GRPO's token loss ``l_t = max(-A r_t, -A clip(r_t, 1 - clip, 1 + clip)) + kl_coef * k3_t`` with
    ``k3 = pi_ref/pi - 1 - log(pi_ref/pi)`` (the KL as a loss term, not in the reward), reduced by ``length_norm``:

    - ``"sequence"``: mean over each row's mask tokens, then over rows (Shao et al. 2024, DeepSeekMath; TRL
      ``loss_type="grpo"``);
    - ``"token"``: mean over every mask token of the batch (DAPO, Yu et al. 2025; TRL ``"bnpo"``);
    - ``"constant"``: ``sum / (B * max_len)``, ``max_len`` defaulting to T (Dr. GRPO, Liu et al. 2025; TRL
      ``"dr_grpo"`` with ``max_completion_length``).

    ``advantages`` [B] (`grpo_advantages` flattened) or [B, T]. ``clip_high`` is DAPO's clip-higher (default
    ``clip``). ``kl_bias_correction`` multiplies ``k3_t`` by the (differentiable) ratio ``r_t``, which makes its
    gradient the unbiased reverse-KL one off-policy (DeepSeek-V3.2; TRL 1.16's default ``use_bias_correction_kl=True``,
    which the on-policy step's ``OnPolicySettings`` follows). Matches TRL ``GRPOTrainer.compute_loss``
    (``epsilon_low = clip``, ``epsilon_high = clip_high``, ``beta = kl_coef``, ``use_bias_correction_kl =
    kl_bias_correction``). Metrics: ``loss/policy``, ``objective/kl`` (mean KL term over mask tokens, the ratio
    included when corrected: TRL GRPO's ``kl``), and `ppo_policy_loss`'s ``policy/clipfrac``, ``policy/approxkl``,
    ``val/ratio``, ``objective/entropy``.
    """
    if length_norm not in LENGTH_NORMS:
        raise ValueError(f"unknown length_norm {length_norm!r}; valid: {', '.join(LENGTH_NORMS)}")
    m = _mask(mask)
    surrogate, *pieces = _clipped_surrogate(m, logp, old_logp, advantages, clip, clip_high)
    lp, ref = _on_mask(m, logp, ref_logp)
    k3 = token_kl(lp, jax.lax.stop_gradient(ref))["k3"]
    if kl_bias_correction:
        k3 = k3 * pieces[1]
    per_token = surrogate + kl_coef * k3
    if length_norm == "sequence":
        loss = jnp.mean(masked_mean(per_token, m, axis=-1))
    elif length_norm == "token":
        loss = masked_mean(per_token, m)
    else:
        loss = _masked_sum(per_token, m) / (m.shape[0] * (m.shape[-1] if max_len is None else max_len))
    metrics = {"loss/policy": jax.lax.stop_gradient(loss), "objective/kl": jax.lax.stop_gradient(masked_mean(k3, m))}
    return loss, {**metrics, **_policy_metrics(m, *pieces)}


def rloo_loss(seq_logp: ArrayLike, advantages: ArrayLike) -> tuple[jax.Array, dict[str, jax.Array]]:
    """REINFORCE with held-constant advantages: ``-mean(A * log pi(y|x))`` over ``[B]`` sequence log-probs.

    Williams 1992; with `rloo_advantages` it is RLOO as written in Ahmadian et al. 2024 (eq. for the leave-one-out
    estimator). TRL ``RLOOTrainer`` optimises the PPO-clipped form on sequence log-probs (`ppo_policy_loss` on
    ``[B, 1]``), whose gradient equals this one at the first update of a batch (ratio 1). Metrics: ``loss/policy``.
    """
    lp, a = _f32(seq_logp, advantages)
    loss = -jnp.mean(jax.lax.stop_gradient(a) * lp)
    return loss, {"loss/policy": jax.lax.stop_gradient(loss)}
