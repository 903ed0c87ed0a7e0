"""Data: read, normalise, tokenise, batch.

    sources.load_records(path_or_hub_id, split=..., format="auto")  -> (records, report)   [datasets]
    formats.normalize_rows(rows, format)                              -> records (skips counted in a DataReport)
    tokenize.ChatEncoder(tokenizer, max_length=..., max_prompt_length=...)
        .encode(record, "sft" | "pairs" | "prompt")                  -> EncodedRecord | Skip
    tokenize.sft_examples / pair_examples(records, encoder, report)  -> example dicts
    cache.encode_records_cached(records, encoder, task, report, cache_dir=..., num_proc=...)
                                                                      -> encode_records, parallel and cached on disk
    rotation.rotating_window(n_items, limit, round_)                  -> the prompt indices a round samples
    loader.sft_dataset / pair_dataset(examples, global_batch_size=..., buckets=..., pad_id=...)
                                                                      -> grain.IterDataset of padded numpy batches

Names are exported lazily so that ``from jaxalign.data import Record`` does not import datasets, grain or jinja.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "formats": (
        "FORMATS", "ROLES", "Message", "Record", "Skip", "check_format", "detect_format", "normalize_row",
        "normalize_rows",
    ),
    "report": ("DataError", "DataReport"),
    "tokenize": (
        "ChatEncoder", "EncodedRecord", "EncodedSequence", "FALLBACK_TEMPLATES", "encode_records", "pair_example",
        "pair_examples", "resolve_chat_template", "sft_example", "sft_examples",
    ),
    "loader": (
        "bucket_for", "length_buckets", "pad_pair_batch", "pad_sft_batch", "pair_dataset", "sft_dataset",
        "total_batches",
    ),
    "sources": ("iter_rows", "load_records", "load_table", "stream_rows"),
    "cache": ("encode_records_cached", "encoding_key", "cache_hit"),
    "rotation": ("rotating_window",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'jaxalign.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"jaxalign.data.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
