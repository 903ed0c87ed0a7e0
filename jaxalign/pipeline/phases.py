"""The run as data: a recipe's method expands to an ordered list of phases; each phase knows the config sections it
depends on (its fingerprint), so a finished phase is skipped on re-run and a changed one is refused.

    sft, eval0, [r1/sample, r1/reward, r1/policy, r1/eval], [r2/...]          (irl)
    sft?, eval0, [rk/sample, rk/policy, rk/eval]                               (spin: previous round as reference)
    sft?, eval0, policy, eval1                                                 (dil / dpo on given preference data)
    sft, eval0, sample (SFT and initial model), reward (discriminator), eval1  (afd, Init-SFT + best-of-N)
"""
from __future__ import annotations

import dataclasses

from jaxalign.config import Config, ConfigError

# config sections each phase kind depends on (besides model / data / run.seed, which every phase depends on)
SECTIONS = {
    "sft": ("sft",),
    "sample": ("sample", "policy"),
    "reward": ("reward", "sample"),
    "policy": ("policy", "sample", "reward"),
    "eval": ("eval",),
}
DEFAULT_ROUND = {
    "irl": "sample,reward,policy,eval",
    "spin": "sample,policy,eval",
    "dil": "policy,eval",
    "dpo": "policy,eval",
    "afd": "sample,reward,eval",
    "sft": "",
}


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    kind: str
    round: int

    @property
    def dir_name(self) -> str:
        return self.name.replace("/", "_")


def round_order(cfg: Config) -> list[str]:
    text = cfg.run.phases or DEFAULT_ROUND[cfg.run.method]
    return [p.strip() for p in text.split(",") if p.strip()]


def plan(cfg: Config) -> list[Phase]:
    """The ordered phases of the run; raises ConfigError for an order that cannot work."""
    method = cfg.run.method
    if method not in DEFAULT_ROUND:
        raise ConfigError(f"run.method={method!r}; choose one of {', '.join(DEFAULT_ROUND)}.")
    order = round_order(cfg)
    # method / pairs mismatches first: their message names the fix better than the phase-order checks below
    if method in ("dil", "dpo") and cfg.policy.pairs != "dataset":
        raise ConfigError(f"run.method={method} trains on given preference pairs: set policy.pairs=dataset "
                          f"(or use run.method=irl / spin for sampled pairs).")
    if method == "spin" and cfg.policy.pairs == "best_of_n":
        raise ConfigError("run.method=spin pairs the demonstration with the previous iterate's sample: set "
                          "policy.pairs=demo_vs_sample (SPIN has no reward model).")
    for kind in order:
        if kind not in SECTIONS or kind == "sft":
            raise ConfigError(f"run.phases: {kind!r} is not a round phase; use sample, reward, policy, eval.")
    if len(set(order)) != len(order):
        raise ConfigError(f"run.phases={','.join(order)}: each phase may appear once per round (they share the "
                          f"round's directory names).")
    if "policy" in order:
        before = order[: order.index("policy")]
        if cfg.policy.pairs in ("best_of_n", "demo_vs_sample") and "sample" not in before:
            raise ConfigError(f"run.phases={','.join(order)}: the policy phase uses sampled responses "
                              f"(policy.pairs={cfg.policy.pairs}) but no sample phase comes before it in the round.")
        if cfg.policy.pairs == "best_of_n" and "reward" not in before:
            raise ConfigError(f"run.phases={','.join(order)}: policy before any reward model in the round — "
                              f"policy.pairs=best_of_n scores samples with this round's reward model, so 'reward' "
                              f"must come before 'policy' (IRL: sample,reward,policy,eval).")
    if "reward" in order and "sample" not in order[: order.index("reward")]:
        raise ConfigError(f"run.phases={','.join(order)}: the reward phase trains on (demonstration, own sample) "
                          f"pairs, so 'sample' must come before 'reward'.")
    phases = []
    if cfg.sft.enabled or method == "sft":
        phases.append(Phase("sft", "sft", 0))
    phases.append(Phase("eval0", "eval", 0))
    rounds = 1 if method in ("dil", "dpo", "afd") else cfg.run.rounds
    if method == "sft":
        return phases
    if rounds < 1:
        raise ConfigError(f"run.rounds={rounds}: at least one round is needed for run.method={method}.")
    for k in range(1, rounds + 1):
        for kind in order:
            phases.append(Phase(f"r{k}/{kind}", kind, k))
    return phases


def policy_objective(cfg: Config):
    """The policy step's objective and the hyper-parameter overrides the recipe sets (beta, reduce)."""
    from jaxalign.losses import get_objective

    overrides: dict = {}
    if cfg.policy.beta >= 0:
        overrides["beta"] = cfg.policy.beta
    if cfg.policy.reduce:
        overrides["reduce"] = cfg.policy.reduce
    return get_objective(cfg.policy.objective, **overrides)[1], overrides
