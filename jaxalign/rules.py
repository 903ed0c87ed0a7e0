"""The run's rules, each decided once: the run (``pipeline/``), the planner (``plan/``) and the config checks ask these
functions, so ``--plan`` plans exactly what the run does. Imports nothing heavy (no jax, no transformers).

- which phases a round has (per method, and for ``policy.kind=online_dil``);
- which policy kinds sample inside the policy phase, and which of those optimise a reward;
- how many responses per prompt the sample phase draws, and how many an on-policy rollout draws;
- whether a global batch splits into micro-batches that divide over the mesh's batch shards.
"""
from __future__ import annotations

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


def batch_split_problem(name: str, batch_size: int, accum_steps: int, shards: int, mesh_shape=None) -> str | None:
    """Why ``name``'s global batch cannot be split into ``accum_steps`` micro-batches that each divide over ``shards``
    batch shards (mesh.data x mesh.fsdp), or None when it can."""
    b, k = batch_size, max(1, accum_steps)
    if b % k == 0 and (b // k) % shards == 0:
        return None
    where = f" = {dict(mesh_shape)}" if mesh_shape is not None else ""
    return (f"{name}.batch_size={b} with {name}.accum_steps={k} gives micro-batches of {b / k:g} rows, which must "
            f"divide evenly over the mesh's {shards} batch shards (mesh.data x mesh.fsdp{where}); choose batch_size "
            f"a multiple of accum_steps x {shards}.")
