"""jaxalign's command line: run a recipe, or plan it for a TPU slice.

    jaxalign --config demo_cpu              # the CPU demo: a tiny model
    jaxalign --config ultrachat_dil k=v     # a recipe of configs/, overridden
    jaxalign --config ultrachat_dil --plan v5p:4x4x4    # memory plan, no TPU
    jaxalign --config trl_dpo.yaml          # a TRL / alignment-handbook file
    jaxalign --list-configs                 # the recipes that ship
    python launch/tpu_run.py ...            # the same, from a checkout

Exit codes: 0 done; 2 bad input (a one-paragraph message on stderr, nothing compiled, nothing written: the work
directory is neither created nor changed); 75 preempted (SIGTERM / SIGINT: the running phase saved a checkpoint —
re-run the same command to resume); 1 anything else.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import os
import re
import shutil
import sys
import textwrap
import tokenize
import typing

from jaxalign import __version__

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 75


# ---- the config keys for --help, read from the schema (jaxalign/config/schema.py) ------------------------------------

_DIVIDER = re.compile(r"^-{3,}.*-{3,}$")  # "# ---- on-policy kinds ... ----": a section heading, nobody's meaning


def field_comments(cls) -> dict[str, str]:
    """Each dataclass field's meaning as its source writes it: the trailing ``# comment`` on the field's line, else
    the comment block right above the field. Inherited fields come from their base class's source. A section heading
    comment (``# ---- name ----``) describes no field: it ends the block above like a blank line."""
    out: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):  # no source (a frozen install): keys still show type and default
            continue
        above: list[str] = []
        line_start = True  # the next NAME token begins a logical line
        field = None
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                text = tok.string.lstrip("#").strip()
                if _DIVIDER.match(text):
                    above = []
                elif field is not None:
                    out[field] = text
                elif line_start:
                    above.append(text)
            elif tok.type in (tokenize.NEWLINE, tokenize.NL):
                # a statement or a blank line ends the comment block that could describe the next field
                if field is None and (tok.type == tokenize.NEWLINE or not tok.line.strip()):
                    above = []
                field = None
                line_start = True
            elif tok.type in (tokenize.INDENT, tokenize.DEDENT):
                continue
            elif line_start:
                line_start = False
                # a field line at class-body level: "name: type = default" (col 4 in a top-level class)
                if tok.type == tokenize.NAME and tok.start[1] == 4 and tok.string in klass.__dataclass_fields__:
                    field = tok.string
                    if above:
                        out[field] = " ".join(above)
                above = []
    return out


def key_choices() -> dict[str, tuple]:
    """The allowed values of the keys that have a fixed set, from the tables the config checks use (so --help and
    the checks cannot disagree)."""
    from jaxalign.config import checks
    from jaxalign.data.formats import FORMATS
    from jaxalign.losses import OBJECTIVES, PAIR_RULES
    from jaxalign.models.lora import TARGETS as LORA_TARGETS

    out = {key: tuple(allowed) for key, allowed in checks.CHOICES.items() if "." in key}
    for section in ("sft", "reward", "policy"):
        out[f"{section}.optimizer"] = tuple(checks.CHOICES["optimizer"])
        out[f"{section}.schedule"] = tuple(checks.CHOICES["schedule"])
    for name in ("train", "eval_prompts", "eval_prefs"):
        out[f"data.{name}.format"] = ("auto",) + tuple(FORMATS)
    out["policy.objective"] = tuple(sorted(OBJECTIVES))
    out["policy.pair_rule"] = tuple(PAIR_RULES)
    out["model.lora.base_dtype"] = ("",) + tuple(checks.DTYPES)
    out["model.lora.targets"] = tuple(LORA_TARGETS)  # any non-empty subset
    return out


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _mentions(text: str, value: str) -> bool:
    return bool(re.search(rf"(?<![\w.]){re.escape(value)}(?!\w)", text))


