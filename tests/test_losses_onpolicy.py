"""jaxalign.losses' on-policy math against float64 numpy transcriptions of the reference code, properties, transforms.

The ``np_*`` references are explicit Python loops transcribed from the reference code and papers, not from the jax
code: TRL's RLOOTrainer (leave-one-out baseline, KL folded into the score), PPOTrainer (per-token KL reward + score,
the reversed ``lastgaelam`` loop, ``masked_mean``, ``masked_whiten``, the clipped policy and value losses) and
GRPOTrainer (``loss_type`` grpo / bnpo / dr_grpo, the k3 penalty), the GRPO paper's group normalisation and Dr. GRPO's
mean-only advantage. They run in float64 on the float32 values the jax functions see and skip masked positions, so the
junk (-inf log-probs, nan values) that the batches carry there never reaches them. Gradients are written out by hand.

Tolerance: 1e-6 relative to the largest entry of the expected array (float32 against float64).

Compiles are the slow part on a loaded CPU: every function goes through one suite, jitted once and reused.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jaxalign.losses as L

TOL = 1e-6


def close(actual, expected, tol=TOL, scale=None):
    """Relative ``tol`` against the largest entry of ``expected``, or against ``scale`` (the size of the terms) where
    a mean of terms of both signs nearly cancels: float32 resolves it only to ~1e-7 of the terms."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    floor = np.abs(expected).max(initial=0.0) if scale is None else scale
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * max(floor, 1e-3))


# ----------------------------------------------------------------------------------------------------------------------
# numpy float64 references (explicit loops)


def np_rloo_advantages(r):
    """TRL RLOOTrainer: baseline = mean of the other k - 1 samples' rewards."""
    p, n = r.shape
    out = np.zeros((p, n))
    for i in range(p):
        for j in range(n):
            others = [r[i, k] for k in range(n) if k != j]
            out[i, j] = r[i, j] - sum(others) / len(others)
    return out


def np_grpo_advantages(r, scale, eps, ddof):
    """GRPO: (r - mean(group)) / (std(group) + eps); Dr. GRPO: r - mean(group)."""
    p, n = r.shape
    out = np.zeros((p, n))
    for i in range(p):
        mean = sum(r[i]) / n
        std = np.sqrt(sum((x - mean) ** 2 for x in r[i]) / (n - ddof))
        for j in range(n):
            out[i, j] = (r[i, j] - mean) / (std + eps) if scale else r[i, j] - mean
    return out


def np_gae(rewards, values, mask, gamma, lam):
    """TRL PPOTrainer: rewards / values filled with 0 off the mask, then the reversed lastgaelam loop."""
    b, t = rewards.shape
    r = np.where(mask, rewards, 0.0)
    v = np.where(mask, values, 0.0)
    adv = np.zeros((b, t))
    for i in range(b):
        lastgaelam = 0.0
        for s in reversed(range(t)):
            nextvalues = v[i, s + 1] if s < t - 1 else 0.0
            delta = r[i, s] + gamma * nextvalues - v[i, s]
            lastgaelam = delta + gamma * lam * lastgaelam
            adv[i, s] = lastgaelam
    returns = adv + v
    return np.where(mask, adv, 0.0), np.where(mask, returns, 0.0)


def np_masked_mean(x, mask):
    total, count = 0.0, 0.0
    for i, j in zip(*np.nonzero(mask)):
        total += x[i, j]
        count += 1
    return total / count if count else 0.0


def np_ppo_policy(logp, old, adv, mask, clip):
    """TRL PPOTrainer's pg loss (masked_mean of max(-A r, -A clip(r))) and d loss / d logp."""
    b, t = logp.shape
    n = mask.sum()
    per_token, clipped_flags, log_ratios, ratios = (np.zeros((b, t)) for _ in range(4))
    grad = np.zeros((b, t))
    for i in range(b):
        for s in range(t):
            if not mask[i, s]:
                continue
            ratio = np.exp(logp[i, s] - old[i, s])
            loss1 = -adv[i, s] * ratio
            loss2 = -adv[i, s] * min(max(ratio, 1 - clip), 1 + clip)
            per_token[i, s] = max(loss1, loss2)
            clipped_flags[i, s] = float(loss2 > loss1)
            log_ratios[i, s] = logp[i, s] - old[i, s]
            ratios[i, s] = ratio
            # the clipped branch is flat in logp; inside [1 - clip, 1 + clip] both branches are -A r
            grad[i, s] = 0.0 if loss2 > loss1 else -adv[i, s] * ratio / n
    entropy = np.mean([-sum(old[i, s] for s in range(t) if mask[i, s]) for i in range(b)])
    metrics = {"loss/policy": np_masked_mean(per_token, mask), "policy/clipfrac": np_masked_mean(clipped_flags, mask),
               "policy/approxkl": 0.5 * np_masked_mean(log_ratios**2, mask), "val/ratio": np_masked_mean(ratios, mask),
               "objective/entropy": entropy}
    return metrics["loss/policy"], grad, metrics


