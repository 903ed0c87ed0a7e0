"""Building a config: a recipe (ours, or a TRL / alignment-handbook file mapped by :mod:`jaxalign.trl_recipes`) plus
``key=value`` overrides -> the typed :class:`~jaxalign.config.schema.Config`, every value parsed as YAML, checked
against its field's type and remembered with where it came from; then :func:`~jaxalign.config.checks.validate`.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import typing
from typing import Any, Callable

import yaml

from jaxalign.config.checks import ConfigError, validate
from jaxalign.config.paths import parse_override, read_recipe, resolve_config_path
from jaxalign.config.schema import Config
from jaxalign.trl_recipes.names import trl_names
from jaxalign.trl_recipes.recipe import DONE as TRL_SET, map_recipe

def _fields(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def valid_keys(cls=Config, prefix: str = "") -> list[str]:
    out = []
    for name, tp in _fields(cls).items():
        if dataclasses.is_dataclass(tp):
            out += valid_keys(tp, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def _unknown(key: str, where: str) -> ConfigError:
    """An unknown key: the five closest names (ours and the TRL names the recipe map knows) and where to look."""
    scored = []
    matcher = difflib.SequenceMatcher(b=key)
    for name in valid_keys() + list(trl_names()):
        matcher.set_seq1(name)
        scored.append((matcher.ratio(), name))
    scored.sort(key=lambda x: -x[0])
    best = scored[0][0] if scored else 0.0
    # at most five, and only those nearly as close as the closest (policy.learnig_rate: not policy.warmup_ratio)
    close = [name for score, name in scored[:5] if score >= max(0.6, best - 0.25)]
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"{where}: unknown config key {key!r}.{hint} `jaxalign --help` lists every key with its type, "
                       f"default and meaning; TRL / alignment-handbook names are mapped as docs/trl_users.md shows.")


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    ok = {bool: isinstance(value, bool), int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool), str: isinstance(value, str)}
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if tp is str and value is None:
        return ""
    if tp is list and isinstance(value, str):  # model.lora.targets=q,v on the command line
        return [v.strip() for v in value.split(",") if v.strip()]
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "5e-7" (no dot) as a string; users write it that way on the command line
            return float(value)
        except ValueError:
            pass
    if not ok.get(tp, True):
        raise ConfigError(f"{where}: {key}={value!r} should be of type {tp.__name__}.")
    if tp is float:
        try:
            return float(value)
        except OverflowError:  # an integer past float range
            raise ConfigError(f"{where}: {key}={value!r} is too large for a float.") from None
    return value


def _build(cls, raw: dict[str, Any], prefix: str, where: str, origins: dict[str, str] | None = None):
    """The dataclass tree from the raw mapping; a value of the wrong type is reported with where that key was set
    (``origins``: dotted key -> the YAML file or the command line), else with ``where``."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: section {prefix.rstrip('.') or '(top)'} must be a mapping, got {raw!r}.")
    fields = _fields(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise _unknown(prefix + key, where)
        tp = fields[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, f"{prefix}{key}.", (origins or {}).get(prefix + key, where),
                                 origins)
        else:
            kwargs[key] = _coerce(value, tp, prefix + key, (origins or {}).get(prefix + key, where))
    return cls(**kwargs)


def _dotted(raw: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys of a nested mapping (sections and their keys)."""
    out = []
    for key, value in raw.items():
        out.append(prefix + str(key))
        if isinstance(value, dict):
            out += _dotted(value, f"{prefix}{key}.")
    return out


def _set(raw: dict, dotted: str, value: Any, where: str, text: str | None = None) -> None:
    """Set ``dotted`` in the raw mapping. ``text`` is the command-line spelling: a string field keeps it as typed
    (``run.name=0.10`` stays "0.10", ``data.train.split=on`` stays "on") instead of YAML's number / bool / date."""
    parts = dotted.split(".")
    cls, node = Config, raw
    for part in parts[:-1]:
        fields = _fields(cls)
        if part not in fields or not dataclasses.is_dataclass(fields[part]):
            raise _unknown(dotted, where)
        cls = fields[part]
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    fields = _fields(cls)
    if parts[-1] not in fields:
        raise _unknown(dotted, where)
    if dataclasses.is_dataclass(fields[parts[-1]]):
        raise ConfigError(f"{where}: {dotted} is a section; set one of its keys, e.g. "
                          f"{dotted}.{next(iter(_fields(fields[parts[-1]])))}=...")
    if fields[parts[-1]] is str and text is not None and not isinstance(value, (str, list, dict, type(None))):
        value = text.strip()
    node[parts[-1]] = value


def load(name: str, overrides: list[str] | tuple[str, ...] = (), *, trainer: str = "",
         echo: Callable[[str], None] | None = None) -> Config:
    """Read a YAML recipe (a name in configs/ or a path) and apply ``key=value`` overrides. A TRL /
    alignment-handbook recipe (or TRL names among the overrides) goes through the name map first
    (:mod:`jaxalign.trl_recipes.recipe`): ``echo`` gets its table, refused keys raise ConfigError; ``trainer``
    names the TRL trainer where the recipe's path and keys do not."""
    path = resolve_config_path(name)
    raw = read_recipe(path)
    typed = items = [parse_override(item) for item in overrides]
    trl = map_recipe(raw, items, path=path, trainer=trainer, sections=tuple(_fields(Config)))
    if trl is not None:
        raw, items = trl.sections, trl.ours
    # where each key's value comes from, for the messages about a bad value: the file, the TRL map, the command line
    origins = {key: str(path) for key in _dotted(raw)}
    if trl is not None:
        trl_typed = {key for key, _, _ in typed} - {key for key, _, _ in items}  # TRL names on the command line
        for row in trl.rows:
            if row.our_key and row.status in TRL_SET:
                origins[row.our_key] = (f"TRL's default for {row.trl_key}, which {path} leaves out"
                                        if row.status == "default" else f"command line, as TRL's {row.trl_key}"
                                        if row.trl_key in trl_typed else f"{path}, as TRL's {row.trl_key}")
        for key, value in trl.assignments():
            _set(raw, key, value, origins.get(key, f"{path} (TRL name map)"))
        if echo is not None:
            echo(trl.table())
        trl.check()
    for key, value, text in items:
        _set(raw, key, value, "command line", text)
        origins[key] = "command line"
    cfg = _build(Config, raw, "", str(path), origins)
    known = set(valid_keys())

    def origin(key: str) -> str | None:
        """How a value problem says where the key was set (None: not a single key)."""
        label = origins.get(key)
        if label is None:
            return "the default" if key in known else None
        if label.startswith("TRL's default"):
            return label
        return f"from the {label}" if label.startswith("command line") else f"from {label}"

    validate(cfg, where=str(path) + (" + command line" if overrides else ""), origin=origin)
    return cfg


def from_dict(raw: dict[str, Any], where: str = "a config mapping") -> Config:
    """A config from its nested mapping (``to_dict``'s inverse; run.yaml read back), types checked, not validated."""
    return _build(Config, raw, "", where)


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def section_fingerprint(cfg: Config, *sections: str) -> str:
    """A stable hash of the given sections: a finished phase is bound to the settings that produced it."""
    d = to_dict(cfg)
    blob = json.dumps({s: d[s] for s in sections}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
