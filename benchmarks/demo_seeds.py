"""The CPU demo's numbers across seeds and policy steps, plus its wall-clock time (docs/results.md).

    python benchmarks/demo_seeds.py                               # seeds 0-4 x dil_lsif, dpo, spin
    python benchmarks/demo_seeds.py --seeds 0 --variants dil_lsif # one run: the demo's own timing

Variants (the policy step of each IRL round; everything else is ``configs/demo_cpu.yaml``):

- ``dil_lsif``: the demo as shipped — best-of-N max-min pairs ranked by the round's reward model, DIL's LSIF loss;
- ``dpo``: the same pairs, DPO's loss;
- ``spin``: SPIN-style pairs that do not use the reward model — demonstration vs the policy's own sample, DPO's loss
  with the previous round's policy as reference (``configs/ultrachat_spin.yaml``'s policy choices).

Each run is the real launcher (``launch/tpu_run.py --config demo_cpu``) in a subprocess with its own work directory
(a finished run's directory is reused: its phases are skipped); ``--jobs 2`` runs two at a time.
The table gives, per variant and round, the mean and range (min..max over seeds) of the gold score (greedy answers to
the held-out prompts), the reward model's accuracy on held-out (demonstration, own answer) pairs and on the corrupted
held-out pairs, and its win rate against the SFT model's answers; ``--json`` writes every run's rows.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "dil_lsif": ["policy.objective=dil_lsif"],
    "dpo": ["policy.objective=dpo"],
    "spin": ["policy.objective=dpo", "policy.pairs=demo_vs_sample", "policy.reference=previous"],
}
COLUMNS = (("gold", "gold"), ("rm_demo_vs_sample_accuracy", "RM acc. (demo vs own answer)"),
           ("rm_heldout_accuracy", "RM acc. (corrupted pairs)"), ("rm_win_rate_vs_sft", "RM win rate vs SFT"))


def run_demo(workdir: Path, seed: int, variant: str, extra: list[str]) -> tuple[list[dict], float]:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, str(ROOT / "launch" / "tpu_run.py"), "--config", "demo_cpu", "--workdir", str(workdir),
           f"run.seed={seed}", "run.show_progress=false", *VARIANTS[variant], *extra]
    t0 = time.time()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if out.returncode != 0:
        raise RuntimeError(f"demo failed (seed {seed}, {variant}):\n{out.stderr[-3000:]}")
    sys.path.insert(0, str(ROOT))
    from jaxalign import config as config_lib
    from jaxalign.pipeline.report import round_table
    from jaxalign.pipeline.runner import Pipeline

    cfg = config_lib.load(str(workdir / "run.yaml"))
    return round_table(Pipeline(cfg, workdir)), wall


def cell(values) -> str:
    v = np.asarray([x for x in values if x is not None], float)
    if not len(v):
        return "–"
    return f"{v.mean():.3f} ({v.min():.3f}..{v.max():.3f})" if len(v) > 1 else f"{v[0]:.3f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--root", default="runs/demo_seeds")
    ap.add_argument("--jobs", type=int, default=1, help="seeds run at a time")
    ap.add_argument("--json", default="", help="write every run's round table here")
    ap.add_argument("overrides", nargs="*", help="config overrides for every run")
    args = ap.parse_args()
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; valid: {sorted(VARIANTS)}")
    variants, seeds = args.variants.split(","), [int(s) for s in args.seeds.split(",")]

    def one(job: tuple[str, int]) -> dict:
        variant, seed = job
        table, wall = run_demo(Path(args.root) / f"{variant}_seed{seed}", seed, variant, args.overrides)
        print(f"{variant} seed {seed}: {wall:.0f} s  " + json.dumps(
            {r["round"]: round(r.get("gold", float("nan")), 3) for r in table}), flush=True)
        return {"variant": variant, "seed": seed, "seconds": wall, "rounds": table}

    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(one, [(v, s) for v in variants for s in seeds]))
    results: dict[str, list[list[dict]]] = {}
    for r in sorted(runs, key=lambda r: (variants.index(r["variant"]), r["seed"])):
        results.setdefault(r["variant"], []).append(r["rounds"])
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1) + "\n")

    print("\n| variant | round | " + " | ".join(name for _, name in COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for variant, tables in results.items():
        for i, row in enumerate(tables[0]):
            vals = [t[i] for t in tables]
            print(f"| {variant} | {row['round']} | " + " | ".join(cell([v.get(k) for v in vals]) for k, _ in COLUMNS)
                  + " |")
    print("\n| variant | seed | wall-clock s |\n|---|---|---|")
    for r in sorted(runs, key=lambda r: (variants.index(r["variant"]), r["seed"])):
        print(f"| {r['variant']} | {r['seed']} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
