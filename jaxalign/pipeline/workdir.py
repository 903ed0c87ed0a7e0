"""The work directory of a run: where each phase's outputs live, and which earlier model a phase starts from.

Layout::

    run.yaml                     the resolved config of the run that owns this directory
    assets/                      the demo task's generated data, tokenizer and model (run.demo_task)
    phases/<phase>/done.json     completion marker: the settings it ran with (and their hash), metrics, wall time
    phases/<phase>/checkpoints/  orbax (resumable training state)      phases/<phase>/tb/  tensorboard + metrics.jsonl
    phases/<phase>/model/        the phase's final model as HF safetensors (what later phases and users read)
    phases/<phase>/adapter/      model.lora: the phase's adapters in PEFT's format (model/ holds them merged)
    phases/<phase>/reference/    cached reference log-probs (policy.precompute_reference)
    phases/rK_sample/samples.json, phases/*eval*/eval.json
    report.md, plots/*.png

Paths are ``etils.epath`` paths (orbax's own path layer), so the same code addresses a local folder or a bucket
(``gs://bucket/run``); :mod:`jaxalign.storage` holds what differs between the two.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml
from etils import epath

from jaxalign.config import Config, ConfigError
from jaxalign.pipeline.phases import Phase
from jaxalign.storage import is_remote, write_atomic


def default_root(cfg: Config) -> str:
    """The work directory as the recipe gives it: run.workdir (what --workdir sets), else runs/<run.name> (relative to
    the current folder; :class:`jaxalign.pipeline.runner.Pipeline` resolves it the same way)."""
    return cfg.run.workdir or f"runs/{cfg.run.name}"


def check_writable(root: str, what: str = "--workdir") -> None:
    """Refuse, before anything is read or written, a local work directory this process could not write: a file in
    its place, a folder without write permission, or a missing folder whose nearest existing parent is a file or not
    writable. Nothing is created here. (A bucket, gs://..., is checked by its first write.)"""
    if is_remote(root):
        return
    path = Path(root).absolute()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {root} is a file, not a folder: the run writes its phases, checkpoints and report "
                          f"into a folder there. Give a folder (a new one is created), or move the file.")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{what} {root} cannot be created: {parent} is a file, not a folder.")
    if not os.access(parent, os.W_OK | os.X_OK):
        where = "is not writable" if parent == path else f"cannot be created: {parent} is not writable"
        raise ConfigError(f"{what} {root} {where} by this user; give a folder you can write (--workdir DIR).")


class WorkDir:
    def __init__(self, root: str | epath.PathLike):
        self.root = epath.Path(root)
        # the model the recipe starts from (model.path resolved to a folder), set once the run is prepared
        self.base_model: epath.Path | None = None

    # ---- layout ---------------------------------------------------------------------------------------------------
    def phase(self, phase: Phase | str) -> epath.Path:
        name = phase.dir_name if isinstance(phase, Phase) else phase.replace("/", "_")
        return self.root / "phases" / name

    @property
    def assets(self) -> epath.Path:
        return self.root / "assets"

    @property
    def run_yaml(self) -> epath.Path:
        return self.root / "run.yaml"

    @property
    def report(self) -> epath.Path:
        return self.root / "report.md"

    @property
    def plots(self) -> epath.Path:
        return self.root / "plots"

    def samples(self, round_: int) -> epath.Path:
        return self.phase(f"r{round_}/sample") / "samples.json"

    def eval_file(self, phase: Phase | str) -> epath.Path:
        return self.phase(phase) / "eval.json"

    # ---- completion markers ---------------------------------------------------------------------------------------
    def done(self, phase: Phase) -> dict[str, Any] | None:
        marker = self.phase(phase) / "done.json"
        return json.loads(marker.read_text()) if marker.is_file() else None

    def mark_done(self, phase: Phase, info: dict[str, Any]) -> None:
        # atomic: a torn done.json would make the next run fail to read it
        write_atomic(self.phase(phase) / "done.json", json.dumps(info, indent=2))

    # ---- which model a phase starts from --------------------------------------------------------------------------
    def sft_model(self) -> epath.Path:
        d = self.phase("sft") / "model"
        return d if d.is_dir() else self.base_model

    def policy_model(self, round_: int) -> epath.Path:
        """The policy after round ``round_`` (round 0: the SFT model)."""
        for k in range(round_, 0, -1):
            d = self.phase(f"r{k}/policy") / "model"
            if d.is_dir():
                return d
        return self.sft_model()

    def reward_model(self, round_: int) -> epath.Path | None:
        d = self.phase(f"r{round_}/reward") / "model"
        return d if d.is_dir() else None

    def latest_reward_model(self, round_: int) -> tuple[int, epath.Path] | None:
        """The newest reward model of rounds ``round_``, ``round_ - 1``, ... 1 (evaluation scores with it)."""
        for k in range(round_, 0, -1):
            d = self.reward_model(k)
            if d is not None:
                return k, d
        return None

    # ---- ownership ------------------------------------------------------------------------------------------------
    def check_owner(self, cfg: Config, *, force: bool) -> None:
        """Refuse a directory that holds another run (its run.yaml names another run or method), unless forced."""
        if not self.run_yaml.is_file():
            return
        old = (yaml.safe_load(self.run_yaml.read_text()) or {}).get("run", {})
        if (old.get("name"), old.get("method")) != (cfg.run.name, cfg.run.method) and not force:
            raise ConfigError(
                f"{self.root} holds a different run (name={old.get('name')!r}, method={old.get('method')!r}); "
                f"choose another --workdir, or pass --force to reuse it (finished phases are then redone).")
