"""The on-policy policy phase (``policy.kind`` = rloo | grpo | ppo | online_dil): the policy learns from its own fresh
samples, drawn batch by batch from its current weights.

For each rollout batch (``policy.rollout_batch_size`` sequences: P prompts x N samples):

1. sample N responses per prompt with the in-process sampler on the train state's own parameters (the rollout and
   the update share one copy of the weights on the devices; PPO's value head is left out of what the sampler sees);
2. rloo / grpo / ppo: score them with the round's reward model, normalised by its mean / std on the demonstrations
   (computed once per phase, as the IRL authors do), minus ``policy.missing_eos_penalty`` for a response that does
   not end; the tempered token log-probs of the policy (the ratio's denominator) and of the reference, PPO's values;
   the advantages (:mod:`jaxalign.train.onpolicy_steps`); then ``policy.inner_epochs`` passes of mini-batches of
   ``policy.batch_size`` sequences through the jitted step;
3. online_dil: (demonstration, fresh sample) pairs through the pair step with the DIL objective — DIL's future work
   (the future work named in the DIL paper): no reward model, the policy samples itself, so the round is ``policy,eval``.

One logged step (TRL's ``objective/*``, ``policy/*``, ``val/*``) is one rollout batch. This module prepares the
phase (weights, reference, reward, the rollouts); :func:`jaxalign.train.onpolicy_loop.train_onpolicy` runs it, and so
resumes, checkpoints every ``policy.save_every`` rollout batches, logs to ``run.trackers`` and stops on preemption or
a non-finite step as the pair phases do. Resume is exact: a rollout batch's prompts and sampling seed are functions
of its index, so a resumed phase redoes the batches after the last checkpoint exactly as the first attempt did them.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import numpy as np

from jaxalign import sharding
from jaxalign.config import ConfigError
from jaxalign.data.loader import bucket_for, pad_pair_batch
from jaxalign.data.tokenize import EncodedRecord
from jaxalign.metrics import read_metrics
from jaxalign.models.value import VALUE_HEAD, init_value_head, without_value_head
from jaxalign.pipeline.context import RunContext
from jaxalign.pipeline.modelio import load_policy, load_reward, save_model
from jaxalign.pipeline.pairs import encode_response, make_pair, strip_eos
from jaxalign.pipeline.phases import Phase
from jaxalign.pipeline.sample import draw, prompts_of_round
from jaxalign.pipeline.scoring import gold_scores, score_sequences
from jaxalign.pipeline.training import lora_merged, lora_split
from jaxalign.rules import policy_reference, rollout_prompts, rollout_samples_per_prompt
from jaxalign.train.onpolicy_loop import Rollout, train_onpolicy
from jaxalign.train.onpolicy_steps import OnPolicySettings, make_rollout_advantages, make_rollout_logps
from jaxalign.train.steps import StepConfig, make_eval_rewards

# reward_fn(rows, responses) -> scores [len(rows)]: a fixed reward instead of the RM (tests: the demo's gold metric)
RewardFn = Callable[[Sequence[EncodedRecord], Sequence[Sequence[int]]], np.ndarray]


def settings(ctx: RunContext) -> OnPolicySettings:
    return settings_of(ctx.cfg)


def settings_of(cfg) -> OnPolicySettings:
    """The on-policy step's settings from the policy / sample sections (the planner compiles the same ones)."""
    p, s = cfg.policy, cfg.sample
    return OnPolicySettings(kind=p.kind, num_samples=rollout_samples_per_prompt(cfg),
                            temperature=s.temperature or 1.0,
                            clip=p.clip, clip_high=p.clip_high or None, kl_coef=p.kl_coef, vf_coef=p.vf_coef,
                            gamma=p.gamma, lam=p.lam, grpo_scale=p.grpo_scale, length_norm=p.length_norm,
                            whiten_advantages=p.whiten_advantages, max_new_tokens=s.max_new_tokens,
                            kl_bias_correction=p.kl_bias_correction)


