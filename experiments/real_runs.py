"""What the experiments on a real model share: where runs and data live, the offline SmolLM2 folder, the CLI call and
the 95% Wilson interval their tables report."""
from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs"
SHARED = Path(os.environ.get("JAXALIGN_SHARED_DATA", ROOT.parent / "shared" / "data"))


def smollm2() -> Path:
    """The offline SmolLM2-135M-Instruct folder (built once by ``tests/real_model.py``)."""
    spec = importlib.util.spec_from_file_location("real_model", ROOT / "tests" / "real_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.smollm2_folder()


def run_cli(recipe: str, workdir: Path, overrides: list[str]) -> None:
    """One run of the CLI's own launcher (a finished phase is skipped when the same command is repeated)."""
    cmd = [sys.executable, "launch/tpu_run.py", "--config", recipe, "--workdir", str(workdir), *overrides]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion k / n."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)
