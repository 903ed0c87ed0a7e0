"""AOT plan of a recipe on a TPU slice, from this machine: per-chip memory, FLOPs, estimated step time, MFU, verdict.

    python launch/tpu_run.py --config ultrachat_dil --plan v5p:4x4x4 [mesh.fsdp=16 policy.accum_steps=2 ...]

With ``libtpu`` installed (``pip install -e ".[tpu]"``), ``jax.experimental.topologies.get_topology_desc`` describes the
slice's devices without a TPU, and the engine's own jitted functions — :func:`jaxalign.train.steps.make_train_step`
for the SFT / reward / preference steps (the preference step with its frozen reference), the sampler's
``jaxalign.sampling.kernels.prefill`` / ``decode`` — are lowered with abstract inputs (``ShapeDtypeStruct`` carrying the recipe's
shardings) and compiled by the TPU compiler. Only the model's ``config.json`` is needed (the recipe models' configs are
in ``configs/models/``). For each phase:

- memory per chip: parameters, optimizer state and reference weights as the compiler lays them out (a no-op program
  taking just that tree, ``memory_analysis().argument_size_in_bytes``); the step's total, which is every HBM allocation
  of its buffer assignment (parameters, outputs, the temporary heap; read from the compiler's dump), hence
  activations / temporaries = total - arguments - outputs; the KV cache; what the phase keeps on the chip outside the
  step (see ``report.OUTSIDE``) — against the HBM the compiler may use. When the step does not fit, the TPU compiler
  refuses it (RESOURCE_EXHAUSTED) and its message gives the total.
- FLOPs per step and the compiler's estimated compute time, loop-aware (:mod:`jaxalign.plan.hlo`; the compiler's
  ``cost_analysis()`` counts a scanned layer once); collective time from the bytes each chip sends and the slice's
  ICI bandwidth (a model: the compiler gives none); step time = max(compute, collectives), i.e. collectives overlapped.
- MFU: :func:`jaxalign.flops.mfu`, the formula the training metrics use (model FLOPs of the trained tokens, remat and
  the reference forward not counted), at the estimated step time and the chip's peak from ``jaxalign.flops.PEAK_FLOPS``.
"""
from __future__ import annotations

import sys

from jaxalign.plan.disk import disk_plan, format_disk
from jaxalign.plan.hours import ASSUMPTIONS, format_rounds, format_sampling, round_items, sampling_estimate
from jaxalign.plan.phases import (HUB_CONFIGS, MODELS_DIR, PhaseRow, make_mesh, model_config, model_step_flops,
                                  WhatIf, plan_train, resolve_model_file)
from jaxalign.plan.sampling import plan_sampler, prefill_flops
from jaxalign.plan.onpolicy import REWARD_KINDS, plan_onpolicy
from jaxalign.plan.report import FIT_MARGIN, format_plan, judge
from jaxalign.plan.tpu import CHIPS, PlanError, Slice, get_slice, hbm_allocated, parse_oom, require_libtpu

__all__ = ["plan_recipe", "phases_to_plan", "PlanError", "PhaseRow", "WhatIf", "Slice", "CHIPS", "HUB_CONFIGS",
           "MODELS_DIR", "FIT_MARGIN", "get_slice", "require_libtpu", "model_config", "resolve_model_file", "parse_oom",
           "hbm_allocated", "format_plan", "judge", "plan_train", "plan_sampler", "model_step_flops", "prefill_flops",
           "round_items", "sampling_estimate", "ASSUMPTIONS"]


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
    if "sample" in kinds and "eval" in kinds and cfg.run.method != "afd":  # a round's eval, for the round total
        out.append("eval")
    return out


def plan_recipe(cfg, topology: str, *, phases: list[str] | None = None, print_fn=print,
                what_if: WhatIf = WhatIf()) -> list[PhaseRow]:
    """Compile every phase of ``cfg`` for ``topology`` and print the plan; returns one row per compiled function.

    ``phases`` limits the plan to some of sft / sample / eval / reward / policy; ``what_if`` plans engine changes
    that are not made yet (:class:`jaxalign.plan.phases.WhatIf`)."""
    import jax

    try:  # never probe for a local TPU while planning (libtpu is installed): compile on the CPU client
        jax.config.update("jax_platforms", "cpu")
    except Exception:
        pass
    from jaxalign.models.ops import target_platform

    sl = get_slice(topology)
    mcfg = model_config(cfg)
    mesh = make_mesh(cfg, sl)
    rows: list[PhaseRow] = []
    with target_platform("tpu"):  # traced on this CPU host, compiled for the slice: trace the TPU program
        for phase in phases or phases_to_plan(cfg):
            print(f"[plan] {phase}: compiling for {sl.name} ({len(sl.devices)} devices; minutes for a 7B model) ...",
                  file=sys.stderr, flush=True)
            if phase in ("sample", "eval"):
                rows += plan_sampler(cfg, mcfg, mesh, sl, phase=phase)
            elif phase == "policy" and cfg.policy.kind in REWARD_KINDS:  # the on-policy step: its own inputs
                rows.append(plan_onpolicy(cfg, mcfg, mesh, sl))
            else:
                rows.append(plan_train(phase, cfg, mcfg, mesh, sl, what_if))
            for r in rows:
                judge(r, cfg, mesh, sl)
    if print_fn is not None:
        print_fn(format_plan(cfg, mcfg, sl, mesh, rows))
        sampling, rounds = format_sampling(cfg, sl, rows), format_rounds(cfg, mcfg, rows, sl)
        if sampling:
            print_fn(f"Sampling on {sl.name} (per chip; HBM {sl.hbm_bw / 1e9:.0f} GB/s):\n\n{sampling}\n\n"
                     + (f"Per round on {sl.name} (hours, from the est. step s above):\n\n{rounds}\n" if rounds else
                        f"Assumptions: {ASSUMPTIONS}.\n"))
        print_fn(format_disk(cfg, disk_plan(cfg, mcfg)))
    return rows