def make_scorer(ctx: RunContext, phase: Phase, rows: list[EncodedRecord], reward_fn: RewardFn | None):
    """``(rows, responses, stopped) -> scores`` (float32): the round's RM normalised on the demonstrations, or
    ``reward_fn``; minus the missing-EOS penalty."""
    penalty = ctx.cfg.policy.missing_eos_penalty
    if reward_fn is None and ctx.cfg.policy.reward == "gold":
        def reward_fn(rs, responses):
            return gold_scores(ctx, [r.prompt_ids for r in rs], [strip_eos(ctx, t) for t in responses])
    if reward_fn is None:
        folder = ctx.workdir.reward_model(phase.round)
        if folder is None:
            raise ConfigError(f"phase {phase.name}: policy.kind={ctx.cfg.policy.kind} needs this round's reward model "
                              f"(phases/r{phase.round}_reward/model), which is missing.")
        rm, fn = load_reward(ctx, folder), make_eval_rewards(ctx.model_cfg, ctx.mesh)
        demo = score_sequences(ctx, rm, [e.chosen.ids for e in rows], fn=fn)
        mean, std = float(np.mean(demo)), float(np.std(demo)) + 1e-6
        print(f"[{phase.name}] reward model on the demonstrations: mean {mean:.4f}, std {std:.4f} (scores normalised)")

        def reward_fn(rs, responses):
            seqs = [np.concatenate([np.asarray(r.prompt_ids), np.asarray(t, np.int32)]) for r, t in zip(rs, responses)]
            return (score_sequences(ctx, rm, seqs, fn=fn) - mean) / std

    def score(rs, responses, stopped):
        out = np.asarray(reward_fn(rs, responses), np.float32)
        return out - penalty * (1.0 - np.asarray(stopped, np.float32))

    return score


def rollout_arrays(ctx: RunContext, rows, responses, length: int) -> dict[str, np.ndarray]:
    """Prompt + sampled response (EOS kept where it was sampled, nothing added), right-padded to ``length``."""
    ids = np.full((len(rows), length), ctx.encoder.pad_id, np.int32)
    attn, mask = np.zeros_like(ids), np.zeros_like(ids)
    for i, (r, t) in enumerate(zip(rows, responses)):
        p = len(r.prompt_ids)
        seq = np.concatenate([np.asarray(r.prompt_ids, np.int32), np.asarray(t, np.int32)])[:length]
        ids[i, :len(seq)], attn[i, :len(seq)], mask[i, p:len(seq)] = seq, 1, 1
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": mask}


def step_config(ctx: RunContext, *, base_is_reference: bool, seed: int) -> StepConfig:
    """The update's step: the on-policy loss (rloo / grpo / ppo) or online DIL's pair step; with LoRA, on adapters
    drawn from ``seed``. ``base_is_reference``: the LoRA base with the adapters off is the reference."""
    p = ctx.cfg.policy
    if p.kind == "online_dil":
        step = p.step(reference_logps=policy_reference(ctx.cfg, uses_reference=p.build_objective().uses_reference,
                                                       base_is_reference=base_is_reference))
    else:
        step = StepConfig("onpolicy", accum_steps=p.accum_steps, onpolicy=settings(ctx))
    return step if ctx.lora is None else dataclasses.replace(step, lora=ctx.lora, seed=seed)


