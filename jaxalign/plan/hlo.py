"""Loop-aware costs of a compiled TPU program, read from its optimized HLO text.

``compiled.cost_analysis()`` counts the body of a ``while`` loop once, whatever its trip count; the decoder scans its
layers, so for a 32-layer model it reports roughly one layer's FLOPs. This module walks the optimized HLO instead:

- every computation gets a multiplier: 1 for the entry, ``trip count x caller`` for a ``while`` body (the trip count is
  the ``known_trip_count`` the compiler recorded, else the bound of the loop condition's ``compare(i, constant(N)),
  direction=LT``; a data-dependent bound counts once and is reported in ``unknown_loops``), the caller's for fusions,
  calls and conditional branches;
- FLOPs: ``2 x output elements x contracted size`` of every ``dot`` / ``convolution`` (matmul FLOPs; elementwise work is
  left out, as the model-FLOPs count leaves it out);
- compute time: the TPU compiler's own per-instruction estimate (``"estimated_cycles"`` in each scheduled instruction's
  backend config) summed with the multipliers, divided by the clock;
- collectives: bytes each chip sends for ``all-gather`` / ``reduce-scatter`` / ``all-reduce`` / ``all-to-all`` /
  ``collective-permute`` under a ring model, which :mod:`jaxalign.plan` turns into seconds with the slice's ICI
  bandwidth (the compiler gives no estimate for collectives).
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1,
               "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8,
               "c64": 8, "c128": 16, "token": 0}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute", "ragged-all-to-all")

_HEADER = re.compile(r"^(ENTRY )?%(\S+) .*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT )?%(\S+) = (.*)$")
_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([^\]]*)\]")


@dataclasses.dataclass
class Instr:
    name: str
    type: str
    opcode: str
    operands: list[str]
    attrs: str
    args: str = ""  # the raw text between the opcode's parentheses (a constant's value)
    root: bool = False


@dataclasses.dataclass
class HloCosts:
    flops: float = 0.0  # matmul FLOPs per device, loops counted with their trip counts
    cycles: float = 0.0  # sum of the compiler's estimated_cycles, same counting
    matmul_cycles: float = 0.0  # the part spent in instructions that hold a matmul (the rest: elementwise, copies)
    collective_bytes: dict = dataclasses.field(default_factory=lambda: defaultdict(float))  # kind -> ring bytes/chip
    collective_groups: list = dataclasses.field(default_factory=list)  # (kind, ring bytes, group size), counted
    unknown_loops: int = 0  # while loops with a data-dependent trip count (counted once)
    loops: list = dataclasses.field(default_factory=list)  # trip counts found


def _balanced(s: str, start: int) -> int:
    """Index just past the bracket group opening at ``s[start]``."""
    pairs = {"(": ")", "[": "]", "{": "}"}
    stack = []
    for i in range(start, len(s)):
        c = s[i]
        if c in pairs:
            stack.append(pairs[c])
        elif stack and c == stack[-1]:
            stack.pop()
            if not stack:
                return i + 1
    return len(s)


def parse_instr(line: str) -> Instr | None:
    m = _INSTR.match(line)
    if not m:
        return None
    root, name, rest = bool(m.group(1)), m.group(2), m.group(3)
    if rest.startswith("("):
        end = _balanced(rest, 0)
    else:
        end = rest.find(" ")
        # a layout may hold spaces only inside braces; array types have none
    typ, tail = rest[:end], rest[end:].lstrip()
    om = re.match(r"([a-z][a-z0-9\-]*)\(", tail)
    if not om:
        return None
    op = om.group(1)
    close = _balanced(tail, om.end() - 1)
    args = tail[om.end():close - 1]
    operands = re.findall(r"%([^\s,()]+)", args)
    return Instr(name, typ, op, operands, tail[close:], args, root)


def parse_module(text: str) -> tuple[dict[str, list[Instr]], str]:
    comps: dict[str, list[Instr]] = {}
    entry, current = "", None
    for line in text.splitlines():
        h = _HEADER.match(line)
        if h and not line.startswith(" "):
            current = h.group(2)
            comps[current] = []
            if h.group(1):
                entry = current
            continue
        if line.startswith("}"):
            current = None
            continue
        if current is not None:
            ins = parse_instr(line)
            if ins is not None:
                comps[current].append(ins)
    return comps, entry


def arrays(typ: str) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, dims) of every array in a type string (one for an array, several for a tuple)."""
    out = []
    for dt, dims in _ARRAY.findall(typ):
        if dt not in DTYPE_BYTES:
            continue
        shape = tuple(int(re.sub(r"[^0-9]", "", d) or 0) for d in dims.split(",") if d.strip())
        out.append((dt, shape))
    return out


def nbytes(typ: str) -> float:
    return sum(DTYPE_BYTES[dt] * math.prod(shape) for dt, shape in arrays(typ))


