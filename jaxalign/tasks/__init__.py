"""Tasks whose gold is a program, and the registry of their scorers (``data.gold_metric`` names one).

A scorer grades a greedy answer to a prompt: ``score(prompt, answer) -> float`` in [0, 1], and ``metrics(prompts,
answers)`` returns the eval phase's named means (``gold`` first, then the scorer's own parts). The eval phase reports
them for every round; ``policy.reward=gold`` makes the same scorer the reward of on-policy and best-of-N phases (the
oracle controls of docs/results.md).

- ``demo``: the embedded CPU demo's string tasks (:mod:`jaxalign.tasks.demo`), graded by character agreement;
- ``instructions``: IFEval-style verifiable instructions on real prompts (:mod:`jaxalign.tasks.instructions`):
  ``gold`` = the instruction followed (strict) and the answer still an answer (guard).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from jaxalign.tasks import demo, instructions


@dataclasses.dataclass(frozen=True)
class Scorer:
    name: str
    grade: Callable[[str, str], dict[str, float]]  # (prompt, answer) -> {"gold": ..., parts...}

    def score(self, prompt: str, answer: str) -> float:
        return self.grade(prompt, answer)["gold"]

    def scores(self, prompts: Sequence[str], answers: Sequence[str]) -> np.ndarray:
        return np.asarray([self.score(p, a) for p, a in zip(prompts, answers)], np.float32)

    def metrics(self, prompts: Sequence[str], answers: Sequence[str], prefix: str = "") -> dict[str, float]:
        """The mean of every part over the answers, keyed ``prefix + part`` (``gold``, ``gold_strict``, ...)."""
        graded = [self.grade(p, a) for p, a in zip(prompts, answers)]
        if not graded:
            return {}
        return {prefix + ("gold" if k == "gold" else f"gold_{k}"): float(np.mean([g[k] for g in graded]))
                for k in graded[0]}


SCORERS: dict[str, Scorer] = {
    "demo": Scorer("demo", lambda p, a: {"gold": demo.gold_score(p, a)}),
    "instructions": Scorer("instructions", instructions.grade),
}


def get_scorer(name: str) -> Scorer:
    if name not in SCORERS:
        raise ValueError(f"unknown gold metric {name!r}; the registered scorers are {sorted(SCORERS)}")
    return SCORERS[name]