def np_ppo_value(v, v_old, ret, mask, clip):
    """TRL PPOTrainer's vf loss, 0.5 masked_mean(max((v - R)^2, (clip(v, v_old +- clip) - R)^2)), and d / d v."""
    b, t = v.shape
    n = mask.sum()
    total, clipfrac, vpred, error = 0.0, 0.0, 0.0, 0.0
    grad = np.zeros((b, t))
    for i in range(b):
        for s in range(t):
            if not mask[i, s]:
                continue
            loss1 = (v[i, s] - ret[i, s]) ** 2
            loss2 = (min(max(v[i, s], v_old[i, s] - clip), v_old[i, s] + clip) - ret[i, s]) ** 2
            total += max(loss1, loss2)
            clipfrac += float(loss2 > loss1)
            vpred += v[i, s]
            error += loss1
            grad[i, s] = 0.0 if loss2 > loss1 else (v[i, s] - ret[i, s]) / n
    metrics = {"loss/value": 0.5 * total / n, "val/clipfrac": clipfrac / n, "val/vpred": vpred / n,
               "val/error": error / n}
    return metrics["loss/value"], grad, metrics


def np_grpo(logp, old, ref, adv, mask, clip, kl_coef, loss_type, max_len):
    """TRL GRPOTrainer.compute_loss: per-token -min(r A, clip(r) A) + beta k3, reduced as grpo / bnpo / dr_grpo."""
    b, t = logp.shape
    per_token, grad_token, kl = np.zeros((b, t)), np.zeros((b, t)), np.zeros((b, t))
    for i in range(b):
        for s in range(t):
            if not mask[i, s]:
                continue
            coef_1 = np.exp(logp[i, s] - old[i, s])
            coef_2 = min(max(coef_1, 1 - clip), 1 + clip)
            k3 = np.exp(ref[i, s] - logp[i, s]) - (ref[i, s] - logp[i, s]) - 1
            per_token[i, s] = -min(coef_1 * adv[i], coef_2 * adv[i]) + kl_coef * k3
            kl[i, s] = k3
            surrogate_grad = 0.0 if coef_2 * adv[i] < coef_1 * adv[i] else -adv[i] * coef_1
            grad_token[i, s] = surrogate_grad + kl_coef * (1.0 - np.exp(ref[i, s] - logp[i, s]))
    lengths = mask.sum(-1)
    if loss_type == "grpo":
        loss = np.mean([per_token[i].sum() / max(lengths[i], 1.0) for i in range(b)])
        grad = grad_token / np.maximum(lengths, 1.0)[:, None] / b
    elif loss_type == "bnpo":
        loss = per_token.sum() / max(mask.sum(), 1.0)
        grad = grad_token / max(mask.sum(), 1.0)
    else:
        loss = per_token.sum() / (b * max_len)
        grad = grad_token / (b * max_len)
    return loss, grad, {"loss/policy": loss, "objective/kl": np_masked_mean(kl, mask)}


def np_rollout(scores, logp, ref, mask, kl_coef):
    """TRL RLOOTrainer (sequence rewards, KL in the reward) and PPOTrainer (per-token rewards, score at the end)."""
    b, t = logp.shape
    seq, tok = np.zeros(b), np.zeros((b, t))
    kls, ents = np.zeros(b), np.zeros(b)
    for i in range(b):
        positions = [s for s in range(t) if mask[i, s]]
        for s in positions:
            k1 = logp[i, s] - ref[i, s]
            kls[i] += k1
            ents[i] -= logp[i, s]
            tok[i, s] = -kl_coef * k1
        seq[i] = scores[i] - kl_coef * kls[i]
        if positions:
            tok[i, positions[-1]] += scores[i]
    metrics = {"objective/kl": kls.mean(), "objective/entropy": ents.mean(),
               "objective/non_score_reward": (-kl_coef * kls).mean(), "objective/rlhf_reward": seq.mean(),
               "objective/scores": scores.mean()}
    return seq, tok, metrics


