"""The CPU demo's numbers across seeds and policy objectives, plus its wall-clock time.

    python benchmarks/demo_seeds.py                         # seeds 0,1,2 x objectives dil_lsif,dpo
    python benchmarks/demo_seeds.py --seeds 0 --objectives dil_lsif   # one run: the demo's own timing

Each run is the real launcher (``launch/tpu_run.py --config demo_cpu``) in a subprocess with its own work directory;
the table gives, per objective and round, the mean and spread (min..max over seeds) of the gold metric, the reward
model's held-out accuracy and its win rate against the SFT policy, and each run's wall-clock time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def run_demo(workdir: Path, seed: int, objective: str, extra: list[str]) -> tuple[list[dict], float]:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, str(ROOT / "launch" / "tpu_run.py"), "--config", "demo_cpu", "--workdir", str(workdir),
           f"run.seed={seed}", f"policy.objective={objective}", "run.show_progress=false", *extra]
    t0 = time.time()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if out.returncode != 0:
        raise SystemExit(f"demo failed (seed {seed}, {objective}):\n{out.stderr[-3000:]}")
    sys.path.insert(0, str(ROOT))
    from jaxalign import config as config_lib
    from jaxalign.pipeline.report import round_table
    from jaxalign.pipeline.runner import Pipeline

    cfg = config_lib.load(str(workdir / "run.yaml"))
    return round_table(Pipeline(cfg, workdir)), wall


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--objectives", default="dil_lsif,dpo")
    ap.add_argument("--root", default="runs/demo_seeds")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    results: dict[str, list[list[dict]]] = {}
    walls = []
    for objective in args.objectives.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            table, wall = run_demo(Path(args.root) / f"{objective}_seed{seed}", seed, objective, args.overrides)
            results.setdefault(objective, []).append(table)
            walls.append((objective, seed, wall))
            print(f"{objective} seed {seed}: {wall:.0f} s  " + json.dumps(
                {r["round"]: round(r.get("gold", float("nan")), 3) for r in table}), flush=True)

    def cell(values):
        v = np.asarray([x for x in values if x is not None], float)
        if not len(v):
            return "–"
        return f"{v.mean():.3f} ({v.min():.3f}..{v.max():.3f})" if len(v) > 1 else f"{v[0]:.3f}"

    print("\n| objective | round | gold | RM held-out acc | RM win rate vs SFT |")
    print("|---|---|---|---|---|")
    for objective, tables in results.items():
        for i, row in enumerate(tables[0]):
            vals = [t[i] for t in tables]
            print(f"| {objective} | {row['round']} | {cell([v.get('gold') for v in vals])} | "
                  f"{cell([v.get('rm_heldout_accuracy') for v in vals])} | "
                  f"{cell([v.get('rm_win_rate_vs_sft') for v in vals])} |")
    print("\n| objective | seed | wall-clock s |\n|---|---|---|")
    for objective, seed, wall in walls:
        print(f"| {objective} | {seed} | {wall:.0f} |")


if __name__ == "__main__":
    main()
