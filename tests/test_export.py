"""Exported phase models work in transformers as a TRL user expects, and hub downloads fetch one copy of the weights.

- A causal LM written by ``save_pretrained`` + ``complete_export`` loads with ``AutoModelForCausalLM`` /
  ``AutoTokenizer`` and answers chat messages through ``pipeline("text-generation")``: the weights are built by hand
  as a bigram machine (last prompt token -> A -> B -> <|im_end|> -> A ...), so the reply is exactly "A B" only when the
  chat template's generation prompt was applied and generation stopped at the template's end-of-turn token.
- A reward model scores a padded batch of 4 with ``AutoModelForSequenceClassification`` equal to ``reward_forward``.
- ``push_to_hub`` and the hub download's file choice run against a patched ``HfApi`` / ``snapshot_download``.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxalign.data.formats import Message, Record  # noqa: E402
from jaxalign.data.tokenize import ChatEncoder  # noqa: E402
from jaxalign.models import Decoder, ModelConfig, RewardModel, reward_forward, save_pretrained  # noqa: E402
from jaxalign.models.export import complete_export, converted_copy  # noqa: E402
from jaxalign.models.hub import hub_repo_id, model_files, push_to_hub  # noqa: E402

H = 16


def _cfg(vocab: int, tok) -> ModelConfig:
    return ModelConfig(model_type="llama", vocab_size=vocab, hidden_size=H, intermediate_size=32, num_layers=1,
                       num_heads=2, num_kv_heads=1, head_dim=8, max_position_embeddings=256, sliding_windows=(None,),
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)


@pytest.fixture(scope="module")
def chatml_tokenizer(shared_data):
    # GPT-2's BPE with ChatML's turn markers added as special tokens: end-of-turn (<|im_end|>) differs from EOS.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "gpt2")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tok


def _bigram_decoder(cfg: ModelConfig, chain: list[int], default: int) -> Decoder:
    """Attention and MLP write nothing, so the logits depend on the current token only: chain[i] -> chain[i + 1],
    chain[-1] -> chain[1] (a loop), every other token -> ``default``."""
    from jaxalign.models import param_shapes

    params = {k: np.zeros(s, np.float32) for k, s in param_shapes(cfg).items()}
    for k in ("final_norm", "attn_norm", "mlp_norm"):
        params[k][...] = 1.0
    params["embed"][:, 0] = 1.0
    params["lm_head"][0, default] = 10.0
    successors = chain[1:] + [chain[1]]
    for slot, (token, nxt) in enumerate(zip(chain, successors), start=1):
        params["embed"][token] = 0.0
        params["embed"][token, slot] = 1.0
        params["lm_head"][slot, nxt] = 10.0
    return Decoder(cfg, params)


def test_exported_chat_model_generates_through_the_pipeline_and_stops_at_end_of_turn(chatml_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    tok = chatml_tokenizer
    encoder = ChatEncoder(tok, chat_template="chatml")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    prompt_ids = encoder.encode_prompt([Message("user", "What is the capital of France?")])
    a, b = tok.encode(" Paris"), tok.encode(" indeed")
    assert len(a) == len(b) == 1
    cfg = _cfg(len(tok), tok)
    decoder = _bigram_decoder(cfg, [int(prompt_ids[-1]), a[0], b[0], im_end], default=tok.encode(" no")[0])
    folder = save_pretrained(decoder, tmp_path / "model")
    complete_export(folder, tokenizer=tok, chat_template="chatml", dtype="bfloat16")

    generation = json.loads((folder / "generation_config.json").read_text())
    assert set(generation["eos_token_id"]) == {tok.eos_token_id, im_end}
    config = json.loads((folder / "config.json").read_text())
    assert config["pad_token_id"] == tok.eos_token_id  # GPT-2 has no pad token: the encoder pads with EOS
    loaded_tok = AutoTokenizer.from_pretrained(folder)
    assert loaded_tok.chat_template == encoder.template
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.dtype == torch.bfloat16

    chat = pipeline("text-generation", model=model, tokenizer=loaded_tok)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = chat(messages, max_new_tokens=12, do_sample=False)[0]["generated_text"]
    assert out[:-1] == messages and out[-1]["role"] == "assistant"
    assert out[-1]["content"] == " Paris indeed"
    # The same weights without the stop list run on past <|im_end|> through the loop: the stop is what ended it.
    ids = loaded_tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    longer = model.generate(**ids, max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert longer[0, ids["input_ids"].shape[1]:].tolist() == [a[0], b[0], im_end, a[0], b[0], im_end]


def test_exported_zephyr_model_keeps_template_and_stops_at_eos(shared_data, tmp_path):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "zephyr-mistral-7b")
    cfg = _cfg(len(tok), tok)
    folder = save_pretrained(_bigram_decoder(cfg, [5, 6, 7], default=8), tmp_path / "model")
    complete_export(folder, tokenizer=tok)
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tok.convert_tokens_to_ids("</s>")
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float32"
    copy = converted_copy(folder, tmp_path / "bf16", "bfloat16")
    with safe_open(str(folder / "model.safetensors"), "numpy") as src, safe_open(str(copy / "model.safetensors"),
                                                                                   "numpy") as dst:
        assert src.get_tensor("lm_head.weight").dtype == np.float32  # the source is left as it was
        assert str(dst.get_tensor("lm_head.weight").dtype) == "bfloat16"
        np.testing.assert_array_equal(dst.get_tensor("lm_head.weight").astype(np.float32),
                                      src.get_tensor("lm_head.weight"))  # 0 / 1 / 10 are exact in bfloat16
    assert json.loads((copy / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert loaded.apply_chat_template(messages, tokenize=False) == tok.apply_chat_template(messages, tokenize=False)


def test_exported_reward_model_scores_a_batch_like_reward_forward(shared_data, tmp_path):
    from flax import nnx
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "zephyr-mistral-7b")
    assert tok.pad_token_id == tok.eos_token_id  # the case where transformers' pooling would read the wrong token
    rm = RewardModel(_cfg(len(tok), tok), rngs=nnx.Rngs(3))
    folder = save_pretrained(rm, tmp_path / "rm")
    complete_export(folder, tokenizer=tok, reward=True)
    assert not (folder / "generation_config.json").exists()

    encoder = ChatEncoder(tok)
    texts = ["Paris.", "It is Paris, the largest city of France.", "No idea", "Lyon? Marseille? Paris!"]
    rows = [encoder.encode(Record(i, str(i), (Message("user", "Capital of France?"),), chosen=t), "sft").chosen.ids
            for i, t in enumerate(texts)]
    assert all(r[-1] == tok.eos_token_id for r in rows)  # sequences end with EOS, as jaxalign trains them
    exported_tok = AutoTokenizer.from_pretrained(folder)
    batch = exported_tok.pad({"input_ids": [r.tolist() for r in rows]}, return_tensors="pt")
    hf = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        hf_scores = hf(**batch).logits[:, 0].numpy()
    ours = np.asarray(reward_forward(rm.param_dict(), rm.cfg, batch["input_ids"].numpy().astype(np.int32),
                                     attention_mask=batch["attention_mask"].numpy().astype(bool)))
    assert len(set(map(len, rows))) > 1 and batch["input_ids"].shape[0] == 4
    np.testing.assert_allclose(hf_scores, ours, atol=1e-4, rtol=1e-4)


def test_push_to_hub_creates_the_repo_and_uploads_the_folder(tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw)) or "url")
    monkeypatch.setattr(HfApi, "whoami", lambda self, **kw: {"name": "alice"})
    (tmp_path / "config.json").write_text("{}")
    repo = hub_repo_id("{user}/{run}-{phase}", run="ultrachat irl", phase="r1/policy")
    assert repo == "alice/ultrachat-irl-r1-policy"
    push_to_hub(tmp_path, repo)
    assert calls[0] == ("create", repo, {"repo_type": "model", "private": True, "exist_ok": True})
    assert calls[1][0] == "upload"
    assert calls[1][1]["folder_path"] == str(tmp_path) and calls[1][1]["repo_id"] == repo
    with pytest.raises(FileNotFoundError):
        push_to_hub(tmp_path / "missing", repo)
    with pytest.raises(ValueError):
        hub_repo_id("{user}/{run}/{phase}", run="a", phase="b", user="u")


# A repository laid out like mistralai/Mistral-7B-Instruct-v0.2: three copies of the weights, a sentencepiece
# tokenizer, and the template transformers now writes apart.
MISTRAL_LIKE = [
    ".gitattributes", "README.md", "config.json", "generation_config.json", "special_tokens_map.json",
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja",
    "consolidated.safetensors", "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
    "model-00003-of-00003.safetensors", "model.safetensors.index.json", "pytorch_model-00001-of-00003.bin",
    "pytorch_model-00002-of-00003.bin", "pytorch_model-00003-of-00003.bin", "pytorch_model.bin.index.json",
    "original/params.json", "original/consolidated.00.pth", "model.Q4_K_M.gguf", "tf_model.h5",
]


def test_hub_file_choice_takes_tokenizer_files_and_one_weight_copy():
    chosen = model_files(MISTRAL_LIKE)
    assert chosen == sorted([
        "config.json", "generation_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
        "tokenizer_config.json", "chat_template.jinja", "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors", "model.safetensors.index.json",
    ])
    bpe = model_files(["config.json", "model.safetensors", "vocab.json", "merges.txt", "added_tokens.json",
                       "flax_model.msgpack", "pytorch_model.bin"])
    assert bpe == ["added_tokens.json", "config.json", "merges.txt", "model.safetensors", "vocab.json"]
    # a repository whose only safetensors has another name still gives its one copy
    assert model_files(["config.json", "weights.safetensors", "spiece.model"]) == [
        "config.json", "spiece.model", "weights.safetensors"]


def test_resolve_model_folder_downloads_the_chosen_files(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import HfApi

    from jaxalign.models.config import ModelConfigError
    from jaxalign.models.hf_io import resolve_model_folder

    seen = {}
    monkeypatch.setattr(HfApi, "list_repo_files", lambda self, repo_id, **kw: list(MISTRAL_LIKE))

    def fake_download(repo_id, **kw):
        seen.update(kw, repo_id=repo_id)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert resolve_model_folder("mistralai/Mistral-7B-Instruct-v0.2") == tmp_path
    assert seen["repo_id"] == "mistralai/Mistral-7B-Instruct-v0.2"
    assert seen["allow_patterns"] == model_files(MISTRAL_LIKE)

    monkeypatch.setattr(HfApi, "list_repo_files", lambda self, repo_id, **kw: ["config.json", "pytorch_model.bin"])
    seen.clear()
    with pytest.raises(ModelConfigError, match="safetensors"):
        resolve_model_folder("old/bin-only")
    assert not seen  # refused before downloading anything

    def offline(self, repo_id, **kw):
        raise ConnectionError("offline")

    monkeypatch.setattr(HfApi, "list_repo_files", offline)
    assert resolve_model_folder("some/model") == tmp_path
    assert "model*.safetensors" in seen["allow_patterns"] and "*.jinja" in seen["allow_patterns"]
