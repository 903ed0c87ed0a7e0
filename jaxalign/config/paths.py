"""Where recipes live and how one is read: a name in configs/ or a YAML path -> the raw mapping."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import yaml

from jaxalign.config.checks import ConfigError


def _config_dir() -> Path:
    """The recipes: the top-level configs/ of a source checkout (tests, editable installs, launch/tpu_run.py), else the
    copy an installed wheel carries as the package jaxalign.configs (pyproject.toml maps configs/ there)."""
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "configs").is_dir():
        return checkout / "configs"
    try:  # configs/ has no __init__.py: a namespace package, whose folder is its search location
        spec = importlib.util.find_spec("jaxalign.configs")
    except ImportError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return checkout / "configs"  # neither: resolve_config_path's error names this folder


CONFIG_DIR = _config_dir()


def resolve_config_path(name: str) -> Path:
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    for cand in (CONFIG_DIR / f"{name}.yaml", CONFIG_DIR / name):
        if cand.is_file():
            return cand
    available = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config {name!r} not found: neither a YAML file nor a name in {CONFIG_DIR}. "
                      f"Available: {', '.join(available)}.")


def read_recipe(path: Path) -> dict[str, Any]:
    """The recipe file's top-level mapping (our sections, or a TRL / alignment-handbook recipe's flat keys)."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except Exception as e:  # YAMLError, and ValueError / TypeError from YAML's constructors (e.g. a date 2024-13-45)
        raise ConfigError(f"{path}: not valid YAML ({type(e).__name__}: {e}).") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (run:, model:, ...).")
    return raw


def parse_override(item: str) -> tuple[str, Any, str]:
    """``key=value`` -> (key, the value read as YAML, the text as typed)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value (e.g. policy.learning_rate=5e-7).")
    key, _, text = item.partition("=")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except Exception:  # not YAML (or a YAML constructor failed, e.g. "2024-13-45"): the text as typed
        value = text
    return key.strip(), value, text
