"""The run as data: a recipe's method expands to an ordered list of phases; each phase knows the config sections it
depends on (its fingerprint), so a finished phase is skipped on re-run and a changed one is refused.

    sft, eval0, [r1/sample, r1/reward, r1/policy, r1/eval], [r2/...]          (irl)
    sft?, eval0, [rk/sample, rk/policy, rk/eval]                               (spin: previous round as reference)
    sft?, eval0, policy, eval1                                                 (dil / dpo on given preference data)
    reward                                                                     (a reward model on given pairs)
    sft, eval0, sample (SFT and initial model), reward (discriminator), eval1  (afd, Init-SFT + best-of-N)

Whether the order can work is checked by ``jaxalign.config.validate``; :func:`plan` only expands it.
"""
from __future__ import annotations

import dataclasses

from jaxalign.config import Config
from jaxalign.rules import NO_POLICY_METHODS

# config sections each phase kind depends on (besides model / data / mesh / run.seed, which every phase depends on)
SECTIONS = {
    "sft": ("sft",),
    "sample": ("sample", "policy"),
    "reward": ("reward", "sample"),
    "policy": ("policy", "sample", "reward"),
    "eval": ("eval",),
}


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    kind: str
    round: int

    @property
    def dir_name(self) -> str:
        return self.name.replace("/", "_")


def plan(cfg: Config) -> list[Phase]:
    """The ordered phases of a validated config."""
    phases = []
    if cfg.sft.enabled:  # run.method=sft with sft.enabled=false evaluates the model as given (eval0 only)
        phases.append(Phase("sft", "sft", 0))
    if cfg.run.method not in NO_POLICY_METHODS:
        phases.append(Phase("eval0", "eval", 0))
    if cfg.run.method == "sft":
        return phases
    for k in range(1, cfg.run.num_rounds() + 1):
        phases += [Phase(f"r{k}/{kind}", kind, k) for kind in cfg.run.round_phases(cfg.policy.kind)]
    return phases
