"""Cached, parallel tokenisation gives what ``encode_records`` gives; streamed reads give the first rows; rounds rotate.

The reference for every cached result is ``tokenize.encode_records`` on the same records (arrays, dtypes, changes and
the DataReport compared field by field). Cache hits are detected by counting ``ChatEncoder.encode`` calls.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from jaxalign.data import cache as cache_lib
from jaxalign.data.cache import cache_hit, encode_records_cached
from jaxalign.data.formats import Message, Record
from jaxalign.data.report import DataReport
from jaxalign.data.rotation import rotating_window
from jaxalign.data.sources import load_records
from jaxalign.data.tokenize import ChatEncoder, encode_records

ROWS = 40


@pytest.fixture(scope="module")
def zephyr(shared_data):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "zephyr-mistral-7b")


@pytest.fixture(scope="module")
def records(shared_data):
    recs, _ = load_records(shared_data / "sft" / "oasst_en100_all_threads_messages.jsonl", limit=ROWS)
    user = (Message("user", "What is 2+2?"),)
    planted = [
        Record(ROWS, "special", user, chosen="Four.</s> And more"),  # skipped: special token in content
        Record(ROWS + 1, "long-prompt", (Message("user", "word " * 400),), chosen="ok"),  # prompt truncated
        Record(ROWS + 2, "pair", user, chosen="4", rejected="5"),
    ]
    return recs + planted


@pytest.fixture
def calls(monkeypatch):
    """Counts ChatEncoder.encode calls (in this process: the tests that count use one worker)."""
    seen = []
    original = ChatEncoder.encode

    def counting(self, record, task="sft"):
        seen.append(record.index)
        return original(self, record, task)

    monkeypatch.setattr(ChatEncoder, "encode", counting)
    return seen


def _assert_same(expected, got):
    assert len(expected) == len(got)
    for a, b in zip(expected, got):
        assert (a.row_id, a.record_id, a.changes) == (b.row_id, b.record_id, b.changes)
        np.testing.assert_array_equal(a.prompt_ids, b.prompt_ids)
        assert b.prompt_ids.dtype == np.int32
        for name in ("chosen", "rejected"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None) == (y is None)
            if x is not None:
                np.testing.assert_array_equal(x.ids, y.ids)
                np.testing.assert_array_equal(x.mask, y.mask)
                assert y.ids.dtype == np.int32 and y.mask.dtype == bool


def _report_dict(report):
    d = report.to_dict()
    d.pop("name")
    return d


@pytest.mark.parametrize("task", ["sft", "pairs", "prompt"])
def test_second_encode_hits_the_cache_with_identical_arrays_and_report(zephyr, records, calls, tmp_path, task):
    encoder = ChatEncoder(zephyr, max_length=256, max_prompt_length=128)
    expected_report = DataReport()
    expected = encode_records(records, encoder, task, expected_report)
    calls.clear()

    first_report, second_report = DataReport(), DataReport()
    first = encode_records_cached(records, encoder, task, first_report, cache_dir=tmp_path)
    assert len(calls) == len(records)
    assert cache_hit(records, encoder, task, tmp_path)
    second = encode_records_cached(records, encoder, task, second_report, cache_dir=tmp_path)
    assert len(calls) == len(records)  # read back, not re-tokenised
    _assert_same(expected, first)
    _assert_same(expected, second)
    assert _report_dict(first_report) == _report_dict(second_report) == _report_dict(expected_report)
    if task == "sft":  # the data set exercises both skips and changes
        assert expected_report.skips == {"special_token_in_content": 1}
        assert expected_report.changes["prompt_truncated"] > 0 and expected_report.changes["response_truncated"] > 0


def test_tokenizer_template_lengths_task_and_data_changes_miss_the_cache(zephyr, records, calls, tmp_path):
    import copy

    base = ChatEncoder(zephyr, max_length=256, max_prompt_length=128)
    encode_records_cached(records, base, "sft", cache_dir=tmp_path)
    assert cache_hit(records, base, "sft", tmp_path)
    grown = copy.deepcopy(zephyr)
    grown.add_tokens(["<extra_token>"])  # same class and name, different vocabulary
    variants = {
        "tokenizer": (records, ChatEncoder(grown, max_length=256, max_prompt_length=128), "sft"),
        "template": (records, ChatEncoder(zephyr, max_length=256, max_prompt_length=128, chat_template="chatml"),
                     "sft"),
        "max_length": (records, ChatEncoder(zephyr, max_length=255, max_prompt_length=128), "sft"),
        "max_prompt_length": (records, ChatEncoder(zephyr, max_length=256, max_prompt_length=127), "sft"),
        "task": (records, base, "prompt"),
        "data": (records[:-1] + [Record(records[-1].index, "pair", records[-1].prompt, chosen="4", rejected="6")],
                 base, "sft"),
    }
    for what, (recs, encoder, task) in variants.items():
        assert not cache_hit(recs, encoder, task, tmp_path), what
    calls.clear()
    recs, encoder, task = variants["template"]
    encode_records_cached(recs, encoder, task, cache_dir=tmp_path)
    assert len(calls) == len(records)  # a miss tokenises again
    assert len(list(tmp_path.iterdir())) == 2


def test_two_workers_give_the_same_result(zephyr, records, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_lib, "MIN_ROWS_PER_PROC", 10)
    encoder = ChatEncoder(zephyr, max_length=256, max_prompt_length=128)
    expected_report, report = DataReport(), DataReport()
    expected = encode_records(records, encoder, "sft", expected_report)
    got = encode_records_cached(records, encoder, "sft", report, num_proc=2)  # no cache_dir: parallel only
    _assert_same(expected, got)
    assert _report_dict(report) == _report_dict(expected_report)


def _write_jsonl(path, n):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_streaming_reads_the_first_rows_like_the_full_load(tmp_path):
    path = _write_jsonl(tmp_path / "train.jsonl", 50)
    streamed, streamed_report = load_records(path, limit=7, streaming=True)
    full, _ = load_records(path, limit=7, streaming=False)
    assert streamed == full and [r.chosen for r in streamed] == [f"a{i}" for i in range(7)]
    assert streamed_report.rows_read == 7 and streamed_report.kept == 7
    everything, _ = load_records(path, streaming=True)
    assert len(everything) == 50


def test_hub_split_with_limit_streams_and_falls_back_when_it_cannot(tmp_path, monkeypatch):
    import datasets

    path = str(_write_jsonl(tmp_path / "train.jsonl", 30))
    real_load = datasets.load_dataset
    seen = []

    def fake_load(source, name=None, **kw):  # the hub id is served by the local file through the real reader
        seen.append(kw.get("streaming", False))
        if kw.get("streaming") and source == "org/no-streaming":
            raise NotImplementedError("this dataset cannot stream")
        kw.pop("data_dir", None)
        return real_load("json", data_files={"train": [path]}, **kw)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    records, _ = load_records("org/ultrachat", split="train", limit=4)
    assert seen == [True] and [r.chosen for r in records] == ["a0", "a1", "a2", "a3"]
    seen.clear()
    records, _ = load_records("org/no-streaming", split="train", limit=4)
    assert seen == [True, False] and len(records) == 4
    seen.clear()
    load_records("org/ultrachat", split="train")  # no limit: the whole split, as before
    assert seen == [False]


def test_rotating_window_moves_on_each_round_and_covers_every_item():
    assert rotating_window(10, 4, 1).tolist() == [0, 1, 2, 3]
    assert rotating_window(10, 4, 2).tolist() == [4, 5, 6, 7]
    assert rotating_window(10, 4, 3).tolist() == [8, 9, 0, 1]
    assert rotating_window(10, None, 5).tolist() == list(range(10))
    assert rotating_window(3, 8, 2).tolist() == [0, 1, 2]
    for n, limit in [(17, 5), (12, 4), (7, 7)]:
        rounds = -(-n // limit)
        seen = np.concatenate([rotating_window(n, limit, k) for k in range(1, rounds + 1)])
        assert set(seen.tolist()) == set(range(n))  # every item within ceil(n / limit) rounds
        assert len(np.unique(seen[:n])) == n  # none twice before all have been used
        assert all(len(rotating_window(n, limit, k)) == min(n, limit) for k in range(1, 30))
    with pytest.raises(ValueError):
        rotating_window(10, 4, 0)
    with pytest.raises(ValueError):
        rotating_window(10, 0, 1)


def test_no_records_and_all_skipped_records(zephyr, tmp_path):
    encoder = ChatEncoder(zephyr)
    report = DataReport()
    assert encode_records_cached([], encoder, "sft", report, cache_dir=tmp_path) == [] and report.kept == 0
    bad = [Record(0, "a", (Message("user", "hi"),), chosen="x</s>")]
    for _ in range(2):  # written, then read back: the skip is replayed from the cache
        report = DataReport()
        assert encode_records_cached(bad, encoder, "sft", report, cache_dir=tmp_path) == []
        assert report.kept == 0 and report.skips == {"special_token_in_content": 1}
    assert cache_hit(bad, encoder, "sft", tmp_path)
