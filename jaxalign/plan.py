"""AOT plan of a recipe on a TPU slice, from this machine: per-chip memory, FLOPs, estimated step time, MFU, verdict.

    python launch/tpu_run.py --config ultrachat_dil --plan v5p:4x4x4 [mesh.fsdp=16 policy.accum_steps=2 ...]

With ``libtpu`` installed (``pip install -e ".[tpu]"``), ``jax.experimental.topologies.get_topology_desc`` describes the
slice's devices without a TPU, and the engine's own jitted functions — :func:`jaxalign.train.steps.make_train_step`
for the SFT / reward / preference steps (the preference step with its frozen reference), the sampler's
``_prefill_fn`` / ``_decode_fn`` — are lowered with abstract inputs (``ShapeDtypeStruct`` carrying the recipe's
shardings) and compiled by the TPU compiler. Only the model's ``config.json`` is needed (the recipe models' configs are
in ``configs/models/``). For each phase:

- memory per chip: parameters, optimizer state and reference weights as the compiler lays them out (a no-op program
  taking just that tree, ``memory_analysis().argument_size_in_bytes``); activations / temporaries
  (``temp_size_in_bytes`` of the step); KV cache; what the phase keeps on the chip outside the step (see ``OUTSIDE``);
  ``total = arguments + outputs - aliased (donated) + temporaries + outside``, against the HBM the compiler may use.
  When the step does not fit, the TPU compiler refuses it (RESOURCE_EXHAUSTED) and its message gives the total.
- FLOPs per step and the compiler's estimated compute time, loop-aware (:mod:`jaxalign.plan_hlo`; the compiler's
  ``cost_analysis()`` counts a scanned layer once); collective time from the bytes each chip sends and the slice's
  ICI bandwidth (a model: the compiler gives none); step time = max(compute, collectives), i.e. collectives overlapped.
- MFU: :func:`jaxalign.flops.mfu`, the formula the training metrics use (model FLOPs of the trained tokens, remat and
  the reference forward not counted), at the estimated step time and the chip's peak from ``jaxalign.flops.PEAK_FLOPS``.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from jaxalign.config import ConfigError

GiB = 2**30
MODELS_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"
# hub id -> file in configs/models (any other id is tried as <repo name lower-cased>.json)
HUB_CONFIGS = {
    "mistralai/Mistral-7B-v0.1": "mistral-7b-v0.1.json",
    "alignment-handbook/zephyr-7b-sft-full": "zephyr-7b-sft-full.json",
    "HuggingFaceH4/mistral-7b-sft-beta": "mistral-7b-sft-beta.json",
    "EleutherAI/pythia-1b": "pythia-1b.json",
    "EleutherAI/pythia-1b-deduped": "pythia-1b.json",
    "Qwen/Qwen2.5-0.5B-Instruct": "qwen2.5-0.5b-instruct.json",
}
FIT_MARGIN = 0.9  # FITS below this fraction of the usable HBM, TIGHT up to 1.0
OUTSIDE = ("train phases: the phase's loaded params stay alive next to the train state's copy "
           "(jaxalign.train.state.create_state copies them); sampling: the param_dtype params the phase loaded, next "
           "to the compute-dtype copies the sampler makes")


class PlanError(ConfigError):
    """A topology, model or mesh that cannot be planned; the message says what to change (the launcher prints it
    and exits 2, like any bad config)."""


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm: float  # bytes per device the TPU compiler may use (from its RESOURCE_EXHAUSTED message)
    mxu_flops_per_cycle: int  # per device: MXUs x 2 x systolic array size
    ici_link: float  # bytes/s of one ICI link, both directions (collectives model)


# keyed by device_kind (lower case). v2 / v3 / v4 topologies list each TensorCore as a device.
CHIPS = {
    "tpu v2": Chip("v2", 7.48 * GiB, 1 * 2 * 128 * 128, 2 * 31e9),
    "tpu v3": Chip("v3", 15.48 * GiB, 2 * 2 * 128 * 128, 2 * 41e9),
    "tpu v4": Chip("v4", 15.25 * GiB, 4 * 2 * 128 * 128, 2 * 45e9),
    "tpu v5 lite": Chip("v5e", 15.75 * GiB, 4 * 2 * 128 * 128, 2 * 45e9),
    "tpu v5": Chip("v5p", 95.74 * GiB, 8 * 2 * 128 * 128, 2 * 90e9),
    "tpu v6 lite": Chip("v6e", 31.25 * GiB, 4 * 2 * 256 * 256, 2 * 90e9),
}


@dataclasses.dataclass
class Slice:
    name: str
    devices: list
    chip: Chip
    peak: float  # bf16 FLOP/s per device (jaxalign.flops.PEAK_FLOPS)
    dims: tuple[int, ...]

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


@dataclasses.dataclass
class PhaseRow:
    phase: str
    detail: str = ""
    params: float = 0.0
    opt_state: float = 0.0
    reference: float = 0.0
    temps: float = 0.0
    kv_cache: float = 0.0
    outside: float = 0.0
    total: float = 0.0
    hbm: float = 0.0
    verdict: str = ""
    advice: list = dataclasses.field(default_factory=list)
    flops: float | None = None  # per device per step, from the compiled program (matmuls)
    model_flops: float | None = None  # per device per step, analytic (see FLOPS_NOTE)
    compute_s: float | None = None
    matmul_s: float | None = None  # the part of compute_s in instructions that hold a matmul
    collective_s: float | None = None
    collective_bytes: float | None = None
    step_s: float | None = None
    mfu: float | None = None
    compile_s: float = 0.0
    analysis_total: float | None = None  # arguments + outputs - aliased + temps from memory_analysis (cross-check)
    exact: bool = True  # False when the compiler refused the program and total comes from its error message

    @property
    def fits(self) -> bool:
        return self.total <= self.hbm


# ---- inputs: topology, model, mesh ------------------------------------------------------------------------------

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


def resolve_model_file(path: str) -> Path:
    """config.json of ``model.path``: a local folder / config file, or a hub id mapped to ``configs/models``."""
    p = Path(path).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return p / "config.json"
    if p.is_file() and p.suffix == ".json":
        return p
    name = HUB_CONFIGS.get(path) or f"{path.rstrip('/').split('/')[-1].lower()}.json"
    if (MODELS_DIR / name).is_file():
        return MODELS_DIR / name
    known = ", ".join(sorted(HUB_CONFIGS))
    raise PlanError(f"model.path={path!r}: no config.json for it. Planning needs only the model's config.json: give a "
                    f"local folder holding one, or add it to {MODELS_DIR} (hub ids mapped there: {known}).")


def model_config(cfg):
    from jaxalign.models.config import load_config

    src = resolve_model_file(cfg.model.path)
    with tempfile.TemporaryDirectory() as d:  # load_config reads <folder>/config.json with transformers
        shutil.copy(src, Path(d) / "config.json")
        return load_config(d, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, remat=cfg.model.remat)


def make_mesh(cfg, sl: Slice):
    import jax
    from jax.sharding import AxisType

    from jaxalign import sharding

    try:
        mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=sl.devices)
    except ValueError as e:
        raise PlanError(f"{e} ({sl.name} has {len(sl.devices)} devices)") from None
    shape = tuple(mesh.shape[a] for a in sharding.MESH_AXES)
    try:  # the physical layout the run gets (jax.make_mesh places mesh axes on torus axes)
        return jax.make_mesh(shape, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=sl.devices)
    except Exception:
        return mesh


# ---- abstract inputs --------------------------------------------------------------------------------------------

def _sds(shape, dtype, sharding):
    import jax

    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def abstract_params(mcfg, mesh, *, reward: bool = False, dtype=None) -> dict:
    import jax.numpy as jnp

    from jaxalign.models.decoder import LOGICAL_AXES, param_shapes
    from jaxalign.sharding import named_sharding

    shapes = param_shapes(mcfg)
    if reward:
        shapes.pop("lm_head", None)
        shapes["score"] = (mcfg.hidden_size,)
    out = {}
    for k, s in shapes.items():
        dt = jnp.dtype(dtype(k) if callable(dtype) else (dtype or mcfg.param_dtype))
        out[k] = _sds(s, dt, named_sharding(LOGICAL_AXES[k], s, mesh))
    return out


def abstract_batch(kind: str, batch: int, length: int, mesh, *, pack: bool = False) -> dict:
    import jax.numpy as jnp

    from jaxalign.sharding import batch_sharding

    keys = (["input_ids", "loss_mask", "attention_mask"] + (["segment_ids", "positions"] if pack else [])
            if kind == "sft" else [f"{s}_{k}" for s in ("chosen", "rejected")
                                   for k in ("input_ids", "loss_mask", "attention_mask")])
    return {k: _sds((batch, length), jnp.int32, batch_sharding(mesh, 2)) for k in keys}


def tree_bytes(tree) -> float:
    """Per-device bytes of a tree of ShapeDtypeStructs from their shardings (arithmetic, no padding)."""
    import jax

    total = 0.0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shard) * x.dtype.itemsize
    return total


def compiled_bytes(tree) -> float:
    """Per-device bytes of a tree as the TPU compiler lays it out (tiles pad small dimensions)."""
    import jax

    try:
        c = jax.jit(lambda t: None, keep_unused=True).lower(tree).compile()
        return float(c.memory_analysis().argument_size_in_bytes)
    except Exception:  # e.g. the tree alone exceeds HBM: fall back to the arithmetic
        return tree_bytes(tree)


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


def _dump(row: PhaseRow, text: str, what: str) -> None:
    """With JAXALIGN_PLAN_DUMP=DIR, keep the optimized HLO (or the compiler's out-of-memory report) of each phase."""
    import os

    folder = os.environ.get("JAXALIGN_PLAN_DUMP")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{re.sub(r'[^a-z0-9]+', '_', row.phase.lower())}.{what}").write_text(text)


# ---- compile and measure ----------------------------------------------------------------------------------------

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


def compile_and_measure(row: PhaseRow, sl: Slice, mcfg, build: Callable[[], Any], args: tuple, *, tokens: float,
                        seq_len: int, backward: bool, kv: float = 0.0, extra_args: float = 0.0):
    """Lower ``build()`` on ``args``, compile for the slice, fill the memory / FLOPs / time fields of ``row``."""
    from jaxalign import flops as flops_lib
    from jaxalign.plan_hlo import analyze

    t0 = time.perf_counter()
    dump = tempfile.mkdtemp(prefix="jaxalign_plan_")
    try:
        compiled = build().lower(*args).compile(compiler_options={"xla_dump_to": dump})
        allocated = hbm_allocated(dump)
    except Exception as e:
        row.compile_s = time.perf_counter() - t0
        oom = parse_oom(str(e))
        if oom is None:
            raise
        shutil.rmtree(dump, ignore_errors=True)
        _dump(row, str(e), "oom.txt")
        row.exact = False
        row.kv_cache = kv
        row.temps = max(oom[0] - row.params - row.opt_state - row.reference - kv - extra_args, 0.0)
        row.total = oom[0] + row.outside
        return None
    row.compile_s = time.perf_counter() - t0
    _dump(row, compiled.as_text(), "hlo.txt")
    mem = compiled.memory_analysis()
    row.temps = float(mem.temp_size_in_bytes)
    row.kv_cache = kv
    for f in Path(dump).glob("*after_optimizations-buffer-assignment.txt"):
        _dump(row, f.read_text(), "buffer-assignment.txt")
    shutil.rmtree(dump, ignore_errors=True)
    in_step = float(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                    + mem.temp_size_in_bytes)
    row.analysis_total = in_step
    if allocated:  # what the runtime reserves: every HBM allocation of the buffer assignment
        in_step = allocated
        row.temps = max(allocated - mem.argument_size_in_bytes - mem.output_size_in_bytes
                        + mem.alias_size_in_bytes, 0.0)
    row.total = in_step + row.outside
    n = len(sl.devices)
    costs = analyze(compiled.as_text(), n)
    row.flops = costs.flops
    row.compute_s = costs.cycles / sl.clock
    row.matmul_s = costs.matmul_cycles / sl.clock
    row.collective_bytes = sum(costs.collective_bytes.values())
    row.collective_s = sum(b / sl.ici_bandwidth(g) for _, b, g in costs.collective_groups)
    row.step_s = max(row.compute_s, row.collective_s)
    if tokens and row.step_s:
        row.mfu = flops_lib.mfu(tokens / row.step_s, mcfg, seq_len, sl.peak * n, backward=backward)
    return compiled


# ---- the phases -------------------------------------------------------------------------------------------------

def _optimizer(section):
    from jaxalign.train.optim import OptimConfig, make_optimizer

    return make_optimizer(OptimConfig(name=section.optimizer, learning_rate=section.learning_rate,
                                      schedule=section.schedule, warmup_ratio=section.warmup_ratio,
                                      weight_decay=section.weight_decay, max_grad_norm=section.max_grad_norm), 1000)


def _check_batch(name: str, section, mesh) -> None:
    from jaxalign.sharding import batch_shards

    b, k, shards = section.batch_size, max(1, section.accum_steps), batch_shards(mesh)
    if b % k or (b // k) % shards:
        raise PlanError(f"{name}.batch_size={b} with {name}.accum_steps={k} gives micro-batches of {b / k:g} rows, "
                        f"which must divide evenly over the mesh's {shards} batch shards (data x fsdp); choose "
                        f"batch_size a multiple of accum_steps x {shards}.")


def plan_train(kind: str, cfg, mcfg, mesh, sl: Slice) -> PhaseRow:
    import jax
    import jax.numpy as jnp

    from jaxalign.train.state import TrainState, state_shardings
    from jaxalign.train.steps import StepConfig, make_train_step

    section = {"sft": cfg.sft, "reward": cfg.reward, "preference": cfg.policy}[kind]
    name = {"sft": "sft", "reward": "reward", "preference": "policy"}[kind]
    _check_batch(name, section, mesh)
    params = abstract_params(mcfg, mesh, reward=kind == "reward")
    optimizer, schedule = _optimizer(section)
    abstract = jax.eval_shape(lambda p: TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p)), params)
    shard = state_shardings(abstract, mesh)
    state = jax.tree.map(lambda a, s: _sds(a.shape, a.dtype, s), abstract, shard)
    T = cfg.data.max_length
    batch = abstract_batch("sft" if kind == "sft" else "pairs", section.batch_size, T, mesh,
                           pack=kind == "sft" and cfg.sft.pack)
    ref, detail = None, ""
    if kind == "sft":
        step_cfg = StepConfig("sft", accum_steps=section.accum_steps)
    elif kind == "reward":
        step_cfg = StepConfig("reward", accum_steps=section.accum_steps, margin=cfg.reward.margin,
                              center_coef=cfg.reward.center_coef)
    else:
        from jaxalign.losses import get_objective

        overrides = {}
        if cfg.policy.beta >= 0:
            overrides["beta"] = cfg.policy.beta
        if cfg.policy.reduce:
            overrides["reduce"] = cfg.policy.reduce
        _, objective = get_objective(cfg.policy.objective, **overrides)
        step_cfg = StepConfig("preference", accum_steps=section.accum_steps, objective=cfg.policy.objective,
                              objective_args=tuple(sorted(overrides.items())),
                              reference="params" if objective.uses_reference else "none")
        if objective.uses_reference:
            ref = abstract_params(mcfg, mesh)
        detail = f"{cfg.policy.objective}{', reference in step' if ref else ''}, "
    rows_per_item = 1 if kind == "sft" else 2
    detail += (f"{section.batch_size} {'seqs' if kind == 'sft' else 'pairs'} x {T} tok"
               f"{f', accum {section.accum_steps}' if section.accum_steps > 1 else ''}, remat {mcfg.remat}")
    row = PhaseRow(name, detail, hbm=sl.chip.hbm)
    row.params = compiled_bytes(params)
    row.opt_state = compiled_bytes(state.opt_state)
    row.reference = row.params if ref is not None else 0.0
    row.outside = row.params  # the loaded params, alive next to the state's copy (OUTSIDE)
    args = (state, batch) + ((ref,) if ref is not None else ())
    build = lambda: make_train_step(mcfg, step_cfg, optimizer, schedule, mesh, shard, batch, ref)  # noqa: E731
    tokens = section.batch_size * rows_per_item * T
    compile_and_measure(row, sl, mcfg, build, args, tokens=tokens, seq_len=T, backward=True,
                        extra_args=tree_bytes(batch))
    n = len(sl.devices)
    seq = T - 1  # the step predicts tokens 1..T-1
    ntok = section.batch_size * rows_per_item * seq / n
    row.model_flops = model_step_flops(mcfg, ntok, seq, remat=mcfg.remat, reference=ref is not None,
                                       lm_head=kind != "reward")
    return row


