"""Synthetic data and a tiny model for the engine tests (no tokenizer needed)."""
from __future__ import annotations

import numpy as np

from jaxalign.models import ModelConfig

VOCAB = 64


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=8, max_position_embeddings=128, sliding_windows=(None, None), pad_token_id=0,
                bos_token_id=1, eos_token_id=2)
    base.update(kw)
    return ModelConfig(**base)


def sft_examples(n=32, seed=0):
    rng = np.random.RandomState(seed)
    out = []
    for i in range(n):
        p, r = rng.randint(3, 8), rng.randint(3, 10)
        ids = np.concatenate([[1], rng.randint(3, VOCAB, p), (np.arange(r) * 3 + i) % (VOCAB - 3) + 3, [2]])
        mask = np.zeros(len(ids), bool)
        mask[1 + p:] = True
        out.append({"input_ids": ids.astype(np.int32), "loss_mask": mask, "row_id": i})
    return out


def pair_examples(n=32, seed=0):
    """Chosen responses use even tokens, rejected odd ones: separable by a reward model and by a policy."""
    rng = np.random.RandomState(seed)
    out = []
    for i in range(n):
        prompt = np.concatenate([[1], rng.randint(3, VOCAB, rng.randint(3, 8))])
        r = rng.randint(3, 8)
        chosen = np.concatenate([prompt, 2 * rng.randint(2, VOCAB // 2, r), [2]])
        rejected = np.concatenate([prompt, 2 * rng.randint(2, VOCAB // 2 - 1, r) + 1, [2]])
        ex = {"prompt_ids": prompt.astype(np.int32), "row_id": i}
        for side, ids in (("chosen", chosen), ("rejected", rejected)):
            m = np.zeros(len(ids), bool)
            m[len(prompt):] = True
            ex[f"{side}_ids"], ex[f"{side}_mask"] = ids.astype(np.int32), m
        out.append(ex)
    return out
