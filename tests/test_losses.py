"""jaxalign.losses against independent float64 numpy transcriptions, analytic gradients, properties and transforms.

The numpy references (``np_*``) are written from the formulas in ../shared/METHODS.md, not from the jax code: they run
in float64 on the float32 values the jax functions see, and each comes with its gradient written out by hand.

Compiling is the slow part on a loaded CPU, so the losses are gathered into two suites (pair losses on sequence
log-probs / rewards; token-level functions on logits), each compiled once and reused by the value, property and
transform tests; the transform tests compare the same suites run eagerly, under jit and under jit(vmap).
"""
from __future__ import annotations

import ast
import functools
import os
import subprocess
import sys
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxalign.losses as L
from jaxalign.losses import logprobs as logprobs_module
from jaxalign.losses.dil import EXP_CAP, capped_exp

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("flax", "optax", "transformers", "torch", "datasets", "grain", "orbax", "tensorboardX")
B = 16
ARGS4 = (0, 1, 2, 3)


# ----------------------------------------------------------------------------------------------------------------------
# numpy float64 references: (loss, d loss / d policy_chosen, d loss / d policy_rejected, metrics, term scale)


def np_logsig(x):
    return -np.logaddexp(0.0, -x)


def np_sig(x):
    return np.exp(np_logsig(x))


def np_pref_metrics(rw, rl, pc, pr):
    return {
        "rewards/chosen": rw.mean(), "rewards/rejected": rl.mean(), "rewards/margins": (rw - rl).mean(),
        "rewards/accuracies": (rw > rl).mean(), "logps/chosen": pc.mean(), "logps/rejected": pr.mean(),
    }


def np_dpo(pc, pr, rc, rr, beta, variant, eps):
    d = (pc - rc) - (pr - rr)
    z = beta * d
    if variant == "sigmoid":
        losses = -(1 - eps) * np_logsig(z) - eps * np_logsig(-z)
        terms = losses
        dl_dd = beta * (-(1 - eps) * np_sig(-z) + eps * np_sig(z))
    elif variant == "robust":
        losses = (-(1 - eps) * np_logsig(z) + eps * np_logsig(-z)) / (1 - 2 * eps)
        terms = ((1 - eps) * np.abs(np_logsig(z)) + eps * np.abs(np_logsig(-z))) / (1 - 2 * eps)
        dl_dd = beta * (-(1 - eps) * np_sig(-z) - eps * np_sig(z)) / (1 - 2 * eps)
    elif variant == "hinge":
        losses = terms = np.maximum(0.0, 1 - z)
        dl_dd = np.where(z < 1, -beta, 0.0)
    elif variant == "ipo":
        losses = terms = (d - 1 / (2 * beta)) ** 2
        dl_dd = 2 * (d - 1 / (2 * beta))
    else:
        raise AssertionError(variant)
    n = pc.size
    metrics = np_pref_metrics(beta * (pc - rc), beta * (pr - rr), pc, pr)
    return losses.mean(), dl_dd / n, -dl_dd / n, metrics, terms.mean()


def np_simpo(pc, pr, beta, gamma):
    z = beta * (pc - pr) - gamma
    g = -beta * np_sig(-z) / pc.size
    losses = -np_logsig(z)
    return losses.mean(), g, -g, np_pref_metrics(beta * pc, beta * pr, pc, pr), losses.mean()


def np_dil(pc, pr, rc, rr, variant, beta):
    if variant == "lsif_ref_free":
        rc, rr = np.zeros_like(rc), np.zeros_like(rr)
    uw, ul = pc - rc, pr - rr
    if variant in ("lsif", "lsif_ref_free"):
        losses = -np.exp(beta * uw) + 0.5 * np.exp(2 * beta * ul)
        terms = np.exp(beta * uw) + 0.5 * np.exp(2 * beta * ul)
        gw, gl = -beta * np.exp(beta * uw), beta * np.exp(2 * beta * ul)
    elif variant == "ukl":
        losses = -beta * uw + np.exp(beta * ul)
        terms = np.abs(beta * uw) + np.exp(beta * ul)
        gw, gl = -beta * np.ones_like(uw), beta * np.exp(beta * ul)
    elif variant == "bce":
        losses = terms = -np_logsig(beta * uw) - np_logsig(-beta * ul)
        gw, gl = -beta * np_sig(-beta * uw), beta * np_sig(beta * ul)
    else:
        raise AssertionError(variant)
    n = pc.size
    return losses.mean(), gw / n, gl / n, np_pref_metrics(beta * uw, beta * ul, pc, pr), terms.mean()


