"""The KV-cache sampler: greedy parity with transformers, sampling in distribution, stop ids, seeds, meshes, bad input.

Compiles are the cost here (a few seconds each on CPU), so the tests share prompt shapes and settings: every test
below reuses one of a handful of compiled (prefill, decode) pairs through module-scoped fixtures and the sampler's
compile cache.
"""
from __future__ import annotations

import math

import jax
import numpy as np
import pytest
import torch
from hf_models import make_hf_model

from jaxalign.models import KVCache, from_pretrained
from jaxalign.sampling import (DecodeMode, bucket_length, compile_cache_size, compiled_functions, compiled_peak_bytes,
                               generate, generate_from_params, kv_cache_bytes, plan_batch_size, sampler,
                               sampling_bytes_per_device, stop_id_buffer)
from jaxalign.sharding import make_mesh

MAX_NEW = 12


def _prompts(lengths, seed):
    rng = np.random.default_rng(seed)
    return [[1] + rng.integers(3, 256, size=n - 1).tolist() for n in lengths]


# ragged, all in the 16-token prompt bucket: every 4-prompt test shares one compiled shape
PROMPTS = _prompts([3, 9, 14, 6], seed=0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two families, wide init so greedy argmaxes are not near-ties: {name: (transformers model, jaxalign Decoder)}."""
    out = {}
    for variant in ("llama", "gpt_neox"):
        folder = tmp_path_factory.mktemp(variant)
        hf = make_hf_model(variant, folder, seed=1, init_std=0.5)
        out[variant] = (hf, from_pretrained(folder))
    return out


@pytest.fixture(scope="module")
def llama(models):
    return models["llama"]


def _hf_logits(hf, seqs):
    """Last-position float64 logits of transformers for each (unpadded) sequence, grouped by length."""
    out = np.zeros((len(seqs), hf.config.vocab_size))
    by_len = {}
    for i, s in enumerate(seqs):
        by_len.setdefault(len(s), []).append(i)
    with torch.no_grad():
        for _, idx in by_len.items():
            ids = torch.tensor([seqs[i] for i in idx])
            out[idx] = hf(ids).logits[:, -1].double().numpy()
    return out


# ---- 1. greedy parity ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["llama", "gpt_neox"])
def test_greedy_matches_transformers_per_prompt(models, variant):
    hf, model = models[variant]
    res = generate(model, PROMPTS, max_new_tokens=MAX_NEW, show_progress=False)  # ragged batch, decoded together
    assert res.stats.num_batches == 1 and res.stats.rows_per_batch == 4
    for i, p in enumerate(PROMPTS):
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=MAX_NEW, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, pad_token_id=0)
        want = out.sequences[0, len(p):].tolist()
        assert res.tokens[i] == want, f"prompt {i}"
        want_lp = [torch.log_softmax(step[0].double(), -1)[t].item() for step, t in zip(out.logits, want)]
        np.testing.assert_allclose(res.logprobs[i], want_lp, atol=1e-3)
        # HF stops at eos (id 2) too; our row is cut after it and says so
        assert res.stopped[i] == (want[-1] == 2)


# ---- 2. sampling in distribution, top-k, top-p ----------------------------------------------------------------

N_DIST = 2048
DIST_PROMPT = PROMPTS[1]
TEMPERATURE = 1.5


def _filtered_probs(logits, temperature, top_k=0, top_p=1.0):
    """Reference (float64) sampling distribution: softmax(logits / T) restricted to top-k, then the nucleus."""
    z = logits / temperature
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    order = np.argsort(-p, axis=-1, kind="stable")
    keep = np.zeros_like(p, dtype=bool)
    for r in range(p.shape[0]):
        ranked = p[r, order[r]]
        k = top_k or len(ranked)
        if top_p < 1.0:
            ranked_k = ranked[:k] / ranked[:k].sum()
            before = np.cumsum(ranked_k) - ranked_k
            k = int(np.sum(before < top_p))
        keep[r, order[r, :k]] = True
    q = np.where(keep, p, 0.0)
    return q / q.sum(-1, keepdims=True), keep


def _chi_square_ok(counts, expected, z=3.719):
    """Pearson chi-square against ``expected`` counts; bins under 5 expected are pooled. Accepts at p > ~1e-4
    (Wilson-Hilferty quantile with z = 3.719). Returns (ok, statistic, critical value, degrees of freedom)."""
    counts, expected = np.asarray(counts, float), np.asarray(expected, float)
    assert abs(counts.sum() - expected.sum()) < 1e-6 * counts.sum()
    big = expected >= 5
    obs, exp = list(counts[big]), list(expected[big])
    rest_o, rest_e = counts[~big].sum(), expected[~big].sum()
    if rest_e >= 5:
        obs.append(rest_o)
        exp.append(rest_e)
    elif rest_e > 0 or rest_o > 0:  # merge the small remainder into the smallest large bin
        j = int(np.argmin(exp))
        obs[j] += rest_o
        exp[j] += rest_e
    obs, exp = np.array(obs), np.array(exp)
    stat = float(np.sum((obs - exp) ** 2 / exp))
    df = len(obs) - 1
    crit = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return stat <= crit, stat, crit, df


@pytest.fixture(scope="module")
def dist_runs(llama):
    """N_DIST samples of two tokens from one prompt, for three filter settings (one prefill per run)."""
    hf, model = llama
    runs = {}
    for name, kw in {"plain": {}, "top_k": dict(top_k=8), "top_p": dict(top_p=0.7)}.items():
        res = generate(model, [DIST_PROMPT], max_new_tokens=2, temperature=TEMPERATURE, num_samples=N_DIST, seed=7,
                       stop_at_eos=False, show_progress=False, **kw)
        assert res.stats.prompt_tokens == len(DIST_PROMPT)  # the prompt was prefilled once, not N_DIST times
        toks = np.array(res.tokens)
        assert toks.shape == (N_DIST, 2)
        first = _hf_logits(hf, [DIST_PROMPT])[0]
        uniq = sorted(set(toks[:, 0].tolist()))
        second = dict(zip(uniq, _hf_logits(hf, [DIST_PROMPT + [t] for t in uniq])))
        runs[name] = (kw, res, toks, first, np.stack([second[t] for t in toks[:, 0]]))
    return runs


@pytest.mark.parametrize("name", ["plain", "top_k", "top_p"])
def test_samples_follow_the_tempered_filtered_distribution(dist_runs, name):
    """2048 samples of the first token (drawn from the prefill) and of the second (drawn in the decode loop) pass a
    Pearson chi-square test against softmax(logits / T) after top-k / top-p (transformers' logits as the reference)
    at p > 1e-4, and the first token's empirical distribution is within total variation 0.1 of it; the same counts
    fail the test against temperature 1.5 T (the test has power)."""
    kw, res, toks, first, second = dist_runs[name]
    # step 1 (sampled from the prefill logits): counts vs N * softmax(logits / T) (filtered)
    p1, _ = _filtered_probs(first[None], TEMPERATURE, **kw)
    ok, stat, crit, df = _chi_square_ok(np.bincount(toks[:, 0], minlength=256), N_DIST * p1[0])
    assert ok, f"step 1 chi2 {stat:.1f} > {crit:.1f} (df {df})"
    tv = 0.5 * np.abs(np.bincount(toks[:, 0], minlength=256) / N_DIST - p1[0]).sum()
    assert tv < 0.1, tv
    # the test has power: a wrong temperature is rejected
    wrong, _ = _filtered_probs(first[None], TEMPERATURE * 1.5, **kw)
    assert not _chi_square_ok(np.bincount(toks[:, 0], minlength=256), N_DIST * wrong[0])[0]
    # step 2 (sampled inside the decode loop): marginal = sum over rows of p(. | prompt, row's first token)
    p2, _ = _filtered_probs(second, TEMPERATURE, **kw)
    ok, stat, crit, df = _chi_square_ok(np.bincount(toks[:, 1], minlength=256), p2.sum(0))
    assert ok, f"step 2 chi2 {stat:.1f} > {crit:.1f} (df {df})"
    # log-probs are under the raw (temperature 1, unfiltered) model distribution
    lp = np.array(res.logprobs)

    def log_softmax(x):
        return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))

    np.testing.assert_allclose(lp[:, 0], log_softmax(first)[toks[:, 0]], atol=1e-3)
    np.testing.assert_allclose(lp[:, 1], log_softmax(second)[np.arange(N_DIST), toks[:, 1]], atol=1e-3)


def test_top_k_never_leaves_the_k_best(dist_runs):
    _, _, toks, first, second = dist_runs["top_k"]
    assert set(toks[:, 0]) <= set(np.argsort(-first)[:8].tolist())
    rank = (second > second[np.arange(N_DIST), toks[:, 1]][:, None]).sum(-1)  # tokens strictly better than the pick
    assert rank.max() < 8
    assert len(set(toks[:, 0])) > 1  # and it does sample


def test_top_p_never_leaves_the_nucleus(dist_runs):
    _, _, toks, first, second = dist_runs["top_p"]
    # smallest set with mass >= 0.7 (a hair of float slack at the boundary: 0.7 + 1e-5)
    _, keep1 = _filtered_probs(first[None], TEMPERATURE, top_p=0.7 + 1e-5)
    assert keep1[0, toks[:, 0]].all()
    _, keep2 = _filtered_probs(second, TEMPERATURE, top_p=0.7 + 1e-5)
    assert keep2[np.arange(N_DIST), toks[:, 1]].all()
    # without top-p the same prompt does emit tokens outside that set (so the check above means something)
    _, _, plain, _, _ = dist_runs["plain"]
    assert not keep1[0, plain[:, 0]].all()


# ---- 3. stop ids ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_stop_ids_cut_rows_without_touching_others(llama, temperature):
    _, model = llama
    kw = dict(max_new_tokens=MAX_NEW, temperature=temperature, seed=3, stop_at_eos=False, show_progress=False)
    free = generate(model, PROMPTS, **kw)
    assert all(len(t) == MAX_NEW for t in free.tokens) and not any(free.stopped)
    stop = free.tokens[0][2]  # row 0 stops after its 3rd token (or earlier if the id appears before)
    other = free.tokens[2][5]
    cut = generate(model, PROMPTS, stop_ids=(stop, other), **kw)
    for i, (full, lp) in enumerate(zip(free.tokens, free.logprobs)):
        hits = [k for k, t in enumerate(full) if t in (stop, other)]
        end = hits[0] + 1 if hits else len(full)  # the stop id itself is kept
        assert cut.tokens[i] == full[:end], f"row {i}"
        np.testing.assert_allclose(cut.logprobs[i], lp[:end], atol=1e-6)
        assert cut.stopped[i] == bool(hits)
    assert len(cut.tokens[0]) <= 3 and cut.stopped[0]
    # every row stops right away: the loop ends early
    all_stop = generate(model, PROMPTS, stop_ids=tuple(sorted({t[0] for t in free.tokens})), **kw)
    assert all(len(t) == 1 for t in all_stop.tokens) and all_stop.stats.decode_steps == 1


# ---- 4. seeds, batching, samples per prompt, meshes -----------------------------------------------------------

def test_same_seed_same_samples_different_seed_different(llama):
    _, model = llama
    kw = dict(max_new_tokens=MAX_NEW, temperature=1.0, stop_at_eos=False, show_progress=False)
    a = generate(model, PROMPTS, seed=11, **kw)
    b = generate(model, PROMPTS, seed=11, **kw)
    c = generate(model, PROMPTS, seed=12, **kw)
    assert a.tokens == b.tokens and a.logprobs == b.logprobs
    assert a.tokens != c.tokens
    assert b.stats.compiles == 0 and c.stats.compiles == 0  # seed and temperature are traced, not compiled in
    d = generate(model, PROMPTS, seed=11, **{**kw, "temperature": 0.8})
    assert d.stats.compiles == 0 and d.tokens != a.tokens


def test_num_samples_and_streamed_batches_do_not_change_samples(llama):
    """Sample j of prompt i depends on (seed, i, j) only: the same with N=1 or N=3, one batch or batches of 2."""
    _, model = llama
    kw = dict(max_new_tokens=MAX_NEW, temperature=1.0, seed=5, stop_at_eos=False, show_progress=False)
    one = generate(model, PROMPTS, **kw)
    params, cfg = model.param_dict(), model.cfg
    many = generate_from_params(params, cfg, PROMPTS, num_samples=3, batch_size=2, **{**kw, "show_progress": True})
    assert many.stats.num_batches == 2 and many.stats.rows_per_batch == 6
    assert many.stats.prompt_tokens == sum(map(len, PROMPTS))  # each prompt prefilled once for its 3 samples
    assert len(many.tokens) == 12 and many.num_prompts == 4
    for i in range(4):
        assert many.tokens[i * 3] == one.tokens[i] == many.samples(i)[0] == many.grouped_tokens[i][0]
        np.testing.assert_allclose(many.logprobs[i * 3], one.logprobs[i], atol=1e-4)  # other batch shapes
        assert len({tuple(t) for t in many.samples(i)}) == 3  # samples of one prompt differ
    assert len(many.sequence_logprobs()) == 12


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 1, 4)])
def test_greedy_is_the_same_on_every_mesh(llama, shape):
    _, model = llama
    assert jax.device_count() == 8
    ref = generate(model, PROMPTS, max_new_tokens=MAX_NEW, show_progress=False)  # one device
    mesh = make_mesh(*shape)
    res = generate(model, PROMPTS, max_new_tokens=MAX_NEW, mesh=mesh, show_progress=False)
    assert res.tokens == ref.tokens
    for a, b in zip(res.logprobs, ref.logprobs):
        np.testing.assert_allclose(a, b, atol=1e-4)
    assert res.stats.prompts_per_batch % shape[0] == 0


def test_greedy_ignores_top_k_top_p_and_seed(llama):
    """temperature 0 decides greedy through DecodeMode.from_settings: top-k / top-p / seed change neither the samples
    nor the compiled program (no new compile)."""
    _, model = llama
    kw = dict(max_new_tokens=MAX_NEW, show_progress=False)
    ref = generate(model, PROMPTS, **kw)
    res = generate(model, PROMPTS, top_k=3, top_p=0.5, seed=9, **kw)
    assert res.tokens == ref.tokens and res.logprobs == ref.logprobs and res.stats.compiles == 0


# ---- 5. host-side settings: decode mode, length buckets, stop ids ---------------------------------------------

@pytest.mark.parametrize("temperature, top_p, top_k, want", [
    (0.0, 1.0, 0, DecodeMode(greedy=True)),
    (0, 0.5, 7, DecodeMode(greedy=True)),  # greedy: top-k / top-p are off whatever they say
    (1.0, 1.0, 0, DecodeMode(greedy=False)),
    (0.01, 0.9, 0, DecodeMode(greedy=False, use_top_p=True)),
    (0.7, 1.0, np.int64(20), DecodeMode(greedy=False, top_k=20)),
    (1.3, 0.8, 10, DecodeMode(greedy=False, top_k=10, use_top_p=True)),
])
def test_decode_mode_from_settings(temperature, top_p, top_k, want):
    mode = DecodeMode.from_settings(temperature, top_p, top_k)
    assert mode == want and type(mode.top_k) is int
    assert hash(mode) == hash(want)  # part of the compile-cache key


def test_bucket_length():
    assert [bucket_length(n) for n in (1, 15, 16, 17, 64, 65, 1000)] == [16, 16, 16, 32, 64, 128, 1024]
    assert bucket_length(3, minimum=1) == 4 and bucket_length(1, minimum=1) == 1
    assert [bucket_length(n, (48, 24, 100)) for n in (1, 24, 25, 100)] == [24, 24, 48, 100]
    with pytest.raises(ValueError, match=r"prompt 101 is longer than the largest of prompt_buckets=\[24, 48, 100\]"):
        bucket_length(101, (48, 24, 100), what="prompt")


def test_stop_id_buffer():
    assert stop_id_buffer(()).tolist() == [-1] * 8
    assert stop_id_buffer((5, 2)).tolist() == [5, 2] + [-1] * 6
    nine = stop_id_buffer(range(3, 12))
    assert nine.dtype == np.int32 and nine.tolist() == list(range(3, 12)) + [-1] * 7


# ---- 6. bad input, refused before compilation -----------------------------------------------------------------

@pytest.mark.parametrize("prompts, kw, match", [
    ([[1, 5], []], {}, "prompt 1 is empty"),
    ([[1] * 129], {}, "longer than the model's context"),
    ([[1] * 100], dict(max_new_tokens=40), "overflow"),
    ([[1, 5]], dict(top_p=0.0), "top_p"),
    ([[1, 5]], dict(top_p=1.5), "top_p"),
    ([[1, 5]], dict(top_p=-0.2), "top_p"),
    ([[1, 5]], dict(max_new_tokens=0), "max_new_tokens"),
    ([[1, 5]], dict(temperature=-1.0), "temperature"),
    ([[1, 5]], dict(top_k=1000), "top_k"),
    ([[1, 300]], {}, "outside"),
    ([[1, 5]], dict(memory_budget_bytes=1000), "budget"),
])
def test_bad_input_is_refused_before_compiling(llama, prompts, kw, match):
    _, model = llama
    before = compile_cache_size()
    with pytest.raises(ValueError, match=match):
        generate(model, prompts, **{"max_new_tokens": 8, "show_progress": False, **kw})
    assert compile_cache_size() == before


def test_no_prompts_gives_an_empty_result(llama):
    res = generate(llama[1], [], max_new_tokens=4, show_progress=False)
    assert res.tokens == [] and res.logprobs == []


# ---- memory planning ----------------------------------------------------------------------------------------------

def test_kv_cache_bytes_is_the_real_cache_size(llama):
    cfg = llama[1].cfg
    for batch, length, dtype in [(3, 40, None), (8, 128, "bfloat16")]:
        cache = KVCache.zeros(cfg, batch, length, dtype)
        assert kv_cache_bytes(cfg, batch, length, dtype) == cache.k.nbytes + cache.v.nbytes


def test_batch_size_is_planned_from_the_budget(llama):
    cfg = llama[1].cfg
    kw = dict(num_prompts=1000, prompt_len=64, cache_len=128, num_samples=4)
    per = sampling_bytes_per_device(cfg, prompts_per_batch=1, **{k: kw[k] for k in ("num_samples", "prompt_len",
                                                                                      "cache_len")})
    b = plan_batch_size(cfg, budget_bytes=10 * per["total"], max_rows=10_000, **kw)
    assert 1 <= b <= 10
    assert sampling_bytes_per_device(cfg, prompts_per_batch=b, num_samples=4, prompt_len=64,
                                     cache_len=128)["total"] <= 10 * per["total"]
    assert plan_batch_size(cfg, budget_bytes=2**40, max_rows=64, **kw) == 16  # 16 prompts x 4 samples = 64 rows
    mesh = make_mesh(4, 2, 1)  # batch split 8 ways: a multiple of 8
    assert plan_batch_size(cfg, budget_bytes=2**40, max_rows=64, mesh=mesh, **kw) % 8 == 0
    with pytest.raises(ValueError, match="budget"):
        plan_batch_size(cfg, budget_bytes=100, **kw)


@pytest.mark.parametrize("shared", [True, False])
def test_memory_plan_bounds_what_xla_allocates(llama, dist_runs, shared):
    """The planned prefill / decode peaks bound what XLA allocates (memory_analysis() of the functions the
    distribution runs compiled: 1 prompt x 2048 samples, a cache-dominated shape), for the shared-prefix layout (the
    default) and the repeated cache; the total is within 1.5x of the real peak."""
    cfg = llama[1].cfg
    if not shared:  # the same shape and settings as the top-p distribution run, with the repeated cache
        generate(llama[1], [DIST_PROMPT], max_new_tokens=2, temperature=TEMPERATURE, num_samples=N_DIST, seed=7,
                 stop_at_eos=False, show_progress=False, top_p=0.7, shared_prefix=False)
    found = {}
    for key, compiled in compiled_functions().items():  # key: (kind, cfg, params, ids shape, N, cache length, ...)
        if (key[0] in ("prefill", "decode") and key[3] == (1, 16) and key[4] == N_DIST and ("use_top_p", True) in key
                and ("shared_prefix", shared) in key):
            found[key[0]] = (compiled, key[5])
    (pc, s), (dc, _) = found["prefill"], found["decode"]
    pm, dm = pc.memory_analysis(), dc.memory_analysis()
    # the cache the decode loop carries: prefix KV(1 prompt, 16) + suffix KV(2048 rows, new), or KV(2048 rows, S)
    kv = kv_cache_bytes(cfg, 1, 16) + kv_cache_bytes(cfg, N_DIST, s - 16) if shared else kv_cache_bytes(cfg, N_DIST, s)
    plan = sampling_bytes_per_device(cfg, prompts_per_batch=1, num_samples=N_DIST, prompt_len=16, cache_len=s,
                                     shared_prefix=shared)
    assert plan["kv_cache"] == kv
    actual_prefill = pm.output_size_in_bytes + pm.temp_size_in_bytes
    actual_decode = kv + dm.temp_size_in_bytes + dm.output_size_in_bytes - dm.alias_size_in_bytes
    assert actual_prefill <= plan["prefill"] and actual_decode <= plan["decode"], (actual_prefill, actual_decode, plan)
    peak = max(actual_prefill, actual_decode)
    assert peak <= plan["total"] <= 1.5 * peak, (peak, plan)
    # what the sampler checks a planned batch against (the cache plus the decode state it carries): also bounded by
    # the plan on CPU, so a planned batch is never shrunk here
    assert peak <= compiled_peak_bytes(pc, dc) <= plan["total"], (compiled_peak_bytes(pc, dc), peak, plan)


def _compiled_pair(batch: int, n: int) -> tuple:
    """The compiled (prefill, decode) of the sampled (temperature > 0, no top-k / top-p), one-device, 4-prompt-bucket
    runs below with ``batch`` prompts x ``n`` samples."""
    found = {}
    for key, compiled in compiled_functions().items():
        if (key[3] == (batch, 16) and key[4] == n and key[5] == 16 + bucket_length(MAX_NEW) and ("greedy", False) in key
                and ("top_k", 0) in key and ("use_top_p", False) in key and ("mesh", None) in key):
            found.setdefault(key[0], []).append(compiled)
    assert len(found["prefill"]) == len(found["decode"]) == 1, found
    return found["prefill"][0], found["decode"][0]


def test_planned_batch_that_does_not_fit_compiled_is_shrunk_before_it_runs(llama, monkeypatch):
    """When the shape-based plan allows more than the compiled programs fit (as on TPU, where the 7B plans' compiled
    decode held about a second copy of the cache), the sampler shrinks the batch by XLA's own bytes before running
    anything; the samples do not depend on the batch."""
    _, model = llama
    params, cfg = model.param_dict(), model.cfg
    kw = dict(max_new_tokens=MAX_NEW, temperature=1.0, seed=3, num_samples=2, stop_at_eos=False, show_progress=False)
    full = generate_from_params(params, cfg, PROMPTS, batch_size=4, **kw)  # not planned: never checked
    generate_from_params(params, cfg, PROMPTS, batch_size=2, **kw)
    need = {b: compiled_peak_bytes(*_compiled_pair(b, 2)) for b in (4, 2)}
    assert need[2] < need[4]
    monkeypatch.setattr(sampler, "plan_batch_size", lambda *a, **k: 4)  # the shape plan says all 4 prompts fit
    budget = (need[2] + need[4]) // 2
    res = generate_from_params(params, cfg, PROMPTS, memory_budget_bytes=budget, **kw)
    b = res.stats.prompts_per_batch
    assert res.stats.shrunk_from == 4 and 2 <= b < 4 and res.stats.num_batches == math.ceil(4 / b)
    assert compiled_peak_bytes(*_compiled_pair(b, 2)) <= budget
    assert res.tokens == full.tokens
    for got, want in zip(res.logprobs, full.logprobs):
        np.testing.assert_allclose(got, want, atol=1e-4)  # other batch shapes
    # a budget not even one prompt fits by the compiled bytes: refused with the numbers, nothing run
    with pytest.raises(ValueError, match="memory_analysis"):
        generate_from_params(params, cfg, PROMPTS, memory_budget_bytes=need[2] // 100, **kw)