class Rollouts:
    """``rollouts(state, step) -> Rollout``: rollout batch ``step``'s prompts (a permutation of the round's prompts per
    epoch) and sampling seed are functions of ``step``; its samples come from the state's current weights."""

    def __init__(self, ctx: RunContext, phase: Phase, rows: list[EncodedRecord], *, per: int, per_epoch: int,
                 seed: int, ref, frozen, reward_fn: RewardFn | None):
        """``frozen``: with LoRA, the base the state's adapters sit on; ``ref`` the reference's weights (the base
        itself when the adapters-off base is the reference)."""
        self.ctx, self.rows, self.per, self.per_epoch, self.seed = ctx, rows, per, per_epoch, seed
        self.ref, self.frozen = ref, frozen
        p, s = ctx.cfg.policy, ctx.cfg.sample
        self.n = rollout_samples_per_prompt(ctx.cfg)
        if p.kind != "online_dil":
            self.s = settings(ctx)
            self.logps = make_rollout_logps(ctx.model_cfg, ctx.mesh, self.s.temperature, ctx.lora)
            self.ref_logps = make_rollout_logps(ctx.model_cfg, ctx.mesh, self.s.temperature)
            self.advantages = make_rollout_advantages(self.s)
            self.score = make_scorer(ctx, phase, rows, reward_fn)
        longest = max(len(r.prompt_ids) for r in rows) + s.max_new_tokens
        self.length = bucket_for(longest, ctx.buckets + (longest,))  # one shape for every rollout batch: one compile

    def policy(self, state):
        """The causal LM the sampler sees (PPO's value head left out; LoRA: the adapters merged)."""
        params = state.params if self.frozen is None else lora_merged(self.ctx, state.params, self.frozen).params
        return without_value_head(params)

    def targets(self, state, arrays: dict[str, np.ndarray], scores: np.ndarray):
        """Old / reference log-probs, values and advantages of a rollout batch (host arrays) + rollout metrics."""
        dev = sharding.shard_batch({k: arrays[k] for k in ("input_ids", "attention_mask")}, self.ctx.mesh)
        logps, values = self.logps(state.params, dev["input_ids"], dev["attention_mask"], self.frozen)
        ref_logps, _ = self.ref_logps(self.ref, dev["input_ids"], dev["attention_mask"])
        mask = sharding.shard_batch({"m": arrays["loss_mask"][:, 1:]}, self.ctx.mesh)["m"]
        if values is None:
            values = jax.numpy.zeros(logps.shape, jax.numpy.float32)
        scores = sharding.shard_batch({"s": scores}, self.ctx.mesh)["s"]
        extra, metrics = self.advantages(scores, logps, ref_logps, values, mask)
        m = arrays["loss_mask"][:, 1:] != 0
        out = dict(arrays, old_logps=np.where(m, np.asarray(jax.device_get(logps)), 0.0).astype(np.float32))
        if self.s.kind == "grpo":
            out["ref_logps"] = np.where(m, np.asarray(jax.device_get(ref_logps)), 0.0).astype(np.float32)
        out.update({k: np.asarray(jax.device_get(v), np.float32) for k, v in extra.items()})
        return out, {k: float(v) for k, v in jax.device_get(metrics).items()}

    def __call__(self, state, step: int) -> Rollout:
        ctx, cfg, i = self.ctx, self.ctx.cfg, step - 1
        epoch, b = divmod(i, self.per_epoch)
        order = np.random.default_rng(self.seed + epoch).permutation(len(self.rows))
        batch_rows = [self.rows[j] for j in order[b * self.per:(b + 1) * self.per]]
        res = draw(ctx, self.policy(state), [r.prompt_ids.tolist() for r in batch_rows], num_samples=self.n,
                   temperature=cfg.sample.temperature, max_new_tokens=cfg.sample.max_new_tokens,
                   seed=(self.seed + 7919 * i) % 2**31)
        flat_rows = [r for r in batch_rows for _ in range(self.n)]
        if cfg.policy.kind == "online_dil":
            pairs = [make_pair(r, r.chosen, encode_response(ctx, r, t)) for r, t in zip(flat_rows, res.tokens)]
            batch = {k: v for k, v in pad_pair_batch(pairs, pad_id=ctx.encoder.pad_id, buckets=ctx.buckets).items()
                     if k != "row_id"}
            metrics = {}
        else:
            scores = self.score(flat_rows, [strip_eos(ctx, t) for t in res.tokens], res.stopped)
            batch, metrics = self.targets(state, rollout_arrays(ctx, flat_rows, res.tokens, self.length), scores)
        tokens = sum(len(t) for t in res.tokens)
        metrics.update({"val/num_eos_tokens": float(np.sum(res.stopped)), "response_length": tokens / len(res.tokens),
                        "episode": float(step * len(res.tokens))})
        return Rollout(batch, metrics, tokens)


