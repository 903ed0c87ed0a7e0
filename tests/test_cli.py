"""The command line (jaxalign/cli.py): --help documents every config key from the schema, --list-configs every recipe,
the launcher script and ``python -m jaxalign.cli`` are the same program, and a built wheel carries the recipes and the
``jaxalign`` console script."""
from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import typing
import zipfile
from pathlib import Path

import pytest

from jaxalign import cli
from jaxalign import config as config_lib

REPO = Path(__file__).resolve().parents[1]


def _env(**extra) -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO), **extra}


def _help_text(capsys) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def _schema_comments() -> dict[str, str]:
    """key -> trailing comment, read independently of cli.field_comments: the config module's syntax tree gives each
    field's line, the source text the comment after it."""
    source = Path(config_lib.__file__).read_text()
    lines = source.splitlines()
    by_class: dict[str, dict[str, str]] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef):
            by_class[node.name] = {}
            for base in node.bases:  # inherited fields (Reward(Train))
                if isinstance(base, ast.Name) and base.id in by_class:
                    by_class[node.name].update(by_class[base.id])
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    line = lines[stmt.end_lineno - 1]
                    m = re.search(r"\)?\s+#\s*(.+)$", line[stmt.end_col_offset:])
                    if m:
                        by_class[node.name][stmt.target.id] = m.group(1).strip()
    out = {}
    for key in config_lib.valid_keys():
        cls = config_lib.Config
        *sections, name = key.split(".")
        for part in sections:
            cls = typing.get_type_hints(cls)[part]
        if name in by_class.get(cls.__name__, {}):
            out[key] = by_class[cls.__name__][name]
    return out


def test_help_lists_every_key_with_type_default_and_meaning(capsys):
    text = _help_text(capsys)
    rows = {}
    for line in text.split("config keys (set any as key=value):", 1)[1].splitlines():
        parts = line.split()
        if parts:
            rows[parts[0]] = line
    keys = config_lib.valid_keys()
    assert sorted(rows) == sorted(keys)
    defaults = config_lib.to_dict(config_lib.Config())
    for key in keys:
        value = defaults
        for part in key.split("."):
            value = value[part]
        # "<type> = <default>": the annotation may be generic (tuple[str, ...]) where the value's type is plain
        assert re.search(rf"^\s*{re.escape(key)}\s+{type(value).__name__}\S* = {re.escape(repr(value))}(\s|$)",
                         rows[key]), rows[key]
    comments = _schema_comments()
    assert len(comments) > 20  # the parser above found the schema's comments
    for key, comment in comments.items():
        assert rows[key].rstrip().endswith(comment), (key, rows[key], comment)


