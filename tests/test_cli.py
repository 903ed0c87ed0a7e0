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
from jaxalign.config import schema as config_schema

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
    source = Path(config_schema.__file__).read_text()
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


def _help_keys(text: str) -> dict[str, tuple[str, str]]:
    """The config keys section of --help: key -> (its head line, its description joined from the lines below)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("config keys (set any as key=value"))
    while not lines[start].endswith(":"):  # the heading itself may wrap
        start += 1
    rows: dict[str, list[str]] = {}
    key = None
    for line in lines[start + 1:]:
        if line.startswith("  ") and not line.startswith("   "):
            key = line.split()[0]
            assert key not in rows, f"{key} listed twice"
            rows[key] = [line, ""]
        elif line.startswith("      ") and key is not None:
            rows[key][1] = (rows[key][1] + " " + line.strip()).strip()
        else:
            assert not line.strip(), f"unexpected line in the keys section: {line!r}"
    return {k: (head, desc) for k, (head, desc) in rows.items()}


@pytest.mark.parametrize("columns", [60, 80, 250])
def test_help_describes_every_key_within_the_terminal_width(capsys, monkeypatch, columns):
    """Every key of valid_keys() is listed once, in order, with a non-empty description; every help line (argparse's
    part, the description, the keys) fits the terminal width (COLUMNS, as shutil.get_terminal_size reads it)."""
    monkeypatch.setenv("COLUMNS", str(columns))
    text = _help_text(capsys)
    too_long = [line for line in text.splitlines() if len(line) > columns]
    assert not too_long, too_long
    rows = _help_keys(text)
    assert list(rows) == config_lib.valid_keys()
    assert not [key for key, (_, desc) in rows.items() if not desc], "keys without a description"
    assert not [key for key, (_, desc) in rows.items() if "----" in desc], "a section heading leaked into a key"


def test_help_gives_type_default_choices_and_units(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # no wrapping: one head line per key
    rows = _help_keys(_help_text(capsys))
    defaults = config_lib.to_dict(config_lib.Config())
    for key, (head, _) in rows.items():
        value = defaults
        for part in key.split("."):
            value = value[part]
        # "<type> = <default>": the annotation may be generic (tuple[str, ...]) where the value's type is plain
        assert re.fullmatch(rf"  {re.escape(key)}  {type(value).__name__}\S* = {re.escape(repr(value))}", head), head
    # the schema's comments are the descriptions (the trailing ones, read independently of cli.field_comments)
    comments = _schema_comments()
    assert len(comments) > 100
    for key, comment in comments.items():
        assert " ".join(comment.split()) in rows[key][1], (key, rows[key][1], comment)
    # the allowed values, from the same tables the config checks use
    from jaxalign.data.formats import FORMATS
    from jaxalign.losses import OBJECTIVES

    choices = cli.key_choices()
    assert set(choices["data.train.format"]) == {"auto", *FORMATS}
    assert set(choices["policy.objective"]) == set(OBJECTIVES)
    for section in ("sft", "reward", "policy"):
        assert choices[f"{section}.optimizer"] == ("adamw", "rmsprop", "sgd")
    for key, allowed in choices.items():
        for value in allowed:
            if value:
                assert re.search(rf"(?<![\w.]){re.escape(value)}(?!\w)", rows[key][1]), (key, value, rows[key][1])
    # units and special values
    for key, words in {"sft.save_every": ("optimizer steps",), "mesh.data": ("-1",), "mesh.fsdp": ("-1",),
                       "mesh.tensor": ("-1",), "data.max_length": ("tokens",), "policy.max_steps": ("0 =",),
                       "sample.top_k": ("0 = off",), "policy.beta": ("-1",), "sft.warmup_ratio": ("fraction",)
                       }.items():
        for word in words:
            assert word in rows[key][1], (key, word, rows[key][1])


def test_field_comments_follow_new_fields_and_blocks_above(tmp_path):
    """A new dataclass gets its meanings without any registration: trailing comments, a comment block right above a
    field, inherited fields; a field with no comment (or one separated by a blank line, or only a section heading
    ``# ---- x ----`` above it) has none, and a heading never joins the block under it."""
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
            # ---- a section heading ----
            epsilon: int = 0
            # ---- another heading ----
            # the block under a heading
            zeta: int = 0
    ''')
    path = tmp_path / "_cli_schema_probe.py"
    path.write_text(src)
    try:
        spec = importlib.util.spec_from_file_location("_cli_schema_probe", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["_cli_schema_probe"] = module
        spec.loader.exec_module(module)
        assert cli.field_comments(module.Child) == {"alpha": "the first one", "beta": "described above, over two lines",
                                                    "delta": "last", "zeta": "the block under a heading"}
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


def test_distributed_on_without_its_variables_is_bad_input(capsys, monkeypatch, tmp_path):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    code = cli.main(["--config", "demo_cpu", "--distributed", "on", "--workdir", str(tmp_path / "never-created")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("jaxalign: error: --distributed on needs JAX_COORDINATOR_ADDRESS") and err.count("\n") == 1
    assert not (tmp_path / "never-created").exists()


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
    assert Path(module) == target / "jaxalign" / "config" / "__init__.py"
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
    p = subprocess.run([sys.executable, str(script), "--version"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.startswith("jaxalign "), p.stdout + p.stderr
    # the typed losses API ships its PEP 561 marker
    assert (target / "jaxalign" / "py.typed").is_file()


def test_main_reads_sys_argv_when_called_without_arguments(monkeypatch, capsys):
    """The console script calls main() with no argument: it must parse sys.argv[1:]."""
    monkeypatch.setattr(sys, "argv", ["jaxalign", "--list-configs"])
    assert cli.main() == 0
    assert "demo_cpu" in capsys.readouterr().out



def test_overrides_and_options_in_any_order():
    args = cli.parse_args(["--config", "demo_cpu", "run.rounds=1", "--workdir", "w", "sft.max_steps=2", "--force"])
    assert (args.config, args.workdir, args.force) == ("demo_cpu", "w", True)
    assert args.overrides == ["run.rounds=1", "sft.max_steps=2"]


# ---- bad input: exit 2, one paragraph on stderr, nothing written -----------------------------------------------------

def _tree(root: Path) -> dict[str, tuple]:
    """Everything under ``root`` with its kind, size and modification time (a written or touched file shows)."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (p.is_dir(), st.st_size, st.st_mtime_ns, st.st_mode)
    return out


def _bad_input(capsys, root: Path, argv: list[str]) -> tuple[str, str]:
    """``cli.main(argv)`` must exit 2 with one ``jaxalign: error:`` paragraph (no traceback) on stderr and leave
    ``root`` (which holds the work directory, the recipe and the data) exactly as it was."""
    before = _tree(root)
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, err
    text = err.strip()
    assert text.startswith("jaxalign: error: ") and "\n" not in text, err  # one paragraph: one line
    assert "Traceback" not in err
    assert _tree(root) == before, "something was written"
    return out, text


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    """A tokenizer, a random-init model and data small enough to build in a second (the demo task's, shrunk)."""
    from jaxalign.tasks.demo import build_demo_assets

    return build_demo_assets(tmp_path_factory.mktemp("assets"), n_train=8, n_test=4, n_heldout=4, hidden_size=16,
                             intermediate_size=32, num_heads=2, num_kv_heads=1)


def _inputs(assets) -> list[str]:
    return ["run.demo_task=false", f"model.path={assets.model_dir}", f"model.tokenizer={assets.tokenizer_dir}",
            f"data.train.source={assets.train_file}", f"data.eval_prompts.source={assets.test_file}",
            f"data.eval_prefs.source={assets.heldout_prefs_file}"]


def test_bad_input_workdir_is_a_file(capsys, tmp_path):
    (tmp_path / "w").write_text("not a folder")
    _, err = _bad_input(capsys, tmp_path, ["--config", "demo_cpu", "--workdir", str(tmp_path / "w")])
    assert f"--workdir {tmp_path / 'w'} is a file, not a folder" in err
    _, err = _bad_input(capsys, tmp_path, ["--config", "demo_cpu", "--workdir", str(tmp_path / "w" / "run")])
    assert f"{tmp_path / 'w'} is a file" in err
    assert (tmp_path / "w").read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_bad_input_workdir_not_writable(capsys, tmp_path):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        _, err = _bad_input(capsys, tmp_path, ["--config", "demo_cpu", "--workdir", str(tmp_path / "ro")])
        assert "is not writable" in err
        _, err = _bad_input(capsys, tmp_path, ["--config", "demo_cpu", "--workdir", str(tmp_path / "ro" / "run")])
        assert f"cannot be created: {tmp_path / 'ro'} is not writable" in err
    finally:
        (tmp_path / "ro").chmod(0o755)


def test_bad_input_workdir_denied_by_the_permission_check(capsys, tmp_path, monkeypatch):
    """The same refusal where the test runs as root (which may write anywhere): the check asks os.access, answered
    here as for another user."""
    from jaxalign.pipeline import workdir as workdir_lib

    (tmp_path / "ro").mkdir()
    real_access = os.access
    monkeypatch.setattr(workdir_lib.os, "access", lambda p, mode: False if Path(p) == tmp_path / "ro"
                        else real_access(p, mode))
    _, err = _bad_input(capsys, tmp_path, ["--config", "demo_cpu", "--workdir", str(tmp_path / "ro")])
    assert f"--workdir {tmp_path / 'ro'} is not writable by this user" in err
    _, err = _bad_input(capsys, tmp_path, ["--config", "demo_cpu", "--workdir", str(tmp_path / "ro" / "a" / "b")])
    assert f"cannot be created: {tmp_path / 'ro'} is not writable" in err


def test_bad_input_empty_dataset(capsys, tmp_path, tiny_assets):
    (tmp_path / "empty.jsonl").write_text("")
    out, err = _bad_input(capsys, tmp_path, ["--config", "demo_cpu", "--workdir", str(tmp_path / "w"),
                                             *_inputs(tiny_assets), f"data.train.source={tmp_path / 'empty.jsonl'}"])
    assert f"{tmp_path / 'empty.jsonl'}' is empty (0 rows)" in err
    # the terminal gets a short summary, not the resolved config (that goes to run.yaml when the inputs check out)
    assert out.startswith("# resolved config") and len(out.splitlines()) <= 10, out
    for line in ("recipe    ", "method    irl", f"model     {tiny_assets.model_dir}",
                 f"data      {tmp_path / 'empty.jsonl'}", f"workdir   {tmp_path / 'w'}",
                 f"run.yaml  {tmp_path / 'w' / 'run.yaml'}"):
        assert f"\n  {line}" in out, (line, out)
    assert "reliability:" not in out and "learning_rate" not in out


def test_bad_input_missing_model(capsys, tmp_path, tiny_assets):
    _, err = _bad_input(capsys, tmp_path, ["--config", "demo_cpu", "--workdir", str(tmp_path / "w"),
                                           *_inputs(tiny_assets), f"model.path={tmp_path / 'no_model'}"])
    assert "no_model: model folder not found" in err


def test_bad_input_refused_trl_recipe_key(capsys, tmp_path):
    """A TRL recipe asking for what jaxalign cannot do (4-bit base weights) stops before anything is read; a key that
    only tunes PyTorch (use_liger_kernel) is listed as not applicable, never fatal."""
    recipe = tmp_path / "dpo_config.yaml"
    recipe.write_text("model_name_or_path: HuggingFaceH4/mistral-7b-sft-beta\n"
                      "dataset_name: HuggingFaceH4/ultrafeedback_binarized\n"
                      "learning_rate: 5.0e-7\nbeta: 0.01\nuse_liger_kernel: true\nload_in_4bit: true\n"
                      f"output_dir: {tmp_path / 'out'}\n")
    out, err = _bad_input(capsys, tmp_path, ["--config", str(recipe), "--workdir", str(tmp_path / "w")])
    assert "(1) load_in_4bit=true: jaxalign has no 4-bit base weights" in err and "(2)" not in err
    assert "use_liger_kernel" not in err and "use_liger_kernel" in out  # in the table, as n/a


def test_unknown_key_names_at_most_five_close_keys_and_points_to_help(capsys, tmp_path):
    _, err = _bad_input(capsys, tmp_path, ["--config", "demo_cpu", "--workdir", str(tmp_path / "w"),
                                           "policy.learnig_rate=1e-6"])
    m = re.search(r"Did you mean ([^?]+)\?", err)
    assert m, err
    suggested = m.group(1).split(", ")
    assert suggested[0] == "policy.learning_rate" and len(suggested) <= 5, suggested
    assert "jaxalign --help" in err and len(err) < 500  # not every key on one line
    assert sum(f" {key}," in err for key in config_lib.valid_keys()) <= 5
    _, err = _bad_input(capsys, tmp_path, ["--config", "demo_cpu", "lerning_rate=1e-6"])  # a TRL name is offered
    assert "Did you mean learning_rate" in err
    _, err = _bad_input(capsys, tmp_path, ["--config", "demo_cpu", "xyzzy=1"])  # nothing close: still where to look
    assert "Did you mean" not in err and "jaxalign --help" in err


def test_bad_value_names_where_it_was_set(capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("policy:\n  learning_rate: abc\n")
    _, err = _bad_input(capsys, tmp_path, ["--config", str(recipe)])
    assert err.startswith(f"jaxalign: error: {recipe}: policy.learning_rate='abc' should be of type float")
    _, err = _bad_input(capsys, tmp_path, ["--config", "demo_cpu", "policy.learning_rate=abc"])
    assert err.startswith("jaxalign: error: command line: policy.learning_rate='abc' should be of type float")
    # checked values: each problem says where its key was set; the command line wins over the file it overrides
    recipe.write_text("policy:\n  learning_rate: 0\nsample:\n  top_p: 0.5\n")
    _, err = _bad_input(capsys, tmp_path, ["--config", str(recipe), "sample.top_p=2"])
    assert f"policy.learning_rate=0.0: must be > 0.0 (from {recipe})" in err
    assert "sample.top_p=2.0: must be <= 1.0 (from the command line)" in err
    recipe.write_text("policy:\n  learning_rate: 1.0e-6\n")
    _, err = _bad_input(capsys, tmp_path, ["--config", str(recipe), "sample.top_p=0.5", "policy.num_samples=1"])
    assert "policy.num_samples=1: best-of-N pairs need at least 2 samples per prompt (from the command line)" in err


def test_bare_command_prints_the_usage_and_exits_2(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["jaxalign"])
    assert cli.main() == 2
    out, err = capsys.readouterr()
    assert not out and err.startswith("usage: jaxalign ") and "--config" in err
    assert "jaxalign: error: no recipe given" in err and "--list-configs" in err and "--help" in err


def test_no_pytorch_advice_from_transformers(tmp_path):
    """Where torch is not installed (hidden here by sys.modules), transformers' "PyTorch was not found" advice stays
    out of a run's output; the error is the only thing on stderr, and transformers' own warnings stay on."""
    env = {k: v for k, v in _env().items() if k not in ("TRANSFORMERS_VERBOSITY", "TRANSFORMERS_NO_ADVISORY_WARNINGS")}
    hide = "import sys; sys.modules['torch'] = None; "
    control = subprocess.run([sys.executable, "-c", hide + "import transformers"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
    assert "PyTorch was not found" in control.stderr  # the check below is meaningful
    code = (hide + "from jaxalign import cli; rc = cli.main(sys.argv[1:]); import transformers; "
            "print(transformers.logging.get_verbosity()); sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code, "--config", "ultrachat_dil", "--workdir", str(tmp_path / "w"),
                        f"model.path={tmp_path / 'no_model'}"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("jaxalign: error: ") and p.stderr.count("\n") == 1, p.stderr
    assert p.stdout.splitlines()[-1] == "30"  # logging.WARNING: transformers' other warnings are not hidden
    assert not (tmp_path / "w").exists()


def test_version(capsys):
    import jaxalign

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"jaxalign {jaxalign.__version__}"
