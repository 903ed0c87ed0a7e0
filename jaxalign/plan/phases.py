"""The phases compiled for a slice: abstract inputs with the recipe's shardings, the engine's train steps and the
sampler's prefill / decode, and what each compiled program costs (memory, FLOPs, time)."""
from __future__ import annotations

import dataclasses
import math
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from jaxalign.config import CONFIG_DIR
from jaxalign.plan.tpu import PlanError, Slice, hbm_allocated, parse_oom
from jaxalign.rules import micro_batch_size, policy_reference, rollout_prompts, rollout_samples_per_prompt

MODELS_DIR = CONFIG_DIR / "models"  # shipped with the recipes (a wheel carries them as jaxalign/configs/models)
# hub id -> file in configs/models (any other id is tried as <repo name lower-cased>.json)
HUB_CONFIGS = {
    "mistralai/Mistral-7B-v0.1": "mistral-7b-v0.1.json",
    "alignment-handbook/zephyr-7b-sft-full": "zephyr-7b-sft-full.json",
    "HuggingFaceH4/mistral-7b-sft-beta": "mistral-7b-sft-beta.json",
    "EleutherAI/pythia-1b": "pythia-1b.json",
    "EleutherAI/pythia-1b-deduped": "pythia-1b.json",
    "Qwen/Qwen2.5-0.5B-Instruct": "qwen2.5-0.5b-instruct.json",
}


@dataclasses.dataclass
class PhaseRow:
    """One compiled function of a phase: bytes per device, FLOPs per device per step, seconds, verdict."""

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
    model_flops: float | None = None  # per device per step, analytic (model_step_flops / prefill_flops)
    compute_s: float | None = None
    matmul_s: float | None = None  # the part of compute_s in instructions that hold a matmul
    collective_s: float | None = None
    collective_bytes: float | None = None
    collectives: dict = dataclasses.field(default_factory=dict)  # kind -> (bytes sent per device, seconds)
    step_s: float | None = None
    mfu: float | None = None
    compile_s: float = 0.0
    exact: bool = True  # False when the compiler refused the program and total comes from its error message
    info: dict = dataclasses.field(default_factory=dict)  # sampling: the batch and shapes (jaxalign.plan.hours)

    @property
    def fits(self) -> bool:
        return self.total <= self.hbm


# ---- inputs: model, mesh ---------------------------------------------------------------------------------------

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

def sds(shape, dtype, sharding):
    import jax

    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def abstract_params(mcfg, mesh, *, reward: bool = False, dtype=None) -> dict:
    import jax.numpy as jnp

    from jaxalign.models.axes import PARAM_AXES
    from jaxalign.models.decoder import param_shapes
    from jaxalign.sharding import named_sharding

    shapes = param_shapes(mcfg)
    if reward:
        shapes.pop("lm_head", None)
        shapes["score"] = (mcfg.hidden_size,)
    out = {}
    for k, s in shapes.items():
        dt = jnp.dtype(dtype(k) if callable(dtype) else (dtype or mcfg.param_dtype))
        out[k] = sds(s, dt, named_sharding(PARAM_AXES[k], s, mesh))
    return out


def abstract_batch(kind: str, batch: int, length: int, mesh, *, pack: bool = False) -> dict:
    import jax.numpy as jnp

    from jaxalign.sharding import batch_sharding

    keys = (["input_ids", "loss_mask", "attention_mask"] + (["segment_ids", "positions"] if pack else [])
            if kind == "sft" else [f"{s}_{k}" for s in ("chosen", "rejected")
                                   for k in ("input_ids", "loss_mask", "attention_mask")])
    return {k: sds((batch, length), jnp.int32, batch_sharding(mesh, 2)) for k in keys}


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


