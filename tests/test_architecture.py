"""Structure rules for the ``jaxalign`` package, read from the source with ``ast`` (nothing is imported):

- no module imports another module's ``_private`` name (``from jaxalign.x import _y`` or ``jaxalign.x._y``): a name
  needed elsewhere is public;
- no import cycle between jaxalign modules (imports inside functions count: a lazy import only hides a cycle);
- no module much past 400 lines;
- only ``jaxalign.train`` constructs a ``PhaseCheckpointer`` or a ``MetricsWriter`` (a call of the class, by its name,
  an alias of it or ``module.Name``): a phase that opened its own would resume, stop and log by rules of its own, as
  the on-policy phase once did, logging nothing to wandb whatever ``run.trackers`` said.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "jaxalign"
MAX_LINES = 420


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(module: str, name: str | None) -> str | None:
    """The jaxalign module an import refers to: ``from pkg import sub`` names the submodule when one exists."""
    if name and f"{module}.{name}" in MODULES:
        return f"{module}.{name}"
    return module if module in MODULES else None


def _imports(name: str) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every jaxalign import in module ``name``."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base == "jaxalign" or base.startswith("jaxalign."):
                out += [(base, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.Import):
            out += [(alias.name, None, node.lineno) for alias in node.names if alias.name.startswith("jaxalign")]
    return out


def _attribute_privates(name: str) -> list[tuple[str, int]]:
    """``alias._x`` where ``alias`` names a jaxalign module imported into ``name``."""
    tree = ast.parse(MODULES[name].read_text())
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxalign"):
            for a in node.names:
                target = _resolve(node.module, a.name)
                if target is not None and target == f"{node.module}.{a.name}":
                    aliases[a.asname or a.name] = target
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("jaxalign") and a.asname:
                    aliases[a.asname] = a.name
    hits = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            hits.append((f"{aliases[node.value.id]}.{node.attr}", node.lineno))
    return hits


def private_imports() -> list[str]:
    found = []
    for name in MODULES:
        for module, imported, line in _imports(name):
            if imported and imported.startswith("_") and not imported.startswith("__") and module != name:
                found.append(f"{name}:{line} imports {module}.{imported}")
        found += [f"{name}:{line} uses {target}" for target, line in _attribute_privates(name)]
    return found


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name in MODULES:
        for module, imported, _ in _imports(name):
            target = _resolve(module, imported)
            if target and target != name:
                graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


ENGINE = "jaxalign.train"
ENGINE_ONLY = ("PhaseCheckpointer", "MetricsWriter")


def engine_constructions() -> list[str]:
    """Calls of an ENGINE_ONLY class in a module outside ENGINE."""
    found = []
    for name, path in MODULES.items():
        if name == ENGINE or name.startswith(ENGINE + "."):
            continue
        tree = ast.parse(path.read_text())
        aliases = {a.asname or a.name: a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                   for a in node.names if a.name in ENGINE_ONLY}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            called = (aliases.get(func.id, func.id) if isinstance(func, ast.Name) else
                      func.attr if isinstance(func, ast.Attribute) else None)
            if called in ENGINE_ONLY:
                found.append(f"{name}:{node.lineno} constructs {called}")
    return found


RULES = "jaxalign.rules"  # the one light module that decides sample counts and batch splits


def _mentions(node: ast.AST, attr: str) -> bool:
    return any(isinstance(n, ast.Attribute) and n.attr == attr for n in ast.walk(node))


def rule_rederivations() -> list[str]:
    """Places outside jaxalign.rules that decide a rule it owns: a conditional sample count (``x.num_samples if ...``)
    or a batch-divisibility test (``batch_size % ...``)."""
    found = []
    for name, path in MODULES.items():
        if name == RULES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.IfExp) and _mentions(node.body, "num_samples")
                    and isinstance(node.orelse, ast.Constant) and node.orelse.value == 1):  # "N if ... else 1"
                found.append(f"{name}:{node.lineno} decides a sample count")
            if (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod)
                    and (_mentions(node.left, "batch_size") or
                         (isinstance(node.left, ast.BinOp) and _mentions(node.left, "batch_size")))):
                found.append(f"{name}:{node.lineno} decides a batch split")
    return found


def test_rules_are_decided_once_in_a_light_module():
    assert rule_rederivations() == []
    heavy = [target for target, _, _ in _imports(RULES) if target.split(".")[0] in ("jax", "transformers", "numpy",
                                                                                     "jaxalign")]
    assert heavy == []


def test_no_module_imports_a_private_name():
    assert private_imports() == []


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_only_the_training_engine_opens_checkpoints_and_metrics():
    assert engine_constructions() == []


def test_no_module_past_the_size_limit():
    long = {name: n for name, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


# ---- the checks themselves catch what they are for -------------------------------------------------------------

def test_checks_catch_a_private_import_and_a_cycle(tmp_path, monkeypatch):
    pkg = tmp_path / "jaxalign"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from jaxalign.b import _hidden\n")
    (pkg / "b.py").write_text("def f():\n    from jaxalign import a\n    return a\n_hidden = 1\n")
    (pkg / "sub" / "c.py").write_text("import jaxalign.b as bb\nx = bb._hidden\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", pkg)
    monkeypatch.setattr(sys.modules[__name__], "MODULES", {_module_name(p): p for p in sorted(pkg.rglob("*.py"))})
    found = private_imports()
    assert any("jaxalign.a:1 imports jaxalign.b._hidden" in f for f in found)
    assert any("jaxalign.sub.c:2 uses jaxalign.b._hidden" in f for f in found)
    assert cycles(import_graph()) == [["jaxalign.a", "jaxalign.b"]]


def test_check_catches_a_checkpointer_or_writer_built_outside_train(tmp_path, monkeypatch):
    pkg = tmp_path / "jaxalign"
    for sub in ("pipeline", "train"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "pipeline" / "own_loop.py").write_text(
        "from jaxalign import checkpoint as ck\n"
        "from jaxalign.metrics import MetricsWriter as Writer\n"
        "def run(d):\n"
        "    c = ck.PhaseCheckpointer(d / 'checkpoints')\n"
        "    return c, Writer(d / 'tb', total_steps=1, desc='x')\n")
    (pkg / "pipeline" / "phase.py").write_text(  # names the classes, constructs neither
        "from jaxalign.checkpoint import PhaseCheckpointer\n"
        "from jaxalign.metrics import MetricsWriter, read_metrics\n"
        "from jaxalign.train.run import train\n"
        "def run(d, w: MetricsWriter) -> PhaseCheckpointer:\n"
        "    isinstance(w, MetricsWriter)\n"
        "    return train(d), read_metrics(d)\n")
    (pkg / "train" / "run.py").write_text(
        "from jaxalign.checkpoint import PhaseCheckpointer\n"
        "from jaxalign.metrics import MetricsWriter\n"
        "def train(d):\n"
        "    return PhaseCheckpointer(d), MetricsWriter(d, total_steps=1, desc='x')\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", pkg)
    monkeypatch.setattr(sys.modules[__name__], "MODULES", {_module_name(p): p for p in sorted(pkg.rglob("*.py"))})
    assert engine_constructions() == ["jaxalign.pipeline.own_loop:4 constructs PhaseCheckpointer",
                                      "jaxalign.pipeline.own_loop:5 constructs MetricsWriter"]


def test_check_catches_a_rule_decided_outside_rules(tmp_path, monkeypatch):
    pkg = tmp_path / "jaxalign"
    (pkg / "plan").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "plan" / "__init__.py").write_text("")
    (pkg / "rules.py").write_text("def n(cfg):\n    return cfg.policy.num_samples if cfg.x else 1\n")
    (pkg / "plan" / "sampling.py").write_text(
        "def n(cfg):\n"
        "    return cfg.policy.num_samples if cfg.policy.pairs == 'best_of_n' else 1\n"
        "def ok(p, shards):\n"
        "    return (p.batch_size // p.accum_steps) % shards == 0\n"
        "def fine(cfg):\n"
        "    return cfg.policy.num_samples\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", pkg)
    monkeypatch.setattr(sys.modules[__name__], "MODULES", {_module_name(p): p for p in sorted(pkg.rglob("*.py"))})
    assert rule_rederivations() == ["jaxalign.plan.sampling:2 decides a sample count",
                                    "jaxalign.plan.sampling:4 decides a batch split"]


@pytest.mark.parametrize("graph, expected", [
    ({"x": {"y"}, "y": {"z"}, "z": set()}, []),
    ({"x": {"y"}, "y": {"z"}, "z": {"x"}}, [["x", "y", "z"]]),
])
def test_cycle_finder(graph, expected):
    assert cycles(graph) == expected