def test_field_comments_follow_new_fields_and_blocks_above(tmp_path):
    """A new dataclass gets its meanings without any registration: trailing comments, a comment block right above a
    field, inherited fields; a field with no comment (or one separated by a blank line) has none."""
    import importlib.util
    import textwrap

    src = textwrap.dedent('''
        import dataclasses


        @dataclasses.dataclass
        class Base:
            alpha: int = 1  # the first one
            # described above,
            # over two lines
            beta: str = "x"


        @dataclasses.dataclass
        class Child(Base):
            """A docstring is not a comment."""

            gamma: float = 0.5
            # orphan comment

            delta: bool = True  # last
    ''')
    path = tmp_path / "_cli_schema_probe.py"
    path.write_text(src)
    try:
        spec = importlib.util.spec_from_file_location("_cli_schema_probe", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["_cli_schema_probe"] = module
        spec.loader.exec_module(module)
        assert cli.field_comments(module.Child) == {"alpha": "the first one", "beta": "described above, over two lines",
                                                    "delta": "last"}
    finally:
        sys.modules.pop("_cli_schema_probe", None)


def test_list_configs_lists_every_recipe_with_its_first_comment(capsys):
    assert cli.main(["--list-configs"]) == 0
    out = capsys.readouterr().out
    files = sorted(config_lib.CONFIG_DIR.glob("*.yaml"))
    assert files and config_lib.CONFIG_DIR == REPO / "configs"
    listed = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert sorted(listed) == [p.stem for p in files]
    for p in files:
        first = next(line for line in p.read_text().splitlines() if line.startswith("#"))
        assert listed[p.stem].endswith(first.lstrip("#").strip())


def test_launcher_script_and_module_are_the_same_program(tmp_path):
    """``python launch/tpu_run.py`` and ``python -m jaxalign.cli`` print the same recipes and fail a bad key the same
    way: exit 2, one ``jaxalign: error:`` paragraph naming the closest key."""
    runs = [[sys.executable, str(REPO / "launch" / "tpu_run.py")], [sys.executable, "-m", "jaxalign.cli"]]
    listed = []
    for cmd in runs:
        p = subprocess.run(cmd + ["--list-configs"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 0, p.stderr
        listed.append(p.stdout)
    assert listed[0] == listed[1] and "demo_cpu" in listed[0]
    # the launcher's bad-input path is tested in test_pipeline.py; here the module's exit status reaches the shell
    p = subprocess.run(runs[1] + ["--config", "demo_cpu", "policy.learnig_rate=1"], cwd=tmp_path, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().startswith("jaxalign: error: ") and "policy.learning_rate" in p.stderr


def test_distributed_on_without_its_variables_is_bad_input(capsys, monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    code = cli.main(["--config", "demo_cpu", "--distributed", "on", "--workdir", "/nonexistent/never-created"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("jaxalign: error: --distributed on needs JAX_COORDINATOR_ADDRESS") and err.count("\n") == 1
    assert not Path("/nonexistent/never-created").exists()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of what the wheel is made of, so the build leaves no build/ or egg-info in the checkout."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("jaxalign", "configs"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                        str(src)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    (whl,) = out.glob("jaxalign-*.whl")
    return whl


def test_wheel_carries_the_recipes_and_the_console_script(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        entry_points = z.read(entry).decode()
    for p in (REPO / "configs").rglob("*"):
        if p.is_file():
            assert f"jaxalign/configs/{p.relative_to(REPO / 'configs').as_posix()}" in names, p
    assert re.search(r"^\[console_scripts\]\s*\njaxalign = jaxalign\.cli:main\s*$", entry_points, re.M), entry_points
    # every module of the source tree is in the wheel
    assert {f"jaxalign/{p.relative_to(REPO / 'jaxalign').as_posix()}" for p in (REPO / "jaxalign").rglob("*.py")} \
        <= names


def test_installed_wheel_finds_its_packaged_recipes(wheel, tmp_path):
    """A non-editable install (pip --target: the wheel's files and its console script, no source checkout anywhere on
    the path) resolves recipes from the packaged copy, and the ``jaxalign`` script runs."""
    target = tmp_path / "site"
    p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target",
                        str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    env = _env(PYTHONPATH=str(target))
    code = ("import jaxalign.config as c; p = c.resolve_config_path('demo_cpu'); print(c.__file__); print(p); "
            "print(c.load('demo_cpu').run.name)")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    module, recipe, name = p.stdout.split()
    assert Path(module) == target / "jaxalign" / "config.py"
    assert Path(recipe) == target / "jaxalign" / "configs" / "demo_cpu.yaml"
    assert Path(recipe).read_text() == (REPO / "configs" / "demo_cpu.yaml").read_text()
    assert name == config_lib.load("demo_cpu").run.name
    script = target / "bin" / "jaxalign"
    p = subprocess.run([sys.executable, str(script), "--list-configs"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[0] == f"recipes in {target / 'jaxalign' / 'configs'}:"
    assert sorted(line.split()[0] for line in p.stdout.splitlines()[1:]) == \
        sorted(x.stem for x in (REPO / "configs").glob("*.yaml"))


def test_main_reads_sys_argv_when_called_without_arguments(monkeypatch, capsys):
    """The console script calls main() with no argument: it must parse sys.argv[1:]."""
    monkeypatch.setattr(sys, "argv", ["jaxalign", "--list-configs"])
    assert cli.main() == 0
    assert "demo_cpu" in capsys.readouterr().out



def test_overrides_and_options_in_any_order():
    args = cli.parse_args(["--config", "demo_cpu", "run.rounds=1", "--workdir", "w", "sft.max_steps=2", "--force"])
    assert (args.config, args.workdir, args.force) == ("demo_cpu", "w", True)
    assert args.overrides == ["run.rounds=1", "sft.max_steps=2"]