def key_descriptions() -> list[tuple[str, str, str]]:
    """Every key of ``jaxalign.config.valid_keys()`` as (key, ``type = default``, meaning); the meaning is the
    schema's comment plus the allowed values where the comment does not already name them all."""
    from jaxalign import config as config_lib

    choices = key_choices()
    rows = []
    for key in config_lib.valid_keys():
        cls = config_lib.Config
        *sections, name = key.split(".")
        for part in sections:
            cls = typing.get_type_hints(cls)[part]
        f = {f.name: f for f in dataclasses.fields(cls)}[name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        meaning = field_comments(cls).get(name, "")
        allowed = choices.get(key)
        if allowed and not all(_mentions(meaning, a) for a in allowed if a):
            shown = " | ".join(repr(a) if a == "" else str(a) for a in allowed)
            meaning = f"{meaning.rstrip('.')}; one of: {shown}" if meaning else f"one of: {shown}"
        rows.append((key, f"{_type_name(typing.get_type_hints(cls)[name])} = {default!r}", meaning))
    return rows


def help_width() -> int:
    """The terminal's width, as argparse measures it (COLUMNS, else the terminal, else 80), less argparse's margin."""
    return max(shutil.get_terminal_size().columns - 2, 40)


def config_keys_help(width: int | None = None) -> str:
    """Every config key on its own line (``key  type = default``), its meaning below it, wrapped to ``width``."""
    width = width or help_width()
    out = []
    for key, typed, meaning in key_descriptions():
        out += textwrap.wrap(f"{key}  {typed}", width, initial_indent="  ", subsequent_indent="      ",
                             break_on_hyphens=False)
        out += textwrap.wrap(meaning, width, initial_indent="      ", subsequent_indent="      ",
                             break_on_hyphens=False)
    return "\n".join(out)


def list_configs() -> str:
    """Every recipe in the config directory with the first comment line of its YAML."""
    from jaxalign.config import CONFIG_DIR

    rows = []
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        first = next((line.lstrip("#").strip() for line in path.read_text().splitlines()
                      if line.startswith("#") and line.lstrip("#").strip()), "")
        rows.append((path.stem, first))
    width = max((len(r[0]) for r in rows), default=0)
    return f"recipes in {CONFIG_DIR}:\n" + "\n".join(f"  {n:<{width}}  {d}" for n, d in rows)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """The description wrapped to the terminal: prose paragraphs refilled, indented example lines kept as lines (a
    long one continues on the next line, indented further)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out: list[str] = []
        for block in re.split(r"\n\s*\n", text.strip("\n")):
            lines = block.splitlines()
            if all(line.startswith(" ") for line in lines):
                for line in lines:
                    lead = line[: len(line) - len(line.lstrip())]
                    out += textwrap.wrap(line.strip(), width, initial_indent=indent + lead,
                                         subsequent_indent=indent + lead + "    ", break_on_hyphens=False)
            else:
                out += textwrap.wrap(" ".join(line.strip() for line in lines), width, initial_indent=indent,
                                     subsequent_indent=indent, break_on_hyphens=False)
            out.append("")
        return "\n".join(out).rstrip("\n") + "\n"


class _ParserWithKeys(argparse.ArgumentParser):
    """argparse's help plus the config keys; built when --help is asked for, so a new key appears by itself (on the
    parser, not its formatter: argparse formats the usage line with the formatter too)."""

    def format_help(self) -> str:
        head = textwrap.fill("config keys (set any as key=value; a recipe sets them in YAML sections, e.g. policy: "
                             "{beta: 0.1}):", help_width(), break_on_hyphens=False)
        return super().format_help() + "\n" + head + "\n" + config_keys_help() + "\n"


def parser() -> argparse.ArgumentParser:
    ap = _ParserWithKeys(prog="jaxalign", description=__doc__, formatter_class=_Formatter)
    ap.add_argument("--config", default="demo_cpu", help="a name in configs/ or a YAML path (default: demo_cpu); a "
                    "TRL / alignment-handbook recipe runs through the name map of docs/trl_users.md")
    ap.add_argument("--trainer", default="", metavar="NAME",
                    help="the TRL trainer a TRL recipe is for (sft, dpo, cpo, grpo, rloo, reward) where neither its "
                         "path nor its keys tell")
    ap.add_argument("--workdir", default=None, metavar="DIR",
                    help="where the run writes (default runs/<run.name>); a local folder or a bucket "
                         "(gs://BUCKET/PATH); on several hosts one all of them see")
    ap.add_argument("--plan", default=None, metavar="TOPOLOGY", help="AOT-compile every phase for a TPU topology, "
                    "e.g. v5p:4x4x4, and print memory / FLOPs per chip; runs nothing")
    ap.add_argument("--force", action="store_true", help="redo phases whose config changed / reuse another run's dir")
    ap.add_argument("--distributed", choices=("auto", "on", "off"), default="auto",
                    help="auto: start jax.distributed on a multi-host environment JAX detects (TPU pod, GKE, SLURM, "
                         "Open MPI) or from the JAX_* variables, nothing on one host; on: from JAX_COORDINATOR_ADDRESS,"
                         " JAX_NUM_PROCESSES, JAX_PROCESS_ID (CPU too); off: never")
    ap.add_argument("--list-configs", action="store_true", help="list the recipes with their first comment line")
    ap.add_argument("--version", action="version", version=f"jaxalign {__version__}")
    ap.add_argument("overrides", nargs="*", metavar="key=value",
                    help="config overrides, e.g. policy.learning_rate=5e-7 (keys: see below)")
    return ap


# ---- running ---------------------------------------------------------------------------------------------------------

def quiet_transformers() -> None:
    """transformers warns "PyTorch was not found" on import where torch is absent; jaxalign never needs torch (it
    reads tokenizers and configs only), so that advice is noise. TRANSFORMERS_NO_ADVISORY_WARNINGS silences exactly
    transformers' advisory warnings (logger.warning_advice: in transformers 5 only that one), not its other warnings
    or errors; a value the user set is kept."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def run_summary(cfg, recipe: str, workdir: str | None) -> str:
    """What the terminal shows before a run: the recipe, method, model, data and where the run writes (the whole
    resolved config goes to <workdir>/run.yaml, not to the terminal)."""
    from jaxalign import config as config_lib

    method = [cfg.run.method]
    if cfg.run.num_rounds() > 1:
        method.append(f"{cfg.run.num_rounds()} rounds")
    round_ = cfg.run.round_phases(cfg.policy.kind)
    if "policy" in round_:
        method.append(f"policy.objective={cfg.policy.objective}"
                      + (f", policy.kind={cfg.policy.kind}" if cfg.policy.kind != "pairs" else ""))
    if cfg.model.lora.rank:
        method.append(f"LoRA rank {cfg.model.lora.rank}")
    demo = "generated by the demo task (run.demo_task)"
    ds = cfg.data.train
    data = (f"{ds.source}" + (f" ({ds.name})" if ds.name else "") + f", split {ds.split}"
            + (f", first {ds.limit} rows" if ds.limit else "")) if ds.source else (demo if cfg.run.demo_task else "")
    rows = [("recipe", recipe), ("method", ", ".join(method)),
            ("model", cfg.model.path or (demo if cfg.run.demo_task else "(not set: model.path)")),
            ("data", data or "(not set: data.train.source)")]
    if workdir is None:
        head = "# resolved config (--plan: compiled for the topology; nothing is run or written)"
    else:
        rows += [("workdir", workdir), ("run.yaml", f"{workdir.rstrip('/')}/run.yaml")]
        head = f"# resolved config: all {len(config_lib.valid_keys())} keys go to run.yaml once the inputs check out"
    width = max(len(k) for k, _ in rows)
    return head + "\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _stop_on_signals() -> dict:
    """SIGTERM anywhere outside a training loop (loading, sampling, evaluating, writing the report) stops the run like
    Ctrl-C: exit 75, finished phases and checkpoints kept. Inside a training loop the loop's own handler takes over and
    saves a checkpoint first. SIGINT is set to Python's KeyboardInterrupt even when it arrived ignored: a non-interactive
    shell starts `cmd &` with SIGINT ignored, and the run would then stop on it inside a training loop (whose handler is
    explicit) but not while sampling. Returns the previous handlers (none off the main thread, where signals cannot be
    set)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    return {signal.SIGTERM: signal.signal(signal.SIGTERM, interrupt),
            signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler)}


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Options and key=value overrides in any order: `--config X key=value --workdir D key=value` is how people
    type it (plain parse_args stops collecting overrides at the first option after them)."""
    return parser().parse_intermixed_args(argv)