def np_masked_whiten(x, mask):
    """TRL masked_whiten: masked mean, Bessel-corrected masked variance, rsqrt(var + 1e-8)."""
    vals = [x[i, j] for i, j in zip(*np.nonzero(mask))]
    n = len(vals)
    mean = sum(vals) / n
    var = sum((y - mean) ** 2 for y in vals) / n * n / (n - 1)
    return np.where(mask, (x - mean) / np.sqrt(var + 1e-8), 0.0)


# ----------------------------------------------------------------------------------------------------------------------
# inputs: ragged contiguous response masks (a prompt part masked in front, padding behind), junk off the mask


def token_batch(rng, b=6, t=12):
    mask = np.zeros((b, t), bool)
    for i in range(b - 1):
        start = int(rng.integers(0, 4))
        mask[i, start:start + int(rng.integers(1, t - start + 1))] = True
    mask[0, :] = True  # one full row; the last row is empty (a sample cut to nothing)
    logp = -np.abs(rng.normal(1.5, 1.0, (b, t)))
    old = logp + rng.normal(0.0, 0.3, (b, t))  # ratios both inside and outside 1 +- 0.2
    ref = logp + rng.normal(0.0, 0.5, (b, t))
    x = {"logp": logp, "old": old, "ref": ref,
         "adv_tok": rng.normal(0, 1, (b, t)), "adv_seq": rng.normal(0, 1, b),
         "values": rng.normal(0, 1, (b, t)), "returns": rng.normal(0, 1.5, (b, t)),
         "rewards": rng.normal(0, 0.5, (b, t)),
         "scores": rng.normal(0, 2, b)}
    x["old_values"] = x["values"] + rng.normal(0, 0.3, (b, t))
    clean = {k: v.astype(np.float32) for k, v in x.items()}
    dirty = dict(clean)
    for k in ("logp", "old", "ref"):
        dirty[k] = np.where(mask, clean[k], -np.inf).astype(np.float32)
    for k in ("adv_tok", "values", "returns", "rewards", "old_values"):
        dirty[k] = np.where(mask, clean[k], np.nan).astype(np.float32)
    return clean, dirty, mask


def suite(x, mask, hp):
    """Every on-policy function on one batch, with the gradients the losses need."""
    logp, old, ref = x["logp"], x["old"], x["ref"]
    out = {}
    vg = lambda f, *a: jax.value_and_grad(f, has_aux=True)(*a)  # noqa: E731
    out["ppo_tok"] = vg(lambda lp: L.ppo_policy_loss(lp, old, x["adv_tok"], mask, clip=hp["clip"]), logp)
    out["ppo_seq"] = vg(lambda lp: L.ppo_policy_loss(lp, old, x["adv_seq"], mask, clip=hp["clip"]), logp)
    out["value"] = vg(lambda v: L.ppo_value_loss(v, x["old_values"], x["returns"], mask, clip=hp["vclip"]),
                      x["values"])
    for norm in L.LENGTH_NORMS:
        out[f"grpo_{norm}"] = vg(lambda lp, n=norm: L.grpo_loss(lp, old, ref, x["adv_seq"], mask, clip=hp["clip"],
                                                                 kl_coef=hp["kl_coef"], length_norm=n), logp)
    out["gae"] = L.gae(x["rewards"], x["values"], mask, gamma=hp["gamma"], lam=hp["lam"])
    out["kl_rewards"] = L.kl_penalized_rewards(x["scores"], logp, ref, mask, kl_coef=hp["kl_coef"])
    out["token_rewards"] = L.ppo_token_rewards(x["scores"], logp, ref, mask, kl_coef=hp["kl_coef"])
    out["whiten"] = L.masked_whiten(x["adv_tok"], mask)
    out["rloo"] = vg(lambda s: L.rloo_loss(s, x["adv_seq"]), x["scores"])
    return out


SUITE = jax.jit(suite)


def hparams(clip=0.2, vclip=0.2, kl_coef=0.04, gamma=1.0, lam=0.95):
    return {k: np.float32(v) for k, v in locals().items()}


