"""The sample phase: the current policy answers the training prompts (round k samples from the policy of round k-1).

``samples.json`` holds, per prompt (``row_ids``), ``samples`` — the candidates the policy step pairs (N of them for
best-of-N, else one) — and, where the method wants them, ``negatives``: the reward model's rejected responses
(IRL: one near-greedy sample at ``sample.negative_temperature``; AfD Init-SFT: one sample of the initial model).
"""
from __future__ import annotations

import json
from typing import Sequence

import jax
import numpy as np

from jaxalign.config import Config
from jaxalign.data.rotation import rotating_window
from jaxalign.pipeline.context import RunContext
from jaxalign.pipeline.modelio import load_policy
from jaxalign.pipeline.phases import Phase
from jaxalign.rules import candidates_per_prompt, round_prompts
from jaxalign.sampling import GenerationResult, generate_from_params


def draw(ctx: RunContext, params, prompts: Sequence[Sequence[int]], *, num_samples: int, temperature: float,
         max_new_tokens: int, seed: int) -> GenerationResult:
    """Sample from ``params`` with the recipe's top-k / top-p (the sampler ignores them when greedy)."""
    s = ctx.cfg.sample
    return generate_from_params(params, ctx.model_cfg, [list(p) for p in prompts], max_new_tokens=max_new_tokens,
                                temperature=temperature, top_p=s.top_p, top_k=s.top_k, seed=seed,
                                num_samples=num_samples, mesh=ctx.mesh, batch_size=s.batch_size or None,
                                show_progress=ctx.cfg.run.show_progress)


def prompts_of_round(ctx: RunContext, round_: int) -> list:
    """The demonstrations whose prompts round ``round_`` answers: all, or ``sample.limit`` of them — the next ones each
    round (``sample.rotate``, every prompt once before any twice) or round 1's every round (SPIN's setting)."""
    rows = ctx.demonstrations
    s = ctx.cfg.sample
    # DITTO ranks this round's samples above earlier rounds' for the same prompts: its prompts stay fixed
    rotate = s.rotate and ctx.cfg.policy.pairs != "ditto"
    return [rows[i] for i in rotating_window(len(rows), round_prompts(ctx.cfg, len(rows)), round_ if rotate else 1)]


def run(ctx: RunContext, phase: Phase) -> dict[str, float]:
    cfg = ctx.cfg
    rows = prompts_of_round(ctx, phase.round)
    prompts = [e.prompt_ids.tolist() for e in rows]
    n = candidates_per_prompt(cfg)
    params = load_policy(ctx, ctx.workdir.policy_model(phase.round - 1))
    res = draw(ctx, params, prompts, num_samples=n, temperature=cfg.sample.temperature,
               max_new_tokens=cfg.sample.max_new_tokens, seed=cfg.run.seed * 7919 + phase.round)
    if res.stats.shrunk_from:
        print(f"[{phase.name}] sampling batch: {res.stats.shrunk_from} prompts x {n} (the memory plan) did not fit "
              f"as compiled; {res.stats.prompts_per_batch} x {n} per batch (sample.batch_size sets it)")
    out = {"row_ids": [e.row_id for e in rows], "num_samples": n, "samples": res.grouped_tokens}
    metrics = {"tokens_per_second": res.stats.tokens_per_s, "samples": len(res.tokens),
               "mean_length": float(np.mean([len(t) for t in res.tokens]))}
    if cfg.run.method == "afd":  # Init-SFT: negatives from the initial model
        init = load_policy(ctx, ctx.workdir.base_model)
        neg = draw(ctx, init, prompts, num_samples=1, temperature=cfg.sample.temperature,
                   max_new_tokens=cfg.sample.max_new_tokens, seed=cfg.run.seed * 7919 + 104729)
        out["negatives"] = neg.grouped_tokens
    elif cfg.run.method == "irl" and cfg.sample.negative_temperature >= 0:
        # the reward model's rejected responses, sampled apart from the best-of-N candidates (IRL authors: 0.01)
        neg = draw(ctx, params, prompts, num_samples=1, temperature=cfg.sample.negative_temperature,
                   max_new_tokens=cfg.sample.max_new_tokens, seed=cfg.run.seed * 7919 + phase.round + 1)
        out["negatives"] = neg.grouped_tokens
    if jax.process_index() == 0:
        ctx.workdir.samples(phase.round).write_text(json.dumps(out))
    return metrics


def read_samples(ctx: RunContext, round_: int) -> dict:
    return json.loads(ctx.workdir.samples(round_).read_text())
