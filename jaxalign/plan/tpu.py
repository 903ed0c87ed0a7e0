"""TPU slices without a TPU: devices from libtpu's topology description, per-chip HBM / clock / ICI, and what the
compiler says about memory (its buffer assignment, its out-of-memory message)."""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
from pathlib import Path

from jaxalign.config import ConfigError

GiB = 2**30


class PlanError(ConfigError):
    """A topology, model or mesh that cannot be planned; the message says what to change (the launcher prints it
    and exits 2, like any bad config)."""


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm: float  # bytes per device the TPU compiler may use (from its RESOURCE_EXHAUSTED message)
    mxu_flops_per_cycle: int  # per device: MXUs x 2 x systolic array size
    ici_link: float  # bytes/s of one ICI link, both directions (collectives model)
    hbm_bw: float = 0.0  # bytes/s of HBM per device (spec sheets; per TensorCore where the topology lists cores)


# keyed by device_kind (lower case). v2 / v3 / v4 topologies list each TensorCore as a device.
CHIPS = {
    "tpu v2": Chip("v2", 7.48 * GiB, 1 * 2 * 128 * 128, 2 * 31e9, 700e9 / 2),
    "tpu v3": Chip("v3", 15.48 * GiB, 2 * 2 * 128 * 128, 2 * 41e9, 900e9 / 2),
    "tpu v4": Chip("v4", 15.25 * GiB, 4 * 2 * 128 * 128, 2 * 45e9, 1228e9),
    "tpu v5 lite": Chip("v5e", 15.75 * GiB, 4 * 2 * 128 * 128, 2 * 45e9, 819e9),
    "tpu v5": Chip("v5p", 95.74 * GiB, 8 * 2 * 128 * 128, 2 * 90e9, 2765e9),
    "tpu v6 lite": Chip("v6e", 31.25 * GiB, 4 * 2 * 256 * 256, 2 * 90e9, 1640e9),
}


@dataclasses.dataclass
class Slice:
    name: str
    devices: list
    chip: Chip
    peak: float  # bf16 FLOP/s per device (jaxalign.flops.PEAK_FLOPS)
    dims: tuple[int, ...]

    @property
    def unit(self) -> str:
        """What one device is: a chip (v5e, v5p, v6e) or a TensorCore (v2, v3, v4 topologies list cores)."""
        return "chip" if len(self.devices) == math.prod(self.dims) else "core"

    @property
    def sold_as(self) -> str:
        """The slice's name as Google sells it: v2 / v3 / v4 / v5p slices count TensorCores (2 per chip, so
        ``v5p:2x2x1`` is a v5p-8 and ``v5p:4x4x4`` a v5p-128), v5e / v6e slices count chips (``v5e:4x4`` is a v5e-16)."""
        generation = self.name.split(":")[0]
        cores_per_chip = 2 if generation in ("v2", "v3", "v4", "v5p") else 1
        return f"{generation}-{math.prod(self.dims) * cores_per_chip}"

    @property
    def hbm_bw(self) -> float:
        """HBM bytes/s per device (a v4 topology that lists TensorCores splits its chip's bandwidth over two)."""
        return self.chip.hbm_bw / (2 if self.chip.name == "v4" and self.unit == "core" else 1)

    @property
    def clock(self) -> float:
        return self.peak / self.chip.mxu_flops_per_cycle

    def ici_bandwidth(self, group: int) -> float:
        """Bytes/s a chip moves in a ring collective over ``group`` chips: one link per torus dimension the group
        spans (the mesh is laid out over the torus by jax.make_mesh), both directions."""
        dims, k, span = sorted((d for d in self.dims if d > 1), reverse=True), 0, 1
        while span < group and k < len(dims):
            span *= dims[k]
            k += 1
        return self.chip.ici_link * max(k, 1)


def require_libtpu() -> None:
    if importlib.util.find_spec("libtpu") is None:
        raise PlanError('--plan compiles for a TPU with the TPU compiler, which comes with libtpu; it is not '
                        'installed. Install the TPU extra: pip install -e ".[tpu]" (or pip install "libtpu==0.0.42.*" '
                        'for jax 0.10.2). No TPU is needed: the plan runs on this machine\'s CPU.')


def get_slice(topology: str) -> Slice:
    """The devices of a TPU slice named like ``v5p:4x4x4``, ``v5e:16x16`` or ``v5e:1x1`` (one chip)."""
    require_libtpu()
    import os

    # without a TPU nothing is shared: let several plans (and test workers) load libtpu at once
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    import jax
    from jax.experimental import topologies

    from jaxalign.flops import PEAK_FLOPS

    m = re.fullmatch(r"(v\d[a-z]*):(\d+(?:x\d+)*)", topology.strip())
    if not m:
        raise PlanError(f"--plan {topology!r}: expected GENERATION:AxBxC, e.g. v5p:2x2x1 (4 chips), v5e:4x4, "
                        f"v5p:4x4x4, v5e:16x16, v6e:4x4, or v5e:1x1 for one chip.")
    dims = tuple(int(x) for x in m.group(2).split("x"))
    kw = {"chips_per_host_bounds": (1,) * max(len(dims), 3)} if math.prod(dims) == 1 else {}
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology.strip(), **kw)
    except Exception as e:  # libtpu raises a plain runtime error for unknown names
        raise PlanError(f"--plan {topology!r}: libtpu could not describe this slice ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:300]}). Names that work: v5p:2x2x1, v5e:4x4, v5p:4x4x4, "
                        f"v5e:16x16, v6e:4x4, v5e:1x1, v2:2x2.") from None
    devices = list(desc.devices)
    kind = devices[0].device_kind.lower()
    chip = CHIPS.get(kind)
    if chip is None:
        raise PlanError(f"--plan {topology!r}: device kind {devices[0].device_kind!r} has no HBM / clock entry in "
                        f"jaxalign.plan.CHIPS; known: {', '.join(sorted(CHIPS))}.")
    peak = next(p for k, p in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])) if kind.startswith(k))
    if chip.name == "v4" and len(devices) == 2 * math.prod(dims):  # PEAK_FLOPS is per v4 chip (2 cores)
        peak /= 2
    del jax
    return Slice(topology.strip(), devices, chip, peak, dims)


def hbm_allocated(folder: str) -> float | None:
    """Bytes of HBM the compiled program reserves per device: the sum of its buffer assignment's allocations in the
    default memory space (parameters, outputs, the preallocated temporary heap, constants), read from the compiler's
    dump. None if the dump has no buffer assignment."""
    files = sorted(Path(folder).glob("*after_optimizations-buffer-assignment.txt"))
    if not files:
        return None
    total = 0.0
    for line in files[-1].read_text().splitlines():
        m = re.match(r"allocation \d+: size (\d+)(.*)", line)
        if m and not re.search(r"\bcolor [1-9]", m.group(2)):
            total += float(m.group(1))
    return total


_OOM = [re.compile(r"required for [^(]*\(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)"),
        re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm")]
_UNIT = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_oom(message: str) -> tuple[float, float] | None:
    """(required, available) bytes from the TPU compiler's RESOURCE_EXHAUSTED message, or None."""
    for pat in _OOM:
        m = pat.search(message)
        if m:
            return float(m.group(1)) * _UNIT[m.group(2)], float(m.group(3)) * _UNIT[m.group(4)]
    return None