def plan_rollouts(ctx: RunContext, num_rows: int) -> tuple[int, int, int]:
    """(prompts per rollout batch, rollout batches per epoch, rollout batches in the phase)."""
    p = ctx.cfg.policy
    per = rollout_prompts(ctx.cfg)
    per_epoch = num_rows // per
    if per_epoch < 1:
        raise ConfigError(f"policy: {num_rows} prompts do not fill one rollout batch of {per} prompts "
                          f"(policy.rollout_batch_size / samples per prompt); lower it or raise sample.limit.")
    total = per_epoch * p.epochs
    return per, per_epoch, min(total, p.max_steps) if p.max_steps else total


def run(ctx: RunContext, phase: Phase, *, reward_fn: RewardFn | None = None) -> dict[str, float]:
    cfg, p = ctx.cfg, ctx.cfg.policy
    rows = prompts_of_round(ctx, phase.round)
    per, per_epoch, total = plan_rollouts(ctx, len(rows))
    start_model = ctx.workdir.policy_model(phase.round - 1)
    params = load_policy(ctx, start_model)
    ref_folder = start_model if p.reference == "previous" else ctx.workdir.sft_model()
    if p.kind == "ppo":
        params[VALUE_HEAD] = init_value_head(ctx.model_cfg, ctx.mesh)
    seed = cfg.run.seed + 1000 * phase.round
    frozen = None
    if ctx.lora is not None:  # the state trains the adapters (+ PPO's value head) on the frozen base
        params, frozen = lora_split(ctx, params, seed=seed, trainable=(VALUE_HEAD,) if p.kind == "ppo" else ())
    # LoRA on the reference itself: the frozen base with the adapters off is the reference, no second copy
    base_is_reference = frozen is not None and str(ref_folder) == str(start_model)
    ref = frozen if base_is_reference else load_policy(ctx, ref_folder)
    # the mini-batch order and the rollouts' prompts and sampling seeds all derive from this seed
    rollout_seed = cfg.run.seed * 1_000_003 + phase.round * 10_007
    phase_settings = p.settings(seed=rollout_seed, run=cfg.run, reliability=cfg.reliability)
    rollouts = Rollouts(ctx, phase, rows, per=per, per_epoch=per_epoch, seed=rollout_seed, ref=ref, frozen=frozen,
                         reward_fn=reward_fn)
    trained = train_onpolicy(cfg=ctx.model_cfg, params=params, rollout=rollouts, phase_dir=ctx.workdir.phase(phase),
                             mesh=ctx.mesh, step_cfg=step_config(ctx, base_is_reference=base_is_reference, seed=seed),
                             optim=p.optim(), settings=phase_settings, total_steps=total,
                             rollout_size=per * rollout_samples_per_prompt(cfg), inner_epochs=p.inner_epochs,
                             ref_params=ref, frozen=frozen, counters=ctx.counters, name=phase.name)
    if frozen is None:
        save_model(ctx, without_value_head(trained), phase)
    else:
        merged = lora_merged(ctx, trained, frozen)
        save_model(ctx, without_value_head(merged.params), phase, adapters=merged.adapters, base=start_model)
    return final_metrics(ctx, phase)


KEPT = ("loss", "objective/scores", "objective/rlhf_reward", "objective/kl", "objective/entropy", "policy/clipfrac",
        "rewards/accuracies", "rewards/margins", "response_length")


def final_metrics(ctx: RunContext, phase: Phase) -> dict[str, float]:
    """The last rollout batch's objective / loss metrics, mean tokens/s (the first batch, which compiles, left out)
    and the number of rollout batches."""
    rows = [r for r in read_metrics(ctx.workdir.phase(phase) / "tb", latest_only=True) if r.get("split") == "train"]
    if not rows:
        return {}
    out = {k: rows[-1][k] for k in KEPT if k in rows[-1]}
    out["tokens_per_second"] = float(np.mean([r["tokens_per_second"] for r in rows[1:] or rows]))
    out["steps"] = len(rows)
    return out