def _dump(row: PhaseRow, text: str, what: str) -> None:
    """With JAXALIGN_PLAN_DUMP=DIR, keep the optimized HLO (or the compiler's out-of-memory report) of each phase."""
    import os

    folder = os.environ.get("JAXALIGN_PLAN_DUMP")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{re.sub(r'[^a-z0-9]+', '_', row.phase.lower())}.{what}").write_text(text)


# ---- compile and measure ----------------------------------------------------------------------------------------

def compile_and_measure(row: PhaseRow, sl: Slice, mcfg, build: Callable[[], Any], args: tuple, *, tokens: float,
                        seq_len: int, backward: bool, kv: float = 0.0, extra_args: float = 0.0):
    """Lower ``build()`` on ``args``, compile for the slice, fill the memory / FLOPs / time fields of ``row``."""
    from jaxalign import flops as flops_lib
    from jaxalign.plan.hlo import analyze

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
    for kind, b, g in costs.collective_groups:
        sent, secs = row.collectives.get(kind, (0.0, 0.0))
        row.collectives[kind] = (sent + b, secs + b / sl.ici_bandwidth(g))
    row.step_s = max(row.compute_s, row.collective_s)
    if tokens and row.step_s:
        row.mfu = flops_lib.mfu(tokens / row.step_s, mcfg, seq_len, sl.peak * n, backward=backward)
    return compiled


# ---- the phases -------------------------------------------------------------------------------------------------

def _optimizer(section, mu_dtype: str = ""):
    from jaxalign.train.optim import make_optimizer

    return make_optimizer(section.optim(), 1000, mu_dtype=mu_dtype)


def _check_batch(name: str, section, mesh) -> None:
    from jaxalign.sharding import batch_split_problem

    problem = batch_split_problem(name, section.batch_size, section.accum_steps, mesh)
    if problem:
        raise PlanError(problem)


@dataclasses.dataclass(frozen=True)
class WhatIf:
    """Engine changes to plan before making them (the default plans the engine as it is).

    - ``precomputed_reference``: the policy step reads reference log-probs from the batch
      (``StepConfig(reference_logps="precomputed")``, :mod:`jaxalign.train.reference`) instead of holding the reference
      weights and running their forward pass;
    - ``mu_dtype``: AdamW's first moment in this dtype (``optax.adamw(mu_dtype=...)``), e.g. ``"bfloat16"``.
    """

    precomputed_reference: bool = False
    mu_dtype: str = ""


@dataclasses.dataclass
class TrainInputs:
    """A train phase's abstract step inputs (no compile): the step config (its accum_steps splits ``batch``, one
    optimizer step's global batch, into micro-batches inside the step), the trainable params (LoRA: the adapters),
    the frozen base (None without LoRA) and the reference's params where the step takes them."""

    step_cfg: Any
    params: dict
    frozen: dict | None
    ref: dict | None
    batch: dict
    detail: str
    rollout: tuple[int, int] | None = None  # on-policy kinds: (prompts, samples per prompt) of a rollout batch
    resident: dict = dataclasses.field(default_factory=dict)  # abstract trees on the chips beside the step

    @property
    def global_batch(self) -> int:
        return next(iter(self.batch.values())).shape[0]

    @property
    def micro_batch(self) -> int:
        return micro_batch_size(self.global_batch, self.step_cfg.accum_steps)


def rollout_batch(cfg) -> tuple[int, int] | None:
    """``(prompts, samples per prompt)`` of an on-policy rollout batch (:func:`jaxalign.rules.rollout_prompts`,
    :func:`jaxalign.rules.rollout_samples_per_prompt`); None for ``policy.kind=pairs``."""
    return None if cfg.policy.kind == "pairs" else (rollout_prompts(cfg), rollout_samples_per_prompt(cfg))


