"""Tokenisation in parallel, cached on disk: ``encode_records`` for data sets too large to tokenise on every run.

Contract:

- ``encode_records_cached(records, encoder, task, report, cache_dir=..., num_proc=...)`` returns exactly what
  ``tokenize.encode_records`` returns (the same ``EncodedRecord`` arrays, in record order) and leaves ``report`` with
  the same skip and change counts and examples, whether it tokenised or read the cache.
- Tokenising runs through ``datasets.Dataset.map(num_proc=...)`` (each worker holds a copy of the encoder); small
  inputs use fewer workers, since starting one costs more than tokenising a few hundred rows.
- The cache is one folder per key under ``cache_dir``: ``encoding_key`` hashes the records, the tokenizer (its full
  serialised vocabulary, merges and special tokens), the chat template, ``max_length``, ``max_prompt_length``, the
  task and ``ENCODING_VERSION``. Any change misses; a re-run or a resume with the same inputs reads the folder back
  (Arrow, memory-mapped) instead of tokenising. Each row's skip reason and changes are stored with it, so the report
  is rebuilt by replaying them. A folder appears only when complete (written under a temporary name, then renamed).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from jaxalign.data.formats import Message, Record, Skip
from jaxalign.data.report import DataReport
from jaxalign.data.tokenize import ChatEncoder, EncodedRecord, EncodedSequence, encode_records

# Bump when ChatEncoder gives different ids or masks for the same inputs, so old caches stop matching.
ENCODING_VERSION = 1
# Below this many rows per worker a process costs more than it saves.
MIN_ROWS_PER_PROC = 2000
_SEQUENCES = ("prompt", "chosen", "rejected")


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides a tokenizer's ids: its serialised model (vocabulary, merges, normaliser,
    pre-tokeniser, added tokens) when it is a fast tokenizer, else its vocabulary, plus its special tokens."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    specials = {k: str(v) for k, v in (getattr(tokenizer, "special_tokens_map", None) or {}).items()}
    h.update(json.dumps(specials, sort_keys=True).encode())
    return h.hexdigest()


def records_fingerprint(records: Iterable[Record]) -> str:
    """A hash of the records' contents and positions."""
    h = hashlib.sha256()
    for r in records:
        h.update(repr((r.index, r.id, [(m.role, m.content) for m in r.prompt], r.chosen, r.rejected,
                       r.reference)).encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def encoding_key(records: Iterable[Record], encoder: ChatEncoder, task: str) -> str:
    """The cache key of ``encode_records(records, encoder, task)`` (see the module docstring)."""
    parts = {
        "version": ENCODING_VERSION,
        "task": task,
        "max_length": encoder.max_length,
        "max_prompt_length": encoder.max_prompt_length,
        "completion_end": encoder.completion_end,
        "template": encoder.template,
        "tokenizer": tokenizer_fingerprint(encoder.tokenizer),
        "records": records_fingerprint(records),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


# ------------------------------------------------------------------------------------------------------ tokenising
def _rows(records: list[Record]) -> dict[str, list]:
    return {
        "index": [r.index for r in records],
        "id": [r.id for r in records],
        "roles": [[m.role for m in r.prompt] for r in records],
        "contents": [[m.content for m in r.prompt] for r in records],
        "chosen": [r.chosen for r in records],
        "rejected": [r.rejected for r in records],
        "reference": [r.reference for r in records],
    }


def _features():
    from datasets import Features, Sequence, Value

    ids, mask, text = Sequence(Value("int32")), Sequence(Value("bool")), Value("string")
    columns = {"row_id": Value("int64"), "record_id": text, "skip_reason": text, "skip_detail": text,
               "change_kinds": Sequence(text), "change_details": Sequence(text), "prompt_ids": ids,
               "has_chosen": Value("bool"), "has_rejected": Value("bool")}
    for name in _SEQUENCES[1:]:
        columns.update({f"{name}_ids": ids, f"{name}_mask": mask})
    return Features(columns)


def _encode_batch(batch: dict[str, list], encoder: ChatEncoder, task: str) -> dict[str, list]:
    """``Dataset.map`` body: encode a batch of rows into flat columns (a ``Skip`` keeps its reason, no ids)."""
    out: dict[str, list] = {k: [] for k in _features()}
    no_ids, no_mask = np.zeros(0, np.int32), np.zeros(0, bool)  # typed: an untyped [] would be read as float64
    for i, index in enumerate(batch["index"]):
        prompt = tuple(Message(r, c) for r, c in zip(batch["roles"][i], batch["contents"][i]))
        record = Record(index, batch["id"][i], prompt, batch["chosen"][i], batch["rejected"][i], batch["reference"][i])
        result = encoder.encode(record, task)
        skipped = isinstance(result, Skip)
        out["row_id"].append(index)
        out["record_id"].append(record.id)
        out["skip_reason"].append(result.reason if skipped else None)
        out["skip_detail"].append(result.detail if skipped else None)
        changes = () if skipped else result.changes
        out["change_kinds"].append([kind for kind, _ in changes])
        out["change_details"].append([detail for _, detail in changes])
        out["prompt_ids"].append(no_ids if skipped else result.prompt_ids)
        for name in _SEQUENCES[1:]:
            seq = None if skipped else getattr(result, name)
            out[f"has_{name}"].append(seq is not None)
            out[f"{name}_ids"].append(no_ids if seq is None else seq.ids)
            out[f"{name}_mask"].append(no_mask if seq is None else seq.mask)
    return out


def _tokenize(records: list[Record], encoder: ChatEncoder, task: str, num_proc: int, key: str):
    import datasets

    workers = max(1, min(num_proc, len(records) // MIN_ROWS_PER_PROC))
    table = datasets.Dataset.from_dict(_rows(records))
    return table.map(
        _encode_batch, batched=True, batch_size=256, num_proc=workers if workers > 1 else None,
        fn_kwargs={"encoder": encoder, "task": task}, remove_columns=table.column_names, features=_features(),
        new_fingerprint=key,  # our own key: hashing the encoder (a whole tokenizer) for datasets' is slow
        keep_in_memory=True, desc=f"tokenising ({task})",
    )


# ---------------------------------------------------------------------------------------------------------- reading
def _ragged(table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, offsets) of a list column: slicing these is far faster than reading rows one by one."""
    column = table.column(name).combine_chunks()
    values = column.values.to_numpy(zero_copy_only=False)
    # one owned, writable copy per column; rows are views into it
    return np.array(values, copy=True), column.offsets.to_numpy()


def _to_records(dataset, report: DataReport) -> list[EncodedRecord]:
    table = dataset.data.table
    meta = table.select(["row_id", "record_id", "skip_reason", "skip_detail", "change_kinds", "change_details",
                         "has_chosen", "has_rejected"]).to_pydict()
    ragged = {name: _ragged(table, name) for name in table.column_names if name.endswith(("_ids", "_mask"))}

    def piece(name: str, i: int) -> np.ndarray:
        values, offsets = ragged[name]
        return values[offsets[i]:offsets[i + 1]]

    out = []
    for i, row in enumerate(meta["row_id"]):
        if meta["skip_reason"][i] is not None:
            report.skip(row, meta["skip_reason"][i], meta["skip_detail"][i] or "")
            continue
        changes = tuple(zip(meta["change_kinds"][i], meta["change_details"][i]))
        for kind, detail in changes:
            report.change(row, kind, detail)
        sequences = {
            name: EncodedSequence(piece(f"{name}_ids", i), piece(f"{name}_mask", i)) if meta[f"has_{name}"][i] else None
            for name in _SEQUENCES[1:]
        }
        out.append(EncodedRecord(row, meta["record_id"][i], piece("prompt_ids", i), changes=changes, **sequences))
    report.kept = len(out)
    return out


def encode_records_cached(
    records: Iterable[Record],
    encoder: ChatEncoder,
    task: str,
    report: DataReport | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    num_proc: int = 1,
) -> list[EncodedRecord]:
    """``encode_records`` with ``num_proc`` workers and, given ``cache_dir`` (a local folder), an on-disk cache
    keyed by ``encoding_key``; see the module docstring. Without either it is ``encode_records`` itself."""
    report = report if report is not None else DataReport()
    records = list(records)
    if not records or (cache_dir is None and num_proc <= 1):
        return encode_records(records, encoder, task, report)
    import datasets

    key = encoding_key(records, encoder, task)
    folder = None if cache_dir is None else Path(cache_dir) / f"{task}-{key}"
    if folder is not None and folder.is_dir():
        return _to_records(datasets.load_from_disk(str(folder)), report)
    encoded = _tokenize(records, encoder, task, num_proc, key)
    if folder is not None:
        tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
        encoded.save_to_disk(str(tmp))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished the same key first; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    return _to_records(encoded, report)


def cache_hit(records: Iterable[Record], encoder: ChatEncoder, task: str, cache_dir: str | os.PathLike) -> bool:
    """Whether ``encode_records_cached`` would read these records from ``cache_dir`` instead of tokenising."""
    return (Path(cache_dir) / f"{task}-{encoding_key(list(records), encoder, task)}").is_dir()
