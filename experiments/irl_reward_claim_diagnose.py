"""Post-hoc diagnostic for experiments/irl_reward_claim.py (added after its full run was seen; it changes none of its
metrics): response length as an explanation. Reads the run's cached features (``<out>/cache``) and heads
(``<out>/heads.npz``) — no model forward — and prints, per evaluation set, the accuracy of "the longer response wins",
how often each scorer agrees with it, and the mean response length (tokens, after the common cut) of the training
demonstrations vs the SFT model's samples.

    PYTHONPATH=. python experiments/irl_reward_claim_diagnose.py [--out runs/irl_reward_claim]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

SETS = ("hh_helpful_test500", "oasst_rank_pairs", "alpacaeval_gpt4_pairs")
SCORERS = ("sft_mean", "sft_sum", "irl_r1", "irl_r2", "afd", "bt_pref")


def load(cache: Path, name: str) -> dict:
    (path,) = cache.glob(f"feat_{name}_*.npz")
    f = dict(np.load(path))
    # the number of scored response tokens: summed / mean log-prob (every response has at least its end of turn)
    f["len"] = np.rint(f["sum"] / f["mean"])
    return f


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/irl_reward_claim")
    out = Path(ap.parse_args().out)
    cache, heads = out / "cache", dict(np.load(out / "heads.npz"))

    def score(f, sc):
        return f[sc] if sc in ("sum", "mean") else f["mean"] if sc == "sft_mean" else f["sum"] if sc == "sft_sum" \
            else f["h"] @ heads[sc]

    res = {"train_lengths": {k: float(load(cache, k)["len"].mean()) for k in ("demos", "greedy", "cands",
                                                                                "hh_rejected")}}
    for s in SETS:
        c, r = load(cache, f"{s}_chosen"), load(cache, f"{s}_rejected")
        longer = np.sign(c["len"] - r["len"])
        row = {"longer_wins_accuracy": float(np.mean(np.where(longer > 0, 1, np.where(longer < 0, 0, 0.5)))),
               "chosen_mean_len": float(c["len"].mean()), "rejected_mean_len": float(r["len"].mean())}
        for sc in SCORERS:
            d = np.sign(score(c, sc) - score(r, sc))
            m = longer != 0
            row[f"{sc}_prefers_longer"] = float(np.mean(d[m] == longer[m]))
        res[s] = row
    print(json.dumps(res, indent=1))
    (out / "diagnose_lengths.json").write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