def model_step_flops(mcfg, tokens: float, seq: int, *, remat: str, reference: bool, lm_head: bool = True) -> float:
    """Analytic matmul FLOPs the compiled train step should execute for ``tokens`` tokens of length ``seq``:
    ``flops_per_token`` (6 N + attention), plus what remat recomputes — under remat=full the layers' forward except
    each layer's last matmul (its output only feeds the residual sum, which the backward pass does not need: MLP down
    projection, and with GPT-NeoX's parallel residual also the attention output projection), under remat=dots the
    attention einsums — plus a forward of the reference; the reward model has no LM head (its 6 H V drops out)."""
    from jaxalign.flops import flops_per_token

    fwd = flops_per_token(mcfg, seq, backward=False)
    h, L = mcfg.hidden_size, mcfg.num_layers
    head = 2 * h * mcfg.vocab_size
    attn = 4 * L * seq * mcfg.num_heads * mcfg.head_dim
    last = 2 * L * h * (mcfg.intermediate_size + (mcfg.num_heads * mcfg.head_dim if mcfg.parallel_residual else 0))
    per_tok = 3 * fwd + {"full": fwd - head - last, "dots": attn}.get(remat, 0.0) + (fwd if reference else 0.0)
    if not lm_head:
        per_tok -= 3 * head
    return per_tok * tokens


