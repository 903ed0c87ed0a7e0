"""The IRL reward claim on real data, in miniature (issue 15, item 2).

Claim (IRL paper, "From Demonstrations to Rewards", RewardBench): a reward model learned from demonstrations alone —
demonstration = chosen, the policy's own near-greedy sample = rejected — ranks real human preferences far better than
the SFT model's own scores (55.91 -> 68.45 after IRL round 1 -> 69.78 after round 2).

Here: SFT model = SmolLM2-135M-Instruct (a 4-bit-dequantized copy, tests/real_model.py), demonstrations = Anthropic
HH-RLHF helpful-base ``chosen`` final turns (``helpful_test_rest_501_to_end`` stands in for the train split).
Scorers, each evaluated by pairwise accuracy on held-out preference pairs (HH helpful_test_500, OASST rank pairs,
AlpacaEval GPT-4-judged pairs) with 95% Wilson intervals:

- ``sft_mean`` / ``sft_sum``: the SFT model's mean / summed response log-prob (no training);
- ``irl_r1``: Bradley-Terry RM on (demonstration, near-greedy own sample at temperature 0.01);
- ``irl_r2``: round 2 — the policy step is best-of-N against r1 (pi_1 = the r1-best of N samples of pi_SFT at
  temperature 1), the RM re-initialised and trained on the accumulated pairs of rounds 1 and 2 (demonstration vs
  pi_1's answer added), as the authors re-initialise and accumulate;
- ``afd``: AfD discriminator loss (log D on demonstrations, log(1 - D) on pi_SFT samples at temperature 1);
- ``bt_pref``: Bradley-Terry RM on real preference pairs (the same training rows' HH chosen / rejected), same budget.

What fits 2 CPU cores in well under an hour (decided before any result was seen): every reward model is the SFT
backbone, frozen, with a trained scalar head — exactly the library's reward model (``jaxalign.models.reward_forward``:
``score . h_last``, the final normed hidden state of the last token), of which only ``score`` is trained. The frozen
backbone's features are therefore computed once per sequence and shared by every reward model, and the same forward
gives the SFT log-probs (the tied LM head on the same hidden states). Heads are trained full-batch with the library's
losses (``bradley_terry_loss``, ``afd_discriminator_loss``), optimizer (``make_optimizer``) and head initialisation
(``init_score``). Every scored response is cut to ``response_tokens`` tokens and closed with the end-of-turn token
(``ChatEncoder.encode_sampled``), demonstrations, samples and evaluation pairs alike, so no scorer can tell a
truncated demonstration from a finished sample by its last token. ``checks`` in the JSON verifies that the head
reproduces ``reward_forward`` and that the log-probs match ``forward``'s logits.

    PYTHONPATH=. python experiments/irl_reward_claim.py            # full run (~35-45 min on 2 cores)
    PYTHONPATH=. python experiments/irl_reward_claim.py --quick    # smoke run, a few minutes
    PYTHONPATH=. python experiments/irl_reward_claim.py --half     # the fallback: half the counts

Writes ``<out>/results.json`` (rows + settings + timings), ``<out>/irl_reward_claim.png``, ``<out>/heads.npz``;
intermediate features / samples are cached under ``<out>/cache`` (a re-run with the same settings reuses them).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jaxalign.data.report import DataReport  # noqa: E402
from jaxalign.data.sources import load_records  # noqa: E402
from jaxalign.data.tokenize import ChatEncoder, EncodedSequence, encode_records  # noqa: E402
from jaxalign.losses import afd_discriminator_loss, bradley_terry_loss, sequence_logprobs, token_logprobs  # noqa
from jaxalign.models import forward, load_config, read_params, reward_forward  # noqa: E402
from jaxalign.models.reward import init_score, last_token_index  # noqa: E402
from jaxalign.sampling import generate_from_params  # noqa: E402
from jaxalign.train.optim import OptimConfig, make_optimizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("JAXALIGN_SHARED_DATA", ROOT.parent / "shared" / "data"))
if not SHARED.is_dir():
    SHARED = Path("/work/shared/data")


@dataclasses.dataclass(frozen=True)
class Settings:
    n_train: int = 64  # demonstration prompts (and, for bt_pref, the same rows' preference pairs)
    n_eval: int = 100  # held-out pairs per evaluation set (seeded subsample)
    bon_train: int = 4  # round-2 policy step: best-of-N against r1 on the training prompts
    n_policy: int = 16  # held-out HH prompts for the best-of-8 policy comparison
    bon_policy: int = 8
    max_prompt_tokens: int = 96  # prompts keep their last tokens
    response_tokens: int = 64  # every scored response: first 64 tokens + end of turn; also the sampling budget
    negative_temperature: float = 0.01  # IRL authors: near-greedy negatives
    sample_temperature: float = 1.0  # AfD negatives and best-of-N candidates (hh_afd / Online-RLHF: 1.0)
    head_steps: int = 300  # full-batch steps for every head
    head_lr: float = 1e-3
    batch: int = 8  # sequences per feature forward
    buckets: tuple[int, ...] = (96, 160)  # padded lengths (few shapes: each one compiles once)
    bootstrap: int = 2000
    seed: int = 0


FULL = Settings()
QUICK = Settings(n_train=8, n_eval=8, bon_train=2, n_policy=3, bon_policy=4, max_prompt_tokens=48,
                 response_tokens=12, head_steps=30, buckets=(64,), bootstrap=200)
# the fallback decided before the full run: half the counts, everything else as FULL
HALF = dataclasses.replace(FULL, n_train=32, n_eval=50, n_policy=8)

EVAL_SETS = {
    "hh_helpful_test500": (SHARED / "hh_rlhf" / "helpful_test_500.jsonl", "hh"),
    "oasst_rank_pairs": (SHARED / "preference" / "oasst_en100_rank_pairs.jsonl", "auto"),
    "alpacaeval_gpt4_pairs": (SHARED / "preference" / "alpaca_eval_gpt4_judged_pairs.jsonl", "auto"),
}
TRAIN_FILE = SHARED / "hh_rlhf" / "helpful_test_rest_501_to_end.jsonl"
SCORERS = ("sft_mean", "sft_sum", "irl_r1", "irl_r2", "afd", "bt_pref")
LABELS = {"sft_mean": "SFT mean log-prob", "sft_sum": "SFT summed log-prob", "irl_r1": "IRL round 1",
          "irl_r2": "IRL round 2", "afd": "AfD discriminator", "bt_pref": "BT on preference pairs"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def real_model_folder() -> Path:
    spec = importlib.util.spec_from_file_location("real_model", ROOT / "tests" / "real_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.smollm2_folder()


# ---- statistics ---------------------------------------------------------------------------------------------------

def wilson(k: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def pair_outcomes(chosen: np.ndarray, rejected: np.ndarray) -> np.ndarray:
    """1 where chosen scores higher, 0 where lower, 0.5 on a tie."""
    return np.where(chosen > rejected, 1.0, np.where(chosen < rejected, 0.0, 0.5))


def bootstrap_ci(x: np.ndarray, reps: int, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = rng.choice(x, size=(reps, len(x)), replace=True).mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


# ---- data ---------------------------------------------------------------------------------------------------------

def read_pairs(path: Path, fmt: str, encoder: ChatEncoder, name: str) -> list:
    records, report = load_records(str(path), split="train", format=fmt)
    rep = DataReport(name=name)
    enc = encode_records(records, encoder, "pairs", rep)
    log(f"{name}: {len(records)} rows read, {len(enc)} encoded ({len(records) - len(enc)} skipped)")
    return enc


def cut(encoder: ChatEncoder, prompt_ids, response_ids, n: int) -> EncodedSequence:
    """prompt + the response's first ``n`` tokens (its own end-of-turn dropped) + end of turn."""
    stops = set(encoder.end_of_turn_ids())
    body = [int(t) for t in response_ids if int(t) not in stops]
    return encoder.encode_sampled(prompt_ids, body[:n])


