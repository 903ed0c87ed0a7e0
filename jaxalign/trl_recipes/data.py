"""The dataset keys of a TRL / alignment-handbook recipe -> ``data.train`` and the held-out data.

Four spellings: the handbook's ``dataset_mixture: {datasets: [{id, config, split, columns, weight}], seed,
test_split_size}``, TRL's own mixture (top-level ``datasets: [{path, name, data_dir, split, columns, fraction}]``,
``test_split_size``), the handbook's older ``dataset_mixer: {id: fraction}`` + ``dataset_splits``, and the scripts'
``dataset_name`` / ``dataset_config`` / ``dataset_train_split`` / ``dataset_test_split``.

jaxalign reads one source per role, so a mixture is honoured when its entries are splits of one dataset (same id and
config) taken whole: they become one split expression, ``train_prefs+test_prefs``, which ``datasets`` reads as their
concatenation. Weights other than 1 (subsampling) and several datasets are refused. ``test_split_size`` N holds out
the last N rows of the last split (``test_prefs[-2000:]``; the handbook draws N rows at random from the shuffled
mixture: as many rows, others); a fraction f holds out the last f of every split. Setting ``data.train.source``
replaces the recipe's datasets (training and held-out) altogether.
"""
from __future__ import annotations

from typing import Any

from jaxalign.trl_recipes.names import Recipe, Row, not_applicable, refuse

DATASET_KEYS = ("dataset_mixture", "datasets", "test_split_size", "dataset_mixer", "dataset_splits", "dataset_name",
                "dataset_config", "dataset_train_split", "dataset_test_split")
# columns that change how a row is rendered, which jaxalign's formats do not read
_RENDERING_COLUMNS = ("chat_template_kwargs", "tools", "images")


def _entries(r: Recipe) -> tuple[str, list[dict], Any] | str:
    """(the key that holds the datasets, entries {source, name, data_dir, split, columns, share}, test_split_size),
    or why the datasets cannot be read."""
    k = r.keys
    mixture = k.get("dataset_mixture")
    if mixture is not None and "dataset_name" not in r.from_command_line:
        if not isinstance(mixture, dict) or not isinstance(mixture.get("datasets"), list):
            return "dataset_mixture must hold a list under 'datasets'"
        return "dataset_mixture", [
            {"source": d.get("id"), "name": d.get("config"), "data_dir": None, "split": d.get("split", "train"),
             "columns": d.get("columns"), "share": d.get("weight", 1.0)} for d in mixture["datasets"]
        ], mixture.get("test_split_size")
    if isinstance(k.get("datasets"), list) and "dataset_name" not in r.from_command_line:
        return "datasets", [
            {"source": d.get("path"), "name": d.get("name"), "data_dir": d.get("data_dir"),
             "split": d.get("split", "train"), "columns": d.get("columns"), "share": d.get("fraction")}
            for d in k["datasets"]
        ], k.get("test_split_size")
    if isinstance(k.get("dataset_mixer"), dict) and "dataset_name" not in r.from_command_line:
        splits = k.get("dataset_splits") or ["train", "test"]
        train = [s for s in splits if "train" in s]
        return "dataset_mixer", [
            {"source": src, "name": None, "data_dir": None, "split": s, "columns": None, "share": share}
            for src, share in k["dataset_mixer"].items() for s in train
        ], ("splits", [s for s in splits if "test" in s])
    if k.get("dataset_name"):
        return "dataset_name", [{"source": k["dataset_name"], "name": k.get("dataset_config"), "data_dir": None,
                                 "split": k.get("dataset_train_split", "train"), "columns": None, "share": None}], None
    return "no dataset: give dataset_name (a hub id or a local file / folder) or data.train.source"


