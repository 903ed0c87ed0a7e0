"""Does training with jaxalign make a real model better? SmolLM2-135M-Instruct on verifiable instructions.

Every row is a run of the CLI's own recipes (``configs/instructions_sft.yaml``, ``configs/instructions_irl.yaml``)
with ``key=value`` overrides, in its own work directory under ``runs/``; a finished phase is skipped when the command
is repeated, so the comparison resumes across sittings. The gold is the task's program (``jaxalign/tasks/
instructions.py``) on the greedy answers to 256 held-out AlpacaEval prompts; intervals are 95% Wilson intervals over
prompts (one seed) or the spread of the seeds' means (several).

    python experiments/instructions.py --seeds 0 --variants start sft irl_dil oracle_dpo      # run (resumes)
    python experiments/instructions.py --seeds 0 --report                                     # table + plot

Variants (all but ``start`` and ``sft`` start from the seed's SFT model and train LoRA adapters):

- ``start``: SmolLM2-135M-Instruct as given (greedy, so one run serves every seed);
- ``sft``: LoRA SFT on 512 demonstrations (32 steps);
- ``sft_more``: the SFT model trained ``COMPUTE_MATCHED_STEPS`` more SFT steps — as many optimizer steps as the two
  IRL rounds' policy steps take at most (2 rounds x 4 epochs x 64 pairs / 16);
- ``irl_dil`` / ``irl_dpo``: two IRL rounds (RM on (demonstration, own near-greedy sample), policy step DIL-LSIF / DPO
  on best-of-4 max-min pairs scored by it);
- ``oracle_dpo``: DPO on best-of-4 max-min pairs ranked by the gold program (no reward model) — whether the policy
  step can move the gold at all;
- ``oracle_rloo``: RLOO with the gold program as the reward;
- ``rloo``: RLOO against the round's learned reward model; ``spin``: SPIN-style (demonstration, own sample) DPO pairs,
  the previous round as reference; ``afd``: AfD's discriminator reward and best-of-N.

The data are built first (``jaxalign.tasks.instruction_data``) from real answers: Alpaca-GPT4 (LLaMA-Factory's demo
slice) and HH-RLHF helpful for training, AlpacaEval (zephyr-7b-beta's answers as demonstrations) held out. The folder
with those files is ``$JAXALIGN_SHARED_DATA`` (default: ``shared/data`` in the checkout's parent folder); the model is the
offline SmolLM2 folder ``tests/real_model.py`` builds.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from real_runs import ROOT, RUNS, SHARED, run_cli, smollm2, wilson

DATA = RUNS / "instructions_data"
COMPUTE_MATCHED_STEPS = 32

# each variant: (recipe, overrides); {sft} is the seed's SFT model folder
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "start": ("instructions_sft", ["sft.enabled=false"]),
    "sft": ("instructions_sft", []),
    "sft_more": ("instructions_sft", ["model.path={sft}", f"sft.max_steps={COMPUTE_MATCHED_STEPS}"]),
    "irl_dil": ("instructions_irl", []),
    "irl_dpo": ("instructions_irl", ["policy.objective=dpo"]),
    # the oracle trains no reward model; its policy phase's fingerprint still covers the reward section, which was
    # the recipe's earlier one when its seed-0 round 1 ran (kept so that run resumes)
    "oracle_dpo": ("instructions_irl", ["policy.reward=gold", "policy.objective=dpo", "run.phases=sample,policy,eval",
                                        "reward.learning_rate=1e-4", "reward.epochs=2", "reward.save_every=8"]),
    "oracle_rloo": ("instructions_irl", ["policy.reward=gold", "policy.kind=rloo", "run.phases=policy,eval",
                                         "policy.rollout_batch_size=64"]),
    "rloo": ("instructions_irl", ["policy.kind=rloo", "policy.rollout_batch_size=64"]),
    "spin": ("instructions_irl", ["run.method=spin", "policy.pairs=demo_vs_sample", "policy.objective=dpo",
                                  "policy.reference=previous"]),
    "afd": ("instructions_irl", ["run.method=afd", "eval.best_of_n=4"]),
}


def workdir(variant: str, seed: int) -> Path:
    return RUNS / ("instructions_start" if variant == "start" else f"instructions_{variant}_s{seed}")


def build_data() -> None:
    if (DATA / "eval.jsonl").is_file():
        return
    subprocess.run([sys.executable, "-m", "jaxalign.tasks.instruction_data",
                    "--train", str(SHARED / "sft" / "llamafactory_alpaca_en_demo_messages.jsonl"),
                    str(SHARED / "hh_rlhf" / "helpful_test_rest_501_to_end.jsonl"),
                    "--eval", str(SHARED / "sft" / "alpaca_eval_zephyr-7b-beta_messages.jsonl"),
                    "--out", str(DATA)], cwd=ROOT, check=True)


def row_overrides(variant: str, seed: int, model: Path) -> tuple[str, list[str]]:
    """(recipe, overrides) of one row."""
    recipe, overrides = VARIANTS[variant]
    sft = workdir("sft", seed) / "phases" / "sft" / "model"
    args = [o.format(sft=sft) for o in overrides]
    if recipe == "instructions_irl" or variant == "sft_more":
        args = [f"model.path={sft}"] + [a for a in args if not a.startswith("model.path=")]
    else:
        args = [f"model.path={model}"] + args
    return recipe, [f"run.name={workdir(variant, seed).name}", f"run.seed={seed}", *args]


def run(variants: list[str], seeds: list[int]) -> None:
    build_data()
    model = smollm2()
    for seed in seeds:
        for v in variants:
            if v == "start" and seed != seeds[0]:
                continue
            recipe, args = row_overrides(v, seed, model)
            run_cli(recipe, workdir(v, seed), args)


# ---- the report ---------------------------------------------------------------------------------------------------

def evals(folder: Path) -> dict[str, dict]:
    """``{stage: {gold, by_instruction, metrics}}`` for each finished eval phase of a run (eval0, r1, r2, ...)."""
    from jaxalign.tasks.instructions import instruction_of

    out = {}
    for done in sorted((folder / "phases").glob("*eval*/done.json")):
        name = done.parent.name.replace("_eval", "")
        data = json.loads((done.parent / "eval.json").read_text())
        by: dict[str, list[float]] = {}
        for prompt, g in zip(data["prompts"], data["gold"]):
            by.setdefault(instruction_of(prompt).name, []).append(g)
        out[name] = {"gold": data["gold"], "metrics": json.loads(done.read_text())["metrics"],
                     "by_instruction": {k: sum(v) / len(v) for k, v in sorted(by.items())}}
    return out


def phase_metrics(folder: Path, kind: str) -> dict[str, dict]:
    return {d.parent.name.split("_")[0]: json.loads(d.read_text())["metrics"]
            for d in sorted((folder / "phases").glob(f"r*_{kind}/done.json"))}


def report(seeds: list[int], out: Path) -> dict:
    rows = []
    for v in VARIANTS:
        for seed in (seeds[:1] if v == "start" else seeds):
            folder = workdir(v, seed)
            if not folder.is_dir():
                continue
            stages = evals(folder)
            if v not in ("start", "sft", "sft_more"):
                stages.pop("eval0", None)  # the SFT model again: its row is "sft"
            for stage, e in stages.items():
                g = e["gold"]
                lo, hi = wilson(sum(g), len(g))
                m = e["metrics"]
                row = {"variant": v, "seed": seed, "stage": stage, "prompts": len(g), "gold": sum(g) / len(g),
                       "gold_lo": lo, "gold_hi": hi, "strict": m.get("gold_strict"), "guard": m.get("gold_guard"),
                       "answer_length": m.get("answer_length"),
                       "rm_demo_vs_sample_accuracy": m.get("rm_demo_vs_sample_accuracy"),
                       "by_instruction": e["by_instruction"]}
                pol = phase_metrics(folder, "policy").get(stage, {})
                for k in ("rm_gold_pair_accuracy", "rm_gold_pairs", "samples_gold", "chosen_gold", "rejected_gold",
                          "pairs", "steps"):
                    row[k] = pol.get(k)
                rows.append(row)
    out.mkdir(parents=True, exist_ok=True)
    result = {"seeds": seeds, "rows": rows, "compute_matched_steps": COMPUTE_MATCHED_STEPS}
    (out / "instructions.json").write_text(json.dumps(result, indent=1))
    print(table(rows))
    print()
    print(instruction_table(rows))
    plot(rows, out / "instructions.png")
    return result


def fmt(x, spec=".3f") -> str:
    return "—" if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    head = ("| variant | seed | stage | gold [95% CI] | strict | guard | answer tokens | RM: demo vs own | "
            "RM: gold-ranked own pairs (n) | gold of samples / chosen / rejected |")
    lines = [head, "|---" * 10 + "|"]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['seed']} | {r['stage']} | {r['gold']:.3f} [{r['gold_lo']:.3f}, {r['gold_hi']:.3f}]"
            f" | {fmt(r['strict'])} | {fmt(r['guard'])} | {fmt(r['answer_length'], '.1f')} | "
            f"{fmt(r['rm_demo_vs_sample_accuracy'])} | {fmt(r['rm_gold_pair_accuracy'])} "
            f"({fmt(r['rm_gold_pairs'], '.0f')}) | {fmt(r['samples_gold'])} / {fmt(r['chosen_gold'])} / "
            f"{fmt(r['rejected_gold'])} |")
    return "\n".join(lines)


def instruction_table(rows: list[dict]) -> str:
    names = sorted({k for r in rows for k in r["by_instruction"]})
    lines = ["| variant | seed | stage | " + " | ".join(names) + " |", "|---" * (3 + len(names)) + "|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['seed']} | {r['stage']} | "
                     + " | ".join(fmt(r["by_instruction"].get(n), ".2f") for n in names) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    base = [r for r in rows if r["variant"] in ("start", "sft")]
    for r in base:
        ax.axhline(r["gold"], ls="--" if r["variant"] == "start" else "-", color="grey", lw=1)
        ax.text(2.05, r["gold"], r["variant"], va="center", fontsize=8)
    for v in dict.fromkeys(r["variant"] for r in rows if r["variant"] not in ("start", "sft")):
        rs = [r for r in rows if r["variant"] == v]
        xs = [0 if r["stage"] == "eval0" else int(r["stage"][1:]) for r in rs]
        ys = [r["gold"] for r in rs]
        err = [[y - r["gold_lo"] for y, r in zip(ys, rs)], [r["gold_hi"] - y for y, r in zip(ys, rs)]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=v)
    ax.set_xlabel("round (sft_more: its one stage)")
    ax.set_ylabel("gold (instruction followed and an answer)")
    ax.set_xticks([1, 2])
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--report", action="store_true", help="only collect the finished runs into a table and plot")
    ap.add_argument("--out", type=Path, default=RUNS / "instructions_report")
    a = ap.parse_args()
    if not a.report:
        run(a.variants, a.seeds)
    report(a.seeds, a.out)


if __name__ == "__main__":
    main()
