"""The CPU demo's self-generated task: assets on disk, tokenizer + chat template, model, and the gold score."""
import json
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxalign.tasks.demo import (
    ARGS_FILE,
    KINDS,
    TASK_NAME,
    build_demo_assets,
    corrupt,
    gold_answer,
    gold_score,
    make_prompt,
    mean_gold_score,
    parse_prompt,
)

SMALL = dict(n_train=30, n_test=12, n_heldout=15, hidden_size=32, intermediate_size=64, num_layers=2)


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_demo_assets(tmp_path_factory.mktemp("demo"), seed=3, **SMALL)


@pytest.fixture(scope="module")
def tokenizer(assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets.tokenizer_dir)


# ------------------------------------------------------------------------------------------------------ assets
def test_files_exist_and_parse(assets):
    assert assets.task == TASK_NAME
    train, test, prefs = _jsonl(assets.train_file), _jsonl(assets.test_file), _jsonl(assets.heldout_prefs_file)
    assert (len(train), len(test), len(prefs)) == (30, 12, 15)
    for row in train + test:
        user, assistant = row["messages"]
        assert user == {"role": "user", "content": row["prompt"]}
        assert assistant["role"] == "assistant" and assistant["content"] == gold_answer(row["prompt"])
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert {parse_prompt(r["prompt"])[0] for r in train} == set(KINDS)
    test_prompts = {r["prompt"] for r in test}
    for row in prefs:
        assert row["prompt"] in test_prompts
        assert row["chosen"][0] == row["rejected"][0] == {"role": "user", "content": row["prompt"]}
        assert row["chosen"][1]["content"] == gold_answer(row["prompt"])
        assert row["rejected"][1]["content"] != row["chosen"][1]["content"]
    assert json.loads((assets.root / ARGS_FILE).read_text())["seed"] == 3


def test_records_normalise_in_the_data_package(assets):
    from jaxalign.data.formats import detect_format, normalize_rows

    train, prefs = _jsonl(assets.train_file), _jsonl(assets.heldout_prefs_file)
    assert detect_format(train[0].keys(), train[0]) == "messages"
    assert detect_format(prefs[0].keys(), prefs[0]) == "preference"
    records = normalize_rows(prefs)
    assert len(records) == len(prefs) and all(r.is_pair for r in records)
    assert len(normalize_rows(train)) == len(train)