def response_of(e, seq: EncodedSequence) -> np.ndarray:
    return seq.ids[len(e.prompt_ids):]


# ---- the frozen backbone: last-token features and response log-probs, one forward per sequence --------------------

class Backbone:
    def __init__(self, folder: Path, s: Settings, cache: Path):
        self.cfg = load_config(folder)
        self.params = read_params(folder, self.cfg)
        self.s, self.cache = s, cache
        cfg = self.cfg

        def feats(params, ids, attn, mask):
            hidden = forward(params, cfg, ids, attention_mask=attn, return_hidden=True)
            last = jnp.take_along_axis(hidden, last_token_index(attn)[:, None, None], axis=1)[:, 0]
            # the tied LM head (SmolLM2 ties embeddings), as forward applies it: logits = h @ embed.T
            logits = jnp.einsum("bth,vh->btv", hidden[:, :-1], params["embed"].astype(hidden.dtype))
            tok = token_logprobs(logits, ids[:, 1:])
            m = mask[:, 1:]
            return last, sequence_logprobs(tok, m, "sum"), sequence_logprobs(tok, m, "mean")

        self._fn = jax.jit(feats)

    def __call__(self, name: str, seqs: list[EncodedSequence], pad_id: int) -> dict[str, np.ndarray]:
        """{"h": [N, H] last-token final hidden states, "sum" / "mean": response log-probs [N]} (cached by name)."""
        key = hashlib.sha256(b"".join(s.ids.tobytes() + s.mask.tobytes() for s in seqs)).hexdigest()[:12]
        path = self.cache / f"feat_{name}_{key}.npz"
        if path.exists():
            return dict(np.load(path))
        t0 = time.time()
        b = self.s.batch
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        h = np.zeros((len(seqs), self.cfg.hidden_size), np.float32)
        lsum, lmean = np.zeros(len(seqs), np.float32), np.zeros(len(seqs), np.float32)
        for start in range(0, len(order), b):
            idx = order[start:start + b]
            longest = max(len(seqs[i]) for i in idx)
            length = next((x for x in self.s.buckets if x >= longest), longest)
            ids = np.full((b, length), pad_id, np.int32)
            attn = np.zeros((b, length), np.int32)
            mask = np.zeros((b, length), bool)
            for j, i in enumerate(idx + [idx[-1]] * (b - len(idx))):
                n = len(seqs[i])
                ids[j, :n], attn[j, :n], mask[j, :n] = seqs[i].ids, 1, seqs[i].mask
            last, s_, m_ = jax.device_get(self._fn(self.params, ids, attn, mask))
            h[idx], lsum[idx], lmean[idx] = last[:len(idx)], s_[:len(idx)], m_[:len(idx)]
        out = {"h": h, "sum": lsum, "mean": lmean}
        np.savez(path, **out)
        log(f"features {name}: {len(seqs)} sequences in {time.time() - t0:.0f}s")
        return out