def check_suite(out, x, mask, hp):
    a = {k: np.asarray(v, np.float64) for k, v in x.items()}
    clip, vclip, kl_coef = float(hp["clip"]), float(hp["vclip"]), float(hp["kl_coef"])
    t = mask.shape[1]
    for name, adv in (("ppo_tok", a["adv_tok"]), ("ppo_seq", np.broadcast_to(a["adv_seq"][:, None], mask.shape))):
        (loss, metrics), grad = out[name]
        ref_loss, ref_grad, ref_metrics = np_ppo_policy(a["logp"], a["old"], adv, mask, clip)
        close(loss, ref_loss)
        close(grad, ref_grad)
        for k, v in ref_metrics.items():
            close(metrics[k], v)
    (loss, metrics), grad = out["value"]
    ref_loss, ref_grad, ref_metrics = np_ppo_value(a["values"], a["old_values"], a["returns"], mask, vclip)
    close(loss, ref_loss)
    close(grad, ref_grad)
    for k, v in ref_metrics.items():
        close(metrics[k], v)
    for norm, trl in (("sequence", "grpo"), ("token", "bnpo"), ("constant", "dr_grpo")):
        (loss, metrics), grad = out[f"grpo_{norm}"]
        ref_loss, ref_grad, ref_metrics = np_grpo(a["logp"], a["old"], a["ref"], a["adv_seq"], mask, clip, kl_coef,
                                                  trl, t)
        close(loss, ref_loss)
        close(grad, ref_grad)
        for k, v in ref_metrics.items():
            close(metrics[k], v)
    adv, ret = out["gae"]
    ref_adv, ref_ret = np_gae(a["rewards"], a["values"], mask, float(hp["gamma"]), float(hp["lam"]))
    close(adv, ref_adv)
    close(ret, ref_ret)
    seq, tok, ref_metrics = np_rollout(a["scores"], a["logp"], a["ref"], mask, kl_coef)
    close(out["kl_rewards"][0], seq)
    close(out["token_rewards"][0], tok)
    for k, v in ref_metrics.items():
        close(out["kl_rewards"][1][k], v)
        close(out["token_rewards"][1][k], v)
    close(out["whiten"], np_masked_whiten(a["adv_tok"], mask))
    (loss, _), grad = out["rloo"]
    close(loss, -np.mean(a["adv_seq"] * a["scores"]))
    close(grad, -a["adv_seq"] / len(a["adv_seq"]))


# ----------------------------------------------------------------------------------------------------------------------
# 1. equality with the transcriptions


@pytest.mark.parametrize("hp", [hparams(), hparams(clip=0.1, vclip=0.5, kl_coef=0.0, gamma=0.99, lam=1.0),
                                hparams(clip=0.3, vclip=0.05, kl_coef=0.1, gamma=0.9, lam=0.0)],
                         ids=["defaults", "no_kl", "tight"])
def test_suite_matches_numpy_with_junk_off_the_mask(hp):
    clean, dirty, mask = token_batch(np.random.default_rng(int(hp["clip"] * 100)))
    out = SUITE(dirty, mask, hp)
    check_suite(out, clean, mask, hp)
    # junk (-inf log-probs, nan values) off the mask: finite everywhere, zero gradient there
    for name in ("ppo_tok", "ppo_seq", "value", *(f"grpo_{n}" for n in L.LENGTH_NORMS)):
        (loss, metrics), grad = out[name]
        assert np.isfinite(loss) and all(np.isfinite(v) for v in metrics.values()), name
        grad = np.asarray(grad)
        assert np.isfinite(grad).all() and (grad[~mask] == 0).all(), name
        assert (grad[mask] != 0).any(), name
    for arr in (*out["gae"], out["token_rewards"][0], out["whiten"]):
        assert np.isfinite(arr).all() and (np.asarray(arr)[~mask] == 0).all()


@pytest.mark.parametrize("n", [2, 4, 8])
def test_group_advantages_match_numpy(n):
    r = np.random.default_rng(n).normal(0.5, 2.0, (5, n)).astype(np.float32)
    r[0] = 1.25  # a group whose samples all tie: advantage 0, not nan
    r64 = r.astype(np.float64)
    close(L.rloo_advantages(r), np_rloo_advantages(r64))
    for scale in (True, False):
        for ddof in (0, 1):  # 0: the contract (population std); 1: TRL GRPOTrainer (torch's unbiased std)
            close(L.grpo_advantages(r, scale=scale, ddof=ddof), np_grpo_advantages(r64, scale, 1e-4, ddof))
    assert (np.asarray(L.grpo_advantages(r))[0] == 0).all() and (np.asarray(L.rloo_advantages(r))[0] == 0).all()


