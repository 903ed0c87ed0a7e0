"""The field's sanity check on real preferences: SmolLM2-135M-Instruct (LoRA) on Anthropic HH-RLHF helpful pairs.

Every row is a run of ``configs/hh_helpful_prefs.yaml`` with ``key=value`` overrides, in its own work directory under
``runs/``; offline, the data and the model are pointed at local copies of the same rows (``helpful_test_rest_501_to_end``
= the helpful-base test rows after the first 500, the training pairs; ``helpful_test_500`` = the first 500, held out)
and at the offline SmolLM2 folder. The curves are the held-out metrics the policy / reward phase logs every
``eval.eval_steps`` steps (TRL's ``eval_rewards/accuracies``, ``eval_rewards/margins``) and the accuracy within
length-matched pairs (chosen and rejected within 10% of each other's length).

    python experiments/hh_preferences.py                 # run every variant (resumes), then the table and plot
    python experiments/hh_preferences.py --report        # only the table and plot of the finished runs
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from real_runs import RUNS, SHARED, run_cli, smollm2, wilson

RECIPE = "hh_helpful_prefs"
VARIANTS: dict[str, list[str]] = {
    "dpo": [],
    "dil_lsif": ["policy.objective=dil_lsif", "policy.reduce=mean"],
    "simpo": ["policy.objective=simpo", "policy.beta=2.0", "policy.simpo_gamma=1.0"],
    "reward_bt": ["run.method=reward"],
}
# published figures to read ours beside (not to match at this budget)
ANCHORS = [
    ("SmolLM2-135M-Instruct's own DPO on UltraFeedback (61k pairs, 2 epochs): eval rewards/accuracies", 0.615),
    ("A Qwen2-0.5B reward model after 3,200 pairs (TRL's reward-modelling documentation): eval accuracy", 0.688),
]


def workdir(variant: str) -> Path:
    return RUNS / f"hh_prefs_{variant}"


def local_data() -> list[str]:
    hh = SHARED / "hh_rlhf"
    return [f"data.train.source={hh / 'helpful_test_rest_501_to_end.jsonl'}", "data.train.split=train",
            "data.train.data_dir=", f"data.eval_prefs.source={hh / 'helpful_test_500.jsonl'}",
            "data.eval_prefs.split=train", "data.eval_prefs.data_dir=",
            f"data.eval_prompts.source={hh / 'helpful_test_500.jsonl'}", "data.eval_prompts.split=train",
            "data.eval_prompts.data_dir="]


def run(variants: list[str]) -> None:
    model = smollm2()
    for v in variants:
        run_cli(RECIPE, workdir(v), [f"run.name=hh_prefs_{v}", f"model.path={model}", *local_data(), *VARIANTS[v]])


def curves(folder: Path) -> list[dict]:
    """The held-out records of the run's training phase (``split == "eval"`` in its metrics.jsonl)."""
    found = sorted((folder / "phases").glob("*/tb/metrics.jsonl"))
    rows = [json.loads(line) for f in found for line in f.read_text().splitlines()]
    return [r for r in rows if r.get("split") == "eval"]


def report(out: Path, heldout: int) -> dict:
    result = {"heldout_pairs": heldout, "anchors": ANCHORS, "runs": {}}
    lines = ["| objective | steps | held-out accuracy [95% CI] | length-matched accuracy [95% CI] (pairs) | "
             "held-out margin |", "|---|---|---|---|---|"]
    for v in VARIANTS:
        c = curves(workdir(v))
        if not c:
            continue
        result["runs"][v] = c
        last = c[-1]
        acc, lm = last["rewards/accuracies"], last.get("rewards/accuracies_length_matched")
        n_lm = int(last.get("length_matched", 0))
        lo, hi = wilson(acc * heldout, heldout)
        lm_text = "—"
        if lm is not None:
            llo, lhi = wilson(lm * n_lm, n_lm)
            lm_text = f"{lm:.3f} [{llo:.3f}, {lhi:.3f}] ({n_lm})"
        lines.append(f"| {v} | {last['step']} | {acc:.3f} [{lo:.3f}, {hi:.3f}] | {lm_text} | "
                     f"{last['rewards/margins']:.3f} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "hh_preferences.json").write_text(json.dumps(result, indent=1))
    print("\n".join(lines))
    print()
    for name, value in ANCHORS:
        print(f"- {name}: {value}")
    plot(result["runs"], out / "hh_preferences.png")
    return result


def plot(runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for v, c in runs.items():
        steps = [r["step"] for r in c]
        axes[0].plot(steps, [r["rewards/accuracies"] for r in c], marker="o", label=v)
        axes[1].plot(steps, [r.get("rewards/accuracies_length_matched", float("nan")) for r in c], marker="o",
                     label=v)
        axes[2].plot(steps, [r["rewards/margins"] for r in c], marker="o", label=v)
    for ax, title in zip(axes, ("eval rewards/accuracies", "... within length-matched pairs", "eval rewards/margins")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
    for ax in axes[:2]:
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--report", action="store_true", help="only collect the finished runs into a table and plot")
    ap.add_argument("--heldout", type=int, default=128, help="held-out pairs per evaluation (the recipe's "
                    "eval.heldout_limit)")
    ap.add_argument("--out", type=Path, default=RUNS / "hh_preferences_report")
    a = ap.parse_args()
    if not a.report:
        run(a.variants)
    report(a.out, a.heldout)


if __name__ == "__main__":
    main()