def train_inputs(kind: str, cfg, mcfg, mesh, what_if: WhatIf = WhatIf()) -> TrainInputs:
    """The abstract inputs of phase ``kind`` (sft | reward | policy with a pair step: ``policy.kind`` pairs or
    online_dil): ``{kind}.batch_size`` rows (pairs for reward / policy) split into ``{kind}.accum_steps``
    micro-batches, and the policy step's reference as :func:`jaxalign.rules.policy_reference` decides it (round 1:
    with LoRA the frozen base with the adapters off is the reference)."""
    import jax.numpy as jnp

    section = getattr(cfg, kind)  # sft | reward | policy
    params = abstract_params(mcfg, mesh, reward=kind == "reward")
    lora, frozen = cfg.model.lora.build(), None
    if lora is not None:  # the state holds the adapters (+ the reward head); the base is a frozen step argument
        params, frozen = lora_split_abstract(params, mcfg, mesh, lora, cfg.model.lora.base_dtype,
                                             trainable=("score",) if kind == "reward" else ())
    T = cfg.data.max_length
    batch = abstract_batch("sft" if kind == "sft" else "pairs", section.batch_size, T, mesh,
                           pack=kind == "sft" and cfg.sft.pack)
    ref, detail, rollout = None, "", None
    if kind != "policy":
        step_cfg = section.step()
    else:
        p = cfg.policy
        mode = policy_reference(cfg, uses_reference=p.build_objective().uses_reference,
                                base_is_reference=lora is not None)
        if what_if.precomputed_reference and mode in ("in_step", "base"):
            mode = "precomputed"
        step_cfg = p.step(reference_logps=mode)
        if mode == "in_step":
            ref = abstract_params(mcfg, mesh)
        if mode == "precomputed":
            from jaxalign.sharding import batch_sharding

            batch.update({k: sds((section.batch_size,), jnp.float32, batch_sharding(mesh, 1))
                          for k in ("ref_chosen_logps", "ref_rejected_logps")})
        detail = f"{p.objective}, reference {'in step' if ref else mode}, "
        rollout = rollout_batch(cfg)
        if rollout is not None:  # online_dil: (demonstration, own sample) pairs of each rollout batch
            detail += f"{p.kind}, rollout {rollout[0]} prompts x {rollout[1]}, "
    if lora is not None:
        step_cfg = dataclasses.replace(step_cfg, lora=lora)
        base_dtype = cfg.model.lora.base_dtype or mcfg.param_dtype
        detail += (f"LoRA r={lora.rank} ({sum(math.prod(x.shape) for x in params.values()) / 1e6:.1f}M trainable), "
                   f"frozen base {base_dtype}, ")
    detail += (f"{section.batch_size} {'seqs' if kind == 'sft' else 'pairs'} x {T} tok"
               f"{f', accum {section.accum_steps}' if section.accum_steps > 1 else ''}, remat {mcfg.remat}")
    return TrainInputs(step_cfg, params, frozen, ref, batch, detail, rollout)


def plan_train(kind: str, cfg, mcfg, mesh, sl: Slice, what_if: WhatIf = WhatIf()) -> PhaseRow:
    import jax
    import jax.numpy as jnp

    from jaxalign.train.state import TrainState, state_shardings
    from jaxalign.train.steps import make_train_step

    section = getattr(cfg, kind)  # sft | reward | policy
    _check_batch(kind, section, mesh)
    inputs = train_inputs(kind, cfg, mcfg, mesh, what_if)
    step_cfg, params, frozen, ref, batch = inputs.step_cfg, inputs.params, inputs.frozen, inputs.ref, inputs.batch
    optimizer, schedule = _optimizer(section, what_if.mu_dtype)
    abstract = jax.eval_shape(lambda p: TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p)), params)
    shard = state_shardings(abstract, mesh)
    state = jax.tree.map(lambda a, s: sds(a.shape, a.dtype, s), abstract, shard)
    T = cfg.data.max_length
    rows_per_item = 1 if kind == "sft" else 2
    row = PhaseRow(kind, inputs.detail, hbm=sl.chip.hbm)
    row.params = compiled_bytes(params) + (compiled_bytes(frozen) if frozen is not None else 0.0)
    row.opt_state = compiled_bytes(state.opt_state)
    row.reference = row.params if ref is not None else 0.0
    row.outside = 0.0  # train() donates the loaded params to the train state: no second copy (report.OUTSIDE)
    if what_if != WhatIf():
        row.detail += f"; what if: {what_if}"
    args = (state, batch) + step_cfg.extra_args(frozen, ref)
    build = lambda: make_train_step(mcfg, step_cfg, optimizer, schedule, mesh, shard, batch, ref, frozen)  # noqa: E731
    tokens = section.batch_size * rows_per_item * T
    compile_and_measure(row, sl, mcfg, build, args, tokens=tokens, seq_len=T, backward=True,
                        extra_args=tree_bytes(batch))
    n = len(sl.devices)
    seq = T - 1  # the step predicts tokens 1..T-1
    ntok = section.batch_size * rows_per_item * seq / n
    row.model_flops = model_step_flops(mcfg, ntok, seq, remat=mcfg.remat,
                                       reference=ref is not None or step_cfg.reference_logps == "base",
                                       lm_head=kind != "reward", lora=step_cfg.lora is not None)
    return row