def np_bradley_terry(rw, rl, margin, center):
    z = rw - rl - margin
    loss = -np_logsig(z).mean() + center * ((rw + rl) ** 2).mean()
    n = rw.size
    metrics = {"rewards/chosen": rw.mean(), "rewards/rejected": rl.mean(), "rewards/margins": (rw - rl).mean(),
               "rewards/accuracies": (rw > rl).mean()}
    return loss, (-np_sig(-z) + 2 * center * (rw + rl)) / n, (np_sig(-z) + 2 * center * (rw + rl)) / n, metrics


def np_afd(pos, neg):
    loss = -np_logsig(pos).mean() - np_logsig(-neg).mean()
    metrics = {"accuracy": 0.5 * ((pos > 0).mean() + (neg < 0).mean()), "accuracy/positive": (pos > 0).mean(),
               "accuracy/negative": (neg < 0).mean(), "rewards/positive": pos.mean(), "rewards/negative": neg.mean(),
               "rewards/margins": pos.mean() - neg.mean()}
    return loss, -np_sig(-pos) / pos.size, np_sig(neg) / neg.size, metrics


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_token_logprobs(logits, targets):
    return np.take_along_axis(np_log_softmax(logits), targets[..., None], -1)[..., 0]


# ----------------------------------------------------------------------------------------------------------------------
# comparison helpers and inputs of realistic scale