def test_constant_normaliser_takes_max_len_and_token_norm_takes_clip_high():
    clean, _, mask = token_batch(np.random.default_rng(5))
    a = {k: np.asarray(v, np.float64) for k, v in clean.items()}
    loss, _ = L.grpo_loss(clean["logp"], clean["old"], clean["ref"], clean["adv_seq"], mask, length_norm="constant",
                          max_len=256)
    close(loss, np_grpo(a["logp"], a["old"], a["ref"], a["adv_seq"], mask, 0.2, 0.04, "dr_grpo", 256)[0])
    # DAPO's clip-higher: only the upper bound moves
    lo, hi = 0.2, 0.28
    loss, metrics = L.ppo_policy_loss(clean["logp"], clean["old"], clean["adv_tok"], mask, clip=lo, clip_high=hi)
    per_token, flags = np.zeros(mask.shape), np.zeros(mask.shape)
    for i, s in zip(*np.nonzero(mask)):
        ratio = np.exp(a["logp"][i, s] - a["old"][i, s])
        l1, l2 = -a["adv_tok"][i, s] * ratio, -a["adv_tok"][i, s] * min(max(ratio, 1 - lo), 1 + hi)
        per_token[i, s], flags[i, s] = max(l1, l2), float(l2 > l1)
    close(loss, np_masked_mean(per_token, mask))
    close(metrics["policy/clipfrac"], np_masked_mean(flags, mask))


# ----------------------------------------------------------------------------------------------------------------------
# 2. properties

PROP = settings(max_examples=25, deadline=None)
groups = st.integers(2, 8).flatmap(
    lambda n: hnp.arrays(np.float32, (4, n), elements=st.floats(-10.0, 10.0, width=32)))


@PROP
@given(r=groups)
def test_rloo_advantages_sum_to_zero_and_scale_the_centred_rewards(r):
    adv = np.asarray(L.rloo_advantages(r), np.float64)
    n = r.shape[1]
    np.testing.assert_allclose(adv.sum(-1), 0.0, atol=1e-5 * max(np.abs(r).max(), 1))
    # r_i - mean_{j != i} r_j = N / (N - 1) (r_i - mean_j r_j)
    centred = r.astype(np.float64) - r.astype(np.float64).mean(-1, keepdims=True)
    np.testing.assert_allclose(adv, n / (n - 1) * centred, atol=1e-5 * max(np.abs(r).max(), 1))


