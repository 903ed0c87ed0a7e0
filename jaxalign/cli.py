"""jaxalign's command line: run a recipe, or plan it for a TPU slice.

    jaxalign --config ultrachat_dil [--workdir DIR] [key=value ...]      (or: python launch/tpu_run.py ...)
    jaxalign --config ultrachat_dil --plan v5p:4x4x4     # AOT memory / FLOPs plan, no TPU needed
    jaxalign --config zephyr_dpo_config_full.yaml num_processes=8   # a TRL / alignment-handbook recipe file
    jaxalign --list-configs                               # the recipes that ship with jaxalign

Exit codes: 0 done; 2 bad input (a one-paragraph message, nothing compiled); 75 preempted (SIGTERM / SIGINT: the
running phase saved a checkpoint — re-run the same command to resume); 1 anything else.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import os
import sys
import tokenize
import typing

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 75


# ---- the config keys for --help, read from the schema (jaxalign/config.py) -------------------------------------------

def field_comments(cls) -> dict[str, str]:
    """Each dataclass field's meaning as its source writes it: the trailing ``# comment`` on the field's line, else
    the comment block right above the field. Inherited fields come from their base class's source."""
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
                if field is not None:
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


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def config_keys_help() -> str:
    """Every key of ``jaxalign.config.valid_keys()`` as ``key  type = default  meaning``."""
    from jaxalign import config as config_lib

    rows = []
    for key in config_lib.valid_keys():
        cls = config_lib.Config
        *sections, name = key.split(".")
        for part in sections:
            cls = typing.get_type_hints(cls)[part]
        f = {f.name: f for f in dataclasses.fields(cls)}[name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        meaning = field_comments(cls).get(name, "")
        rows.append((key, f"{_type_name(typing.get_type_hints(cls)[name])} = {default!r}", meaning))
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    return "\n".join(f"  {k:<{w0}}  {t:<{w1}}  {m}".rstrip() for k, t, m in rows)


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


class _ParserWithKeys(argparse.ArgumentParser):
    """argparse's help plus the config keys; built when --help is asked for, so a new key appears by itself (on the
    parser, not its formatter: argparse formats the usage line with the formatter too)."""

    def format_help(self) -> str:
        return super().format_help() + "\nconfig keys (set any as key=value):\n" + config_keys_help() + "\n"


def parser() -> argparse.ArgumentParser:
    ap = _ParserWithKeys(prog="jaxalign", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="demo_cpu", help="a name in configs/ or a YAML path (default: demo_cpu); a "
                    "TRL / alignment-handbook recipe runs through the name map of docs/trl_users.md")
    ap.add_argument("--trainer", default="", metavar="NAME",
                    help="the TRL trainer a TRL recipe is for (sft, dpo, cpo, grpo, rloo) where neither its path nor "
                         "its keys tell")
    ap.add_argument("--workdir", default=None, help="where the run writes (default runs/<run.name>); a local folder or a bucket (gs://BUCKET/PATH); on several hosts one all of them see")
    ap.add_argument("--plan", default=None, metavar="TOPOLOGY", help="AOT-compile every phase for a TPU topology")
    ap.add_argument("--force", action="store_true", help="redo phases whose config changed / reuse another run's dir")
    ap.add_argument("--distributed", choices=("auto", "on", "off"), default="auto",
                    help="auto: start jax.distributed on a multi-host environment JAX detects (TPU pod, GKE, SLURM, "
                         "Open MPI) or from the JAX_* variables, nothing on one host; on: from JAX_COORDINATOR_ADDRESS,"
                         " JAX_NUM_PROCESSES, JAX_PROCESS_ID (CPU too); off: never")
    ap.add_argument("--list-configs", action="store_true", help="list the recipes with their first comment line")
    ap.add_argument("overrides", nargs="*", help="key=value, e.g. policy.learning_rate=5e-7 (keys: see below)")
    return ap


# ---- running ---------------------------------------------------------------------------------------------------------

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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
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
        print("# resolved config\n" + config_lib.dump(cfg), flush=True)
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