def prefill_flops(mcfg, batch: int, prompt: int, cache_len: int) -> float:
    """Matmul FLOPs of the sampler's prefill: the layers on ``prompt`` tokens attending over all ``cache_len`` slots
    (the cache is allocated at full length), the LM head on the last position only."""
    from jaxalign.flops import matmul_params

    head = mcfg.hidden_size * mcfg.vocab_size
    layers = 2 * (matmul_params(mcfg) - head) * prompt
    attn = 4 * mcfg.num_layers * prompt * cache_len * mcfg.num_heads * mcfg.head_dim
    return batch * (layers + attn + 2 * head)


def plan_sampler(cfg, mcfg, mesh, sl: Slice, *, phase: str) -> list[PhaseRow]:
    import jax
    import jax.numpy as jnp

    from jaxalign import sharding
    from jaxalign.flops import flops_per_token
    from jaxalign.sampling import sampler as S
    from jaxalign.sampling.memory import plan_batch_size

    scfg = mcfg.replace(remat="none")
    if phase == "sample":
        n = cfg.policy.num_samples if cfg.policy.pairs == "best_of_n" and cfg.run.method != "afd" else 1
        temperature, max_new = cfg.sample.temperature, cfg.sample.max_new_tokens
    else:
        n, temperature, max_new = 1, cfg.eval.temperature, cfg.eval.max_new_tokens
    greedy = temperature == 0
    settings = dict(greedy=greedy, top_k=0 if greedy else int(cfg.sample.top_k),
                    use_top_p=(not greedy) and cfg.sample.top_p < 1.0,
                    pad_id=int(mcfg.pad_token_id) if mcfg.pad_token_id is not None else 0, mesh=mesh)
    P = S._bucket(cfg.data.max_prompt_length, None, 16, "prompt")
    out_len = S._bucket(max_new, None, 16, "length")
    cache_len = P + out_len
    cdt = jnp.dtype(mcfg.dtype)
    masters = abstract_params(mcfg, mesh)
    params = abstract_params(mcfg, mesh, dtype=lambda k: mcfg.dtype if k in S._CAST_ONCE else mcfg.param_dtype)
    outside = compiled_bytes(masters)
    shards = sharding.batch_shards(mesh)
    if cfg.sample.batch_size:
        B = math.ceil(cfg.sample.batch_size / shards) * shards
        how = "sample.batch_size"
    else:  # what generate() picks at run time: default_budget_bytes() = 90% of HBM minus what is in use
        prompts = cfg.eval.num_prompts if phase == "eval" else (cfg.sample.limit or 10**6)
        B = plan_batch_size(scfg, num_prompts=prompts, prompt_len=P, cache_len=cache_len, num_samples=n,
                            budget_bytes=int(0.9 * sl.chip.hbm - outside), mesh=mesh, cache_dtype=cdt)
        how = "planned by sampling.memory"
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    bs = lambda nd: sharding.batch_sharding(mesh, nd)  # noqa: E731
    pargs = (params, _sds((B, P), jnp.int32, bs(2)), _sds((B, P), jnp.int32, bs(2)), _sds((B,), jnp.int32, bs(1)),
             _sds((B,), jnp.bool_, bs(1)), _sds((), jnp.uint32, rep), _sds((), jnp.float32, rep),
             _sds((), jnp.float32, rep))
    kv_shape = (mcfg.num_layers, B * n, cache_len, mcfg.num_kv_heads, mcfg.head_dim)
    kv_sh = sharding.named_sharding(S.CACHE_AXES, kv_shape, mesh)
    kv = 2 * tree_bytes([_sds(kv_shape, cdt, kv_sh)])
    label = "sample" if phase == "sample" else "eval sampling"
    detail = f"{B} prompts x {n} samples ({how}), prompt {P} + {out_len} new, temperature {temperature:g}"
    rows = []
    pre = PhaseRow(f"{label}: prefill", detail, hbm=sl.chip.hbm)
    pre.params, pre.outside = compiled_bytes(params), outside

    def prefill_fn(*a):
        return S._prefill_fn(*a, cfg=scfg, num_samples=n, cache_len=cache_len, cache_dtype=cdt, **settings)

    def jit_in_mesh(fn, donate=()):
        class _Build:  # lower() inside activate(mesh), as sampler._compile does
            def lower(self, *a):
                with sharding.activate(mesh):
                    return jax.jit(fn, donate_argnums=donate).lower(*a)
        return _Build()

    compiled = compile_and_measure(pre, sl, mcfg, lambda: jit_in_mesh(prefill_fn), pargs, tokens=B * P, seq_len=P,
                                   backward=False, kv=kv)
    pre.model_flops = prefill_flops(mcfg, B, P, cache_len) / len(sl.devices)
    rows.append(pre)
    dec = PhaseRow(f"{label}: decode", f"{B * n} rows, one token per step, cache {cache_len}", hbm=sl.chip.hbm)
    dec.params, dec.outside = pre.params, outside
    if compiled is None:
        dec.verdict = "not compiled (prefill does not fit)"
        dec.total, dec.kv_cache, dec.exact = pre.total, kv, False
        rows.append(dec)
        return rows
    cache_out, state_out = jax.tree.map(lambda s: _sds(s.shape, s.dtype, s.sharding), compiled.out_info)
    dargs = (params, cache_out, state_out, _sds((), jnp.float32, rep), _sds((), jnp.float32, rep),
             _sds((), jnp.int32, rep), _sds((8,), jnp.int32, rep))

    def decode_fn(*a):
        return S._decode_fn(*a, cfg=scfg, prompt_len=P, out_len=out_len, **settings)

    compile_and_measure(dec, sl, mcfg, lambda: jit_in_mesh(decode_fn, donate=(1,)), dargs, tokens=B * n,
                        seq_len=cache_len, backward=False, kv=kv)
    dec.model_flops = B * n * flops_per_token(mcfg, cache_len, backward=False) / len(sl.devices)
    rows.append(dec)
    return rows