def _format(columns) -> str | None:
    """The data format the columns pin down ("auto" where jaxalign's detection reads them as TRL does), or None."""
    cols = set(columns or ())
    if cols & set(_RENDERING_COLUMNS):
        return None
    if {"chosen", "rejected"} <= cols:
        return "auto"  # preference or hh, told apart per row
    if "messages" in cols:
        return "messages"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    return "auto" if not cols else None


def _one_source(key: str, entries: list[dict]) -> str | None:
    """Why the entries are not one dataset's splits taken whole, or None."""
    if not entries:
        return f"{key} lists no datasets"
    if len({(e["source"], e["name"], e["data_dir"]) for e in entries}) > 1:
        return (f"{key} mixes several datasets ({', '.join(sorted({str(e['source']) for e in entries}))}); jaxalign "
                f"reads one source per role")
    shares = [e["share"] for e in entries]
    if any(s is not None and float(s) != 1.0 for s in shares):
        return f"{key} subsamples its datasets (weights {shares}); jaxalign reads each split whole"
    if _format(entries[0]["columns"]) is None:
        return (f"{key} selects the columns {entries[0]['columns']}, which are not a data format jaxalign reads "
                f"(messages; chosen / rejected with an optional prompt; prompt / completion; no per-row "
                f"{' / '.join(_RENDERING_COLUMNS)})")
    return None


def _hold_out(splits: list[str], size: Any) -> tuple[str, str] | str:
    """(train split expression, held-out split expression) for ``test_split_size``, or why not."""
    if any("[" in s for s in splits):
        return f"test_split_size with a sliced split ({splits}) is not a split expression jaxalign can write"
    if isinstance(size, bool) or not isinstance(size, (int, float)) or size <= 0:
        return f"test_split_size={size!r} must be a row count or a fraction in (0, 1)"
    if isinstance(size, int) or float(size).is_integer() and size >= 1:
        n = int(size)
        return "+".join(splits[:-1] + [f"{splits[-1]}[:-{n}]"]), f"{splits[-1]}[-{n}:]"
    pct = size * 100
    if size >= 1 or abs(pct - round(pct)) > 1e-9:
        return f"test_split_size={size} must be a whole percentage to be written as a split slice"
    keep = 100 - round(pct)
    return "+".join(f"{s}[:{keep}%]" for s in splits), "+".join(f"{s}[{keep}%:]" for s in splits)


def dataset_rows(r: Recipe) -> list[Row]:
    """The dataset rows (:func:`_dataset_rows`) and, for the reward trainer, what becomes of a per-row margin."""
    rows = _dataset_rows(r)
    return rows + [_margin_row(r)] if r.trainer == "reward" else rows


def _margin_row(r: Recipe) -> Row:
    """TRL's RewardTrainer subtracts a dataset's per-row ``margin`` column from r(chosen) - r(rejected) when it has
    one; jaxalign's Bradley-Terry loss subtracts one constant, ``reward.margin``. A mixture whose ``columns`` keep
    that column asks for per-row margins: refused (setting reward.margin takes one constant instead). Otherwise the
    table says so: a hub dataset's columns are not known before it is read, and jaxalign reads no margin column."""
    found = _entries(r)
    kept = [e["columns"] for e in found[1] if "margin" in (e["columns"] or ())] if not isinstance(found, str) else []
    if kept and "data.train.source" not in r.given:
        return refuse("margin (column)", kept[0], "TRL's reward trainer subtracts each row's margin column from "
                                                    "r(chosen) - r(rejected); jaxalign's Bradley-Terry loss subtracts "
                                                    "one constant for every pair", "reward.margin")
    return not_applicable("margin (column)", None, "TRL subtracts a dataset's per-row margin column from r(chosen) - "
                                                   "r(rejected); jaxalign subtracts one constant, reward.margin (0: "
                                                   "none), and reads no such column")


