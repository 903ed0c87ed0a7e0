#!/usr/bin/env python
"""jaxalign's entry point: run a recipe, or plan it for a TPU slice.

    python launch/tpu_run.py --config ultrachat_dil [--workdir DIR] [key=value ...]
    python launch/tpu_run.py --config ultrachat_dil --plan v5p:4x4x4     # AOT memory / FLOPs plan, no TPU needed

Exit codes: 0 done; 2 bad input (a one-paragraph message, nothing compiled); 75 preempted (SIGTERM / SIGINT: the
running phase saved a checkpoint — re-run the same command to resume); 1 anything else.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

EXIT_BAD_INPUT = 2


def _maybe_distributed(mode: str) -> None:
    """Multi-host TPU: initialise jax.distributed (auto-detected on a pod); nothing of it on one host."""
    import jax

    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if mode == "on" or (mode == "auto" and "," in hosts):
        jax.distributed.initialize()


def _stop_on_sigterm():
    """SIGTERM anywhere outside a training loop (loading, sampling, evaluating, writing the report) stops the run like
    Ctrl-C: exit 75, finished phases and checkpoints kept. Inside a training loop the loop's own handler takes over and
    saves a checkpoint first. Returns the previous handler (None off the main thread, where signals cannot be set)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="demo_cpu", help="a name in configs/ or a YAML path (default: demo_cpu)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--plan", default=None, metavar="TOPOLOGY", help="AOT-compile every phase for a TPU topology")
    ap.add_argument("--force", action="store_true", help="redo phases whose config changed / reuse another run's dir")
    ap.add_argument("--distributed", choices=("auto", "on", "off"), default="auto")
    ap.add_argument("overrides", nargs="*", help="key=value, e.g. policy.learning_rate=5e-7")
    args = ap.parse_args(argv)

    from jaxalign import config as config_lib
    from jaxalign.config import ConfigError
    from jaxalign.data.report import DataError
    from jaxalign.models.config import ModelConfigError

    try:
        cfg = config_lib.load(args.config, args.overrides)
        if args.workdir:
            cfg.run.workdir = args.workdir
        print("# resolved config\n" + config_lib.dump(cfg), flush=True)
        if args.plan:
            from jaxalign.plan import plan_recipe

            plan_recipe(cfg, args.plan)
            return 0
        _maybe_distributed(args.distributed)
        from jaxalign.pipeline.runner import Pipeline
        from jaxalign.train.loop import EXIT_PREEMPTED, Preempted

        previous = _stop_on_sigterm()
        try:
            Pipeline(cfg, force=args.force).run()
        except Preempted as e:
            print(f"[jaxalign] {e}", file=sys.stderr)
            return EXIT_PREEMPTED
        finally:
            if previous is not None:
                import signal

                signal.signal(signal.SIGTERM, previous)
    except (ConfigError, DataError, ModelConfigError) as e:
        print(f"jaxalign: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("[jaxalign] interrupted; finished phases and the last checkpoint are kept — re-run the same command "
              "to resume.", file=sys.stderr)
        return 75
    return 0


if __name__ == "__main__":
    sys.exit(main())
