#!/usr/bin/env python
"""jaxalign's entry point from a source checkout: the same as the ``jaxalign`` command (jaxalign/cli.py).

    python launch/tpu_run.py --config ultrachat_dil [--workdir DIR] [key=value ...]
    python launch/tpu_run.py --config ultrachat_dil --plan v5p:4x4x4     # AOT memory / FLOPs plan, no TPU needed
    python launch/tpu_run.py --help                                      # every config key, its type and meaning

Exit codes: 0 done; 2 bad input; 75 preempted (re-run the same command to resume); 1 anything else.
"""
from __future__ import annotations

import sys
from pathlib import Path

# runs without an install: the checkout's jaxalign before any installed one
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jaxalign.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
