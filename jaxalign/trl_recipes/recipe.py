"""Running a TRL / alignment-handbook recipe file as written (docs/trl_users.md).

    jaxalign --config zephyr-7b-beta/dpo/config_full.yaml num_processes=8     # the handbook's recipe file

A YAML file whose top-level keys are TRL names (``model_name_or_path``, ``loss_type``, ...) rather than jaxalign's
sections is such a recipe. :func:`map_recipe` decides the trainer (``--trainer``, else the recipe's path — the
handbook files live in ``recipes/<model>/<trainer>/`` — else keys only one trainer has), translates every key
(:mod:`jaxalign.trl_recipes.training`, :mod:`jaxalign.trl_recipes.data`; TRL's defaults fill what the recipe leaves out), and returns
the jaxalign keys to set, the table printed before the run, and the refusal (exit 2, one paragraph) when a key asks
for something jaxalign cannot do. TRL names typed on the command line (``loss_type=ipo beta=0.05``) join the recipe's
keys; with a jaxalign recipe they are translated alone. A jaxalign key, on the command line or as a section in the
file, wins over what the map sets and lifts the refusal of the TRL key whose effect it replaces.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import re
from pathlib import Path
from typing import Any

from jaxalign.config.checks import ConfigError
from jaxalign.trl_recipes.data import DATASET_KEYS, dataset_rows
from jaxalign.trl_recipes.names import (AT_DEFAULT_LIFTED_BY, AT_DEFAULT_ONLY, DEFAULT_ALIASES, LORA_TASK_TYPES,
                                LOSS_TYPES, NOT_APPLICABLE, REFUSED, REFUSED_TRAINERS, TRAINER_HINTS, TRAINERS,
                                TRL_DEFAULTS, Recipe, Row, not_applicable, refuse, trl_names)
from jaxalign.trl_recipes.training import HANDLERS, head_trains_in_peft

DONE = ("mapped", "default")  # rows whose jaxalign key is set


def _stem_tokens(path: Path) -> list[str]:
    return [t for t in re.split(r"[-_.]", path.stem.lower()) if t]


def detect_trainer(keys: dict[str, Any], path: Path, hint: str = "") -> str:
    """The TRL trainer a recipe is for: ``hint`` (``--trainer``, or ``run.method`` on the command line), else a
    trainer's name in the path, else the keys only one trainer has; a refused or unknown trainer is a ConfigError."""
    known = sorted(TRAINERS)
    where = str(path)
    name = hint.lower()
    if not name:
        # the file name's words and the two folders above it (the handbook's recipes/<model>/<trainer>/config.yaml)
        parts = _stem_tokens(path) + [p.lower() for p in reversed(path.resolve().parent.parts)][:2]
        named = [p for p in parts if p in TRAINERS or p in REFUSED_TRAINERS]
        from_path = named[0] if len(set(named)) == 1 else None
        candidates: set[str] | None = None
        for key, value in keys.items():
            hints = set(TRAINER_HINTS.get(key, ()))
            if key == "loss_type":
                hints = set().union(*(LOSS_TYPES.get(v, set()) for v in (value if isinstance(value, list) else
                                                                          [value])))
            if key == "lora_task_type":
                hints = set(LORA_TASK_TYPES.get(str(value).upper(), ()))
            if hints:
                candidates = hints if candidates is None else candidates & hints
        if from_path and (candidates is None or from_path in candidates or from_path in REFUSED_TRAINERS):
            name = from_path
        elif not from_path and candidates and len(candidates) == 1:
            name = next(iter(candidates))
        else:
            seen = f"the path says {from_path}, its keys say {', '.join(sorted(candidates or ())) or 'nothing'}" \
                if from_path else f"its keys fit {', '.join(sorted(candidates)) or 'no one trainer'}" \
                if candidates is not None else "neither its path nor its keys name one"
            raise ConfigError(f"{where}: cannot tell which TRL trainer this recipe is for ({seen}). Say it with "
                              f"--trainer {'|'.join(known)} (or run.method=sft / dpo / reward).")
    if name in REFUSED_TRAINERS:
        raise ConfigError(f"{where}: a TRL {name.upper()} recipe: {REFUSED_TRAINERS[name]}. jaxalign runs TRL's "
                          f"{', '.join(t.upper() for t in known)} recipes (docs/trl_users.md).")
    if name not in TRAINERS:
        raise ConfigError(f"{where}: --trainer {hint!r} is not a TRL trainer jaxalign runs; choose one of "
                          f"{', '.join(known)}.")
    return name