def close(actual, expected, rtol=1e-5, scale=None):
    """Relative tolerance ``rtol``. Where a batch-mean loss sums terms of both signs (robust DPO, LSIF, UKL) float32
    cannot resolve the mean better than ~1e-7 of the terms' size, so ``scale`` (mean |term|) sets an absolute floor of
    ``rtol * scale / 10``; arrays (gradients) are likewise judged against their largest entry."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    floor = scale if scale is not None else np.abs(expected).max()
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * max(floor, 1e-30) * 0.1)


def close_metrics(metrics, expected):
    for k, v in expected.items():
        close(metrics[k], v)


def f64(*xs):
    return tuple(np.asarray(x, np.float64) for x in xs)


def seed(*key):
    return zlib.crc32(repr(key).encode())  # str hashes are salted per process; this is not


def logps(rng, scale, n=B, near=None):
    """(pc, pr, rc, rr) float32 [n]. scale "sum": -60 +- 12; "mean": -1.5 +- 0.3. ``near``: the reference is the policy
    plus noise of that size (a policy near its reference), else all four are independent draws."""
    mu, sd = (-60.0, 12.0) if scale == "sum" else (-1.5, 0.3)
    pol = rng.normal(mu, sd, (2, n))
    ref = pol + rng.normal(0.0, near, (2, n)) if near is not None else rng.normal(mu, sd, (2, n))
    return tuple(np.concatenate([pol, ref]).astype(np.float32))


# ----------------------------------------------------------------------------------------------------------------------
# the suites: every loss with its gradient, in one function per family


def pair_suite(pc, pr, rc, rr, hp):
    """{name: ((loss, metrics), grads in pc, pr, rc, rr)} for every loss on [B] log-probs / rewards."""
    fns = {f"dpo_{v}": functools.partial(L.dpo_loss, beta=hp["beta"], variant=v, label_smoothing=hp["eps"])
           for v in L.DPO_VARIANTS}
    fns.update({f"dil_{v}": functools.partial(L.dil_loss, variant=v, beta=hp["dil_beta"]) for v in L.DIL_VARIANTS})
    fns["simpo"] = lambda a, b, c, d: L.simpo_loss(a, b, beta=hp["simpo_beta"], gamma=hp["gamma"])
    # Bradley-Terry and AfD take rewards / logits; the log-ratios serve as such here.
    fns["bt"] = lambda a, b, c, d: L.bradley_terry_loss(a - c, b - d, margin=hp["margin"], center_coef=hp["center"])
    fns["afd"] = lambda a, b, c, d: L.afd_discriminator_loss(a - c, b - d)
    return {name: jax.value_and_grad(fn, argnums=ARGS4, has_aux=True)(pc, pr, rc, rr) for name, fn in fns.items()}


def hparams(beta=0.1, eps=0.0, dil_beta=1.0, simpo_beta=2.0, gamma=0.5, margin=0.0, center=0.0):
    return {k: np.float32(v) for k, v in locals().items()}


PAIR_SUITE = jax.jit(pair_suite)


def check_pair_suite_against_numpy(out, pc, pr, rc, rr, hp, names):
    a = f64(pc, pr, rc, rr)
    for name in names:
        (loss, metrics), grads = out[name]
        kind, _, variant = name.partition("_")
        if kind == "dpo":
            ref, gw, gl, ref_metrics, scale = np_dpo(*a, float(hp["beta"]), variant, float(hp["eps"]))
            expected_grads = (gw, gl, -gw, -gl)
        elif kind == "dil":
            ref, gw, gl, ref_metrics, scale = np_dil(*a, variant, float(hp["dil_beta"]))
            zero = np.zeros_like(gw)
            expected_grads = (gw, gl, zero, zero) if variant == "lsif_ref_free" else (gw, gl, -gw, -gl)
        elif kind == "simpo":
            ref, gw, gl, ref_metrics, scale = np_simpo(a[0], a[1], float(hp["simpo_beta"]), float(hp["gamma"]))
            expected_grads = (gw, gl, 0 * gw, 0 * gl)
        elif kind == "bt":
            ref, gw, gl, ref_metrics = np_bradley_terry(a[0] - a[2], a[1] - a[3], float(hp["margin"]),
                                                        float(hp["center"]))
            scale, expected_grads = None, (gw, gl, -gw, -gl)
        else:
            ref, gw, gl, ref_metrics = np_afd(a[0] - a[2], a[1] - a[3])
            scale, expected_grads = None, (gw, gl, -gw, -gl)
        close(loss, ref, scale=scale)
        close_metrics(metrics, ref_metrics)
        for actual, expected in zip(grads, expected_grads):
            close(actual, expected)


def lm_suite(logits, targets, mask, w):
    """Token-level functions on [b, t, v] logits, with gradients in the logits."""
    tl, g_tl = jax.value_and_grad(lambda x: jnp.sum(w * L.token_logprobs(x, targets)))(logits)
    (sft, sft_metrics), g_sft = jax.value_and_grad(L.sft_loss, has_aux=True)(logits, targets, mask)
    lp = L.token_logprobs(logits, targets)
    return {
        "token_logprobs": lp, "weighted_sum": tl, "grad_weighted_sum": g_tl,
        "sft": sft, "sft_metrics": sft_metrics, "grad_sft": g_sft,
        "seq_sum": L.sequence_logprobs(lp, mask, "sum"), "seq_mean": L.sequence_logprobs(lp, mask, "mean"),
        "kl": L.sequence_kl(lp, lp + w, mask),
    }


LM_SUITE = jax.jit(lm_suite)


def lm_batch(rng, b=3, t=7, v=50):
    logits = rng.normal(0, 3, (b, t, v)).astype(np.float32)
    targets = rng.integers(0, v, (b, t)).astype(np.int32)
    mask = rng.uniform(size=(b, t)) < 0.7
    mask[:, 0] = True
    w = rng.normal(0, 0.5, (b, t)).astype(np.float32)
    return logits, targets, mask, w


# ----------------------------------------------------------------------------------------------------------------------
# 1. equality with the numpy transcriptions, values and gradients

DPO_NAMES = [f"dpo_{v}" for v in L.DPO_VARIANTS]
DIL_NAMES = [f"dil_{v}" for v in L.DIL_VARIANTS]


@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("scale", ["sum", "mean"])
def test_dpo_family_matches_numpy(beta, scale):
    rng = np.random.default_rng(seed(beta, scale))
    pc, pr, rc, rr = logps(rng, scale)
    for eps in (0.0, 0.1, 0.3):  # cDPO / robust label smoothing; hinge and ipo ignore it
        hp = hparams(beta=beta, eps=eps)
        check_pair_suite_against_numpy(PAIR_SUITE(pc, pr, rc, rr, hp), pc, pr, rc, rr, hp, DPO_NAMES)


@pytest.mark.parametrize("beta", [1.0, 0.5, 0.1])
@pytest.mark.parametrize("scale,near", [("mean", None), ("mean", 0.5), ("sum", 3.0)])
def test_dil_matches_numpy(beta, scale, near):
    # Summed log-probs with the policy near its reference: independent -60 +- 12 draws would put LSIF's exp(2 u_l)
    # past float32 (and past EXP_CAP), where no float32 loss can equal the float64 exponential.
    rng = np.random.default_rng(seed(beta, scale, near))
    pc, pr, rc, rr = logps(rng, scale, near=near)
    hp = hparams(dil_beta=beta)
    check_pair_suite_against_numpy(PAIR_SUITE(pc, pr, rc, rr, hp), pc, pr, rc, rr, hp, DIL_NAMES)


@pytest.mark.parametrize("beta,gamma", [(2.0, 0.5), (1.0, 0.0), (2.5, 1.4), (10.0, 3.0)])
def test_simpo_matches_numpy(beta, gamma):
    pc, pr, rc, rr = logps(np.random.default_rng(seed(beta, gamma)), "mean")
    hp = hparams(simpo_beta=beta, gamma=gamma)
    check_pair_suite_against_numpy(PAIR_SUITE(pc, pr, rc, rr, hp), pc, pr, rc, rr, hp, ["simpo"])


@pytest.mark.parametrize("margin,center", [(0.0, 0.0), (0.5, 0.0), (0.0, 0.01), (1.0, 0.1)])
def test_bradley_terry_and_afd_match_numpy(margin, center):
    pc, pr, rc, rr = logps(np.random.default_rng(seed(margin, center)), "mean", near=2.0)
    hp = hparams(margin=margin, center=center)
    check_pair_suite_against_numpy(PAIR_SUITE(pc, pr, rc, rr, hp), pc, pr, rc, rr, hp, ["bt", "afd"])


def test_bradley_terry_per_pair_margin_and_afd_unequal_classes():
    rng = np.random.default_rng(11)
    rw, rl, m = rng.normal(0.3, 2.0, (3, B)).astype(np.float32)
    loss, _ = L.bradley_terry_loss(rw, rl, margin=np.abs(m), center_coef=0.1)
    close(loss, np_bradley_terry(*f64(rw, rl, np.abs(m)), 0.1)[0])
    pos, neg = rng.normal(1.0, 3.0, B).astype(np.float32), rng.normal(-0.5, 3.0, B // 2).astype(np.float32)
    loss, metrics = L.afd_discriminator_loss(pos, neg)  # gradients: the suite, with equal class sizes
    ref, _, _, ref_metrics = np_afd(*f64(pos, neg))
    close(loss, ref)
    close_metrics(metrics, ref_metrics)


def test_dil_ukl_differs_from_authors_code_by_a_constant():
    # The DIL trainer computes -pc + exp(pr - rr): same gradient in the policy, value lower by mean(rc).
    pc, pr, rc, rr = logps(np.random.default_rng(3), "mean", near=0.5)
    out = PAIR_SUITE(pc, pr, rc, rr, hparams())
    (loss, _), grads = out["dil_ukl"]
    pc64, pr64, rc64, rr64 = f64(pc, pr, rc, rr)
    close(loss, np.mean(-pc64 + np.exp(pr64 - rr64)) + rc64.mean())
    close(grads[0], np.full(B, -1.0 / B))
    close(grads[1], np.exp(pr64 - rr64) / B)


def test_token_functions_match_numpy():
    logits, targets, mask, w = lm_batch(np.random.default_rng(0))
    out = LM_SUITE(logits, targets, mask, w)
    lp = np_token_logprobs(logits, targets)
    softmax = np.exp(np_log_softmax(logits))
    onehot = np.eye(logits.shape[-1])[targets]
    close(out["token_logprobs"], lp)
    close(out["weighted_sum"], (w * lp).sum())
    close(out["grad_weighted_sum"], w[..., None] * (onehot - softmax))
    close(out["sft"], -(lp * mask).sum() / mask.sum())
    close(out["grad_sft"], (softmax - onehot) * mask[..., None] / mask.sum())
    close(out["sft_metrics"]["mean_token_accuracy"], ((np.argmax(logits, -1) == targets) * mask).sum() / mask.sum())
    assert int(out["sft_metrics"]["num_tokens"]) == mask.sum()
    close(out["seq_sum"], (lp * mask).sum(-1))
    close(out["seq_mean"], (lp * mask).sum(-1) / mask.sum(-1))
    # sequence_kl(q = lp, p = lp + w): log r = w per token.
    log_r = np.asarray(w, np.float64)
    per_token = {"k1": -log_r, "k2": 0.5 * log_r**2, "k3": np.exp(log_r) - 1 - log_r, "entropy": -lp}
    for k, v in per_token.items():
        close(out["kl"][k], (v * mask).sum(-1))


def test_token_logprobs_tiled_path_matches_numpy(monkeypatch):
    # Force several tiles with a ragged last one (602 rows, 9 per tile) so the loop path is checked on small shapes.
    monkeypatch.setattr(logprobs_module, "_TILE_ELEMENTS", 9 * 301)
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(0, 3, (2, 301, 301)), jnp.bfloat16)
    targets = rng.integers(0, 301, (2, 301)).astype(np.int32)
    lp, g = jax.jit(jax.value_and_grad(lambda x: L.token_logprobs(x, targets).sum()))(logits)
    x32 = np.asarray(logits.astype(jnp.float32))
    close(lp, np_token_logprobs(x32, targets).sum())
    assert g.dtype == jnp.bfloat16
    expected = np.eye(301)[targets] - np.exp(np_log_softmax(x32))
    np.testing.assert_allclose(np.asarray(g.astype(jnp.float32)), expected, atol=4e-3)  # bf16 output precision


@pytest.mark.parametrize("mask_dtype", [bool, np.int32, np.float32, jnp.bfloat16])
def test_sequence_logprobs_mask_dtypes_and_junk(mask_dtype):
    rng = np.random.default_rng(2)
    lp = rng.normal(-1.5, 1.0, (4, 9)).astype(np.float32)
    mask = rng.uniform(size=(4, 9)) < 0.6
    mask[3] = False  # an all-masked row: 0, not nan
    junk = np.where(mask, lp, -np.inf).astype(np.float32)  # masked positions may hold anything
    total = np.where(mask, lp.astype(np.float64), 0).sum(-1)
    m = jnp.asarray(mask).astype(mask_dtype)
    close(L.sequence_logprobs(junk, m, reduce="sum"), total)
    close(L.sequence_logprobs(junk, m, reduce="mean"), total / np.maximum(mask.sum(-1), 1))


def test_token_logprobs_out_of_range_targets_are_finite_and_maskable():
    logits, targets, mask, _ = lm_batch(np.random.default_rng(9))
    ignored = np.where(mask, targets, -100)  # HF's ignore index at masked positions
    lp = L.token_logprobs(logits, ignored)
    assert np.isfinite(lp).all()
    x = np.asarray(logits, np.float64)
    lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    close(np.asarray(lp)[~mask], -lse[~mask])  # the docstring's promise: -logsumexp where the target is out of range
    close(L.sequence_logprobs(lp, mask), (np_token_logprobs(logits, targets) * mask).sum(-1))


def test_bf16_inputs_are_computed_in_float32():
    pc, pr, rc, rr = (jnp.asarray(x, jnp.bfloat16) for x in logps(np.random.default_rng(12), "mean", near=0.3))
    up = [np.asarray(x.astype(jnp.float32)) for x in (pc, pr, rc, rr)]
    for name in L.OBJECTIVES:
        fn = L.get_objective(name)[0]
        loss, metrics = fn(pc, pr, rc, rr)
        assert loss.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in metrics.values()), name
        close(loss, fn(*up)[0], rtol=1e-6)
    logits, targets, mask, _ = lm_batch(np.random.default_rng(13))
    loss, _ = L.sft_loss(jnp.asarray(logits, jnp.bfloat16), targets, mask)
    assert loss.dtype == jnp.float32
    close(loss, L.sft_loss(np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32)), targets, mask)[0])


def test_reward_and_kl_losses_upcast_bf16_like_the_preference_losses():
    """The shared as_float32 upcast reaches the reward-model losses and sequence_kl too: bf16 inputs give float32
    results equal to those of the float32 upcasts (python-float hyper-parameters stay python floats)."""
    rng = np.random.default_rng(14)
    a, b = (jnp.asarray(rng.normal(0, 2, 16), jnp.bfloat16) for _ in range(2))
    up = [np.asarray(x.astype(jnp.float32)) for x in (a, b)]
    assert [x.dtype for x in L.as_float32(a, 0.5, np.int32(3))] == [jnp.float32] * 3
    for fn in (lambda x, y: L.bradley_terry_loss(x, y, margin=0.25, center_coef=0.1), L.afd_discriminator_loss):
        loss, metrics = fn(a, b)
        assert loss.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in metrics.values())
        close(loss, fn(*up)[0], rtol=1e-6)
    q, p = (jnp.asarray(rng.normal(-2, 1, (3, 7)), jnp.bfloat16) for _ in range(2))
    mask = (np.arange(7) < np.array([[7], [4], [1]])).astype(np.int32)
    kl = L.sequence_kl(q, p, mask)
    want = L.sequence_kl(np.asarray(q.astype(jnp.float32)), np.asarray(p.astype(jnp.float32)), mask)
    for k in want:
        assert kl[k].dtype == jnp.float32
        close(kl[k], want[k], rtol=1e-6)


def test_capped_exp_is_exact_below_the_cap_and_linear_above():
    x = np.array([-50.0, 0.0, 10.0, 44.0, EXP_CAP], np.float32)
    close(capped_exp(x), np.exp(x.astype(np.float64)))
    above = np.array([EXP_CAP + 1.0, 2 * EXP_CAP], np.float32)
    close(capped_exp(above), np.exp(EXP_CAP) * (1 + above - EXP_CAP))
    close(jax.vmap(jax.grad(capped_exp))(above), np.full(2, np.exp(EXP_CAP)))


# ----------------------------------------------------------------------------------------------------------------------
# 2. properties

PROP = settings(max_examples=25, deadline=None)
ratios = st.lists(st.floats(-50.0, 50.0, width=32), min_size=B, max_size=B).map(lambda x: np.asarray(x, np.float32))
levels = st.lists(st.floats(-80.0, -1.0, width=32), min_size=B, max_size=B).map(lambda x: np.asarray(x, np.float32))
betas = st.sampled_from([0.05, 0.1, 0.5, 1.0])


@PROP
@given(pol=levels, ref=levels, beta=betas, eps=st.sampled_from([0.0, 0.1, 0.25, 0.45]))
def test_dpo_sigmoid_and_robust_at_zero_margin_are_log2(pol, ref, beta, eps):
    out = PAIR_SUITE(pol, pol, ref, ref, hparams(beta=beta, eps=eps))
    for name in ("dpo_sigmoid", "dpo_robust"):
        (loss, metrics), _ = out[name]
        np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-6)
        assert metrics["rewards/accuracies"] == 0.0  # ties are not wins (TRL's strict >)


@PROP
@given(ref=levels, uw=ratios, ul=ratios)
def test_swapping_chosen_and_rejected_flips_margin_and_accuracy(ref, uw, ul):
    pc, pr = ref + uw, ref + ul
    hp = hparams(eps=0.1)
    out, swapped = PAIR_SUITE(pc, pr, ref, ref, hp), PAIR_SUITE(pr, pc, ref, ref, hp)
    for name in [*DPO_NAMES, *DIL_NAMES, "simpo", "bt"]:
        m, s = out[name][0][1], swapped[name][0][1]
        np.testing.assert_allclose(s["rewards/margins"], -m["rewards/margins"], atol=1e-4, err_msg=name)
        ties = np.mean(pc == pr) if name in ("simpo", "dil_lsif_ref_free") else np.mean((pc - ref) == (pr - ref))
        np.testing.assert_allclose(m["rewards/accuracies"] + s["rewards/accuracies"], 1.0 - ties, atol=1e-6,
                                   err_msg=name)


@PROP
@given(ref=levels, uw=ratios, ul=ratios, beta=st.sampled_from([0.5, 1.0]), delta=st.floats(0.01, 5.0))
def test_dil_decreasing_in_uw_increasing_in_ul(ref, uw, ul, beta, delta):
    hp = hparams(dil_beta=beta)

    def losses(w, l_):
        out = PAIR_SUITE(ref + w, ref + l_, ref, ref, hp)
        return {n: float(out[n][0][0]) for n in DIL_NAMES}

    here, up_w, up_l = losses(uw, ul), losses(uw + delta, ul), losses(uw, ul + delta)
    for n in DIL_NAMES:
        assert up_w[n] <= here[n] and up_l[n] >= here[n], n
    # Strictly, through the gradient, where float32 still resolves exp(-2 beta |u|) (lsif_ref_free's log-ratio is the
    # policy log-prob itself: there the ratios are taken against a zero reference).
    w, l_ = np.clip(uw, -20, 20), np.clip(ul, -20, 20)
    for n, out in ((n, PAIR_SUITE(ref + w, ref + l_, ref, ref, hp)) for n in DIL_NAMES[:3]):
        _, (gw, gl, _, _) = out[n]
        assert (np.asarray(gw) < 0).all() and (np.asarray(gl) > 0).all(), n
    _, (gw, gl, _, _) = PAIR_SUITE(w, l_, ref, ref, hp)["dil_lsif_ref_free"]
    assert (np.asarray(gw) < 0).all() and (np.asarray(gl) > 0).all()


def assert_all_finite(pc, pr, ref, what):
    for hp in (hparams(beta=0.1, eps=0.1, center=0.01, margin=1.0), hparams(beta=1.0, eps=0.45, dil_beta=2.0,
                                                                           simpo_beta=10.0)):
        for name, ((loss, metrics), grads) in PAIR_SUITE(pc, pr, ref, ref, hp).items():
            assert np.isfinite(loss), (name, what)
            assert all(np.isfinite(v).all() for v in metrics.values()), (name, what)
            assert all(np.isfinite(g).all() for g in grads), (name, what)


@PROP
@given(ref=levels, uw=ratios, ul=ratios)
def test_losses_finite_at_log_ratios_up_to_50(ref, uw, ul):
    assert_all_finite(ref + uw, ref + ul, ref, "random")


def test_losses_finite_exactly_at_plus_minus_50():
    ref = np.full(B, -30.0, np.float32)
    for sw in (1, -1):
        for sl in (1, -1):
            assert_all_finite(ref + 50.0 * sw, ref + 50.0 * sl, ref, (sw, sl))
    kl = L.sequence_kl(np.full((2, 3), -60.0, np.float32), np.full((2, 3), -5.0, np.float32), np.ones((2, 3)))
    assert all(np.isfinite(v).all() for v in kl.values())


@PROP
@given(rw=ratios, rl=ratios)
def test_bradley_terry_margin_and_centering_only_add(rw, rl):
    out = PAIR_SUITE(rw, rl, 0 * rw, 0 * rl, hparams())
    more = PAIR_SUITE(rw, rl, 0 * rw, 0 * rl, hparams(margin=0.5, center=0.1))
    assert float(more["bt"][0][0]) >= float(out["bt"][0][0]) - 1e-6


def test_validation_errors():
    x = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="sigmoid, ipo, hinge, robust"):
        L.dpo_loss(x, x, x, x, variant="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        L.dpo_loss(x, x, x, x, variant="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="lsif, ukl, bce"):
        L.dil_loss(x, x, x, x, variant="kliep")
    with pytest.raises(ValueError, match="reduce"):
        L.sequence_logprobs(x[None], x[None], reduce="max")
    with pytest.raises(ValueError, match="agree"):
        L.token_logprobs(np.zeros((2, 3, 5)), np.zeros((2, 4), np.int32))


# ----------------------------------------------------------------------------------------------------------------------
# 3. jit / vmap / grad agree with eager


def assert_trees_close(actual, expected, what):
    flat_a, tree_a = jax.tree_util.tree_flatten(actual)
    flat_e, tree_e = jax.tree_util.tree_flatten(expected)
    assert tree_a == tree_e, what
    for a, e in zip(flat_a, flat_e):
        close(a, e)


def test_pair_losses_jit_vmap_grad_match_eager():
    rng = np.random.default_rng(21)
    stacked = [rng.normal(-60, 12, (2, B)).astype(np.float32) for _ in range(4)]
    hp = hparams(beta=0.3, eps=0.1, dil_beta=0.05, margin=0.2, center=0.01)
    batched = jax.jit(jax.vmap(pair_suite, in_axes=(0, 0, 0, 0, None)))(*stacked, hp)
    eager = [pair_suite(*(s[i] for s in stacked), hp) for i in range(2)]  # value_and_grad dispatched op by op
    for i in range(2):
        assert_trees_close(PAIR_SUITE(*(s[i] for s in stacked), hp), eager[i], "jit")
        assert_trees_close(jax.tree_util.tree_map(lambda x: x[i], batched), eager[i], "vmap")


def test_token_functions_jit_vmap_grad_match_eager():
    rng = np.random.default_rng(22)
    batches = [lm_batch(rng) for _ in range(2)]
    stacked = [np.stack(z) for z in zip(*batches)]
    batched = jax.jit(jax.vmap(lm_suite))(*stacked)
    for i, batch in enumerate(batches):
        eager = lm_suite(*batch)
        assert_trees_close(LM_SUITE(*batch), eager, "jit")
        assert_trees_close(jax.tree_util.tree_map(lambda x: x[i], batched), eager, "vmap")


# ----------------------------------------------------------------------------------------------------------------------
# 4. token_logprobs memory at V=151936, T=2048, B=2 in bf16


def test_token_logprobs_memory_at_qwen_vocab():
    b, t, v = 2, 2048, 151936
    f32_copy = b * t * v * 4
    logits_spec = jax.ShapeDtypeStruct((b, t, v), jnp.bfloat16)
    targets_spec = jax.ShapeDtypeStruct((b, t), jnp.int32)
    fwd = jax.jit(L.token_logprobs).lower(logits_spec, targets_spec).compile().memory_analysis()
    assert fwd.temp_size_in_bytes < f32_copy / 4, fwd
    train = jax.jit(jax.value_and_grad(lambda x, y: jnp.sum(L.token_logprobs(x, y))))
    bwd = train.lower(logits_spec, targets_spec).compile().memory_analysis()
    assert bwd.temp_size_in_bytes < f32_copy / 4, bwd

    # The numbers, on a slice long enough to take the tiled path (128 rows > 110 per tile, ragged end).
    rng = np.random.default_rng(0)
    sl = jnp.asarray(rng.normal(0, 2, (b, 64, v)), jnp.bfloat16)
    tg = rng.integers(0, v, (b, 64)).astype(np.int32)
    close(jax.jit(L.token_logprobs)(sl, tg), np_token_logprobs(np.asarray(sl.astype(jnp.float32)), tg))


# ----------------------------------------------------------------------------------------------------------------------
# 5. imports


def test_import_pulls_in_no_heavy_package():
    code = ("import sys, jaxalign.losses; print(','.join(m for m in %r if m in sys.modules or "
            "any(k.startswith(m + '.') for k in sys.modules)))" % (HEAVY,))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import jaxalign.losses loaded {out.stdout.strip()}"


def test_losses_modules_import_only_jax_numpy_and_stdlib():
    allowed = {"jax", "numpy", "jaxalign", "__future__", "dataclasses", "functools", "typing", "numbers", "math"}
    for path in sorted((REPO / "jaxalign" / "losses").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"
                assert not name.startswith("jaxalign") or name.startswith("jaxalign.losses"), f"{path.name}: {name}"


# ----------------------------------------------------------------------------------------------------------------------
# registry and pair rules


def test_registry_resolves_every_objective_with_one_signature():
    pc, pr, rc, rr = logps(np.random.default_rng(8), "mean", near=0.3)
    expected_reduce = {"dpo": "sum", "cdpo": "sum", "hinge": "sum", "robust": "sum", "ipo": "mean", "simpo": "mean"}
    assert {"dpo", "cdpo", "ipo", "hinge", "robust", "simpo", "dil_lsif", "dil_ukl", "dil_bce"} <= set(L.OBJECTIVES)
    for name, objective in L.OBJECTIVES.items():
        fn, resolved = L.get_objective(name)
        assert resolved.reduce == expected_reduce.get(name, "mean"), name
        assert objective.description and objective.name == name
        loss, metrics = fn(pc, pr, rc, rr)
        assert np.isfinite(loss) and "rewards/margins" in metrics
        if not objective.uses_reference:  # reference-free: any reference gives the same loss
            close(fn(pc, pr, rc * 0 + 123.0, rr * 0 - 7.0)[0], loss)
    # Bound with Python-float defaults and run eagerly, they equal the jitted suite (traced hyper-parameters).
    suite = PAIR_SUITE(pc, pr, rc, rr, hparams(beta=0.1, eps=0.1, dil_beta=1.0, simpo_beta=2.0, gamma=0.5))
    for name, suite_name in [("cdpo", "dpo_sigmoid"), ("robust", "dpo_robust"), ("ipo", "dpo_ipo"),
                             ("hinge", "dpo_hinge"), ("simpo", "simpo"), *((n, n) for n in DIL_NAMES)]:
        vg = jax.value_and_grad(L.get_objective(name)[0], argnums=ARGS4, has_aux=True)
        assert_trees_close(vg(pc, pr, rc, rr), suite[suite_name], name)
    fn, dpo = L.get_objective("dpo", beta=0.5, reduce="mean")
    assert dpo.defaults == {"beta": 0.5, "label_smoothing": 0.0} and dpo.reduce == "mean"
    close(fn(pc, pr, rc, rr)[0], L.dpo_loss(pc, pr, rc, rr, beta=0.5)[0])
    close(L.get_objective("cdpo")[0](pc, pr, rc, rr)[0], L.dpo_loss(pc, pr, rc, rr, label_smoothing=0.1)[0])
    close(L.get_objective("dil_lsif")[0](pc, pr, rc, rr)[0], L.dil_loss(pc, pr, rc, rr)[0])
    close(L.get_objective("simpo")[0](pc, pr, rc, rr)[0], L.simpo_loss(pc, pr)[0])
    assert L.OBJECTIVES["dpo"].defaults["beta"] == 0.1  # overrides did not leak into the table
    hash(L.OBJECTIVES["dpo"])  # usable as a jit static argument
    with pytest.raises(ValueError, match="dil_lsif.*simpo"):
        L.get_objective("dpo2")
    with pytest.raises(ValueError, match="valid: beta, label_smoothing, reduce"):
        L.get_objective("dpo", gamma=1.0)


def test_pair_rules():
    rewards = jnp.array([[0.1, 3.0, -2.0, 0.5], [1.0, 1.0, 1.0, 1.0], [-1.0, -3.0, 7.0, 2.0]])
    c, r = L.PAIR_RULES["max_min"](rewards, jax.random.key(0))
    np.testing.assert_array_equal(c, [1, 0, 2])
    np.testing.assert_array_equal(r, [2, 0, 1])
    c, r = jax.jit(L.PAIR_RULES["max_random"])(jnp.tile(rewards[2:], (1500, 1)), jax.random.key(1))
    assert (np.asarray(c) == 2).all() and (np.asarray(r) != 2).all()
    counts = np.bincount(np.asarray(r).ravel(), minlength=4)
    assert counts[2] == 0 and all(abs(n - 500) < 90 for n in counts[[0, 1, 3]])  # uniform over the other three
    with pytest.raises(ValueError, match="at least 2"):
        L.PAIR_RULES["max_random"](rewards[:, :1], jax.random.key(0))
