"""Metrics out: tensorboardX scalars with TRL's names, a JSON-lines log the report plots from, and a progress bar.

Tags are ``train/<name>`` and ``eval/<name>`` with TRL's names (``loss``, ``grad_norm``, ``learning_rate``,
``rewards/chosen``, ``rewards/accuracies``, ``logps/chosen`` ...) so curves overlay runs made with TRL. Each phase
writes into its own tensorboard run directory. Only process 0 writes. The directory may be a bucket (``gs://...``):
a bucket object cannot be appended to, so the event files and metrics.jsonl are written into a local folder whose
changed files are uploaded whole every ``flush_secs`` and on close (tensorboardX's own GCS writer does the same, but
re-uploads from its destructor at interpreter exit, which hangs for minutes when the network is gone).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
from etils import epath

from jaxalign.storage import is_remote, staging_dir


class MetricsWriter:
    def __init__(self, logdir: str | epath.PathLike, *, total_steps: int, desc: str, show_progress: bool = True,
                 initial_step: int = 0, flush_secs: float = 10):
        self.logdir = epath.Path(logdir)
        self.main = jax.process_index() == 0
        self.tb = None
        self.bar = None
        self.flush_secs = flush_secs
        self._staging = None  # the local folder uploaded to a bucket logdir
        if self.main:
            from tensorboardX import SummaryWriter

            self.logdir.mkdir(parents=True, exist_ok=True)
            local = Path(self.logdir)
            if is_remote(self.logdir):
                self._staging, self._uploaded, self._sizes = staging_dir(), time.time(), {}
                local = Path(self._staging.name)
                if (self.logdir / "metrics.jsonl").is_file():  # a resumed run appends to what the bucket holds
                    (local / "metrics.jsonl").write_bytes((self.logdir / "metrics.jsonl").read_bytes())
            self.tb = SummaryWriter(str(local), flush_secs=flush_secs)
            path = local / "metrics.jsonl"
            # A process killed mid-write can leave a partial last line: start the resumed run on a fresh line.
            torn = False
            if path.is_file() and path.stat().st_size > 0:
                with open(path, "rb") as f:
                    f.seek(-1, 2)
                    torn = f.read(1) != b"\n"
            self.jsonl = open(path, "a")
            if torn:
                self.jsonl.write("\n")
            if show_progress:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total_steps, initial=initial_step, desc=desc, dynamic_ncols=True, leave=True)

    def log(self, step: int, metrics: dict[str, Any], *, prefix: str = "train", advance: int = 0) -> None:
        if not self.main:
            return
        flat = {k: float(v) for k, v in metrics.items()}
        for k, v in flat.items():
            self.tb.add_scalar(f"{prefix}/{k}", v, step)
        self.jsonl.write(json.dumps({"step": step, "split": prefix, "time": time.time(), **flat}) + "\n")
        self.jsonl.flush()  # one small write per step; a killed run keeps its log up to the last step
        if self._staging is not None and time.time() - self._uploaded >= self.flush_secs:
            self.flush()
        if self.bar is not None:
            if advance:
                self.bar.update(advance)
            shown = {k: flat[k] for k in ("loss", "rewards/accuracies", "grad_norm", "tokens_per_second") if k in flat}
            self.bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def flush(self) -> None:
        """Make what was logged so far durable (the loop calls it at every checkpoint, so a run resumed from one finds
        the log of every step before it; in a bucket this is an upload)."""
        if not self.main:
            return
        self.tb.flush()
        if self._staging is not None:
            self._upload()

    def close(self) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.bar.close()
        self.tb.close()
        self.jsonl.close()
        if self._staging is not None:
            self._upload()
            self._staging.cleanup()

    def _upload(self) -> None:
        """Copy the staged files that changed since the last upload (event files, metrics.jsonl) to the bucket."""
        for f in Path(self._staging.name).iterdir():
            size = f.stat().st_size
            if self._sizes.get(f.name) != size:
                (self.logdir / f.name).write_bytes(f.read_bytes())
                self._sizes[f.name] = size
        self._uploaded = time.time()


def read_metrics(logdir: str | epath.PathLike, *, latest_only: bool = False) -> list[dict[str, Any]]:
    """The logged records in file order. Lines torn by a killed process are skipped. A resumed run re-logs the steps
    after its last checkpoint; ``latest_only=True`` keeps only the last record of each (split, step), in step order."""
    path = epath.Path(logdir) / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    if latest_only:
        last = {(r.get("split"), r.get("step")): r for r in out}
        out = sorted(last.values(), key=lambda r: (str(r.get("split")), r.get("step") or 0))
    return out
