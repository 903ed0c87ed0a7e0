"""Reading datasets with Hugging Face ``datasets``: hub ids and local json / jsonl / parquet through one code path.

Contract:

- ``load_table(source, split=..., name=...)`` returns a ``datasets.Dataset``. ``source`` is a hub id (read with
  ``load_dataset(hub_id, name, split=split)``), or local data: a file, a glob, a folder (its json/jsonl/parquet files),
  a list of those, or a mapping ``{split: files}`` (read with ``load_dataset("json" | "parquet", data_files=...)``).
  A folder's splits follow ``datasets``' file naming (``train*.jsonl``, ``test-00001.parquet``; otherwise all
  ``"train"``); other local files without a mapping form the split ``"train"``. ``split`` may carry a slice, e.g.
  ``"train[:100]"``.
- Failures are one-paragraph ``DataError``s: a missing or empty local file names the path, and so does one that
  cannot be parsed; a nonexistent split lists the splits that exist; an unreachable hub dataset says so (hub ids
  cannot be fetched offline).
- ``load_records`` = ``load_table`` + ``formats.normalize_rows``: it returns the records and the ``DataReport`` that
  counts every skipped row. With a ``limit`` a hub split is streamed (``stream_rows``: ``load_dataset(...,
  streaming=True)`` + ``take``), so a smoke run on a large dataset fetches only its first rows.
"""
from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from jaxalign.data.formats import Record, check_format, normalize_rows
from jaxalign.data.report import DataError, DataReport

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")


def _builder(path: str) -> str | None:
    name = path.lower()
    for ext in _COMPRESSED:
        name = name.removesuffix(ext)
    return _BUILDERS.get(Path(name).suffix)


def _looks_local(source) -> bool:
    if isinstance(source, (Mapping, list, tuple, os.PathLike)):
        return True
    text = str(source)
    # A hub id is "owner/name" or "name": anything that exists here, names a data file or globs is local.
    return os.path.exists(text) or glob.has_magic(text) or _builder(text) is not None or text.startswith((".", "/"))


def _expand(path: str | os.PathLike) -> list[str]:
    text = os.fspath(path)
    if os.path.isdir(text):
        found = sorted(str(p) for p in Path(text).rglob("*") if p.is_file() and _builder(str(p)))
        if not found:
            raise DataError(f"The folder {text!r} holds no .json, .jsonl or .parquet files.")
        return found
    if glob.has_magic(text):
        found = sorted(glob.glob(text, recursive=True))
        if not found:
            raise DataError(f"No files match {text!r}.")
        return found
    if not os.path.isfile(text):
        raise DataError(f"The data file {text!r} does not exist (looked relative to {os.getcwd()!r}).")
    return [text]


