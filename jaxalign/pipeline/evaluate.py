"""The eval phase: the policy's greedy answers, the gold metric, RM held-out accuracy and RM win rate, per round.

- gold: ``data.gold_metric``'s program on each answer (:mod:`jaxalign.tasks`), with the scorer's parts beside it
  (``gold_strict``, ``gold_guard`` for the instruction task); eval.json keeps each answer's gold score;
- rm_heldout_accuracy: the round's reward model on held-out preference pairs, fraction with r(chosen) > r(rejected);
- rm_demo_vs_sample_accuracy: the round's reward model on held-out (demonstration, own answer) pairs — the eval
  prompts' demonstrations against the greedy answers of the policy that round sampled from (the previous eval's),
  where the two differ: the pairs the IRL reward is trained to tell apart, on prompts it never saw
  (``rm_demo_vs_sample_pairs`` counts them);
- rm_win_rate_vs_sft: the round's reward model scores the policy's answer against the SFT model's answer to the
  same prompt; a win counts 1, a tie 0.5;
- with ``eval.best_of_n = N``: the policy also answers with the best of N samples (``sample.temperature``) ranked by
  the round's reward model (AfD's extrapolation step; online-DPO's candidates): ``bon_gold``,
  ``bon_rm_win_rate_vs_sft``.
"""
from __future__ import annotations

import json

import jax
import numpy as np

from jaxalign.data.formats import Skip
from jaxalign.data.report import DataReport
from jaxalign.data.tokenize import encode_records
from jaxalign.pipeline.context import RunContext
from jaxalign.pipeline.modelio import load_policy, load_reward
from jaxalign.pipeline.pairs import strip_eos
from jaxalign.pipeline.phases import Phase
from jaxalign.pipeline.sample import draw
from jaxalign.pipeline.scoring import score_sequences


def _prompt_text(record) -> str:
    return record.prompt[-1].content


def _win_rate(mine: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean((mine > ref) + 0.5 * (mine == ref)))


def _demo_vs_sample(ctx: RunContext, records, rm, k: int) -> dict[str, float]:
    previous = ctx.workdir.eval_file("eval0" if k <= 1 else f"r{k - 1}/eval")
    if not previous.is_file():
        return {}
    own = json.loads(previous.read_text())
    answer_of = dict(zip(own["prompts"], own["answer_ids"]))
    demos, samples = [], []
    for r in records:
        enc = ctx.encoder.encode(r, "sft")
        answer = answer_of.get(_prompt_text(r))
        if isinstance(enc, Skip) or answer is None:
            continue
        sample = ctx.encoder.encode_sampled(enc.prompt_ids, answer)
        if list(sample.ids) != list(enc.chosen.ids):
            demos.append(enc.chosen.ids)
            samples.append(sample.ids)
    if not demos:
        return {"rm_demo_vs_sample_pairs": 0.0}
    accuracy = float(np.mean(score_sequences(ctx, rm, demos) > score_sequences(ctx, rm, samples)))
    return {"rm_demo_vs_sample_accuracy": accuracy, "rm_demo_vs_sample_pairs": float(len(demos))}


def run(ctx: RunContext, phase: Phase) -> dict[str, float]:
    cfg = ctx.cfg
    k = phase.round
    records, prompt_ids = [], []
    for r in ctx.eval_records:
        ids = ctx.encoder.encode_prompt(r.prompt)
        if isinstance(ids, Skip):
            ctx.count("eval_prompts_skipped")
            continue
        records.append(r)
        prompt_ids.append(np.asarray(ids).tolist())
    params = load_policy(ctx, ctx.workdir.policy_model(k))
    res = draw(ctx, params, prompt_ids, num_samples=1, temperature=cfg.eval.temperature,
               max_new_tokens=cfg.eval.max_new_tokens, seed=cfg.run.seed + 17 * k)
    answers_ids = [strip_eos(ctx, t) for t in res.tokens]
    answers = [ctx.tokenizer.decode(t, skip_special_tokens=True).strip() for t in answers_ids]
    metrics: dict[str, float] = {"answer_length": float(np.mean([len(t) for t in answers_ids])),
                                 "sample_tokens_per_second": res.stats.tokens_per_s}
    prompts = [_prompt_text(r) for r in records]
    out = {"metrics": metrics, "prompts": prompts, "demonstrations": [r.demonstration or "" for r in records],
           "answers": answers, "answer_ids": answers_ids}
    if ctx.scorer is not None:
        metrics.update(ctx.scorer.metrics(prompts, answers))
        out["gold"] = ctx.scorer.scores(prompts, answers).tolist()
    latest = ctx.workdir.latest_reward_model(k)
    if latest is not None:
        rm = load_reward(ctx, latest[1])
        if ctx.eval_prefs:
            enc = encode_records(ctx.eval_prefs, ctx.encoder, "pairs", DataReport(name="eval_prefs"))
            enc = [e for e in enc if e.rejected is not None]  # all of them (the training-time metrics see a limit)
            if enc:
                rc = score_sequences(ctx, rm, [e.chosen.ids for e in enc])
                rr = score_sequences(ctx, rm, [e.rejected.ids for e in enc])
                metrics["rm_heldout_accuracy"] = float(np.mean(rc > rr))

        def score(answer_ids, prompts=prompt_ids):
            return score_sequences(ctx, rm, [np.concatenate([np.asarray(ids), np.asarray(a + [ctx.encoder.eos_id])])
                                             for ids, a in zip(prompts, answer_ids)])

        sft_eval = ctx.workdir.eval_file("eval0")
        sft_answers = json.loads(sft_eval.read_text())["answer_ids"] if sft_eval.is_file() else None
        metrics.update(_demo_vs_sample(ctx, records, rm, k))
        ref = score(sft_answers) if sft_answers is not None else None
        if ref is not None:
            metrics["rm_win_rate_vs_sft"] = _win_rate(score(answers_ids), ref)
        if cfg.eval.best_of_n > 0:
            n = cfg.eval.best_of_n
            cand = draw(ctx, params, prompt_ids, num_samples=n, temperature=cfg.sample.temperature,
                        max_new_tokens=cfg.eval.max_new_tokens, seed=cfg.run.seed + 17 * k + 1)
            flat = [strip_eos(ctx, t) for group in cand.grouped_tokens for t in group]
            scores = score(flat, [ids for ids in prompt_ids for _ in range(n)]).reshape(len(prompt_ids), n)
            bon_ids = [flat[i * n + int(j)] for i, j in enumerate(np.argmax(scores, axis=1))]
            out["best_of_n_answers"] = [ctx.tokenizer.decode(t, skip_special_tokens=True).strip() for t in bon_ids]
            if ctx.scorer is not None:
                metrics["bon_gold"] = ctx.scorer.metrics(prompts, out["best_of_n_answers"])["gold"]
            if ref is not None:
                metrics["bon_rm_win_rate_vs_sft"] = _win_rate(scores.max(axis=1), ref)
    if jax.process_index() == 0:
        ctx.workdir.eval_file(phase).write_text(json.dumps(out))
    return metrics
