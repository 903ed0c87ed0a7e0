"""The demo-design search behind docs/results.md ("A demo whose gain is real"): one demo run with the task's generator
arguments changed, on a development seed.

    python experiments/demo_search.py --workdir runs/search/A --task n_train=600 -- run.seed=100 [key=value ...]

``--task k=v`` sets an argument of ``jaxalign.tasks.demo.build_demo_assets`` (ints, or strings for ``kinds``);
everything after ``--`` goes to the launcher as config overrides. The design search ran on seed 100 only; the 5-seed
table uses seeds 0-4, fixed before any design was tried.
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--task", action="append", default=[], help="build_demo_assets argument k=v")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    task = {}
    for kv in args.task:
        k, v = kv.split("=", 1)
        task[k] = int(v) if v.lstrip("-").isdigit() else v
    from jaxalign.pipeline import context
    from jaxalign.tasks import demo as demo_task

    context.build_demo_assets = functools.partial(demo_task.build_demo_assets, **task)
    from jaxalign.cli import main as cli_main

    return cli_main(["--config", "demo_cpu", "--workdir", args.workdir, "run.show_progress=false", *args.overrides])


if __name__ == "__main__":
    raise SystemExit(main())