# ---- reward heads -------------------------------------------------------------------------------------------------

def train_head(cfg, pos: np.ndarray, neg: np.ndarray, *, loss: str, s: Settings, seed: int) -> tuple[np.ndarray, dict]:
    """The score vector of a reward model on frozen features, trained full-batch: ``bradley_terry`` on aligned
    (pos[i], neg[i]) pairs or ``afd`` (pointwise, positives vs negatives)."""
    w0 = init_score(cfg, jax.random.PRNGKey(seed)).astype(jnp.float32)
    opt, _ = make_optimizer(OptimConfig(name="adamw", learning_rate=s.head_lr, schedule="cosine", warmup_ratio=0.1,
                                        weight_decay=0.0, max_grad_norm=1.0), s.head_steps)
    P, N = jnp.asarray(pos), jnp.asarray(neg)

    def loss_fn(w):
        rp, rn = P @ w, N @ w
        if loss == "afd":
            return afd_discriminator_loss(rp, rn)
        return bradley_terry_loss(rp, rn)

    @jax.jit
    def step(w, st):
        (l, m), g = jax.value_and_grad(loss_fn, has_aux=True)(w)
        up, st = opt.update(g, st, w)
        return optax.apply_updates(w, up), st, l, m

    w, st = w0, opt.init(w0)
    for _ in range(s.head_steps):
        w, st, l, m = step(w, st)
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    m["loss"] = float(l)
    return np.asarray(w), m