def _dataset_rows(r: Recipe) -> list[Row]:
    """Rows for the recipe's dataset keys: data.train.*, and the held-out data (data.eval_prefs for the pair and reward
    trainers, data.eval_prompts for all but the reward trainer: ``Recipe.held_out``) from ``test_split_size`` or, when
    the recipe evaluates, ``dataset_test_split``."""
    k = r.keys
    present = [n for n in DATASET_KEYS if n in k]
    if "data.train.source" in r.given:
        return [Row(n, k[n], status="replaced", note="data.train.source replaces the recipe's datasets")
                for n in present]
    found = _entries(r)
    if isinstance(found, str):
        return [refuse(present[0] if present else "dataset_name", k.get(present[0]) if present else None, found,
                       "data.train.source")]
    key, entries, held = found
    problem = _one_source(key, entries)
    if problem:
        return [refuse(key, k[key], problem, "data.train.source")]
    first = entries[0]
    splits = [str(e["split"]) for e in entries]
    train_split, test_split, note = "+".join(splits), None, ""
    if isinstance(held, tuple):  # dataset_mixer: the splits named "test" are the held-out data
        test_split = "+".join(held[1]) or None
    elif held is not None:
        cut = _hold_out(splits, held)
        if isinstance(cut, str):
            return [refuse(key, k[key], cut, "data.train.source")]
        train_split, test_split = cut
        note = ("held out: the last rows of the mixture (the handbook draws them at random from the shuffled "
                "mixture: as many rows, others)")
    elif key == "dataset_name" and _evaluates(k):
        test_split = str(k.get("dataset_test_split", "test"))
    fmt = _format(first["columns"])
    own = key != "dataset_name"  # a mixture's rows all hang on its key; dataset_name's on each of its keys

    def row(trl_key: str, our_key: str, value: Any, note: str = "") -> Row:
        trl_key = key if own else trl_key
        return Row(trl_key, k.get(trl_key), our_key, value, "mapped" if trl_key in k else "default", note)

    rows = [row("dataset_name", "data.train.source", first["source"]),
            row("dataset_config", "data.train.name", first["name"] or ""),
            row("dataset_train_split", "data.train.split", train_split)]
    if first["data_dir"]:
        rows.append(row(key, "data.train.data_dir", first["data_dir"]))
    if fmt != "auto":
        rows.append(row(key, "data.train.format", fmt))
    roles = r.held_out if test_split else ()
    for i, role in enumerate(roles):
        rows += [row("dataset_test_split", f"data.{role}.source", first["source"], "" if i else note),
                 row("dataset_test_split", f"data.{role}.name", first["name"] or ""),
                 row("dataset_test_split", f"data.{role}.split", test_split)]
        if fmt != "auto":
            rows.append(row("dataset_test_split", f"data.{role}.format", fmt))
    if "eval_prefs" in roles:
        trl_key = key if own else "dataset_test_split"
        rows.append(Row(trl_key, k.get(trl_key), status="differs",
                        note="TRL evaluates the whole held-out split; jaxalign its first eval.heldout_limit pairs (256 "
                             "unless set; raise it to cover the split)"))
    used = {key, *{"dataset_mixer": ("dataset_splits",), "datasets": ("test_split_size",),
                   "dataset_name": ("dataset_config", "dataset_train_split")}.get(key, ())}
    for name in present:
        if name == "dataset_test_split" and key == "dataset_name":
            if not test_split:
                rows.append(not_applicable(name, k[name], "the recipe does not evaluate (eval_strategy=no)"))
        elif name not in used:
            rows.append(not_applicable(name, k[name], f"{key} gives the data"))
    if key == "dataset_mixture" and "seed" in (k[key] or {}):
        rows.append(not_applicable("dataset_mixture.seed", k[key]["seed"],
                                   "row order and the held-out draw; jaxalign shuffles with run.seed"))
    return rows


def _evaluates(k: dict) -> bool:
    strategy = k.get("eval_strategy", k.get("evaluation_strategy", "no"))
    return str(strategy).lower() not in ("no", "none", "false")