# ---- verdicts ---------------------------------------------------------------------------------------------------

def _gib(x: float) -> str:
    return f"{x / GiB:.2f}"


def judge(row: PhaseRow, cfg, mesh, sl: Slice) -> None:
    """Fill ``verdict`` and, when it does not fit comfortably, ``advice``: which knob fixes it, and to what."""
    from jaxalign.sharding import batch_shards

    if row.verdict:
        return
    hbm, n = row.hbm, len(sl.devices)
    frac = row.total / hbm
    approx = "" if row.exact else "~"
    if frac <= FIT_MARGIN:
        row.verdict = f"FITS ({approx}{_gib(row.total)} of {_gib(hbm)} GiB, {100 * (1 - frac):.0f}% free)"
        return
    if frac <= 1.0:
        row.verdict = f"TIGHT ({approx}{_gib(row.total)} of {_gib(hbm)} GiB, under {100 * (1 - FIT_MARGIN):.0f}% free)"
    else:
        row.verdict = (f"DOES NOT FIT: needs {approx}{_gib(row.total)} GiB per chip, {_gib(row.total - hbm)} GiB over "
                       f"the {_gib(hbm)} GiB the compiler may use")
    target = FIT_MARGIN * hbm
    state_shards = mesh.shape["fsdp"] * mesh.shape["tensor"]
    if row.phase in ("sft", "reward", "policy"):
        section = {"sft": cfg.sft, "reward": cfg.reward, "policy": cfg.policy}[row.phase]
        # what does not shrink with the micro-batch: weights, optimizer, reference, the loaded copy, gradients
        fixed = row.params + row.opt_state + row.reference + row.outside + row.params
        if fixed > 0.8 * target:
            need = math.ceil(state_shards * fixed / (0.6 * target))
            shards = 1 << math.ceil(math.log2(max(need, 1)))
            if state_shards < shards <= n:
                row.advice.append(f"weights, optimizer state, reference and gradients take {_gib(fixed)} GiB per "
                                  f"chip: shard them over {shards} chips (mesh.fsdp x mesh.tensor = {shards}, now "
                                  f"{state_shards})")
            elif shards > n:
                row.advice.append(f"weights, optimizer state, reference and gradients need ~{need} chips of this "
                                  f"kind even fully sharded: a bigger slice, or a smaller state (reference "
                                  f"log-probs precomputed instead of reference weights, the loaded params donated "
                                  f"to the train state, bf16 optimizer moments)")
        acts, room = row.total - fixed, target - fixed
        if acts > max(room, 0.0):
            k = max(1, section.accum_steps)
            shards = batch_shards(mesh)
            want = k * acts / max(room, acts / 64)
            options = [k2 for k2 in range(k + 1, section.batch_size + 1)
                       if section.batch_size % k2 == 0 and (section.batch_size // k2) % shards == 0]
            pick = next((k2 for k2 in options if k2 >= want), options[-1] if options else None)
            if pick:
                row.advice.append(f"activations take ~{_gib(acts)} GiB per chip at micro-batch "
                                  f"{section.batch_size // k}: raise {row.phase}.accum_steps to {pick} (micro-batch "
                                  f"{section.batch_size // pick})")
            else:
                row.advice.append(f"activations take ~{_gib(acts)} GiB per chip and the micro-batch is already "
                                  f"one row per batch shard ({section.batch_size // k} over {shards}): move batch "
                                  f"shards to mesh.tensor (activations split over heads / MLP)")
            if cfg.model.remat != "full":
                row.advice.append(f"model.remat=full (now {cfg.model.remat}) recomputes each layer in the backward "
                                  f"pass and keeps only the layer inputs")
    else:
        rest = row.total - row.params - row.outside
        room = target - row.params - row.outside
        if room <= 0:
            row.advice.append("the weights alone fill the chip: raise mesh.fsdp / mesh.tensor")
        else:
            m = re.match(r"(\d+) prompts", row.detail)
            b = int(m.group(1)) if m else 0
            shards = batch_shards(mesh)
            fit_b = max(shards, int(b * room / rest) // shards * shards) if b else 0
            row.advice.append(f"KV cache + activations take {_gib(rest)} GiB per chip: set sample.batch_size="
                              f"{fit_b} (prompts per batch; now {b})")


# ---- the recipe -------------------------------------------------------------------------------------------------

def phases_to_plan(cfg) -> list[str]:
    from jaxalign.pipeline.phases import plan as phase_plan

    kinds = {p.kind for p in phase_plan(cfg)}
    out = [k for k in ("sft",) if k in kinds]
    if "sample" in kinds:
        out.append("sample")
    elif "eval" in kinds:
        out.append("eval")
    out += [k for k in ("reward", "policy") if k in kinds]
    return out


def plan_recipe(cfg, topology: str, *, phases: list[str] | None = None, print_fn=print) -> list[PhaseRow]:
    """Compile every phase of ``cfg`` for ``topology`` and print the plan; returns one row per compiled function."""
    import jax

    try:  # never probe for a local TPU while planning (libtpu is installed): compile on the CPU client
        jax.config.update("jax_platforms", "cpu")
    except Exception:
        pass
    sl = get_slice(topology)
    mcfg = model_config(cfg)
    mesh = make_mesh(cfg, sl)
    rows: list[PhaseRow] = []
    for phase in phases or phases_to_plan(cfg):
        if phase in ("sample", "eval"):
            rows += plan_sampler(cfg, mcfg, mesh, sl, phase=phase)
        else:
            rows.append(plan_train({"sft": "sft", "reward": "reward", "policy": "preference"}[phase], cfg, mcfg,
                                   mesh, sl))
        for r in rows:
            judge(r, cfg, mesh, sl)
    if print_fn is not None:
        print_fn(format_plan(cfg, mcfg, sl, mesh, rows))
    return rows


def _fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def format_plan(cfg, mcfg, sl: Slice, mesh, rows: list[PhaseRow]) -> str:
    n = len(sl.devices)
    mesh_txt = " x ".join(f"{a} {mesh.shape[a]}" for a in ("data", "fsdp", "tensor"))
    head = (f"### {cfg.run.name} on {sl.name}: {n} x {sl.devices[0].device_kind} ({sl.chip.name}), "
            f"{_gib(sl.chip.hbm)} GiB HBM usable per chip, peak {sl.peak / 1e12:.0f} TFLOP/s bf16 per chip\n\n"
            f"model {cfg.model.path} ({mcfg.num_params() / 1e9:.2f} B params; compute {mcfg.dtype}, params "
            f"{mcfg.param_dtype}, remat {mcfg.remat}); mesh {mesh_txt}\n\n")
    cols = ("phase", "params", "opt state", "reference", "acts / temps", "KV cache", "outside step", "total / HBM",
            "fits", "TFLOP compiled / model", "compute s (matmul)", "ICI s", "est. step s", "MFU")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        approx = "" if r.exact else "~"
        fl = "-" if r.flops is None else f"{r.flops / 1e12:.2f} / {r.model_flops / 1e12:.2f}"
        comp = "-" if r.compute_s is None else f"{r.compute_s:.3g} ({r.matmul_s:.3g})"
        lines.append("| " + " | ".join([
            r.phase, _gib(r.params), _gib(r.opt_state), _gib(r.reference), approx + _gib(r.temps), _gib(r.kv_cache),
            _gib(r.outside), f"{approx}{_gib(r.total)} / {_gib(r.hbm)}",
            {"FITS": "yes", "TIGHT": "tight", "DOES": "**NO**"}.get(r.verdict.split(" ")[0], r.verdict[:12]),
            fl, comp, _fmt(r.collective_s, ".3g"), _fmt(r.step_s, ".3g"),
            "-" if r.mfu is None else f"{100 * r.mfu:.1f}%"]) + " |")
    notes = []
    for r in rows:
        notes.append(f"- **{r.phase}** ({r.detail}; compiled in {r.compile_s:.0f} s): {r.verdict}" +
                     "".join(f"\n  - fix: {a}" for a in r.advice))
    units = ("\nGiB per chip. 'outside step': " + OUTSIDE + ". TFLOP per chip per step (decode: per generated "
             "token): matmul FLOPs of the compiled program (loops counted) / the analytic count (jaxalign.flops "
             "+ remat recompute + reference forward). compute s: the TPU compiler's cycle estimates summed (in "
             "brackets: instructions holding a matmul); ICI s: collective bytes per chip / ICI bandwidth (a model); "
             "est. step = max of the two; MFU = jaxalign.flops.mfu at that step time.")
    return head + "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n" + units + "\n"