def _folder_splits(folder: str) -> dict[str, list[str]]:
    """Splits of a folder the way ``datasets`` names them (train*.jsonl, test-0001.parquet, ...; else all train)."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        resolved = DataFilesDict.from_patterns(get_data_patterns(folder), base_path=folder)
    except Exception as err:  # datasets raises its own EmptyDatasetError / FileNotFoundError here
        raise DataError(f"Could not find data files in the folder {folder!r}: {err}") from None
    files = {str(split): sorted(f for f in found if _builder(f)) for split, found in resolved.items()}
    files = {split: found for split, found in files.items() if found}
    if not files:
        raise DataError(f"The folder {folder!r} holds no .json, .jsonl or .parquet files.")
    return files


def _local_files(source) -> dict[str, list[str]]:
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        return _folder_splits(os.fspath(source))
    spec = {str(k): v for k, v in source.items()} if isinstance(source, Mapping) else {"train": source}
    files = {}
    for split, value in spec.items():
        paths = value if isinstance(value, (list, tuple)) else [value]
        files[split] = [f for p in paths for f in _expand(p)]
    return files


def _split_name(split: str) -> str:
    # "train[:10%]+test" -> the first split named; datasets itself handles the slicing syntax.
    return re.split(r"[\[+]", split, maxsplit=1)[0].strip()


def _unknown_split(split: str, available: Sequence[str], where: str) -> DataError:
    return DataError(
        f"The split {split!r} does not exist in {where}; the splits there are {sorted(available)}. "
        "Pass one of them as split=... (a slice such as 'train[:100]' also works)."
    )


def _is_empty(path: str) -> bool:
    """A file with no bytes, or (uncompressed json / jsonl) nothing but whitespace: 0 rows, which ``datasets`` fails
    on with an error that names neither the file nor the problem."""
    size = os.path.getsize(path)
    if size == 0:
        return True
    if size > 1 << 16 or path.lower().endswith(_COMPRESSED) or _builder(path) != "json":
        return False
    with open(path, "rb") as f:
        return not f.read().strip()


def _local_builder(source, split: str) -> tuple[str, dict[str, list[str]]]:
    """(``datasets`` builder name, data files by split) for local data, checked."""
    files = _local_files(source)
    if _split_name(split) not in files:
        raise _unknown_split(split, list(files), f"the local files {source!r}")
    builders = {_builder(f) for fs in files.values() for f in fs}
    if None in builders or len(builders) != 1:
        found = sorted(f for fs in files.values() for f in fs)
        raise DataError(f"Local data must be all .json/.jsonl or all .parquet files; got {found}.")
    empty = [f for f in files[_split_name(split)] if _is_empty(f)]
    if empty:
        raise DataError(f"The data file {empty[0]!r} is empty (0 rows)" + (f", and so are {len(empty) - 1} more of "
                        f"split {split!r}" if len(empty) > 1 else "") + ": give a file with at least one row.")
    return builders.pop(), files


def _load_local(builder: str, files: dict[str, list[str]], split: str, **kw):
    """``datasets.load_dataset`` on local files; a file it cannot parse (or a split with no rows) is a DataError
    naming the files, not a traceback from inside ``datasets``."""
    import datasets

    try:
        return datasets.load_dataset(builder, data_files=files, split=split, **kw)
    except datasets.exceptions.DatasetGenerationError as err:
        cause = err.__cause__ or err.__context__ or err
        raise DataError(f"Could not read {', '.join(files.get(_split_name(split), []))} as {builder} "
                        f"({type(cause).__name__}: {str(cause).strip()}).") from None
    except ValueError as err:
        if "corresponds to no data" not in str(err):
            raise
        raise DataError(f"The local data {', '.join(files.get(_split_name(split), []))} holds no rows for split "
                        f"{split!r}.") from None


def stream_rows(source, *, split: str = "train", name: str | None = None, limit: int | None = None,
                data_dir: str | None = None) -> Iterator[dict]:
    """The first ``limit`` rows (all without one) of ``source`` / ``split``, read with ``load_dataset(...,
    streaming=True)``: a hub split is not downloaded whole. Local files go through the same streaming reader."""
    import datasets

    if _looks_local(source):
        builder, files = _local_builder(source, split)
        table = _load_local(builder, files, split, streaming=True)
    else:
        table = datasets.load_dataset(source, name, split=split, streaming=True, data_dir=data_dir or None)
    return iter(table if limit is None else table.take(limit))


def load_table(
    source,
    *,
    split: str = "train",
    name: str | None = None,
    cache_dir: str | None = None,
    data_dir: str | None = None,
):
    """The ``datasets.Dataset`` for ``source`` and ``split`` (see the module docstring). ``data_dir`` picks a folder
    inside a hub repository (Anthropic/hh-rlhf keeps harmless-base / helpful-base as folders, not configs)."""
    import datasets  # heavy; only readers of data pay for it

    if _looks_local(source):
        builder, files = _local_builder(source, split)
        return _load_local(builder, files, split, cache_dir=cache_dir)
    try:
        return datasets.load_dataset(source, name, split=split, cache_dir=cache_dir, data_dir=data_dir or None)
    except ValueError as err:
        message = str(err)
        if message.startswith("Unknown split"):
            available = re.findall(r"'([^']+)'", message.partition("Should be one of")[2])
            raise _unknown_split(split, available, f"the hub dataset {source!r}") from None
        if "BuilderConfig" in message or "Config name is missing" in message:
            raise DataError(f"The hub dataset {source!r} has no config {name!r}: {message}") from None
        raise
    except (ConnectionError, FileNotFoundError) as err:
        raise DataError(
            f"Could not load the hub dataset {source!r} (config {name!r}, data_dir {data_dir!r}, split {split!r}): {err}. Hub ids need "
            "network access or a warm Hugging Face cache; for local files pass a path ending in .json/.jsonl/.parquet."
        ) from None


def iter_rows(table, batch_size: int = 1000) -> Iterator[dict]:
    """Rows of a ``datasets.Dataset`` as plain dicts, read a batch at a time (much faster than ``table[i]``)."""
    for batch in table.iter(batch_size=batch_size):
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys)):
            yield dict(zip(keys, values))


def _label(source, split: str, name: str | None, data_dir: str | None = None) -> str:
    if isinstance(source, (str, os.PathLike)) and _looks_local(source):
        base = Path(os.fspath(source)).name
    elif isinstance(source, str):
        base = source + (f"/{name}" if name else "") + (f"/{data_dir}" if data_dir else "")
    else:
        base = "local"
    return f"{base}[{split}]"


def load_records(
    source,
    *,
    split: str = "train",
    name: str | None = None,
    format: str = "auto",  # noqa: A002 - the user-facing word
    limit: int | None = None,
    report: DataReport | None = None,
    cache_dir: str | None = None,
    data_dir: str | None = None,
    streaming: bool | None = None,
) -> tuple[list[Record], DataReport]:
    """Read ``source`` / ``split`` and normalise it; returns the records and the report counting every skip.

    ``format`` is ``"auto"`` (from the column names) or one of ``formats.FORMATS``; ``limit`` reads only the first
    rows (subsampling for smoke runs and tests). ``streaming`` reads through ``stream_rows``; by default a hub
    split with a ``limit`` streams (its first rows, not the whole split, are fetched) and falls back to a full load
    where the dataset cannot stream; split slices such as ``"train[:100]"`` need the full load.
    """
    stream = (limit is not None and not _looks_local(source)) if streaming is None else streaming
    rows = None
    if stream and "[" not in split:
        try:
            rows = stream_rows(source, split=split, name=name, limit=limit, data_dir=data_dir)
            first = next(rows, _END)
        except Exception:
            if streaming:  # asked for explicitly: the user should see why it failed
                raise
            rows = None
    if rows is None:
        table = load_table(source, split=split, name=name, cache_dir=cache_dir, data_dir=data_dir)
        if limit is not None:
            table = table.select(range(min(limit, len(table))))
        rows = iter_rows(table)
        first = next(rows, _END)
    label = _label(source, split, name, data_dir)
    report = report if report is not None else DataReport(name=label)
    if first is _END:
        report.kept = 0
        return [], report
    fmt = check_format(format, list(first), first)
    records = normalize_rows(_prepend(first, rows), fmt, report=report, source=Path(label).name)
    report.kept = len(records)
    return records, report


_END = object()


def _prepend(first, rest):
    yield first
    yield from rest
