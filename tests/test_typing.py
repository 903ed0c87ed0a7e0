"""The typed public API of jaxalign.losses: mypy passes on it under the strict per-module flags of pyproject.toml's
[tool.mypy], and every public function carries parameter and return annotations (checked by inspection, so a new
unannotated function fails here even where mypy is not installed).
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
import subprocess
import sys
import typing
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import pytest

import jaxalign.losses as L

REPO = Path(__file__).resolve().parents[1]
LOSSES = REPO / "jaxalign" / "losses"
# Public functions in jaxalign.losses when this test was written; fewer means the walk below stopped finding them.
MIN_PUBLIC_FUNCTIONS = 28


def _mypy(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    # The cache goes to the test's tmp dir: nothing is written into the repository (.mypy_cache is not git-ignored).
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml"), "--cache-dir", str(cache), *args],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )


def test_mypy_passes_on_losses(tmp_path: Path) -> None:
    pytest.importorskip("mypy", reason="mypy is not installed (it is in the test extra: pip install -e '.[test]')")
    cache = tmp_path / "mypy_cache"
    proc = _mypy("jaxalign/losses", cache=cache)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"python -m mypy jaxalign/losses exited {proc.returncode}:\n{out}"
    n_files = len(list(LOSSES.glob("*.py")))
    assert f"no issues found in {n_files} source files" in out, out

    # Not vacuous: the strict flags do apply to jaxalign.losses. The same check with one function's annotations
    # removed (numerics.as_float32, through --shadow-file) must fail with no-untyped-def.
    source = (LOSSES / "numerics.py").read_text()
    typed = "def as_float32(*xs: ArrayLike) -> tuple[jax.Array, ...]:"
    assert typed in source, "update this test: as_float32's signature changed"
    shadow = tmp_path / "numerics_untyped.py"
    shadow.write_text(source.replace(typed, "def as_float32(*xs):"))
    proc = _mypy("--shadow-file", "jaxalign/losses/numerics.py", str(shadow), "jaxalign/losses", cache=cache)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "[no-untyped-def]" in out and "numerics.py" in out, out


def _losses_modules() -> list[ModuleType]:
    names = sorted(m.name for m in pkgutil.iter_modules(L.__path__, prefix="jaxalign.losses."))
    return [L] + [importlib.import_module(n) for n in names]


def _public_functions() -> dict[str, Callable[..., Any]]:
    """Every public function of jaxalign.losses: the functions and public methods defined (not merely imported) in
    each of its modules whose names have no leading underscore, and whatever the package's __all__ exports."""
    found: dict[str, Callable[..., Any]] = {}
    for module in _losses_modules():
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(obj):
                found[f"{module.__name__}.{name}"] = obj
            elif inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    if not attr.startswith("_") and inspect.isfunction(member):
                        found[f"{module.__name__}.{name}.{attr}"] = member
    for name in L.__all__:
        obj = getattr(L, name)
        if inspect.isfunction(obj):
            found.setdefault(f"{obj.__module__}.{name}", obj)
    return found


def test_every_public_function_is_fully_annotated() -> None:
    functions = _public_functions()
    missing = []
    for qualname, fn in sorted(functions.items()):
        # eval_str: the string annotations (from __future__ import annotations) must also resolve at runtime
        sig = inspect.signature(fn, eval_str=True)
        missing += [f"{qualname}: parameter {p.name!r}" for p in sig.parameters.values() if p.annotation is p.empty]
        if sig.return_annotation is sig.empty:
            missing.append(f"{qualname}: return type")
    assert not missing, "unannotated in jaxalign.losses:\n" + "\n".join(missing)
    assert len(functions) >= MIN_PUBLIC_FUNCTIONS, sorted(functions)
    exported = {getattr(L, n).__name__ for n in L.__all__ if inspect.isfunction(getattr(L, n))}
    assert exported <= {q.rsplit(".", 1)[-1] for q in functions}
    assert {"dpo_loss", "dil_loss", "grpo_loss", "get_objective", "token_logprobs", "capped_exp"} <= {
        q.rsplit(".", 1)[-1] for q in functions}


def test_public_dataclass_fields_are_annotated() -> None:
    classes = [obj for module in _losses_modules() for name, obj in vars(module).items()
               if not name.startswith("_") and inspect.isclass(obj) and obj.__module__ == module.__name__
               and dataclasses.is_dataclass(obj)]
    assert L.Objective in classes
    for cls in classes:
        hints = typing.get_type_hints(cls)  # resolves every field's annotation, or raises
        for field in dataclasses.fields(cls):
            # a bare `dict` / `list` says nothing about its contents (mypy's disallow_any_generics says the same)
            hint = hints[field.name]
            assert hint not in (dict, list, tuple, set), f"{cls.__name__}.{field.name}: {hint}"