def _number(value: Any) -> Any:
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", value.strip()):
        return float(value)
    return value


def _key_rows(r: Recipe, key: str, value: Any) -> list[Row]:
    if key in HANDLERS:
        try:
            return HANDLERS[key](r, key, value)
        except (TypeError, ValueError):  # e.g. learning_rate: null
            return [refuse(key, value, "not a value jaxalign can use here")]
    if key in AT_DEFAULT_ONLY:
        allowed, why = AT_DEFAULT_ONLY[key]
        number = _number(value)  # YAML reads 1e-8 (no dot) as a string
        if any(number == a and type(number) is type(a) or value is a for a in allowed):
            return [not_applicable(key, value, "as jaxalign does")]
        return [refuse(key, value, why, *(k.format(s=r.section) for k in AT_DEFAULT_LIFTED_BY.get(key, ())))]
    if key in NOT_APPLICABLE:
        return [not_applicable(key, value, NOT_APPLICABLE[key])]
    if value is None:  # TRL's "not set" (key=null on the command line clears a recipe's key)
        return [not_applicable(key, value, "not set")]
    if key in REFUSED:
        return [refuse(key, value, REFUSED[key])]
    close = difflib.get_close_matches(key, trl_names(), n=2, cutoff=0.75)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return [refuse(key, value, f"not a TRL / handbook name jaxalign knows{hint}")]


def _method_rows(r: Recipe) -> list[Row]:
    """What the trainer itself implies: the method, where the pairs come from, whether an SFT phase runs."""
    t, k = r.trainer, r.keys
    method = TRAINERS[t][0]
    rows = [Row("(trainer)", t, "run.method", method)]
    if t == "sft":
        rows.append(Row("(trainer)", t, "sft.enabled", True))
        if "assistant_only_loss" not in k and "completion_only_loss" not in k:
            rows.append(Row("assistant_only_loss", False, status="differs",
                            note="TRL's default puts a conversation's user turns in the loss too; jaxalign's SFT "
                                 "trains the assistant turns only"))
    elif t == "reward":
        rows += [Row("(trainer)", t, "sft.enabled", False,
                     note="the given model is the starting point: a fresh score head on its backbone, as TRL (go "
                          "on from a sequence-classification checkpoint with model.reward_path)"),
                 Row("(trainer)", t, "data.completion_end", "template",
                     note="TRL 1.x scores everything the chat template renders, the text after the end-of-turn "
                          "token too; the reward is read at the last token")]
        if k.get("use_peft") and k.get("lora_task_type") is None and not head_trains_in_peft(r):
            rows.append(Row("lora_task_type", None, status="differs",
                            note="TRL's default CAUSAL_LM leaves the score head frozen under PEFT (its "
                                 "reward_modeling.py example passes SEQ_CLS); jaxalign trains the head with the "
                                 "adapters, as SEQ_CLS"))
    else:
        rows.append(Row("(trainer)", t, "sft.enabled", False, note="the given model is the starting point"))
    if t in ("dpo", "cpo"):
        rows.append(Row("(trainer)", t, "policy.pairs", "dataset"))
    if t in ("grpo", "rloo"):
        rows += [Row("(trainer)", t, "policy.kind", t), Row("(trainer)", t, "run.rounds", 1),
                 Row("(trainer)", t, "run.phases", "policy,eval"),
                 Row("(trainer)", t, "policy.reward", "gold",
                     note="TRL's reward functions are Python; name jaxalign's scorer with data.gold_metric")]
    length = k.get("max_length", k.get("max_seq_length"))
    if ("max_prompt_length" not in k or t == "reward") and isinstance(length, int) and length >= 2 and \
            t in ("sft", "dpo", "cpo", "reward"):
        rows.append(Row("max_prompt_length", None, "data.max_prompt_length", length - 1, "default",
                        "TRL 1.x has no prompt limit: a prompt may fill max_length"))
    completion = k.get("max_completion_length")
    if t in ("grpo", "rloo") and isinstance(completion, int):  # a rollout is prompt + completion tokens
        prompt = k.get("max_prompt_length", 512)
        rows.append(Row("max_completion_length", completion, "data.max_length", prompt + completion, "default",
                        "max_prompt_length + max_completion_length" + ("" if "max_prompt_length" in k else
                        "; TRL 1.x GRPO does not cut prompts, jaxalign keeps their last 512 tokens")))
    return rows


