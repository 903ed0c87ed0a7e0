"""Where a forward+backward's time goes, by source line: one traced call of the jitted step, every XLA:CPU thunk's
time attributed to the jaxalign line that emitted it.

    python benchmarks/profile_step.py                          # SmolLM2-135M shape, B=4 T=256, mean NLL
    python benchmarks/profile_step.py --loss hidden            # the 30 layers only (a linear loss on the hidden states)
    python benchmarks/profile_step.py --size 100m --top 20

How: the step is compiled once and run once to warm up, then one call runs under ``jax.profiler.trace``. Each XLA
thunk in the trace (a fused kernel or a matmul) names its HLO instruction; the compiled module's stack-frame table
maps the instruction to the Python lines that traced it. Times are *thread* times summed over calls: on a 2-core CPU
two thunks can run at once, so the column adds up to more than the wall time, and a thunk that shares the cores with
a matmul's threads is charged the time it waited. Read the table for proportions and for what an XLA fusion costs
next to the matmul it feeds, not as a stopwatch. Kinds: ``matmul`` (fusions holding a dot), ``library``
(other ops XLA hands to YNNPACK: reductions, elementwise), ``copy``
(fusions whose name says copy or transpose: a layout change), ``slice`` (slice / concatenate / pad fusions),
``other`` (elementwise and reductions).
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile

from common import config_100m, print_table, smollm2_config, tiny_config

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.losses import token_logprobs
from jaxalign.models import forward, init_params


def kind(thunk: str, dots: set[str]) -> str:
    if thunk.startswith("dot") or thunk in dots:
        return "matmul"
    if thunk.startswith(("ynn_fusion", "xnn_fusion", "onednn")):
        return "library"  # a reduction or elementwise op handed to the library, no matmul in it
    if "copy" in thunk or "transpose" in thunk:
        return "copy"
    if any(s in thunk for s in ("slice", "concatenate", "pad")):
        return "slice"
    return "other"


def source_lines(hlo: str):
    """``instruction name -> "function:line < caller:line"`` from the optimized HLO's stack-frame tables."""
    head, _, _ = hlo.partition("\nStackFrames\n")
    files = dict(re.findall(r'^(\d+) "(.*)"$', head.split("FunctionNames")[0], re.M))
    funcs = dict(re.findall(r'^(\d+) "(.*)"$', head.split("FunctionNames")[1].split("FileLocations")[0], re.M))
    locs = {i: (files[f].rsplit("/", 1)[-1], funcs[fn], line) for i, f, fn, line in
            re.findall(r"^(\d+) \{file_name_id=(\d+) function_name_id=(\d+) line=(\d+)", hlo, re.M)}
    frames = dict((i, (loc, parent)) for i, loc, parent in
                  re.findall(r"^(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)", hlo, re.M))

    def chain(frame: str) -> str:
        out, seen = [], set()
        while frame in frames and frame not in seen and len(out) < 2:
            seen.add(frame)
            loc, frame = frames[frame]
            f, fn, line = locs[loc]
            out.append(f"{f}:{fn.replace('.<locals>.', '.')}:{line}")
        return " < ".join(out) or "?"

    where = {}
    for name, frame in re.findall(r"^\s*%(\S+) = .*?stack_frame_id=(\d+)", hlo, re.M):
        where.setdefault(name, chain(frame))
    return where


def fusions_with_a_dot(hlo: str) -> set[str]:
    """Names of the fusion instructions whose fused computation holds a ``dot``."""
    bodies = {m.group(1): m.group(2) for m in re.finditer(r"^%(\S+) .*?\{\n(.*?)\n\}", hlo, re.M | re.S)}
    return {name for name, comp in re.findall(r"^\s*%(\S+) = \S+ fusion\(.*?calls=%([\w.\-]+)", hlo, re.M)
            if " dot(" in bodies.get(comp, "")}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="smollm2", choices=["smollm2", "100m", "tiny"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--loss", default="nll", choices=["nll", "hidden"])
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()

    cfg = {"smollm2": smollm2_config, "100m": config_100m, "tiny": tiny_config}[args.size]()
    params = init_params(cfg, jax.random.key(0))  # the shape is what matters here, not the weights
    rng = np.random.RandomState(0)
    ids = jnp.asarray(rng.randint(3, cfg.vocab_size, size=(args.batch, args.length + 1)).astype(np.int32))
    probe = jnp.asarray(rng.randn(args.batch, args.length, cfg.hidden_size).astype(np.float32))

    def loss(p, ids):
        if args.loss == "hidden":
            return jnp.mean(forward(p, cfg, ids[:, :-1], return_hidden=True) * probe)
        return -jnp.mean(token_logprobs(forward(p, cfg, ids[:, :-1]), ids[:, 1:]))

    step = jax.jit(jax.value_and_grad(loss)).lower(params, ids).compile()
    hlo = step.as_text()
    where, dots = source_lines(hlo), fusions_with_a_dot(hlo)
    jax.block_until_ready(step(params, ids))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            jax.block_until_ready(step(params, ids))
        events = json.load(gzip.open(glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)[0]))["traceEvents"]

    thunks = [e for e in events if e.get("ph") == "X" and e.get("name") in where]
    wall = max((e["dur"] for e in events if e.get("name") == "ThunkExecutor::Execute (wait for completion)"),
               default=float("nan"))
    by_line, by_kind, count = collections.Counter(), collections.Counter(), collections.Counter()
    for e in thunks:
        key = (where[e["name"]], kind(e["name"], dots))
        by_line[key] += e["dur"]
        by_kind[key[1]] += e["dur"]
        count[key] += 1
    total = sum(by_kind.values())
    print(f"{args.size} B={args.batch} T={args.length} loss={args.loss}: one step {wall / 1e6:.2f} s wall, "
          f"{total / 1e6:.2f} s thread time in {len(thunks)} thunks")
    print_table("thread time by kind", ["kind", "thread s", "share"],
                [[k, f"{v / 1e6:.2f}", f"{100 * v / total:.0f}%"] for k, v in by_kind.most_common()])
    print_table(f"thread time by source line (top {args.top})", ["source (innermost < caller)", "kind", "thunks",
                                                                  "thread ms", "share"],
                [[src, k, count[(src, k)], f"{v / 1e3:.0f}", f"{100 * v / total:.1f}%"]
                 for (src, k), v in by_line.most_common(args.top)])


if __name__ == "__main__":
    main()
