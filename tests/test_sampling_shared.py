"""Shared-prefix (cascade) decoding: a prompt's KV cache stored once for its N samples gives the same samples as the
repeated cache and as transformers, in less memory.

Every generate call below decodes the same ragged 4-prompt batch (one 16-token prompt bucket) with N = 4, so each
(variant, layout, greedy / sampled) pair compiles once and the tests share the results through module fixtures.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import make_hf_model

from jaxalign.models import from_pretrained, ops
from jaxalign.sampling import (SharedKV, compiled_functions, generate, kv_cache_bytes, plan_batch_size,
                               sampling_bytes_per_device)
from jaxalign.sharding import make_mesh

MAX_NEW = 12
N = 4
rng = np.random.default_rng(0)
# ragged (left-padded into one 16-token bucket); the longest prompts outrun mistral's 5-token window, and 12 new
# tokens take its window past the whole prompt (the prefix part of the cascade is then fully masked)
PROMPTS = [[1] + rng.integers(3, 256, size=n - 1).tolist() for n in (3, 9, 14, 6)]
# llama: GQA 4 query / 2 KV heads; mistral: the same plus a 5-token sliding window
VARIANTS = ("llama", "mistral")
pytestmark = pytest.mark.slow  # one shared sampling run per model variant, compiled in each worker


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for variant in VARIANTS:
        folder = tmp_path_factory.mktemp(variant)
        out[variant] = (make_hf_model(variant, folder, seed=1, init_std=0.5), from_pretrained(folder))
    return out


@pytest.fixture(scope="module")
def runs(models):
    """{(variant, temperature, shared_prefix): GenerationResult} for N = 4 samples of each prompt."""
    out = {}
    for variant in VARIANTS:
        for temperature in (0.0, 1.0):
            for shared in (True, False):
                out[variant, temperature, shared] = generate(
                    models[variant][1], PROMPTS, max_new_tokens=MAX_NEW, num_samples=N, temperature=temperature,
                    seed=5, stop_at_eos=False, shared_prefix=shared, show_progress=False)
    return out


def _hf_greedy(hf, prompt):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=MAX_NEW, do_sample=False, output_logits=True, return_dict_in_generate=True,
                          pad_token_id=0, eos_token_id=None)
    want = out.sequences[0, len(prompt):].tolist()
    return want, [torch.log_softmax(step[0].double(), -1)[t].item() for step, t in zip(out.logits, want)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_shared_prefix_matches_unshared_and_transformers(models, runs, variant):
    """Greedy tokens of all N samples identical across layouts and to transformers' generate (each prompt alone,
    unpadded); log-probs within the parity tolerance of transformers and 1e-4 of the unshared sampler."""
    hf, _ = models[variant]
    shared, unshared = runs[variant, 0.0, True], runs[variant, 0.0, False]
    assert shared.stats.num_batches == unshared.stats.num_batches == 1
    assert shared.tokens == unshared.tokens
    for a, b in zip(shared.logprobs, unshared.logprobs):
        np.testing.assert_allclose(a, b, atol=1e-4)
    for i, prompt in enumerate(PROMPTS):
        want, want_lp = _hf_greedy(hf, prompt)
        for j, (toks, lps) in enumerate(zip(shared.samples(i), shared.grouped_logprobs[i])):
            assert toks == want, f"prompt {i} sample {j}"
            np.testing.assert_allclose(lps, want_lp, atol=1e-3)


@pytest.mark.parametrize("variant", VARIANTS)
def test_sampled_tokens_same_with_and_without_shared_prefix(runs, variant):
    """Temperature 1, one seed: the same tokens from both layouts (row keys depend on prompt and sample index only),
    and the samples of a prompt do differ."""
    shared, unshared = runs[variant, 1.0, True], runs[variant, 1.0, False]
    assert shared.tokens == unshared.tokens
    for a, b in zip(shared.logprobs, unshared.logprobs):
        np.testing.assert_allclose(a, b, atol=1e-4)
    assert all(len({tuple(t) for t in shared.samples(i)}) > 1 for i in range(len(PROMPTS)))


def test_shared_prefix_is_the_default(models, runs):
    """N > 1 without ``shared_prefix`` reuses the shared layout's programs (no compile, same tokens); their decode
    carries a SharedKV of prefix [layers, B, P, ...] and suffix [layers, B N, new bucket, ...]."""
    _, model = models["llama"]
    res = generate(model, PROMPTS, max_new_tokens=MAX_NEW, num_samples=N, stop_at_eos=False, show_progress=False)
    assert res.stats.compiles == 0 and res.tokens == runs["llama", 0.0, True].tokens
    cfg = model.cfg
    decode = [f for k, f in compiled_functions().items()
              if k[0] == "decode" and k[1] == cfg and k[3] == (4, 16) and k[4] == N and ("shared_prefix", True) in k]
    assert decode
    cache = decode[0].args_info[0][1]  # args_info: ((params, cache, state, ...), kwargs)
    assert isinstance(cache, SharedKV)
    assert cache.prefix.k.shape == (cfg.num_layers, 4, 16, cfg.num_kv_heads, cfg.head_dim)
    assert cache.suffix.k.shape == (cfg.num_layers, 4 * N, 16, cfg.num_kv_heads, cfg.head_dim)


@pytest.mark.parametrize("shape", [(2, 1, 4), (4, 1, 2)])
def test_shared_prefix_greedy_is_the_same_on_a_mesh(models, runs, shape):
    """Rows over data x fsdp (a prompt's N rows on its prompt's shard), KV heads over tensor where it divides them."""
    _, model = models["llama"]
    res = generate(model, PROMPTS, max_new_tokens=MAX_NEW, num_samples=N, stop_at_eos=False, show_progress=False,
                   mesh=make_mesh(*shape))
    ref = runs["llama", 0.0, True]
    assert res.tokens == ref.tokens
    for a, b in zip(res.logprobs, ref.logprobs):
        np.testing.assert_allclose(a, b, atol=1e-4)


# ---- the attention itself ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("window", [None, 3])
def test_cascade_attention_equals_attention_over_the_concatenated_keys(window):
    """Two prompts x 3 rows, GQA 6 / 2, left-padded prefixes, two query steps; with a window of 3 the second
    prompt's prefix is fully masked for the later query (its partial softmax must then weigh nothing)."""
    b, g, t, n, kh, d, p, s = 2, 3, 2, 6, 2, 8, 5, 4
    r = np.random.default_rng(1)
    q = r.standard_normal((b * g, t, n, d), np.float32)
    pk, pv = r.standard_normal((2, b, p, kh, d), np.float32)
    k, v = r.standard_normal((2, b * g, s, kh, d), np.float32)
    p_valid = np.array([[0, 0, 1, 1, 1], [0, 0, 0, 0, 1]], bool)

    @jax.jit  # one compile for both windows (op-by-op dispatch costs more than this whole test)
    def both(win):
        q_idx = p + 1 + jnp.arange(t)  # suffix slots 0..2 filled, queries at suffix slots 1, 2
        p_mask = ops.attention_mask(q_idx, jnp.arange(p), p_valid, win)
        s_mask = ops.attention_mask(q_idx, p + jnp.arange(s), jnp.ones((b * g, s), bool), win)
        got = ops.cascade_attention(q, pk, pv, p_mask, k, v, s_mask, jnp.float32)
        full_k = jnp.concatenate([jnp.repeat(pk, g, axis=0), k], axis=1)
        full_v = jnp.concatenate([jnp.repeat(pv, g, axis=0), v], axis=1)
        full_mask = jnp.concatenate([jnp.repeat(p_mask, g, axis=0), s_mask], axis=2)
        return got, ops.attention(q, full_k, full_v, full_mask, jnp.float32), p_mask

    got, want, p_mask = both(jnp.int32(window or 2**30))
    np.testing.assert_allclose(got, want, atol=1e-5)
    if window:
        assert not p_mask[1, 1].any()


# ---- memory --------------------------------------------------------------------------------------------------------

def test_memory_plan_counts_the_prefix_once(models):
    """Shared: KV = KV(B, P) + KV(B N, new); unshared: KV(B N, P + new). The same budget then holds more prompts."""
    cfg = models["llama"][1].cfg
    kw = dict(prompts_per_batch=8, num_samples=8, prompt_len=256, cache_len=320)
    shared = sampling_bytes_per_device(cfg, **kw)
    unshared = sampling_bytes_per_device(cfg, **kw, shared_prefix=False)
    assert shared["kv_cache"] == kv_cache_bytes(cfg, 8, 256) + kv_cache_bytes(cfg, 64, 64)
    assert unshared["kv_cache"] == kv_cache_bytes(cfg, 64, 320)
    assert shared == sampling_bytes_per_device(cfg, **kw, shared_prefix=True)
    plan = dict(num_prompts=1000, prompt_len=256, cache_len=320, num_samples=8, budget_bytes=unshared["total"],
                max_rows=10_000)
    assert plan_batch_size(cfg, **plan, shared_prefix=False) == 8 < plan_batch_size(cfg, **plan)