# ---- main ---------------------------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/irl_reward_claim")
    ap.add_argument("--quick", action="store_true", help="tiny counts: a few-minute smoke run")
    ap.add_argument("--half", action="store_true", help="the fallback: half the counts of the full run")
    args = ap.parse_args(argv)
    s = QUICK if args.quick else HALF if args.half else FULL
    out = Path(args.out)
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_all = time.time()

    def lap(name, t0):
        timings[name] = round(time.time() - t0, 1)
        log(f"{name}: {timings[name]}s")

    from transformers import AutoTokenizer

    t0 = time.time()
    folder = real_model_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    encoder = ChatEncoder(tok, max_prompt_length=s.max_prompt_tokens)
    bb = Backbone(folder, s, cache)
    cfg, pad = bb.cfg, encoder.pad_id
    lap("load", t0)
    rng = np.random.default_rng(s.seed)

    # ---- data: training rows (demonstrations + their HH preference pairs), evaluation pairs, policy prompts ----
    t0 = time.time()
    train_all = read_pairs(TRAIN_FILE, "hh", encoder, "train stand-in")
    train = [train_all[i] for i in rng.permutation(len(train_all))[:s.n_train]]
    R = s.response_tokens
    demos = [cut(encoder, e.prompt_ids, response_of(e, e.chosen), R) for e in train]
    hh_rejected = [cut(encoder, e.prompt_ids, response_of(e, e.rejected), R) for e in train]
    evals, policy_rows = {}, []
    for name, (path, fmt) in EVAL_SETS.items():
        rows = read_pairs(path, fmt, encoder, name)
        perm = np.random.default_rng(s.seed + 1).permutation(len(rows))
        evals[name] = [rows[i] for i in perm[:s.n_eval]]
        if name == "hh_helpful_test500":  # held-out prompts for the policy side: rows outside the evaluation subsample
            policy_rows = [rows[i] for i in perm[s.n_eval:s.n_eval + s.n_policy]]
    lap("data", t0)

    # ---- sampling: pi_SFT on the training prompts (near-greedy negatives; temperature-1 candidates) ----
    stops = tuple(int(t) for t in encoder.end_of_turn_ids())

    def sample(name, rows, n, temperature, seed):
        path = cache / f"samples_{name}.json"
        if path.exists():
            return json.loads(path.read_text())
        t = time.time()
        res = generate_from_params(bb.params, cfg, [e.prompt_ids.tolist() for e in rows], max_new_tokens=R,
                                   temperature=temperature, top_p=1.0, seed=seed, num_samples=n, stop_ids=stops,
                                   show_progress=False, batch_size=64)
        grouped = [[[int(x) for x in t_] for t_ in g] for g in res.grouped_tokens]
        path.write_text(json.dumps(grouped))
        log(f"sampled {name}: {len(rows)} prompts x {n} in {time.time() - t:.0f}s "
            f"({res.stats.tokens_per_s:.1f} tok/s)")
        return grouped

    t0 = time.time()
    greedy = sample("train_greedy", train, 1, s.negative_temperature, s.seed * 7919 + 2)
    cands = sample("train_t1", train, s.bon_train, s.sample_temperature, s.seed * 7919 + 3)
    pol = sample("policy_t1", policy_rows, s.bon_policy, s.sample_temperature, s.seed * 7919 + 5)
    lap("sampling", t0)

    def enc_samples(rows, grouped):
        return [[cut(encoder, e.prompt_ids, t_, R) for t_ in g] for e, g in zip(rows, grouped)]

    greedy_seq = [g[0] for g in enc_samples(train, greedy)]
    cand_seq = enc_samples(train, cands)
    pol_seq = enc_samples(policy_rows, pol)

    # ---- features of every sequence (one frozen forward each) ----
    t0 = time.time()
    f_demo = bb("demos", demos, pad)
    f_hhrej = bb("hh_rejected", hh_rejected, pad)
    f_greedy = bb("greedy", greedy_seq, pad)
    f_cand = bb("cands", [q for g in cand_seq for q in g], pad)
    f_eval = {}
    for name, rows in evals.items():
        f_eval[name] = (bb(f"{name}_chosen", [cut(encoder, e.prompt_ids, response_of(e, e.chosen), R) for e in rows],
                           pad),
                        bb(f"{name}_rejected",
                           [cut(encoder, e.prompt_ids, response_of(e, e.rejected), R) for e in rows], pad))
    f_pol = bb("policy_cands", [q for g in pol_seq for q in g], pad)
    lap("features", t0)

    # ---- reward heads ----
    t0 = time.time()
    H = cfg.hidden_size
    heads, head_metrics = {}, {}
    heads["irl_r1"], head_metrics["irl_r1"] = train_head(cfg, f_demo["h"], f_greedy["h"], loss="bt", s=s,
                                                         seed=s.seed + 1)
    # round 2: policy step = best-of-N under r1 over temperature-1 samples of pi_SFT; pairs accumulate; fresh head
    cand_h = f_cand["h"].reshape(len(train), s.bon_train, H)
    pick = np.argmax(cand_h @ heads["irl_r1"], axis=1)
    pi1 = cand_h[np.arange(len(train)), pick]
    heads["irl_r2"], head_metrics["irl_r2"] = train_head(
        cfg, np.concatenate([f_demo["h"], f_demo["h"]]), np.concatenate([f_greedy["h"], pi1]), loss="bt", s=s,
        seed=s.seed + 2)
    heads["afd"], head_metrics["afd"] = train_head(cfg, f_demo["h"], cand_h[:, 0], loss="afd", s=s, seed=s.seed + 1)
    heads["bt_pref"], head_metrics["bt_pref"] = train_head(cfg, f_demo["h"], f_hhrej["h"], loss="bt", s=s,
                                                           seed=s.seed + 1)
    lap("heads", t0)
    np.savez(out / "heads.npz", **heads)

    # ---- checks: the head is the library's reward model; the log-probs are forward's ----
    t0 = time.time()
    probe = demos[:2]
    ids = np.full((2, max(len(q) for q in probe)), pad, np.int32)
    attn = np.zeros_like(ids)
    for j, q in enumerate(probe):
        ids[j, :len(q)], attn[j, :len(q)] = q.ids, 1
    rm_params = {k: v for k, v in bb.params.items() if k != "lm_head"}
    rm_params["score"] = jnp.asarray(heads["irl_r1"])
    lib = np.asarray(reward_forward(rm_params, cfg, ids, attention_mask=attn))
    ours = f_demo["h"][:2] @ heads["irl_r1"]
    logits = forward(bb.params, cfg, ids[:, :-1], attention_mask=attn[:, :-1])
    lp_lib = np.asarray(sequence_logprobs(token_logprobs(logits, ids[:, 1:]),
                                          np.stack([np.pad(q.mask, (0, ids.shape[1] - len(q)))
                                                    for q in probe])[:, 1:], "sum"))
    checks = {"reward_forward_max_abs_diff": float(np.max(np.abs(lib - ours))),
              "logprob_sum_max_abs_diff": float(np.max(np.abs(lp_lib - f_demo["sum"][:2])))}
    log(f"checks: {checks}")
    lap("checks", t0)

    # ---- evaluation: pairwise accuracy of every scorer on every held-out set ----
    def scores(f, scorer):
        if scorer == "sft_mean":
            return f["mean"]
        if scorer == "sft_sum":
            return f["sum"]
        return f["h"] @ heads[scorer]

    rows_out = []
    for name, (fc, fr) in f_eval.items():
        for sc in SCORERS:
            o = pair_outcomes(scores(fc, sc), scores(fr, sc))
            lo, hi = wilson(float(o.sum()), len(o))
            rows_out.append({"kind": "accuracy", "eval_set": name, "scorer": sc, "label": LABELS[sc],
                             "n": int(len(o)), "accuracy": float(o.mean()), "ci95": [lo, hi]})
    # the training fit of each head on its own pairs (in-sample)
    fit = {k: {"train_accuracy": v.get("rewards/accuracies", v.get("accuracy")), "train_loss": v["loss"]}
           for k, v in head_metrics.items()}

    # ---- policy side: best-of-N on held-out HH prompts, judged by bt_pref ----
    n_p, K = len(policy_rows), s.bon_policy
    judge = (f_pol["h"] @ heads["bt_pref"]).reshape(n_p, K)
    pickers = {
        "irl_r1": (f_pol["h"] @ heads["irl_r1"]).reshape(n_p, K),
        "irl_r2": (f_pol["h"] @ heads["irl_r2"]).reshape(n_p, K),
        "sft_mean": f_pol["mean"].reshape(n_p, K),
        "sft_sum": f_pol["sum"].reshape(n_p, K),
    }
    picks = {k: np.argmax(v, axis=1) for k, v in pickers.items()}
    picks["random"] = np.random.default_rng(s.seed + 7).integers(0, K, n_p)
    judged = {k: judge[np.arange(n_p), v] for k, v in picks.items()}
    judge_acc = next(r for r in rows_out if r["eval_set"] == "hh_helpful_test500" and r["scorer"] == "bt_pref")
    policy_rows_out = []
    for a, b in [("irl_r2", "random"), ("irl_r1", "random"), ("sft_mean", "random"), ("sft_sum", "random"),
                 ("irl_r2", "sft_mean"), ("irl_r2", "sft_sum")]:
        o = pair_outcomes(judged[a], judged[b])
        lo, hi = bootstrap_ci(o, s.bootstrap, s.seed + 11)
        policy_rows_out.append({"kind": "best_of_n_win_rate", "picker": a, "versus": b, "n_prompts": n_p,
                                "best_of": K, "win_rate": float(o.mean()), "ci95_bootstrap": [lo, hi],
                                "same_pick": float(np.mean(picks[a] == picks[b])),
                                "judge": "bt_pref", "judge_heldout_accuracy_hh": judge_acc["accuracy"]})
    mean_judge = {k: float(v.mean()) for k, v in judged.items()}
    timings["total"] = round(time.time() - t_all, 1)

    cut_frac = {"demos_cut_to_response_tokens": float(np.mean([len(response_of(e, e.chosen)) > R + 1 for e in train]))}
    result = {"settings": dataclasses.asdict(s), "quick": args.quick, "half": args.half, "model": str(folder),
              "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_all)), "truncation": cut_frac,
              "rows": rows_out, "policy": policy_rows_out, "policy_mean_judge_score": mean_judge,
              "head_fit": fit, "checks": checks, "timings_s": timings,
              "sample_lengths": {"greedy_mean_tokens": float(np.mean([len(g[0]) for g in greedy])),
                                 "t1_mean_tokens": float(np.mean([len(t_) for g in cands for t_ in g]))}}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print_table(result)
    plot(result, out / "irl_reward_claim.png")
    log(f"wrote {out / 'results.json'} and {out / 'irl_reward_claim.png'} (total {timings['total']}s)")
    return result


