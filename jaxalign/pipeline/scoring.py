"""Reward-model scores of token sequences (prompt + response), for pair selection and evaluation, and the gold
program's scores of sampled responses (``policy.reward=gold``).

Scores are the RM's raw outputs. The IRL authors normalise them by the RM's mean / std on the training
demonstrations before a policy optimises them; the pipeline's consumers today only compare scores of one RM (best-of-N
pair selection, win rates, held-out accuracy), which an affine normalisation with a positive scale does not change, so
none is applied.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from jaxalign import sharding
from jaxalign.data.loader import bucket_for
from jaxalign.pipeline.context import RunContext
from jaxalign.train.steps import make_eval_rewards


def score_sequences(ctx: RunContext, rm_params: dict[str, jax.Array], sequences: Sequence[Sequence[int]],
                    batch: int = 32, fn=None) -> np.ndarray:
    """RM scores [N] of token sequences, right-padded in length buckets, ``batch`` rows per call. ``fn``: a jitted
    ``make_eval_rewards`` kept by a caller that scores again and again (one compile per shape, not per call).

    Every process calls it with the same ``sequences`` and gets every score (a collective on several processes)."""
    fn = fn or make_eval_rewards(ctx.model_cfg, ctx.mesh)
    shards = sharding.batch_shards(ctx.mesh)
    batch = max(shards, (batch // shards) * shards)
    out = []
    for i in range(0, len(sequences), batch):
        chunk = [np.asarray(s, np.int32) for s in sequences[i:i + batch]]
        n = len(chunk)
        chunk += [chunk[-1]] * (batch - n)
        longest = max(len(s) for s in chunk)
        length = bucket_for(longest, ctx.buckets + (longest,))
        ids = np.full((batch, length), ctx.encoder.pad_id, np.int32)
        attn = np.zeros((batch, length), np.int32)
        for j, s in enumerate(chunk):
            ids[j, :len(s)], attn[j, :len(s)] = s, 1
        # every process holds every sequence (the same samples / eval data on all hosts): the whole batch is the
        # global array, each process keeps its shards, and the scores are gathered back from all of them
        dev = sharding.global_batch({"ids": ids, "attn": attn}, ctx.mesh)
        out.append(sharding.to_host(fn(rm_params, dev["ids"], dev["attn"]))[:n])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def gold_scores(ctx: RunContext, prompt_ids: Sequence[Sequence[int]],
                responses: Sequence[Sequence[int]]) -> np.ndarray:
    """``data.gold_metric``'s scores [N] of responses (token ids, EOS or not) to prompts (token ids): both decoded
    without special tokens, so the scorer reads the prompt's text as the user wrote it."""
    if ctx.scorer is None:
        raise ValueError("gold scores need data.gold_metric")
    decode = ctx.tokenizer.decode
    return ctx.scorer.scores([decode(list(p), skip_special_tokens=True) for p in prompt_ids],
                             [decode(list(r), skip_special_tokens=True).strip() for r in responses])