def _first_shape(typ: str) -> tuple[int, ...]:
    a = arrays(typ)
    return a[0][1] if a else ()


def _dims_attr(attrs: str, key: str) -> list[int]:
    m = re.search(key + r"=\{([0-9,]*)\}", attrs)
    return [int(x) for x in m.group(1).split(",") if x] if m else []


def matmul_flops(ins: Instr, shapes: dict[str, str]) -> float:
    out = math.prod(_first_shape(ins.type))
    if ins.opcode == "dot":
        lhs = _first_shape(shapes.get(ins.operands[0], ""))
        contract = math.prod(lhs[d] for d in _dims_attr(ins.attrs, "lhs_contracting_dims") if d < len(lhs))
        return 2.0 * out * contract
    if ins.opcode == "convolution":
        return _conv_flops(ins, shapes, out)
    return 0.0


def _window(attrs: str, key: str, n: int, default: int) -> list:
    m = re.search(r"\b" + key + r"=([0-9_x\-]+)", attrs)
    if not m:
        return [default] * n
    parts = m.group(1).split("x")
    if key == "pad":
        return [tuple(int(v) for v in p.split("_")) for p in parts]
    return [int(v) for v in parts]


def _conv_flops(ins: Instr, shapes: dict[str, str], out_elems: int) -> float:
    """2 x MACs of an HLO convolution, counting only window taps that land on real (not dilation-hole, not padding)
    input elements: the TPU compiler writes batched matmuls as convolutions whose batch dimensions are spatial
    dimensions with ``lhs_dilate`` / ``stride`` tricks, each of which then contributes one tap per output."""
    import numpy as np

    m = re.search(r"dim_labels=([^_]*)_([^-]*)->(\S+?)[,\s]", ins.attrs + " ")
    if not m or len(ins.operands) < 2:
        return 0.0
    lhs_l, rhs_l, out_l = m.groups()
    lhs = _first_shape(shapes.get(ins.operands[0], ""))
    rhs = _first_shape(shapes.get(ins.operands[1], ""))
    out = _first_shape(ins.type)
    if len(lhs) != len(lhs_l) or len(rhs) != len(rhs_l) or len(out) != len(out_l):
        return 0.0
    spatial = sorted(c for c in rhs_l if c.isdigit())
    n = len(spatial)
    stride, lhs_d, rhs_d = (_window(ins.attrs, k, n, 1) for k in ("stride", "lhs_dilate", "rhs_dilate"))
    pad = _window(ins.attrs, "pad", n, 0)
    pad = [p if isinstance(p, tuple) else (0, 0) for p in pad]
    macs = float(rhs[rhs_l.index("i")])
    per_out = out_elems
    for j, c in enumerate(spatial):
        size_in, w, size_out = lhs[lhs_l.index(c)], rhs[rhs_l.index(c)], out[out_l.index(c)]
        o = np.arange(size_out)[:, None]
        k = np.arange(w)[None, :]
        pos = o * stride[j] + k * rhs_d[j] - pad[j][0]
        ok = (pos >= 0) & (pos <= (size_in - 1) * lhs_d[j]) & (pos % lhs_d[j] == 0)
        macs *= float(ok.sum())
        per_out //= max(size_out, 1)
    return 2.0 * per_out * macs


def group_size(attrs: str, num_devices: int) -> int:
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if m:
        sizes = dict((k.strip("'"), int(v)) for k, v in re.findall(r"('[^']+')=(\d+)", m.group(1)))
        used = re.findall(r"'([^']+)'", m.group(2))
        return math.prod(sizes.get(u, 1) for u in used) if used else num_devices
    m = re.search(r"replica_groups=\[([0-9,]+)\]<=", attrs)
    if m:
        return int(m.group(1).split(",")[-1])
    m = re.search(r"replica_groups=\{\{([0-9,]*)\}", attrs)
    if m:
        return len([x for x in m.group(1).split(",") if x])
    return num_devices


def ring_bytes(kind: str, size: float, n: int) -> float:
    """Bytes one chip sends (= receives) for a collective over ``n`` chips on a ring (size: the op's larger side)."""
    if n <= 1:
        return 0.0
    if kind == "all-reduce":
        return 2.0 * size * (n - 1) / n
    if kind == "collective-permute":
        return size
    return size * (n - 1) / n  # all-gather (output), reduce-scatter (input), all-to-all


def _const(name: str, table: dict[str, Instr]) -> int | None:
    """Integer value of ``name`` if it is a constant (possibly behind copies / converts), else None."""
    for _ in range(4):
        ins = table.get(name)
        if ins is None:
            return None
        if ins.opcode == "constant":
            v = ins.args.strip()
            return int(v) if re.fullmatch(r"-?\d+", v) else None
        if ins.opcode in ("copy", "convert", "bitcast") and ins.operands:
            name = ins.operands[0]
            continue
        return None
    return None


