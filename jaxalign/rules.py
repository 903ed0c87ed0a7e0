"""The run's rules, each decided once: the run (``pipeline/``), the planner (``plan/``) and the config checks ask these
functions, so ``--plan`` plans exactly what the run does. Imports nothing heavy (no jax, no transformers).

- which phases a round has (per method, and for ``policy.kind=online_dil``);
- which policy kinds sample inside the policy phase, and which of those optimise a reward;
- how many responses per prompt the sample phase draws, and how many an on-policy rollout draws;
- how many prompts a round's sample phase answers and an on-policy rollout batch holds;
- how a global batch splits into micro-batches, and whether they divide over the mesh's batch shards;
- how many prompts a sampler batch holds when ``sample.batch_size`` fixes it;
- how the policy step gets its reference log-probs.
"""
from __future__ import annotations

import math

# a round's phases per method (run.phases overrides the order)
DEFAULT_ROUND = {
    "irl": "sample,reward,policy,eval",
    "spin": "sample,policy,eval",
    "dil": "policy,eval",
    "dpo": "policy,eval",
    "reward": "reward",  # a Bradley-Terry reward model on given pairs (TRL's RewardTrainer); its held-out curves
    "afd": "sample,reward,eval",
    "sft": "",
}
METHODS = tuple(DEFAULT_ROUND)
# methods that train on data.train's given preference pairs (the others sample their pairs or train on demonstrations)
GIVEN_PAIRS_METHODS = ("dil", "dpo", "reward")
ONE_ROUND_METHODS = ("dil", "dpo", "reward", "afd")  # the others repeat their round run.rounds times
# methods that train no policy: no eval0 (its greedy answers would have nothing to be compared with)
NO_POLICY_METHODS = ("reward",)
# policy.kind=online_dil samples inside its policy phase and trains no reward model
ONLINE_ROUND = "policy,eval"
POLICY_KINDS = ("pairs", "rloo", "grpo", "ppo", "online_dil")
REWARD_KINDS = ("rloo", "grpo", "ppo")  # on-policy kinds that optimise a reward (the round's RM, or the gold)
GROUP_KINDS = ("rloo", "grpo")  # on-policy kinds that compare several samples of one prompt


def candidates_per_prompt(cfg) -> int:
    """How many responses per prompt the sample phase draws as the policy step's candidates: N for best-of-N and
    DITTO pairs, else 1 (AfD's sample phase draws one SFT and one initial-model answer; on-policy kinds sample inside
    the policy phase)."""
    if cfg.policy.kind != "pairs" or cfg.run.method == "afd":
        return 1
    return cfg.policy.num_samples if cfg.policy.pairs in ("best_of_n", "ditto") else 1


def rollout_samples_per_prompt(cfg) -> int:
    """N per prompt in an on-policy rollout: rloo / grpo compare a prompt's samples; ppo and online_dil draw one."""
    return cfg.policy.num_samples if cfg.policy.kind in GROUP_KINDS else 1


def rollout_prompts(cfg) -> int:
    """Prompts per on-policy rollout batch: ``policy.rollout_batch_size`` sequences (0 = ``policy.batch_size``) over
    the samples each prompt gets (the config checks refuse a rollout that is not a multiple of them)."""
    p = cfg.policy
    return (p.rollout_batch_size or p.batch_size) // rollout_samples_per_prompt(cfg)


def round_prompts(cfg, available: int | None = None) -> int | None:
    """Prompts a round's sample phase answers: ``sample.limit`` of the demonstrations, all of them when 0. The run
    knows how many demonstrations there are (``available``); without that (the planner) ``data.train.limit`` bounds
    them, and None says nothing does (the dataset's size is not in the config)."""
    n = available if available is not None else (cfg.data.train.limit or None)
    limit = cfg.sample.limit or None
    if n is None:
        return limit
    return n if limit is None else min(limit, n)


def micro_batch_size(batch_size: int, accum_steps: int) -> int:
    """Rows of one micro-batch: the global batch of an optimizer step over its ``accum_steps`` (the train step scans
    them; held-out batches are this size too)."""
    return batch_size // max(1, accum_steps)


def fixed_decode_batch(batch_size: int, prompts: int, shards: int) -> int:
    """Prompts per sampler batch when the recipe fixes it (``sample.batch_size``): no more than the prompts there
    are, rounded up to a multiple of the mesh's batch shards (filler rows pad the last shard)."""
    return math.ceil(min(batch_size, prompts) / shards) * shards


def policy_reference(cfg, *, uses_reference: bool, base_is_reference: bool) -> str:
    """How the policy step gets the reference's log-probs (``StepConfig.reference_logps``): "none" for a
    reference-free objective; "precomputed" with ``policy.precompute_reference`` for the pair kind (online_dil's
    pairs are drawn afresh every rollout, so it has nothing to precompute); "base" with LoRA when the reference is
    the phase's starting model (the frozen base with the adapters off); else "in_step"."""
    if not uses_reference:
        return "none"
    if cfg.policy.precompute_reference and cfg.policy.kind == "pairs":
        return "precomputed"
    return "base" if base_is_reference else "in_step"


def batch_split_problem(name: str, batch_size: int, accum_steps: int, shards: int, mesh_shape=None) -> str | None:
    """Why ``name``'s global batch cannot be split into ``accum_steps`` micro-batches that each divide over ``shards``
    batch shards (mesh.data x mesh.fsdp), or None when it can."""
    b, k = batch_size, max(1, accum_steps)
    if b % k == 0 and micro_batch_size(b, k) % shards == 0:
        return None
    where = f" = {dict(mesh_shape)}" if mesh_shape is not None else ""
    return (f"{name}.batch_size={b} with {name}.accum_steps={k} gives micro-batches of {b / k:g} rows, which must "
            f"divide evenly over the mesh's {shards} batch shards (mesh.data x mesh.fsdp{where}); choose batch_size "
            f"a multiple of accum_steps x {shards}.")
