"""The (chosen, rejected) pairs the reward and policy phases train on, built from the sample phase's responses.

- reward (``run.method=reward``): data.train's given preference pairs; reward (IRL): the demonstration is chosen, the policy's own sample rejected (all rounds' pairs with
  ``reward.accumulate_pairs``); reward (AfD Init-SFT): the SFT model's sample positive, the initial model's
  negative;
- policy, ``policy.pairs``: ``dataset`` — the given preference pairs; ``demo_vs_sample`` — SPIN's demonstration vs own
  sample; ``best_of_n`` — the N samples scored by this round's reward model, one pair per prompt by
  ``policy.pair_rule`` (max-min: best vs worst; prompts whose pick is a single sample are dropped); ``ditto`` —
  DITTO's ordering (Shaikh et al. 2024, "Show, Don't Tell: Aligning Language Models with Demonstrated Feedback"):
  the demonstration is preferred to this round's samples, and those to every earlier round's samples; every pair of
  that order is used (demonstration vs each current and each earlier sample, each current sample vs each earlier one).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.data.tokenize import EncodedRecord, EncodedSequence, pair_example
from jaxalign.losses import PAIR_RULES
from jaxalign.pipeline.context import RunContext
from jaxalign.pipeline.modelio import load_reward
from jaxalign.pipeline.phases import Phase
from jaxalign.pipeline.sample import read_samples
from jaxalign.pipeline.scoring import gold_scores, score_sequences


def make_pair(enc: EncodedRecord, chosen: EncodedSequence, rejected: EncodedSequence) -> dict:
    return {"chosen_ids": chosen.ids, "chosen_mask": chosen.mask, "rejected_ids": rejected.ids,
            "rejected_mask": rejected.mask, "prompt_ids": enc.prompt_ids, "row_id": np.int32(enc.row_id)}


def strip_eos(ctx: RunContext, tokens) -> list[int]:
    """A sampled response without its EOS (``encode_sampled`` appends the template's own end of turn)."""
    return [t for t in tokens if t != ctx.encoder.eos_id]


def encode_response(ctx: RunContext, enc: EncodedRecord, tokens) -> EncodedSequence:
    return ctx.encoder.encode_sampled(enc.prompt_ids, strip_eos(ctx, tokens))


def reward_pairs(ctx: RunContext, round_: int) -> list[dict]:
    if ctx.cfg.run.method == "reward":  # the given preference pairs, as TRL's RewardTrainer
        return [pair_example(e) for e in ctx.train if e.rejected is not None]
    by_row = {e.row_id: e for e in ctx.train}
    rounds = range(1, round_ + 1) if ctx.cfg.reward.accumulate_pairs else [round_]
    pairs = []
    for k in rounds:
        s = read_samples(ctx, k)
        for i, row in enumerate(s["row_ids"]):
            enc = by_row[row]
            if ctx.cfg.run.method == "afd":
                pairs.append(make_pair(enc, encode_response(ctx, enc, s["samples"][i][0]),
                                       encode_response(ctx, enc, s["negatives"][i][0])))
            else:  # IRL: the demonstration is chosen, the policy's own sample rejected
                sample = (s["negatives"] if "negatives" in s else s["samples"])[i][0]
                pairs.append(make_pair(enc, enc.chosen, encode_response(ctx, enc, sample)))
    return pairs


def policy_pairs(ctx: RunContext, phase: Phase) -> tuple[list[dict], dict[str, float]]:
    """The policy phase's pairs, and what is measured on the way (best_of_n with a gold metric: see below)."""
    pairs = ctx.cfg.policy.pairs
    if pairs == "dataset":
        return [pair_example(e) for e in ctx.train if e.rejected is not None], {}
    by_row = {e.row_id: e for e in ctx.train}
    s = read_samples(ctx, phase.round)
    if pairs == "demo_vs_sample":
        return [make_pair(by_row[row], by_row[row].chosen, encode_response(ctx, by_row[row], s["samples"][i][0]))
                for i, row in enumerate(s["row_ids"])], {}
    if pairs == "ditto":
        return ditto_pairs(ctx, phase.round, by_row), {}
    return best_of_n_pairs(ctx, phase, s, by_row)


def ditto_pairs(ctx: RunContext, round_: int, by_row: dict[int, EncodedRecord]) -> list[dict]:
    """Demonstration > round ``round_``'s samples > rounds ``1 .. round_ - 1``'s samples, every pair of that order."""
    rounds = [read_samples(ctx, k) for k in range(1, round_ + 1)]
    earlier: dict[int, list[EncodedSequence]] = {}
    for s in rounds[:-1]:
        for i, row in enumerate(s["row_ids"]):
            earlier.setdefault(row, []).extend(encode_response(ctx, by_row[row], t) for t in s["samples"][i])
    out = []
    for i, row in enumerate(rounds[-1]["row_ids"]):
        enc = by_row[row]
        current = [encode_response(ctx, enc, t) for t in rounds[-1]["samples"][i]]
        old = earlier.get(row, [])
        out += [make_pair(enc, enc.chosen, y) for y in current + old]
        out += [make_pair(enc, y, z) for y in current for z in old]
    return out


def best_of_n_pairs(ctx: RunContext, phase: Phase, s: dict, by_row: dict[int, EncodedRecord]
                    ) -> tuple[list[dict], dict[str, float]]:
    """Score the N samples of each prompt with this round's reward model (``policy.reward=gold``: the gold program);
    pick a pair by ``policy.pair_rule``.

    With a gold metric, also measured: ``samples_gold`` (the mean gold of the N samples), ``chosen_gold`` /
    ``rejected_gold`` (of the picked pairs) and ``rm_gold_pair_accuracy``: over every two samples of a prompt whose
    gold differs (``rm_gold_pairs`` of them), how often the scores order them as the gold does (a tie counts 1/2)."""
    n, rows = s["num_samples"], s["row_ids"]
    seqs = [encode_response(ctx, by_row[row], sample) for i, row in enumerate(rows) for sample in s["samples"][i]]
    gold = None
    if ctx.scorer is not None:
        gold = gold_scores(ctx, [by_row[row].prompt_ids for row in rows for _ in range(n)],
                           [strip_eos(ctx, t) for i in range(len(rows)) for t in s["samples"][i]]).reshape(-1, n)
    if ctx.cfg.policy.reward == "gold":
        scores = gold
    else:
        rm = load_reward(ctx, ctx.workdir.reward_model(phase.round))
        scores = score_sequences(ctx, rm, [q.ids for q in seqs]).reshape(len(rows), n)
    key = jax.random.PRNGKey(ctx.cfg.run.seed + phase.round)
    ci, ri = (np.asarray(x) for x in PAIR_RULES[ctx.cfg.policy.pair_rule](jnp.asarray(scores), key))
    keep = [i for i in range(len(rows)) if ci[i] != ri[i]]
    pairs = [make_pair(by_row[rows[i]], seqs[i * n + ci[i]], seqs[i * n + ri[i]]) for i in keep]
    if gold is None:
        return pairs, {}
    metrics = {"samples_gold": float(gold.mean())}
    if keep:
        metrics.update(chosen_gold=float(np.mean([gold[i, ci[i]] for i in keep])),
                       rejected_gold=float(np.mean([gold[i, ri[i]] for i in keep])))
    agree = [float(np.sign(scores[i, a] - scores[i, b]) == np.sign(gold[i, a] - gold[i, b])) if scores[i, a] !=
             scores[i, b] else 0.5 for i in range(len(rows)) for a in range(n) for b in range(a + 1, n)
             if gold[i, a] != gold[i, b]]
    metrics["rm_gold_pairs"] = float(len(agree))
    if agree:
        metrics["rm_gold_pair_accuracy"] = float(np.mean(agree))
    return pairs, metrics
