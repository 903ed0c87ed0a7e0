"""A run, top to bottom: plan the phases, prepare the context, then for each phase skip it (finished with the same
settings), refuse it (finished with other settings, unless ``--force``), or run it; write its done marker and the
report after every phase. The work-directory layout is in :mod:`jaxalign.pipeline.workdir`; what each phase does is
in its own module (``sft``, ``sample``, ``reward``, ``policy``, ``evaluate``).
"""
from __future__ import annotations

import time
from typing import Any, Callable

import jax
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


def fingerprint(cfg: Config, phase: Phase) -> str:
    """The settings a finished phase is bound to: the model, data and mesh sections, its own sections, the seed."""
    return config_lib.section_fingerprint(cfg, "model", "data", "mesh", *SECTIONS[phase.kind]) + f"-seed{cfg.run.seed}"


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
        ctx = self.ctx = build_context(self.cfg, self.workdir, self.phases, force=self.force)
        self._redo_changed(ctx)
        for phase in self.phases:
            if ctx.workdir.done(phase):
                print(f"[jaxalign] {phase.name}: finished earlier, skipped")
                continue
            print(f"[jaxalign] {phase.name}: {phase.kind} (round {phase.round})")
            t0 = time.time()
            ctx.workdir.phase(phase).mkdir(parents=True, exist_ok=True)
            metrics = PHASE_RUNNERS[phase.kind](ctx, phase)
            info = {"phase": phase.name, "kind": phase.kind, "round": phase.round,
                    "fingerprint": fingerprint(ctx.cfg, phase), "seconds": time.time() - t0, "metrics": metrics}
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

    def _redo_changed(self, ctx: RunContext) -> None:
        """A phase finished with other settings is refused, or with ``force`` redone along with every later phase."""
        for i, phase in enumerate(self.phases):
            info = ctx.workdir.done(phase)
            if info and info["fingerprint"] != fingerprint(ctx.cfg, phase):
                if not self.force:
                    raise ConfigError(
                        f"phase {phase.name} finished with different settings (sections "
                        f"{', '.join(('model', 'data', 'mesh') + SECTIONS[phase.kind])}); re-run with the original "
                        f"config, use another --workdir, or pass --force to redo it and every later phase.")
                if jax.process_index() == 0:
                    for later in self.phases[i:]:
                        ctx.workdir.phase(later).rmtree(missing_ok=True)
                barrier("jaxalign: changed phases removed")
                return