def _trip_count(ins: Instr, comps: dict[str, list[Instr]], caller: dict[str, Instr]) -> int | None:
    """Iterations of a while loop: the compiler's known_trip_count, else ``ceil((bound - init) / step)`` read from
    ``compare(i, constant(bound)), direction=LT`` in the condition, ``i + constant(step)`` in the body and the init
    tuple (XLA's windowed einsum loops step by 2)."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', ins.attrs)
    if m:
        return int(m.group(1))
    cm, bm = re.search(r"condition=%([^\s,]+)", ins.attrs), re.search(r"body=%([^\s,]+)", ins.attrs)
    cond = {i.name: i for i in comps.get(cm.group(1), [])} if cm else {}
    for c in cond.values():
        if c.opcode != "compare" or "direction=LT" not in c.attrs or len(c.operands) != 2:
            continue
        bound = _const(c.operands[1], cond)
        var = cond.get(c.operands[0])
        if bound is None or var is None or var.opcode != "get-tuple-element":
            continue
        k = int(re.search(r"index=(\d+)", var.attrs).group(1))
        init, step = 0, 1
        body = comps.get(bm.group(1), []) if bm else []
        table = {i.name: i for i in body}
        root = next((i for i in body if i.root), None)
        if root is not None and root.opcode == "tuple" and k < len(root.operands):
            upd = table.get(root.operands[k])
            if upd is not None and upd.opcode == "add":
                step = next((v for v in (_const(o, table) for o in upd.operands) if v), 1)
        tup = caller.get(ins.operands[0]) if ins.operands else None
        if tup is not None and tup.opcode == "tuple" and k < len(tup.operands):
            init = _const(tup.operands[k], caller) or 0
        return max(0, -(-(bound - init) // max(step, 1)))
    return None


def analyze(text: str, num_devices: int) -> HloCosts:
    comps, entry = parse_module(text)
    mult: dict[str, float] = defaultdict(float)
    fused: set[str] = set()
    mult[entry] = 1.0
    costs = HloCosts()
    order = list(comps)[::-1]  # callees are printed before their callers
    for cname in order:
        m = mult.get(cname, 0.0)
        if not m:
            continue
        table = {i.name: i for i in comps[cname]}
        for ins in comps[cname]:
            if ins.opcode == "while":
                body = re.search(r"body=%([^\s,]+)", ins.attrs)
                trip = _trip_count(ins, comps, table)
                if trip is None:
                    costs.unknown_loops += 1
                    trip = 1
                costs.loops.append(trip)
                if body:
                    mult[body.group(1)] += m * trip
                continue
            for key in ("calls", "to_apply"):
                for callee in re.findall(key + r"=%([^\s,}]+)", ins.attrs):
                    if key == "calls":
                        mult[callee] += m
                        if ins.opcode == "fusion" or ins.opcode.endswith("-start"):
                            fused.add(callee)
            bm = re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)
            if bm:
                for callee in re.findall(r"%([^\s,]+)", bm.group(1)):
                    mult[callee] += m
    memo: dict[str, bool] = {}

    def has_matmul(comp: str) -> bool:
        if comp not in memo:
            memo[comp] = False
            memo[comp] = any(i.opcode in ("dot", "convolution") or
                             any(has_matmul(c) for c in re.findall(r"calls=%([^\s,}]+)", i.attrs))
                             for i in comps.get(comp, []))
        return memo[comp]

    for cname, instrs in comps.items():
        m = mult.get(cname, 0.0)
        if not m:
            continue
        shapes = {i.name: i.type for i in instrs}
        for ins in instrs:
            if ins.opcode in ("dot", "convolution"):
                costs.flops += m * matmul_flops(ins, shapes)
            if cname not in fused:
                cyc = re.search(r'"estimated_cycles":"(\d+)"', ins.attrs)
                if cyc:
                    costs.cycles += m * float(cyc.group(1))
                    callees = re.findall(r"calls=%([^\s,}]+)", ins.attrs)
                    if ins.opcode in ("dot", "convolution") or any(has_matmul(c) for c in callees):
                        costs.matmul_cycles += m * float(cyc.group(1))
            kind = ins.opcode[:-6] if ins.opcode.endswith("-start") else ins.opcode
            if kind in COLLECTIVES:
                sizes = [DTYPE_BYTES[dt] * math.prod(s) for dt, s in arrays(ins.type)]
                if kind == "reduce-scatter":
                    sizes += [nbytes(shapes.get(o, "")) for o in ins.operands]
                size = max(sizes, default=0.0)
                n = group_size(ins.attrs, num_devices)
                b = ring_bytes(kind, size, n)
                costs.collective_bytes[kind] += m * b
                costs.collective_groups.append((kind, m * b, n))
    return costs