def translate(r: Recipe) -> list[Row]:
    """Every row of the mapping table, in the recipe's order, then TRL's defaults for what it leaves out."""
    keys = dict(r.keys)
    defaults = {}
    if r.defaults:
        for key, value in TRL_DEFAULTS[r.trainer].items():
            if key not in keys and not any(a in keys for a in DEFAULT_ALIASES.get(key, ())):
                defaults[key] = value
        if "torch_dtype" in keys or "dtype" in keys:
            defaults.pop("dtype", None)
    full = dataclasses.replace(r, keys={**keys, **defaults})
    rows: list[Row] = []
    data_done = False
    for key in [*keys, *defaults]:
        if key in DATASET_KEYS:
            if not data_done:
                rows += dataset_rows(full)
                data_done = True
            continue
        new = _key_rows(full, key, full.keys[key])
        rows += [dataclasses.replace(x, status="default") if key in defaults and x.status == "mapped" else x
                 for x in new]
    if r.defaults:
        if not data_done:
            rows += dataset_rows(full)
        rows += _method_rows(full)
    out = []
    for x in rows:
        if x.our_key in r.given and x.status in DONE:
            x = dataclasses.replace(x, status="replaced", note=f"{x.our_key} is set explicitly")
        elif x.status == "refused" and set(x.lifted_by) & r.given:
            x = dataclasses.replace(x, status="replaced", note=f"{', '.join(sorted(set(x.lifted_by) & r.given))} "
                                                                f"is set explicitly")
        out.append(x)
    return out


def _show(value: Any, width: int = 34) -> str:
    text = value if isinstance(value, str) and value else json.dumps(value, default=str)
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[: width - 3] + "..."


def table(rows: list[Row]) -> str:
    """The mapping as a text table: TRL key, its value, the jaxalign key, its value, and what happened."""
    lines = [("TRL / handbook key", "value", "jaxalign key", "value", "")]
    last = None
    for x in rows:
        first = x.trl_key != last
        last = x.trl_key
        what = x.status if x.status != "mapped" else ""
        lines.append((x.trl_key if first else "", _show(x.trl_value) if first else "", x.our_key,
                      _show(x.our_value) if x.our_key else "", f"{what}: {x.note}" if what and x.note else
                      what or x.note))
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    out = ["  ".join(c.ljust(w) for c, w in zip(line[:4], widths)) + "  " + line[4] for line in lines]
    out.insert(1, "-" * min(len(max(out, key=len)), 160))
    return "\n".join(line.rstrip() for line in out)


