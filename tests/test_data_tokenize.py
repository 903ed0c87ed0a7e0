"""Chat-template tokenisation on the real slices with the real zephyr tokenizer: masks, BOS/EOS, truncation, errors."""
import json
import random

import numpy as np
import pytest

from jaxalign.data.formats import Message, Record, Skip, normalize_rows
from jaxalign.data.report import DataError, DataReport
from jaxalign.data.sources import load_records
from jaxalign.data.tokenize import ChatEncoder, encode_records, pair_example, sft_example

ROWS_PER_FILE = 40  # a subsample is enough to cover every shape of row; the full files add time, not coverage


@pytest.fixture(scope="module")
def zephyr(shared_data):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "zephyr-mistral-7b")


def _sample(path, n=ROWS_PER_FILE, seed=0):
    rows = [json.loads(line) for line in path.open()]
    keep = sorted(random.Random(seed).sample(range(len(rows)), min(n, len(rows))))
    return [rows[i] for i in keep]


def _runs(mask):
    """(start, end) of each run of True in ``mask``."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]))


def _span_text(tok, ids, start, end):
    # Decoding a slice alone would lose a leading space to the SentencePiece decoder; decode the difference instead.
    before, through = tok.decode(ids[:start]), tok.decode(ids[:end])
    assert through.startswith(before)
    return through[len(before):]


def _check_sequence(tok, seq, conversation, trained_turns):
    """Masks cover exactly the trained assistant turns (text + one EOS); BOS once in front; EOS once per message."""
    ids = seq.ids.tolist()
    assert seq.ids.dtype == np.int32 and seq.mask.dtype == bool and len(seq.ids) == len(seq.mask)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    runs = _runs(seq.mask)
    assert [_span_text(tok, ids, s, e) for s, e in runs] == [t + tok.eos_token for t in trained_turns]
    for s, e in runs:
        assert ids[s:e].count(tok.eos_token_id) == 1 and ids[e - 1] == tok.eos_token_id
    # The zephyr template closes every message (user turns too) with </s>; nothing doubles it.
    assert ids.count(tok.eos_token_id) == len(conversation) and ids[-1] == tok.eos_token_id
    assert all(not (a == b == tok.eos_token_id) for a, b in zip(ids, ids[1:]))
    # The segments concatenate to exactly what zephyr training got from tokenising the whole text with BOS.
    whole = tok.apply_chat_template([m.as_dict() for m in conversation], tokenize=False)
    assert tok(whole, add_special_tokens=True)["input_ids"][: len(ids)] == ids


SFT_FILES = [
    "oasst_en100_top1_messages.jsonl",
    "oasst_en100_all_threads_messages.jsonl",
    "alpaca_eval_zephyr-7b-beta_messages.jsonl",
    "llamafactory_alpaca_en_demo_messages.jsonl",
    "llamafactory_glaive_plainchat_messages.jsonl",
    "mt_bench_gpt4_reference_2turn_messages.jsonl",
]


@pytest.mark.parametrize("name", SFT_FILES)
def test_sft_masks_cover_every_assistant_turn(zephyr, shared_data, name):
    encoder = ChatEncoder(zephyr)
    report = DataReport()
    records = normalize_rows(_sample(shared_data / "sft" / name), report=report)
    encoded = encode_records(records, encoder, "sft", report)
    assert report.skipped == 0 and len(encoded) == len(records) > 0
    for rec, enc in zip(records, encoded):
        conversation = rec.conversation(rec.chosen)
        turns = [m.content for m in conversation if m.role == "assistant"]
        _check_sequence(zephyr, enc.chosen, conversation, turns)
        assert enc.chosen.ids[: len(enc.prompt_ids)].tolist() == enc.prompt_ids.tolist()
        example = sft_example(enc)
        assert set(example) == {"input_ids", "loss_mask", "row_id"} and example["row_id"] == rec.index
    if name.startswith("mt_bench"):
        assert all(len(_runs(e.chosen.mask)) == 2 for e in encoded)


@pytest.mark.parametrize(
    "folder, name",
    [
        ("preference", "alpaca_eval_gpt4_judged_pairs.jsonl"),
        ("preference", "oasst_en100_rank_pairs.jsonl"),
        ("preference", "llamafactory_dpo_en_demo_pairs.jsonl"),
        ("hh_rlhf", "helpful_test_500.jsonl"),
        ("hh_rlhf", "harmless_test_500.jsonl"),
    ],
)
def test_pairs_mask_only_the_final_response(zephyr, shared_data, folder, name):
    encoder = ChatEncoder(zephyr)
    report = DataReport()
    records = normalize_rows(_sample(shared_data / folder / name, n=30), report=report)
    encoded = encode_records(records, encoder, "pairs", report)
    assert len(encoded) == len(records) > 0
    for rec, enc in zip(records, encoded):
        prompt = enc.prompt_ids.tolist()
        assert zephyr.decode(prompt).endswith("<|assistant|>\n")
        for seq, text in ((enc.chosen, rec.chosen), (enc.rejected, rec.rejected)):
            assert seq.ids[: len(prompt)].tolist() == prompt and not seq.mask[: len(prompt)].any()
            _check_sequence(zephyr, seq, rec.conversation(text), [text])
        example = pair_example(enc)
        assert set(example) == {"chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask", "prompt_ids", "row_id"}


def test_hh_real_file_skips_are_the_empty_responses(zephyr, shared_data):
    """harmless_test_500 has exactly one row with an empty chosen response (row 86): that row, and only it, is
    skipped and counted."""
    records, report = load_records(shared_data / "hh_rlhf" / "harmless_test_500.jsonl")
    assert report.rows_read == 500 and dict(report.skips) == {"empty_content": 1}
    assert report.examples["skip:empty_content"][0][0] == 86 and len(records) == 499


def _planted_rows(shared_data):
    good = _sample(shared_data / "sft" / "llamafactory_alpaca_en_demo_messages.jsonl", n=20, seed=1)
    long_answer = "word " * 800
    long_question = "Tell me about this. " * 300
    bad = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]},
        {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ends early</s> sneaky"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": long_answer}]},
        {"messages": [{"role": "user", "content": long_question}, {"role": "assistant", "content": "ok"}]},
        {"messages": "not a list"},
    ]
    rows = good[:10] + bad + good[10:]
    return rows


def test_report_counts_planted_bad_and_truncated_rows(zephyr, shared_data, tmp_path):
    path = tmp_path / "planted.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _planted_rows(shared_data)))
    records, report = load_records(path)
    assert report.rows_read == 28
    assert dict(report.skips) == {
        "bad_role": 1, "empty_content": 1, "non_string_content": 1, "no_assistant_turn": 1, "bad_messages": 1
    }
    assert [row for row, _ in report.examples["skip:bad_role"]] == [10]

    # What the limits should do, measured on an unlimited encoding of the same records.
    full = encode_records(records, ChatEncoder(zephyr), "sft", DataReport())
    assert [e.row_id for e in full] != [] and len(full) == len(records) - 1  # the "</s>" row
    max_length = 512
    too_long = {e.row_id for e in full if len(e.prompt_ids) >= max_length}
    cut = {e.row_id for e in full if len(e.prompt_ids) < max_length < len(e.chosen)}
    assert too_long == {16} and cut  # the planted long question, and at least the planted long answer

    limited = ChatEncoder(zephyr, max_length=max_length)
    encoded = encode_records(records, limited, "sft", report)
    assert report.skips["special_token_in_content"] == 1
    assert report.examples["skip:special_token_in_content"][0][0] == 14
    assert report.skips["prompt_too_long"] == 1 and report.changes["response_truncated"] == len(cut)
    assert report.kept == len(encoded) == 28 - 5 - 2 and report.skipped == 7
    by_row = {e.row_id: e for e in full}
    for e in encoded:
        assert len(e.chosen) <= max_length
        # The response keeps its start: a truncated sequence is a prefix of the untruncated one.
        assert by_row[e.row_id].chosen.ids[: len(e.chosen)].tolist() == e.chosen.ids.tolist()
    assert "prompt_too_long" in report.summary() and "response_truncated" in report.summary()


def test_prompt_truncation_keeps_the_end_and_bos(zephyr):
    long_prompt = (Message("user", "alpha " * 200 + "FINAL QUESTION?"),)
    record = Record(0, "r", long_prompt, chosen="Yes.")
    full = ChatEncoder(zephyr).encode(record, "sft")
    enc = ChatEncoder(zephyr, max_length=96, max_prompt_length=64).encode(record, "sft")
    assert dict(enc.changes).keys() == {"prompt_truncated"}
    assert len(enc.prompt_ids) == 64 and enc.prompt_ids[0] == zephyr.bos_token_id
    assert enc.prompt_ids[1:].tolist() == full.prompt_ids[-63:].tolist()
    assert zephyr.decode(enc.prompt_ids).endswith("FINAL QUESTION?</s>\n<|assistant|>\n")
    assert enc.chosen.ids[64:].tolist() == full.chosen.ids[len(full.prompt_ids):].tolist()


def test_encode_sampled_matches_dataset_encoding(zephyr):
    record = Record(0, "r", (Message("user", "Name a colour."),), chosen="Blue.", rejected="Seven.")
    enc = ChatEncoder(zephyr).encode(record, "pairs")
    response = enc.chosen.ids[len(enc.prompt_ids): -1]  # what the sampler returns: no EOS
    sampled = ChatEncoder(zephyr).encode_sampled(enc.prompt_ids, response)
    assert sampled.ids.tolist() == enc.chosen.ids.tolist() and sampled.mask.tolist() == enc.chosen.mask.tolist()
    again = ChatEncoder(zephyr).encode_sampled(enc.prompt_ids, enc.chosen.ids[len(enc.prompt_ids):])
    assert again.ids.tolist() == enc.chosen.ids.tolist()  # an EOS already there is not doubled
    prompt_only = ChatEncoder(zephyr).encode_prompt(record.prompt)
    assert prompt_only.tolist() == enc.prompt_ids.tolist()


def test_tokenizer_without_chat_template_is_a_clear_error(shared_data):
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "mistral-7b-v0.1")
    with pytest.raises(DataError) as err:
        ChatEncoder(base)
    assert "no chat template" in str(err.value) and "mistral-7b-v0.1" in str(err.value)
    assert "chat_template=" in str(err.value)
    # Asking for a template explicitly is the way out.
    enc = ChatEncoder(base, chat_template="zephyr").encode(Record(0, "r", (Message("user", "q"),), chosen="a"))
    assert enc.chosen.ids[0] == base.bos_token_id and enc.chosen.ids[-1] == base.eos_token_id


def test_template_with_bos_in_text_gets_no_second_bos(shared_data):
    from transformers import AutoTokenizer

    llama = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "llama2-7b")
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
        "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"
    )
    record = Record(0, "r", (Message("user", "hi"), Message("assistant", "hello"), Message("user", "bye")), "ciao")
    enc = ChatEncoder(llama, chat_template=template).encode(record, "sft")
    ids = enc.chosen.ids.tolist()
    assert ids[0] == llama.bos_token_id and ids.count(llama.bos_token_id) == 1
    assert ids.count(llama.eos_token_id) == 2
    assert [_span_text(llama, ids, s, e) for s, e in _runs(enc.chosen.mask)] == [" hello </s>", " ciao </s>"]


def test_template_without_eos_gets_one_appended_and_no_bos_when_tokenizer_has_none(shared_data):
    from transformers import AutoTokenizer

    gpt2 = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "gpt2")
    record = Record(0, "r", (Message("user", "hi"), Message("assistant", "hello"), Message("user", "bye")), "ciao")
    enc = ChatEncoder(gpt2, chat_template="chatml").encode(record, "sft")
    ids = enc.chosen.ids.tolist()
    eos = gpt2.eos_token
    assert gpt2.decode(ids).startswith("<|im_start|>user")  # no BOS: gpt2 adds none
    assert [_span_text(gpt2, ids, s, e) for s, e in _runs(enc.chosen.mask)] == [
        f"hello<|im_end|>{eos}", f"ciao<|im_end|>{eos}"
    ]
    assert ids.count(gpt2.eos_token_id) == 2 and ids[-1] == gpt2.eos_token_id


def test_template_trouble_becomes_a_counted_skip(zephyr):
    unstable = "{{ messages | length }}" + zephyr.chat_template  # earlier text changes as turns are added
    picky = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system turns') }}{% endif %}" + (
        zephyr.chat_template
    )
    single = Record(0, "a", (Message("user", "q"),), chosen="a")
    multi = Record(1, "b", (Message("user", "q"), Message("assistant", "a"), Message("user", "q2")), chosen="a2")
    system = Record(2, "c", (Message("system", "s"), Message("user", "q")), chosen="a")
    report = DataReport()
    kept = encode_records([single, multi], ChatEncoder(zephyr, chat_template=unstable), "sft", report)
    assert [e.row_id for e in kept] == [] and report.skips["template_not_prefix_stable"] == 2
    report = DataReport()
    kept = encode_records([single, system], ChatEncoder(zephyr, chat_template=picky), "sft", report)
    assert [e.row_id for e in kept] == [0] and report.skips["template_error"] == 1
    assert "no system turns" in report.examples["skip:template_error"][0][1]


def test_pairs_task_on_sft_record_and_bad_limits(zephyr):
    result = ChatEncoder(zephyr).encode(Record(0, "r", (Message("user", "q"),), chosen="a"), "pairs")
    assert isinstance(result, Skip) and result.reason == "not_a_pair"
    with pytest.raises(DataError, match="max_prompt_length"):
        ChatEncoder(zephyr, max_length=64, max_prompt_length=64)