def print_table(result: dict) -> None:
    sets = list(EVAL_SETS)
    print("\npairwise accuracy on held-out preference pairs (95% Wilson interval)")
    print(f"{'scorer':<24}" + "".join(f"{n:>28}" for n in sets))
    for sc in SCORERS:
        cells = []
        for n in sets:
            r = next(r for r in result["rows"] if r["eval_set"] == n and r["scorer"] == sc)
            cells.append(f"{r['accuracy']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]")
        print(f"{LABELS[sc]:<24}" + "".join(f"{c:>28}" for c in cells))
    print(f"  n pairs per set: {', '.join(str(next(r['n'] for r in result['rows'] if r['eval_set'] == n)) for n in sets)}")
    print("\nbest-of-N on held-out HH prompts, judged by the BT-on-preferences RM "
          f"(judge's held-out HH accuracy {result['policy'][0]['judge_heldout_accuracy_hh']:.3f})")
    for r in result["policy"]:
        print(f"  {r['picker']:>9} vs {r['versus']:<9} win rate {r['win_rate']:.3f} "
              f"[{r['ci95_bootstrap'][0]:.3f}, {r['ci95_bootstrap'][1]:.3f}]  (same pick {r['same_pick']:.2f}, "
              f"n={r['n_prompts']}, best of {r['best_of']})")
    print(f"\nhead fit (in-sample): {json.dumps(result['head_fit'])}")
    print(f"checks: {json.dumps(result['checks'])}\ntimings (s): {json.dumps(result['timings_s'])}")


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(EVAL_SETS)
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=90)
    width = 0.8 / len(SCORERS)
    for i, sc in enumerate(SCORERS):
        rs = [next(r for r in result["rows"] if r["eval_set"] == n and r["scorer"] == sc) for n in sets]
        x = np.arange(len(sets)) + (i - (len(SCORERS) - 1) / 2) * width
        acc = np.array([r["accuracy"] for r in rs])
        err = np.array([[a - r["ci95"][0], r["ci95"][1] - a] for a, r in zip(acc, rs)]).T
        ax.bar(x, acc, width, yerr=err, capsize=2, label=LABELS[sc])
    ax.axhline(0.5, color="k", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(sets)), sets)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("pairwise accuracy")
    n = result["rows"][0]["n"]
    ax.set_title(f"SmolLM2-135M-Instruct (Q4-dequantized), frozen backbone + trained head; n={n} pairs/set, 95% CI",
                 fontsize=8)
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--replot"]:  # redraw the figure from a results.json: --replot RESULTS.json OUT.png
        plot(json.loads(Path(sys.argv[2]).read_text()), Path(sys.argv[3]))
    else:
        main(sys.argv[1:])
