"""Per-round evaluation: the policy's greedy answers, the gold metric, RM held-out accuracy and RM win rate.

- gold: the task's exact scorer on each answer (where the data defines one; the demo task does);
- rm_heldout_accuracy: the round's reward model on held-out preference pairs, fraction with r(chosen) > r(rejected);
- rm_win_rate_vs_sft: the round's reward model scores the policy's answer against the SFT model's answer to the
  same prompt; a win counts 1, a tie 0.5;
- with ``eval.best_of_n = N``: the policy also answers with the best of N samples (``sample.temperature``) ranked by
  the round's reward model (AfD's extrapolation step; online-DPO's candidates): ``bon_gold``, ``bon_rm_win_rate_vs_sft``.
"""
from __future__ import annotations

import json

import jax
import numpy as np


def _prompt_text(record) -> str:
    return record.prompt[-1].content


def evaluate(p, phase) -> dict:
    cfg = p.cfg
    k = phase.round
    from jaxalign.data.formats import Skip
    from jaxalign.data.tokenize import encode_records

    records, prompt_ids = [], []
    for r in p.eval_records:
        ids = p.encoder.encode_prompt(r.prompt)
        if isinstance(ids, Skip):
            p.counters["eval_prompts_skipped"] = p.counters.get("eval_prompts_skipped", 0) + 1
            continue
        records.append(r)
        prompt_ids.append(np.asarray(ids).tolist())
    params = p._load_policy(p.policy_dir(k))
    res = p._generate(params, prompt_ids, num_samples=1, temperature=cfg.eval.temperature,
                      max_new_tokens=cfg.eval.max_new_tokens, seed=cfg.run.seed + 17 * k)
    answers_ids = [p._strip_eos(t) for t in res.tokens]
    answers = [p.tokenizer.decode(t, skip_special_tokens=True).strip() for t in answers_ids]
    metrics: dict[str, float] = {"answer_length": float(np.mean([len(t) for t in answers_ids])),
                                 "sample_tokens_per_second": res.stats.tokens_per_s}
    from jaxalign.pipeline.demo_task import gold_score

    if cfg.data.gold_metric == "demo":
        metrics["gold"] = float(np.mean([gold_score(_prompt_text(r), a) for r, a in zip(records, answers)]))
    rm_round = max((j for j in range(k, 0, -1) if p.reward_dir(j) is not None), default=None)
    if rm_round is not None:
        from jaxalign.models.hf_io import read_params

        rm = read_params(p.reward_dir(rm_round), p.model_cfg, mesh=p.mesh, include_lm_head=False)
        import jax.numpy as jnp

        rm["score"] = jnp.asarray(np.asarray(p._rm_score_weight(rm_round)))
        if p.eval_prefs:
            from jaxalign.data.report import DataReport

            enc = encode_records(p.eval_prefs, p.encoder, "pairs", DataReport(name="eval_prefs"))
            enc = [e for e in enc if e.rejected is not None]
            if enc:
                rc = p._score(rm, [e.chosen.ids for e in enc])
                rr = p._score(rm, [e.rejected.ids for e in enc])
                metrics["rm_heldout_accuracy"] = float(np.mean(rc > rr))
        def score(answer_ids, prompts=prompt_ids):
            return p._score(rm, [np.concatenate([np.asarray(ids), np.asarray(a + [p.encoder.eos_id])])
                                 for ids, a in zip(prompts, answer_ids)])

        sft_eval = p.phase_dir("eval0") / "eval.json"
        sft_answers = json.loads(sft_eval.read_text())["answer_ids"] if sft_eval.is_file() else None
        ref = score(sft_answers) if sft_answers is not None else None
        if ref is not None:
            mine = score(answers_ids)
            metrics["rm_win_rate_vs_sft"] = float(np.mean((mine > ref) + 0.5 * (mine == ref)))
        if cfg.eval.best_of_n > 0:
            n = cfg.eval.best_of_n
            cand = p._generate(params, prompt_ids, num_samples=n, temperature=cfg.sample.temperature,
                               max_new_tokens=cfg.eval.max_new_tokens, seed=cfg.run.seed + 17 * k + 1)
            flat = [p._strip_eos(t) for group in cand.grouped_tokens for t in group]
            scores = score(flat, [ids for ids in prompt_ids for _ in range(n)]).reshape(len(prompt_ids), n)
            bon_ids = [flat[i * n + int(j)] for i, j in enumerate(np.argmax(scores, axis=1))]
            bon_answers = [p.tokenizer.decode(t, skip_special_tokens=True).strip() for t in bon_ids]
            if cfg.data.gold_metric == "demo":
                metrics["bon_gold"] = float(np.mean([gold_score(_prompt_text(r), a)
                                                     for r, a in zip(records, bon_answers)]))
            if ref is not None:
                best = scores.max(axis=1)
                metrics["bon_rm_win_rate_vs_sft"] = float(np.mean((best > ref) + 0.5 * (best == ref)))
    out = {"metrics": metrics, "prompts": [_prompt_text(r) for r in records],
           "demonstrations": [r.demonstration or "" for r in records], "answers": answers,
           "answer_ids": answers_ids}
    if cfg.eval.best_of_n > 0 and rm_round is not None:
        out["best_of_n_answers"] = bon_answers
    if jax.process_index() == 0:
        (p.phase_dir(phase) / "eval.json").write_text(json.dumps(out))
    return metrics
