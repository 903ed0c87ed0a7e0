"""A run, top to bottom: plan the phases, prepare the context, then for each phase skip it (finished with the same
settings), refuse it (finished with other settings, unless ``--force``), or run it; write its done marker and the
report after every phase. The work-directory layout is in :mod:`jaxalign.pipeline.workdir`; what each phase does is
in its own module (``sft``, ``sample``, ``reward``, ``policy``, ``evaluate``).
"""
from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Callable

import jax
import yaml
from etils import epath

from jaxalign import config as config_lib
from jaxalign.config import Config, ConfigError
from jaxalign.pipeline import evaluate, policy, report, reward, sample, sft
from jaxalign.pipeline.context import RunContext, build_context
from jaxalign.pipeline.hosts import barrier, check_shared_workdir
from jaxalign.pipeline.phases import SECTIONS, Phase, plan
from jaxalign.pipeline.workdir import WorkDir

PHASE_RUNNERS: dict[str, Callable[[RunContext, Phase], dict[str, float]]] = {
    "sft": sft.run, "sample": sample.run, "reward": reward.run, "policy": policy.run, "eval": evaluate.run,
}


def bound_sections(phase: Phase) -> tuple[str, ...]:
    """The config sections a finished phase is bound to: model, data, mesh and its own (and run.seed)."""
    return ("model", "data", "mesh") + SECTIONS[phase.kind]


def fingerprint(cfg: Config, phase: Phase) -> str:
    """A short hash of :func:`settings` (shown in done.json and the report)."""
    return config_lib.section_fingerprint(cfg, *bound_sections(phase)) + f"-seed{cfg.run.seed}"


def settings(cfg: Config, phase: Phase) -> dict[str, Any]:
    d = config_lib.to_dict(cfg)
    return {**{s: d[s] for s in bound_sections(phase)}, "seed": cfg.run.seed}


def same_settings(recorded: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any]) -> bool:
    """Whether a finished phase's recorded settings are the current ones. A key the record lacks was added to the
    schema after the phase ran: it matches while it holds its default (what the phase ran with), so upgrading jaxalign
    never invalidates finished work; a key the schema no longer has is ignored."""
    for key, value in current.items():
        if key not in recorded:
            if value != defaults.get(key):
                return False
        elif isinstance(value, dict) and isinstance(recorded[key], dict):
            if not same_settings(recorded[key], value, defaults.get(key) or {}):
                return False
        elif recorded[key] != value:
            return False
    return True


def restrict(current: dict[str, Any], recorded: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``current`` without the keys ``recorded`` lacks that hold their defaults (keys added to the schema since)."""
    out = {}
    for key, value in current.items():
        if key not in recorded and value == defaults.get(key):
            continue
        if isinstance(value, dict) and isinstance(recorded.get(key), dict):
            value = restrict(value, recorded[key], defaults.get(key) or {})
        out[key] = value
    return out


def finished_with(info: dict[str, Any], cfg: Config, phase: Phase, recorded_run: dict[str, Any] | None) -> bool:
    """Whether the finished phase ``info`` (its done.json) ran with ``cfg``'s settings. Markers written before they
    recorded their settings carry only the hash: it is recomputed from the current settings restricted to the keys the
    work directory's previous run.yaml (``recorded_run``) knew."""
    defaults = config_lib.to_dict(Config())
    if "settings" in info:
        return same_settings(info["settings"], settings(cfg, phase), defaults)
    if info["fingerprint"] == fingerprint(cfg, phase) or not recorded_run:
        return info["fingerprint"] == fingerprint(cfg, phase)
    current = restrict({s: config_lib.to_dict(cfg)[s] for s in bound_sections(phase)},
                       {s: recorded_run.get(s) or {} for s in bound_sections(phase)}, defaults)
    blob = json.dumps(current, sort_keys=True)
    return info["fingerprint"] == hashlib.sha256(blob.encode()).hexdigest()[:16] + f"-seed{cfg.run.seed}"


class Pipeline:
    def __init__(self, cfg: Config, workdir: str | epath.PathLike | None = None, *, force: bool = False):
        self.cfg = cfg
        root = str(workdir or cfg.run.workdir or f"runs/{cfg.run.name}")
        self.workdir = WorkDir(root if "://" in root else epath.Path(root).absolute())
        self.force = force
        self.phases = plan(cfg)
        self.ctx: RunContext | None = None

    def run(self) -> list[dict[str, Any]]:
        """Run every phase not finished yet; returns the per-round table (also in ``report.md``)."""
        check_shared_workdir(self.workdir.root)
        # the previous run's config, read before this run rewrites run.yaml (older done markers need it)
        recorded = yaml.safe_load(self.workdir.run_yaml.read_text()) if self.workdir.run_yaml.is_file() else None
        ctx = self.ctx = build_context(self.cfg, self.workdir, self.phases, force=self.force)
        self._redo_changed(ctx, recorded)
        for phase in self.phases:
            if ctx.workdir.done(phase):
                print(f"[jaxalign] {phase.name}: finished earlier, skipped")
                continue
            print(f"[jaxalign] {phase.name}: {phase.kind} (round {phase.round})")
            t0 = time.time()
            ctx.workdir.phase(phase).mkdir(parents=True, exist_ok=True)
            metrics = PHASE_RUNNERS[phase.kind](ctx, phase)
            info = {"phase": phase.name, "kind": phase.kind, "round": phase.round,
                    "fingerprint": fingerprint(ctx.cfg, phase), "settings": settings(ctx.cfg, phase),
                    "seconds": time.time() - t0, "metrics": metrics}
            if jax.process_index() == 0:
                ctx.workdir.mark_done(phase, info)
                if not ctx.cfg.reliability.keep_finished_checkpoints:  # after the marker: a crash keeps the phase
                    (ctx.workdir.phase(phase) / "checkpoints").rmtree(missing_ok=True)
                report.write_report(ctx)
            barrier(f"jaxalign: {phase.name} done")  # later phases on every host read what process 0 wrote
        if jax.process_index() == 0:  # also when every phase was skipped: the report follows the installed code
            report.write_report(ctx)
        print(report.summary(ctx))
        print(report.outputs(ctx), flush=True)
        return report.round_table(ctx)

    def _redo_changed(self, ctx: RunContext, recorded: dict[str, Any] | None) -> None:
        """A phase finished with other settings is refused, or with ``force`` redone along with every later phase."""
        for i, phase in enumerate(self.phases):
            info = ctx.workdir.done(phase)
            if info and not finished_with(info, ctx.cfg, phase, recorded):
                if not self.force:
                    raise ConfigError(
                        f"phase {phase.name} finished with different settings (sections "
                        f"{', '.join(bound_sections(phase))}); re-run with the original "
                        f"config, use another --workdir, or pass --force to redo it and every later phase.")
                if jax.process_index() == 0:
                    for later in self.phases[i:]:
                        ctx.workdir.phase(later).rmtree(missing_ok=True)
                barrier("jaxalign: changed phases removed")
                return