def test_tokenizer_and_chat_template(assets, tokenizer):
    assert len(tokenizer) % 64 == 0
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == ("<pad>", "<s>", "</s>")
    msgs = [{"role": "user", "content": "reverse: abc"}, {"role": "assistant", "content": "cba"}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    assert text == "<|user|>\nreverse: abc</s>\n<|assistant|>\ncba</s>\n"
    prompt = tokenizer.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>\nreverse: abc</s>\n<|assistant|>\n" and text.startswith(prompt)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids[:2]) == ["<|user|>", "\n"]
    assert tokenizer.decode(ids) == text
    assert tokenizer("ab", add_special_tokens=True)["input_ids"][0] == tokenizer.bos_token_id
    # every id the model can emit decodes, and unknown characters do not break encoding
    assert isinstance(tokenizer.decode(list(range(len(tokenizer)))), str)
    assert tokenizer.unk_token_id in tokenizer("a\u2603b", add_special_tokens=False)["input_ids"]


def test_chat_encoder_masks_exactly_the_demonstration(assets, tokenizer):
    from jaxalign.data.formats import Message, normalize_rows
    from jaxalign.data.tokenize import ChatEncoder

    encoder = ChatEncoder(tokenizer)
    records = normalize_rows(_jsonl(assets.train_file))
    for record in records:
        enc = encoder.encode(record, task="sft")
        ids, mask = enc.chosen.ids, enc.chosen.mask
        assert ids[0] == tokenizer.bos_token_id and list(ids).count(tokenizer.bos_token_id) == 1
        assert tokenizer.decode(ids[mask]) == record.chosen + tokenizer.eos_token
        assert ids[mask][-1] == tokenizer.eos_token_id and not mask[: len(enc.prompt_ids)].any()
        assert len(enc.prompt_ids) <= 24 and mask.sum() <= 17
        prompt_ids = encoder.encode_prompt((Message("user", record.prompt[0].content),))
        np.testing.assert_array_equal(prompt_ids, enc.prompt_ids)
        assert tokenizer.decode(prompt_ids).endswith("<|assistant|>\n")
    pairs = normalize_rows(_jsonl(assets.heldout_prefs_file))
    enc = encoder.encode(pairs[0], task="pairs")
    assert tokenizer.decode(enc.rejected.ids[enc.rejected.mask]) == pairs[0].rejected + "</s>"


def test_model_loads_and_runs(assets, tokenizer):
    import jax.numpy as jnp

    from jaxalign.models import from_pretrained

    model = from_pretrained(assets.model_dir)
    cfg = model.cfg
    assert cfg.model_type == "llama" and cfg.vocab_size == len(tokenizer)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    ids = jnp.asarray([tokenizer("<|user|>\nsort: cab</s>\n")["input_ids"]], jnp.int32)
    logits = model(ids)
    assert logits.shape == (1, ids.shape[1], cfg.vocab_size)
    assert bool(jnp.isfinite(logits).all())


def test_rebuild_is_idempotent_and_arguments_are_honoured(tmp_path):
    a = build_demo_assets(tmp_path, seed=1, **SMALL)
    stamp = {p: p.stat().st_mtime_ns for p in (a.train_file, a.model_dir / "model.safetensors")}
    b = build_demo_assets(tmp_path, seed=1, **SMALL)
    assert b == a
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp  # reused, not rewritten
    first = a.train_file.read_text()
    build_demo_assets(tmp_path, seed=2, **SMALL)  # other arguments: rebuilt
    assert a.train_file.read_text() != first
    assert json.loads((tmp_path / ARGS_FILE).read_text())["seed"] == 2
    (tmp_path / "model" / "model.safetensors").unlink()  # incomplete folder: rebuilt
    build_demo_assets(tmp_path, seed=2, **SMALL)
    assert (tmp_path / "model" / "model.safetensors").is_file()


def test_same_seed_same_bytes(tmp_path):
    """Two builds with one seed are byte-identical, model and tokenizer included: hosts that each build their own
    copy (a bucket work directory builds them in every host's local cache) train and sample the same model."""
    a = build_demo_assets(tmp_path / "a", seed=5, **SMALL)
    b = build_demo_assets(tmp_path / "b", seed=5, **SMALL)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert {"model/model.safetensors", "tokenizer/tokenizer.json"} <= {str(f) for f in files}
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert a.train_file.read_text() != build_demo_assets(tmp_path / "c", seed=6, **SMALL).train_file.read_text()


# ------------------------------------------------------------------------------------------------------ scoring
@pytest.mark.parametrize("prompt,answer", [
    ("reverse: abcd", "dcba"), ("sort: dbca", "abcd"), ("sort: bba", "abb"), ("add: 37+48", "85"),
    ("add: 0+0", "0"), ("add: 99+99", "198"),
])
def test_gold_answer(prompt, answer):
    assert gold_answer(prompt) == answer
    assert gold_score(prompt, answer) == 1.0
    assert gold_score(prompt, f"  {answer}\n") == 1.0
    # a prompt rendered through the chat template, or given as messages, is understood too
    assert gold_answer(f"<|user|>\n{prompt}</s>\n<|assistant|>\n") == answer
    assert gold_answer([{"role": "user", "content": prompt}]) == answer


def test_partial_credit_values():
    assert gold_score("reverse: abcd", "dcbx") == 0.75
    assert gold_score("reverse: abcd", "dc") == 0.5  # missing characters count as wrong
    assert gold_score("reverse: abcd", "dcbaaaaa") == 0.5  # so do extra ones
    assert gold_score("add: 37+48", "") == 0.0
    assert gold_score("add: 37+48", "58") == 0.0


def test_unknown_prompt_is_a_value_error():
    for bad in ("hello", "", "reverse: ", "add: 1+", None, 3):
        with pytest.raises(ValueError):
            gold_answer(bad)


def test_heldout_rejected_answers_score_below_one(assets):
    for row in _jsonl(assets.heldout_prefs_file):
        assert gold_score(row["prompt"], row["chosen"][1]["content"]) == 1.0
        assert 0.0 <= gold_score(row["prompt"], row["rejected"][1]["content"]) < 1.0


def test_mean_gold_score():
    out = mean_gold_score(["add: 1+2", "sort: ba", "sort: cab"], ["3", "ab", "abx"])
    assert out["exact_match"] == pytest.approx(2 / 3)
    assert out["gold_score"] == pytest.approx((1 + 1 + 2 / 3) / 3)
    assert out["gold_score/add"] == 1.0 and out["gold_score/sort"] == pytest.approx(5 / 6)


prompts = st.builds(lambda seed, kind: make_prompt(random.Random(seed), kind, min_letters=1, max_letters=8),
                    st.integers(0, 10**6), st.sampled_from(KINDS))


@settings(max_examples=150, deadline=None)
@given(prompts, st.one_of(st.text(max_size=300), st.binary(max_size=40).map(lambda b: b.decode("latin-1"))))
def test_gold_score_is_bounded_on_hostile_responses(prompt, response):
    s = gold_score(prompt, response)
    assert isinstance(s, float) and 0.0 <= s <= 1.0
    assert (s == 1.0) == (response.strip() == gold_answer(prompt))


def test_gold_score_handles_non_strings():
    assert gold_score("sort: ab", None) == 0.0
    assert gold_score("sort: ab", b"ab") == 0.0


@settings(max_examples=100, deadline=None)
@given(prompts, st.data())
def test_partial_credit_is_monotone_in_correct_characters(prompt, data):
    gold = gold_answer(prompt)
    order = data.draw(st.permutations(range(len(gold))))
    previous = 1.0
    chars = list(gold)
    for k, i in enumerate(order, start=1):  # break one more position at a time
        chars[i] = "#"
        s = gold_score(prompt, "".join(chars))
        assert s == pytest.approx((len(gold) - k) / len(gold))
        assert s < previous
        previous = s


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 10**6), st.sampled_from(KINDS))
def test_corrupt_is_wrong_but_plausible(seed, kind):
    rng = random.Random(seed)
    prompt = make_prompt(rng, kind, min_letters=1, max_letters=8)
    gold = gold_answer(prompt)
    bad = corrupt(gold, rng, kind)
    assert bad != gold and len(bad) == len(gold)
    assert 0.0 <= gold_score(prompt, bad) < 1.0
    assert set(bad) <= set("0123456789" if kind == "add" else "abcdefghijklmnopqrstuvwxyz")