def _no_arguments() -> int:
    """A bare ``jaxalign``: the usage and where to start, exit 2 (it used to start the demo unasked)."""
    parser().print_usage(sys.stderr)
    print("jaxalign: error: no recipe given: name one with --config (jaxalign --list-configs lists them; jaxalign "
          "--config demo_cpu runs the CPU demo); jaxalign --help describes every option and config key.",
          file=sys.stderr)
    return EXIT_BAD_INPUT


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        return _no_arguments()
    quiet_transformers()  # before anything imports transformers
    args = parse_args(argv)
    if args.list_configs:
        try:
            print(list_configs(), flush=True)
        except BrokenPipeError:  # `jaxalign --list-configs | head`: the reader left, which is not an error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0

    from jaxalign import config as config_lib
    from jaxalign.config import ConfigError
    from jaxalign.data.report import DataError
    from jaxalign.distributed import DistributedError
    from jaxalign.metrics import TrackerError
    from jaxalign.models.config import ModelConfigError
    try:
        cfg = config_lib.load(args.config, args.overrides, trainer=args.trainer,
                              echo=lambda text: print(text, flush=True))
        if args.workdir:
            cfg.run.workdir = args.workdir
        workdir = None
        if not args.plan:  # a work directory the run could not write is bad input, found before anything is read
            from jaxalign.pipeline.workdir import check_writable, default_root
            from jaxalign.storage import is_remote

            root = default_root(cfg)
            check_writable(root, "--workdir" if args.workdir else "run.workdir" if cfg.run.workdir else
                           "the work directory (runs/<run.name>)")
            workdir = root if is_remote(root) else os.path.abspath(root)
        print(run_summary(cfg, str(config_lib.resolve_config_path(args.config)), workdir), flush=True)
        if args.plan:
            from jaxalign.plan import plan_recipe

            plan_recipe(cfg, args.plan)
            return 0
        from jaxalign import distributed

        distributed.initialize(args.distributed)
        from jaxalign.pipeline.runner import Pipeline
        from jaxalign.train.loop import EXIT_PREEMPTED, Preempted

        previous = _stop_on_signals()
        try:
            Pipeline(cfg, force=args.force).run()
        except Preempted as e:
            print(f"[jaxalign] {e}", file=sys.stderr)
            return EXIT_PREEMPTED
        finally:
            import signal

            for sig, handler in previous.items():
                signal.signal(sig, handler)
    except (ConfigError, DataError, ModelConfigError, DistributedError, TrackerError) as e:
        print(f"jaxalign: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("[jaxalign] interrupted; finished phases and the last checkpoint are kept — re-run the same command "
              "to resume.", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