@PROP
@given(r=groups, shift=st.floats(-100.0, 100.0))
def test_grpo_advantages_zero_mean_unit_std_shift_invariant(r, shift):
    r64 = r.astype(np.float64)
    std = r64.std(-1)
    adv = np.asarray(L.grpo_advantages(r), np.float64)
    np.testing.assert_allclose(adv.mean(-1), 0.0, atol=1e-5)
    # std(adv) = std / (std + eps): 1 up to eps / std, 0 for a group that ties
    np.testing.assert_allclose(adv.std(-1), std / (std + 1e-4), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(L.grpo_advantages(r, scale=False), r64 - r64.mean(-1, keepdims=True),
                               atol=1e-5 * max(np.abs(r).max(), 1))
    spread = std > 0.1  # float32 resolves the shifted rewards' differences only to ~1e-5 of the shift
    shifted = np.asarray(L.grpo_advantages((r64 + shift).astype(np.float32)), np.float64)
    np.testing.assert_allclose(shifted[spread], adv[spread], atol=2e-3)


@PROP
@given(seed=st.integers(0, 2**31), gamma=st.sampled_from([1.0, 0.99, 0.9]), lam=st.sampled_from([0.0, 0.5, 0.95, 1.0]))
def test_gae_equals_discounted_sum_of_td_errors(seed, gamma, lam):
    clean, dirty, mask = token_batch(np.random.default_rng(seed))
    adv, ret = L.gae(dirty["rewards"], dirty["values"], mask, gamma=gamma, lam=lam)
    r = np.where(mask, clean["rewards"], 0.0).astype(np.float64)
    v = np.where(mask, clean["values"], 0.0).astype(np.float64)
    b, t = r.shape
    v_next = np.concatenate([v[:, 1:], np.zeros((b, 1))], 1)
    delta = r + gamma * v_next - v
    # closed form, not the recursion: A_t = sum_l (gamma lam)^l delta_{t+l}
    expected = np.array([[sum((gamma * lam) ** k * delta[i, s + k] for k in range(t - s)) for s in range(t)]
                         for i in range(b)])
    close(adv, np.where(mask, expected, 0.0), tol=1e-5)
    close(ret, np.where(mask, expected + v, 0.0), tol=1e-5)
    if gamma == 1.0 and lam == 1.0:  # reward-to-go minus value
        to_go = np.array([[r[i, s:].sum() for s in range(t)] for i in range(b)])
        close(adv, np.where(mask, to_go - v, 0.0), tol=1e-5)


@PROP
@given(seed=st.integers(0, 2**31), clip=st.sampled_from([0.1, 0.2, 0.3]))
def test_at_ratio_one_clipping_changes_nothing(seed, clip):
    clean, _, mask = token_batch(np.random.default_rng(seed))
    lp, adv = clean["logp"], clean["adv_tok"]
    loss, metrics = L.ppo_policy_loss(lp, lp, adv, mask, clip=clip)
    close(loss, -np_masked_mean(adv.astype(np.float64), mask), scale=np.abs(adv[mask]).mean())
    assert metrics["policy/clipfrac"] == 0 and metrics["policy/approxkl"] == 0 and metrics["val/ratio"] == 1
    # its gradient is the policy gradient -A / n_tokens, as with no clipping at all
    grad = jax.grad(lambda x: L.ppo_policy_loss(x, lp, adv, mask, clip=clip)[0])(lp)
    close(grad, np.where(mask, -adv / mask.sum(), 0.0))
    v = clean["values"]
    loss, metrics = L.ppo_value_loss(v, v, clean["returns"], mask, clip=clip)
    close(loss, 0.5 * np_masked_mean((v.astype(np.float64) - clean["returns"]) ** 2, mask))
    assert metrics["val/clipfrac"] == 0


def test_grpo_reduces_to_ppo_and_its_normalisers_agree_where_they_should():
    clean, _, mask = token_batch(np.random.default_rng(7))
    lp, old, ref, adv = clean["logp"], clean["old"], clean["ref"], clean["adv_seq"]
    ppo, ppo_metrics = L.ppo_policy_loss(lp, old, adv, mask)
    grpo, grpo_metrics = L.grpo_loss(lp, old, ref, adv, mask, kl_coef=0.0, length_norm="token")
    close(grpo, ppo)
    assert grpo_metrics["policy/clipfrac"] == ppo_metrics["policy/clipfrac"]
    # the reference equal to the policy: k3 = 0, whatever kl_coef
    _, metrics = L.grpo_loss(lp, old, lp, adv, mask, kl_coef=1.0)
    assert metrics["objective/kl"] == 0
    # equal lengths: per-sequence mean = token mean; a full mask: constant normaliser = token mean
    full = np.ones_like(mask)
    by = {n: L.grpo_loss(lp, old, ref, adv, full, length_norm=n)[0] for n in L.LENGTH_NORMS}
    close(by["sequence"], by["token"])
    close(by["constant"], by["token"])
    # k3 >= 0, so the KL term only adds
    assert L.grpo_loss(lp, old, ref, adv, mask, kl_coef=0.1)[0] >= L.grpo_loss(lp, old, ref, adv, mask, kl_coef=0.0)[0]


def test_trl_rloo_clipped_form_has_the_reinforce_gradient_at_the_first_update():
    rng = np.random.default_rng(8)
    rewards = rng.normal(0, 1, (4, 3)).astype(np.float32)
    adv = np.asarray(L.rloo_advantages(rewards)).reshape(-1)
    seq_logp = rng.normal(-40, 10, 12).astype(np.float32)
    g_reinforce = jax.grad(lambda s: L.rloo_loss(s, adv)[0])(seq_logp)
    g_clipped = jax.grad(lambda s: L.ppo_policy_loss(s[:, None], jax.lax.stop_gradient(s)[:, None], adv[:, None],
                                                     np.ones((12, 1)))[0])(seq_logp)
    close(g_clipped, g_reinforce)
    close(g_reinforce, -adv / 12)


@PROP
@given(seed=st.integers(0, 2**31), kl_coef=st.sampled_from([0.0, 0.05, 0.2]))
def test_token_rewards_sum_to_sequence_rewards(seed, kl_coef):
    clean, _, mask = token_batch(np.random.default_rng(seed))
    seq, seq_metrics = L.kl_penalized_rewards(clean["scores"], clean["logp"], clean["ref"], mask, kl_coef=kl_coef)
    tok, tok_metrics = L.ppo_token_rewards(clean["scores"], clean["logp"], clean["ref"], mask, kl_coef=kl_coef)
    has_tokens = mask.any(-1)  # an empty row has nowhere to put its score
    close(np.asarray(tok).sum(-1)[has_tokens], np.asarray(seq)[has_tokens], tol=1e-5)
    close(seq_metrics["objective/kl"], tok_metrics["objective/kl"], tol=1e-5)
    # with gamma = lam = 1 and zero values, every response token's advantage is the row's total reward to come
    adv, _ = L.gae(tok, np.zeros_like(tok), mask, gamma=1.0, lam=1.0)
    first = mask.argmax(-1)
    close(np.asarray(adv)[np.arange(len(first)), first][has_tokens], np.asarray(seq)[has_tokens], tol=1e-5)


def test_masked_whiten_zero_mean_unit_variance_on_the_mask():
    clean, dirty, mask = token_batch(np.random.default_rng(9))
    w = np.asarray(L.masked_whiten(dirty["adv_tok"], mask), np.float64)[mask]
    np.testing.assert_allclose(w.mean(), 0.0, atol=1e-6)
    np.testing.assert_allclose(w.var(ddof=1), 1.0, rtol=1e-5)
    kept = np.asarray(L.masked_whiten(clean["adv_tok"], mask, shift_mean=False), np.float64)[mask]
    close(kept.mean(), clean["adv_tok"][mask].astype(np.float64).mean(), tol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# 3. dtypes, transforms, errors


def test_bf16_inputs_are_computed_in_float32():
    clean, _, mask = token_batch(np.random.default_rng(10))
    bf = {k: jnp.asarray(v, jnp.bfloat16) for k, v in clean.items()}
    up = {k: np.asarray(v.astype(jnp.float32)) for k, v in bf.items()}
    hp = hparams()
    out_bf, out_up = suite(bf, mask, hp), SUITE(up, mask, hp)
    grads = {"ppo_tok", "ppo_seq", "value", "rloo", *(f"grpo_{n}" for n in L.LENGTH_NORMS)}
    for name in out_bf:
        values_bf, values_up = (out_bf[name][0], out_up[name][0]) if name in grads else (out_bf[name], out_up[name])
        for a, b in zip(jax.tree_util.tree_leaves(values_bf), jax.tree_util.tree_leaves(values_up)):
            assert a.dtype == jnp.float32, name
            close(a, b, tol=1e-5)
        if name in grads:  # a gradient comes back in its input's dtype
            assert out_bf[name][1].dtype == jnp.bfloat16, name
            close(out_bf[name][1].astype(jnp.float32), out_up[name][1], tol=1e-2)


def test_jit_and_vmap_match_eager():
    rng = np.random.default_rng(11)
    batches = [token_batch(rng) for _ in range(2)]
    hp = hparams(kl_coef=0.1, gamma=0.99)
    stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *[b[1] for b in batches])
    masks = np.stack([b[2] for b in batches])
    batched = jax.jit(jax.vmap(suite, in_axes=(0, 0, None)))(stacked, masks, hp)
    for i, (_, dirty, mask) in enumerate(batches):
        eager = suite(dirty, mask, hp)
        for what, other in (("jit", SUITE(dirty, mask, hp)), ("vmap", jax.tree_util.tree_map(lambda x: x[i], batched))):
            flat_e, tree_e = jax.tree_util.tree_flatten(eager)
            flat_o, tree_o = jax.tree_util.tree_flatten(other)
            assert tree_e == tree_o, what
            for a, b in zip(flat_o, flat_e):
                close(a, b, tol=1e-5)
    # group advantages under vmap over a leading axis equal the per-slice calls
    r = rng.normal(0, 1, (3, 4, 5)).astype(np.float32)
    for fn in (L.rloo_advantages, L.grpo_advantages):
        close(jax.vmap(fn)(r), np.stack([fn(x) for x in r]))


def test_validation_errors():
    with pytest.raises(ValueError, match="at least 2"):
        L.rloo_advantages(np.zeros((3, 1), np.float32))
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="sequence, token, constant"):
        L.grpo_loss(x, x, x, x[:, 0], x, length_norm="dapo")
