"""Reading with datasets: local json / jsonl / parquet (the hub path is the same call), clear errors, real slices."""
import json

import pytest

from jaxalign.data.report import DataError
from jaxalign.data.sources import iter_rows, load_records, load_table

ROWS = [
    {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(6)
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_json_parquet_folder_and_glob_read_alike(tmp_path):
    import datasets

    jsonl = _write_jsonl(tmp_path / "a.jsonl", ROWS)
    (tmp_path / "b.json").write_text(json.dumps(ROWS))
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "c.parquet"))
    for source in (jsonl, tmp_path / "b.json", str(tmp_path / "c.parquet"), [jsonl]):
        records, report = load_records(source)
        assert [r.chosen for r in records] == [f"a{i}" for i in range(6)], source
        assert report.rows_read == report.kept == 6 and report.skipped == 0
    folder = tmp_path / "splits"
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl", ROWS[:4])
    _write_jsonl(folder / "test.jsonl", ROWS[4:])
    assert len(load_table(folder, split="train")) == 4 and len(load_table(folder, split="test")) == 2
    assert len(load_table(str(folder / "*.jsonl"))) == 6
    assert len(load_table({"train": jsonl, "validation": [jsonl, jsonl]}, split="validation")) == 12
    assert len(load_table(jsonl, split="train[:2]")) == 2
    records, _ = load_records(jsonl, limit=3)
    assert len(records) == 3


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "train.jsonl"
    with pytest.raises(DataError, match="nope/train.jsonl"):
        load_table(missing)
    with pytest.raises(DataError, match="No files match"):
        load_table(str(tmp_path / "*.parquet"))


def test_nonexistent_split_lists_the_splits_that_exist(tmp_path):
    jsonl = _write_jsonl(tmp_path / "a.jsonl", ROWS)
    with pytest.raises(DataError) as err:
        load_table({"train": jsonl, "test": jsonl}, split="validation")
    message = str(err.value)
    assert "'validation'" in message and "['test', 'train']" in message and "\n" not in message
    with pytest.raises(DataError, match=r"\['train'\]"):
        load_table(jsonl, split="train_sft[:10]")


def test_hub_errors_are_one_paragraph(monkeypatch):
    import datasets

    def unknown_split(*args, **kwargs):
        raise ValueError("Unknown split \"train\". Should be one of ['train_sft', 'test_sft'].")

    monkeypatch.setattr(datasets, "load_dataset", unknown_split)
    with pytest.raises(DataError) as err:
        load_table("HuggingFaceH4/ultrachat_200k", split="train")
    assert "['test_sft', 'train_sft']" in str(err.value) and "HuggingFaceH4/ultrachat_200k" in str(err.value)


def test_hub_data_dir_reaches_load_dataset(monkeypatch, tmp_path):
    """data_dir (a folder of a hub repo: Anthropic/hh-rlhf's harmless-base) is passed to datasets.load_dataset and
    named in the report; a hub table read this way goes through the same normalisation as local files."""
    import datasets

    seen = {}
    hh = [{"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}]

    def fake_load(path, name=None, **kwargs):
        seen.update(path=path, name=name, **kwargs)
        return datasets.Dataset.from_list(hh)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    records, report = load_records("Anthropic/hh-rlhf", split="train", data_dir="harmless-base", format="hh")
    assert seen["path"] == "Anthropic/hh-rlhf" and seen["data_dir"] == "harmless-base" and seen["split"] == "train"
    assert len(records) == 1 and records[0].rejected is not None and "harmless-base" in report.name


def test_hub_id_offline_is_a_clear_error():
    # conftest sets HF_HUB_OFFLINE=1: the real hub call runs and fails fast.
    with pytest.raises(DataError, match="Could not load the hub dataset 'someone/no-such-dataset'"):
        load_table("someone/no-such-dataset", split="train")


def test_mixed_types_in_a_file_are_counted_not_fatal(tmp_path):
    rows = ROWS[:2] + [
        {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]},
        {"messages": "a string"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": {"nested": "dict"}}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "wizard", "content": "a"}]},
        {"messages": [[{"role": "user", "content": "q"}]]},
    ] + ROWS[2:3]
    records, report = load_records(_write_jsonl(tmp_path / "mixed.jsonl", rows))
    assert [r.index for r in records] == [0, 1, 7]
    assert report.rows_read == 8 and report.kept == 3
    assert dict(report.skips) == {"non_string_content": 2, "bad_messages": 1, "bad_role": 1, "bad_message": 1}


def test_unknown_columns_name_the_columns(tmp_path):
    path = _write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"\['answer', 'question'\]"):
        load_records(path)
    with pytest.raises(DataError, match="needs the column"):
        load_records(path, format="preference")


def test_real_slices_parse(shared_data):
    expected = {
        "hh_rlhf/helpful_test_500.jsonl": (500, 496),
        "sft/oasst_en100_top1_messages.jsonl": (100, 100),
        "sft/mt_bench_gpt4_reference_2turn_messages.jsonl": (30, 30),
        "preference/oasst_en100_rank_pairs.jsonl": (212, 212),
    }
    for name, (read, kept) in expected.items():
        records, report = load_records(shared_data / name)
        assert (report.rows_read, report.kept) == (read, kept), report.summary()
        assert report.rows_read == report.kept + report.skipped
    table = load_table(shared_data / "sft" / "mt_bench_gpt4_reference_2turn_messages.jsonl")
    first = next(iter_rows(table))
    assert first["messages"][0]["role"] == "user" and len(first["messages"]) == 4
