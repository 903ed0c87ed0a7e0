"""Metrics out: tensorboardX and / or Weights & Biases scalars with TRL's names, a JSON-lines log the report plots from,
and a progress bar.

Tags are ``train/<name>`` and ``eval/<name>`` with TRL's names (``loss``, ``grad_norm``, ``learning_rate``,
``rewards/chosen``, ``rewards/accuracies``, ``logps/chosen`` ...) so curves overlay runs made with TRL. Each phase
writes into its own tensorboard run directory and, with ``"wandb"`` among the trackers, its own wandb run (grouped by
the run's name). The trackers get a train step every ``logging_steps`` steps and the last one always; metrics.jsonl
gets every step. Only process 0 writes. The directory may be a bucket (``gs://...``):
a bucket object cannot be appended to, so the event files and metrics.jsonl are written into a local folder whose
changed files are uploaded whole every ``flush_secs`` and on close (tensorboardX's own GCS writer does the same, but
re-uploads from its destructor at interpreter exit, which hangs for minutes when the network is gone).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import jax
from etils import epath

from jaxalign.storage import cache_root, is_remote, staging_dir

TRACKERS = ("tensorboard", "wandb")


class TrackerError(ValueError):
    """A tracker that cannot be used (unknown name, package not installed); the message says what to do."""


def check_trackers(trackers: str | Sequence[str]) -> tuple[str, ...]:
    """The trackers as a tuple (from names, or one comma-separated string as a config value holds them), after
    checking each name and that wandb imports where it is asked for: call it before the run starts so a missing
    package stops the run at once, not at its first training phase."""
    if isinstance(trackers, str):
        trackers = trackers.split(",")
    trackers = tuple(t.strip() for t in trackers if t.strip())
    unknown = [t for t in trackers if t not in TRACKERS]
    if unknown:
        raise TrackerError(f"run.trackers: unknown tracker(s) {', '.join(map(repr, unknown))}; choose from "
                           f"{', '.join(TRACKERS)} (e.g. run.trackers=tensorboard,wandb).")
    if "wandb" in trackers:
        _import_wandb()
    return trackers


def _import_wandb():
    try:
        import wandb
    except ImportError as e:
        raise TrackerError(
            f"run.trackers asks for wandb, but the wandb package cannot be imported ({e}). Install it with "
            f"`pip install 'jaxalign[wandb]'` (or `pip install wandb`), then `wandb login` or set WANDB_API_KEY "
            f"(WANDB_MODE=offline writes the runs locally for a later `wandb sync`); or drop wandb from run.trackers "
            f"to log to tensorboard only.") from None
    return wandb


class _TensorBoard:
    def __init__(self, logdir: Path, *, flush_secs: float):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(logdir), flush_secs=flush_secs)

    def log(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, logdir: Path, *, run_id: str, run_name: str, phase: str, project: str,
                 config: dict[str, Any] | None):
        wandb = _import_wandb()
        self.run = wandb.init(
            project=project or "jaxalign", name=f"{run_name}/{phase}" if run_name else phase, group=run_name or None,
            job_type=phase, id=run_id, resume="allow", config=config, dir=os.environ.get("WANDB_DIR") or str(logdir),
            # stdout is the run's own log already; wandb's capture would wrap it again for every phase
            settings=wandb.Settings(console="off"))

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def flush(self) -> None:
        pass  # wandb streams on its own

    def close(self) -> None:
        self.run.finish()


def _run_id(logdir: epath.Path) -> str:
    """One wandb id per phase directory: a resumed phase continues its own wandb run instead of starting another."""
    where = str(logdir) if is_remote(logdir) else str(Path(logdir).resolve())
    return hashlib.sha1(where.encode()).hexdigest()[:16]


class MetricsWriter:
    def __init__(self, logdir: str | epath.PathLike, *, total_steps: int, desc: str, show_progress: bool = True,
                 initial_step: int = 0, trackers: str | Sequence[str] = ("tensorboard",), logging_steps: int = 1,
                 run_name: str = "", wandb_project: str = "", config: dict[str, Any] | None = None, flush_secs: float = 10):
        """``trackers``: any of TRACKERS (names or "tensorboard,wandb"); ``logging_steps``: the trackers get every N-th train step and the last;
        ``run_name`` / ``wandb_project`` / ``config``: the wandb run's group and name prefix, project and config."""
        if logging_steps < 1:
            raise TrackerError(f"logging_steps={logging_steps}: must be >= 1.")
        self.logdir = epath.Path(logdir)
        self.main = jax.process_index() == 0
        self.total_steps = total_steps
        self.logging_steps = logging_steps
        self.trackers: list = []
        self.bar = None
        self._pending: tuple[int, dict[str, float]] | None = None  # the last train step the trackers skipped
        self.flush_secs = flush_secs
        self._staging = None  # the local folder uploaded to a bucket logdir
        if self.main:
            trackers = check_trackers(trackers)
            self.logdir.mkdir(parents=True, exist_ok=True)
            local = Path(self.logdir)
            if is_remote(self.logdir):
                self._staging, self._uploaded, self._sizes = staging_dir(), time.time(), {}
                local = Path(self._staging.name)
                if (self.logdir / "metrics.jsonl").is_file():  # a resumed run appends to what the bucket holds
                    (local / "metrics.jsonl").write_bytes((self.logdir / "metrics.jsonl").read_bytes())
            if "tensorboard" in trackers:
                self.trackers.append(_TensorBoard(local, flush_secs=flush_secs))
            if "wandb" in trackers:  # its local files outlive a bucket run's staging folder
                where = Path(self.logdir) if self._staging is None else cache_root() / "wandb"
                where.mkdir(parents=True, exist_ok=True)
                self.trackers.append(_Wandb(where, run_id=_run_id(self.logdir), run_name=run_name, phase=desc,
                                            project=wandb_project, config=config))
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

    def _emit(self, step: int, values: dict[str, float]) -> None:
        for tracker in self.trackers:
            tracker.log(values, step)

    def log(self, step: int, metrics: dict[str, Any], *, prefix: str = "train", advance: int = 0) -> None:
        if not self.main:
            return
        flat = {k: float(v) for k, v in metrics.items()}
        tagged = {f"{prefix}/{k}": v for k, v in flat.items()}
        if prefix != "train" or step % self.logging_steps == 0 or step >= self.total_steps:
            if prefix != "train" and self._pending is not None:
                # wandb drops steps lower than one already logged: the skipped train step goes first
                self._emit(*self._pending)
            self._emit(step, tagged)
            self._pending = None
        else:
            self._pending = (step, tagged)
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
        for tracker in self.trackers:
            tracker.flush()
        self.jsonl.flush()
        if self._staging is not None:
            self._upload()

    def close(self) -> None:
        if not self.main:
            return
        if self._pending is not None:  # a phase that stopped between logging steps (data ran out, preempted)
            self._emit(*self._pending)
            self._pending = None
        if self.bar is not None:
            self.bar.close()
        for tracker in self.trackers:
            tracker.close()
        self.jsonl.close()
        if self._staging is not None:
            self._upload()
            self._staging.cleanup()

    def _upload(self) -> None:
        """Copy the staged files that changed since the last upload (event files, metrics.jsonl) to the bucket."""
        for f in Path(self._staging.name).iterdir():
            if not f.is_file():  # (wandb's own run folder: wandb syncs it itself)
                continue
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