@dataclasses.dataclass
class Translation:
    """A TRL recipe (or TRL names on the command line) mapped: ``sections`` the file's own jaxalign sections,
    ``ours`` the remaining jaxalign ``key=value`` overrides, ``rows`` the table."""

    sections: dict[str, Any]
    ours: list[tuple[str, Any, str]]
    rows: list[Row]
    trainer: str
    where: str

    def assignments(self) -> list[tuple[str, Any]]:
        return [(x.our_key, x.our_value) for x in self.rows if x.our_key and x.status in DONE]

    def table(self) -> str:
        return f"# TRL names -> jaxalign ({self.trainer.upper()} trainer)\n" + table(self.rows)

    def check(self) -> None:
        """ConfigError (one paragraph) naming every refused key, why, and what would replace it."""
        bad = [x for x in self.rows if x.status == "refused"]
        if not bad:
            return
        items = " ".join(f"({i}) {x.trl_key}={_show(x.trl_value, 60)}: {x.note}"
                         + (f", or set {' / '.join(x.lifted_by)}" if x.lifted_by else "") + ";"
                         for i, x in enumerate(bad, 1))
        raise ConfigError(f"{self.where}: the TRL recipe asks for what jaxalign cannot do: {items[:-1]}. Remove or "
                          f"change these keys (TRL names work on the command line too, e.g. load_in_4bit=false), or set the "
                          f"jaxalign key named to replace them; the table above shows the whole mapping "
                          f"(docs/trl_users.md).")


def _flatten(tree: dict[str, Any], prefix: str = "") -> set[str]:
    out = set()
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flatten(value, f"{prefix}{key}.")
        out.add(prefix + key)
    return out


def _hint(ours: list[tuple[str, Any, str]], trainer: str) -> str:
    """--trainer, else run.method=sft|dpo|reward or policy.kind=grpo|rloo on the command line."""
    given = {k: v for k, v, _ in ours}
    if trainer:
        return trainer
    if given.get("policy.kind") in ("grpo", "rloo"):
        return given["policy.kind"]
    return {"sft": "sft", "dpo": "dpo", "reward": "reward"}.get(given.get("run.method"), "")


def map_recipe(raw: dict[str, Any], items: list[tuple[str, Any, str]], *, path: Path, trainer: str = "",
               sections: tuple[str, ...]) -> Translation | None:
    """The translation of a TRL recipe, or of TRL names among the overrides ``items`` (key, value, text); None
    when neither is there. ``sections``: jaxalign's top-level section names."""
    names = set(trl_names())
    flat = {k: v for k, v in raw.items() if k not in sections}
    is_recipe = any(k in names for k in flat)
    # TRL names on the command line, and any of a TRL recipe's own keys (key=null clears one the map refuses)
    trl_items = {k: v for k, v, _ in items if "." not in k and (k in names or is_recipe and k in flat)}
    ours = [item for item in items if item[0] not in trl_items]
    own = {k: v for k, v in raw.items() if k in sections} if is_recipe else raw
    where = str(path) + (" + command line" if items else "")
    if not is_recipe and not trl_items:
        if trainer:
            raise ConfigError(f"{path}: --trainer names the TRL trainer of a TRL recipe; this is a jaxalign recipe.")
        return None
    # what the user sets in jaxalign's own names: a TRL recipe's sections and the command line (a jaxalign recipe's own
    # values are what TRL names on the command line change)
    given = frozenset((_flatten(own) if is_recipe else set()) | {k for k, _, _ in ours})
    if is_recipe:
        name = detect_trainer({**flat, **trl_items}, path, _hint(ours, trainer))
        keys = {**flat, **trl_items}
    else:  # TRL names on the command line of a jaxalign recipe: the recipe's method says which trainer's names
        run, policy = own.get("run") or {}, own.get("policy") or {}
        method = dict((k, v) for k, v, _ in ours).get("run.method", run.get("method", "irl"))
        kind = dict((k, v) for k, v, _ in ours).get("policy.kind", policy.get("kind", "pairs"))
        name = trainer or (method if method in ("sft", "reward") else kind if kind in ("grpo", "rloo") else "dpo")
        keys = dict(trl_items)
    recipe = Recipe(keys, name, given, frozenset(trl_items), defaults=is_recipe)
    return Translation(own, ours, translate(recipe), name, where)
