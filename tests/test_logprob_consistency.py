"""The sampler's log-probs equal the trainer's for the tokens it drew (issue 16, item 3).

An on-policy step treats ``generate(...).logprobs`` as ``old_logp`` and recomputes ``logp`` with the training forward;
at the first update the two must be the same numbers, else the PPO / GRPO ratio is not 1 where it should be and the
KL / importance weights are biased. In-process samplers are known to drift from the trainer here (KV-cache layout,
positions under left padding, sliding-window masks on cache slots, a different head or precision path:
marin-community/marin#1879). This test draws samples from small random-init models with
`jaxalign.sampling.generate` (temperature 1, no top-k / top-p, several samples per prompt, ragged prompts across two
prompt buckets, rows that stop early on eos) and recomputes the drawn tokens' log-probs with the trainer's path,
`jaxalign.models.forward` on prompt + response and `jaxalign.losses.token_logprobs`, in a right-padded and a
left-padded batch.

Tolerance: 2e-5 absolute per token, float32 on CPU. Both paths compute float32 log-softmax of float32 logits; they
differ only in how the attention and matmuls are grouped (one new token against a KV cache vs the full causal
sequence, padding slots), i.e. float32 rounding. Measured: at most 1.05e-5 (GQA) and 1.00e-5 (sliding window), the
same for the right- and left-padded trainer batches. The negative controls at the end show that the mistakes this
guards against (attending to left padding, a missing sliding window) move the log-probs by more than 1000 x that.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxalign.losses import sequence_logprobs, token_logprobs
from jaxalign.models import Decoder, ModelConfig, forward, init_params
from jaxalign.sampling import generate

ATOL = 2e-5
VOCAB = 96
MAX_NEW = 12
NUM_SAMPLES = 3
# ragged; with 2 prompts per batch the longest two share a 32-token prompt bucket, the others the 16-token one
PROMPT_LENGTHS = [20, 3, 9, 14, 6, 1]

CONFIGS = {
    # GQA 4 query heads : 2 KV heads, full attention
    "gqa": dict(num_heads=4, num_kv_heads=2, sliding_windows=(None, None)),
    # GQA 4 : 1 with a sliding window (Mistral-style) far shorter than prompt + response, on one layer of two
    "gqa_sliding_window": dict(num_heads=4, num_kv_heads=1, sliding_windows=(5, None)),
}


def make_model(name):
    cfg = ModelConfig(model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=2,
                      head_dim=16, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                      **CONFIGS[name])
    # wide init: peaked next-token distributions, so a wrong position or mask moves the log-probs by whole units
    return Decoder(cfg, init_params(cfg, jax.random.key(3), std=0.3))


def prompts(seed=0):
    rng = np.random.default_rng(seed)
    return [[1] + rng.integers(3, VOCAB, size=n - 1).tolist() for n in PROMPT_LENGTHS]


def trainer_logprobs(model, seqs, *, left_pad, cfg=None, use_mask=True):
    """The training path: one forward over the padded batch of full sequences, targets shifted by one. ``cfg`` and
    ``use_mask`` exist for the negative controls only."""
    cfg = cfg or model.cfg
    width = max(len(s) for s in seqs)
    ids = np.zeros((len(seqs), width), np.int32)
    mask = np.zeros((len(seqs), width), np.int32)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left_pad else slice(0, len(s))
        ids[i, cols], mask[i, cols] = s, 1

    @jax.jit
    def run(params, ids, mask):
        logits = forward(params, cfg, ids, attention_mask=mask if use_mask else None)
        return token_logprobs(logits[:, :-1], ids[:, 1:])

    lp = np.asarray(run(model.param_dict(), ids, mask))
    offset = [width - len(s) if left_pad else 0 for s in seqs]
    return lp, offset


@pytest.fixture(scope="module", params=list(CONFIGS))
def sampled(request):
    model = make_model(request.param)
    ps = prompts()
    res = generate(model, ps, max_new_tokens=MAX_NEW, temperature=1.0, top_k=0, top_p=1.0, seed=7,
                   num_samples=NUM_SAMPLES, batch_size=2, show_progress=False)
    return request.param, model, ps, res


def test_the_draw_exercises_what_it_should(sampled):
    _, _, ps, res = sampled
    assert res.stats.num_batches == 3 and sorted(set(b[0] for b in res.stats.buckets)) == [16, 32]
    lengths = [len(t) for t in res.tokens]
    assert len(res.tokens) == len(ps) * NUM_SAMPLES
    assert min(lengths) >= 1 and max(lengths) == MAX_NEW
    # several samples of one prompt differ (temperature 1 is really sampling)
    assert any(len({tuple(s) for s in res.samples(i)}) > 1 for i in range(len(ps)))


def full_sequences(ps, res):
    seqs, starts = [], []
    for i, p in enumerate(ps):
        for j in range(NUM_SAMPLES):
            seqs.append(p + res.tokens[res.index(i, j)])
            starts.append(len(p))
    return seqs, starts


def response_logprobs(lp, offset, seqs, starts):
    """Row k's response log-probs: response token t sits at sequence index start + t and is scored by the logits at
    index start + t - 1."""
    return [lp[k, offset[k] + start - 1 + np.arange(len(seq) - start)] for k, (seq, start) in
            enumerate(zip(seqs, starts))]


@pytest.mark.parametrize("left_pad", [False, True], ids=["right_padded", "left_padded"])
def test_sampler_logprobs_equal_trainer_logprobs(sampled, left_pad):
    name, model, ps, res = sampled
    seqs, starts = full_sequences(ps, res)
    lp, offset = trainer_logprobs(model, seqs, left_pad=left_pad)
    worst = 0.0
    for k, trainer in enumerate(response_logprobs(lp, offset, seqs, starts)):
        start, n = starts[k], len(trainer)
        sampler = np.asarray(res.logprobs[k], np.float64)
        assert sampler.shape == (n,)
        diff = np.abs(trainer - sampler)
        worst = max(worst, float(diff.max()))
        assert diff.max() <= ATOL, (
            f"{name}, row {k} (prompt length {start}, {n} new tokens): sampler and trainer log-probs differ by "
            f"{diff.max():.3g} at response token {int(diff.argmax())}; sampler {sampler.round(5).tolist()}, "
            f"trainer {trainer.round(5).tolist()}")
    # the same through the loss-side reduction, per sequence
    response_mask = np.zeros(lp.shape, bool)
    for k, (seq, start) in enumerate(zip(seqs, starts)):
        response_mask[k, offset[k] + start - 1: offset[k] + len(seq) - 1] = True
    np.testing.assert_allclose(sequence_logprobs(lp, response_mask), res.sequence_logprobs(),
                               atol=ATOL * MAX_NEW, rtol=0)
    print(f"{name} {'left' if left_pad else 'right'}-padded: max |sampler - trainer| = {worst:.2e}")


def test_the_comparison_has_teeth(sampled):
    """Negative controls: the mistakes an in-process sampler makes move these log-probs by far more than ATOL, so a
    pass above is not the tolerance hiding them."""
    name, model, ps, res = sampled
    seqs, starts = full_sequences(ps, res)
    sampler = np.concatenate([np.asarray(x) for x in res.logprobs])

    def gap(**kw):
        lp, offset = trainer_logprobs(model, seqs, **kw)
        return np.abs(np.concatenate(response_logprobs(lp, offset, seqs, starts)) - sampler).max()

    assert gap(left_pad=True, use_mask=False) > 1000 * ATOL  # left padding attended to
    if name == "gqa_sliding_window":
        assert gap(left_pad=False, cfg=model.cfg.replace(sliding_windows=(None, None))) > 1000 * ATOL  # no window