def lora_split_abstract(params: dict, mcfg, mesh, lora, base_dtype: str, *, trainable: tuple[str, ...] = ()
                        ) -> tuple[dict, dict]:
    """Abstract ``(trainable, frozen)`` as :func:`jaxalign.models.lora.split_trainable` gives them: the adapters in
    the master dtype (sharded like their base matrices) plus the params named in ``trainable`` (a reward head, PPO's
    value head), and the rest of the base in ``base_dtype``."""
    import jax.numpy as jnp

    from jaxalign.models.lora import adapter_logical_axes, adapter_shapes
    from jaxalign.sharding import named_sharding

    shapes = adapter_shapes(mcfg, lora)
    axes = adapter_logical_axes(shapes)
    train = {k: sds(s, jnp.dtype(mcfg.param_dtype), named_sharding(axes[k], s, mesh)) for k, s in shapes.items()}
    train.update({k: params[k] for k in trainable})
    dt = jnp.dtype(base_dtype or mcfg.param_dtype)
    frozen = {k: sds(v.shape, dt, v.sharding) for k, v in params.items() if k not in trainable}
    return train, frozen


def model_step_flops(mcfg, tokens: float, seq: int, *, remat: str, reference: bool, lm_head: bool = True,
                     lora: bool = False) -> float:
    """Analytic matmul FLOPs the compiled train step should execute for ``tokens`` tokens of length ``seq``:
    ``flops_per_token`` (6 N + attention), plus what remat recomputes — under remat=full the layers' forward except
    each layer's last matmul (its output only feeds the residual sum, which the backward pass does not need: MLP down
    projection, and with GPT-NeoX's parallel residual also the attention output projection), under remat=dots the
    attention einsums — plus a forward of the reference; the reward model has no LM head (its 6 H V drops out).
    With LoRA the frozen weights' gradient matmuls (2 N of the 6 N) are not computed (the adapters' are negligible)."""
    from jaxalign.flops import flops_per_token

    fwd = flops_per_token(mcfg, seq, backward=False)
    h, L = mcfg.hidden_size, mcfg.num_layers
    head = 2 * h * mcfg.vocab_size
    attn = 4 * L * seq * mcfg.num_heads * mcfg.head_dim
    last = 2 * L * h * (mcfg.intermediate_size + (mcfg.num_heads * mcfg.head_dim if mcfg.parallel_residual else 0))
    per_tok = 3 * fwd + {"full": fwd - head - last, "dots": attn}.get(remat, 0.0) + (fwd if reference else 0.0)
    if lora:
        per_tok -= fwd - attn  # the weight gradients: every matmul of the forward but attention's own einsums
    if not lm_head:
        per_tok -= (2 if lora else 3) * head
    return per_tok * tokens
