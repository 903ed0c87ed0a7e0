"""Verdicts (fits / tight / does not fit, and the knob that fixes it) and the printed table."""
from __future__ import annotations

import math
import re

from jaxalign.plan.hours import forward_seconds
from jaxalign.plan.phases import PhaseRow
from jaxalign.plan.tpu import GiB, Slice
from jaxalign.rules import batch_split_problem, micro_batch_size

FIT_MARGIN = 0.9  # FITS below this fraction of the usable HBM, TIGHT up to 1.0
OUTSIDE = ("train phases: nothing (the pipeline's train() donates the loaded params to the train state: "
           "create_state(donate=True), so the step's params are the only copy); sampling: the param_dtype params the "
           "phase loaded, next to the compute-dtype copies the sampler makes; on-policy steps (policy.kind rloo / grpo / "
           "ppo): the round's reward model, resident for the rollouts' scoring")


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
        # what does not shrink with the micro-batch: weights, optimizer, reference, gradients
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
                                  f"log-probs precomputed instead of reference weights, bf16 optimizer moments, "
                                  f"bf16 master weights: model.param_dtype=bfloat16)")
        acts, room = row.total - fixed, target - fixed
        if acts > max(room, 0.0):
            k = max(1, section.accum_steps)
            shards = batch_shards(mesh)
            want = k * acts / max(room, acts / 64)
            options = [k2 for k2 in range(k + 1, section.batch_size + 1)
                       if batch_split_problem("", section.batch_size, k2, shards) is None]
            pick = next((k2 for k2 in options if k2 >= want), options[-1] if options else None)
            if pick:
                row.advice.append(f"activations take ~{_gib(acts)} GiB per chip at micro-batch "
                                  f"{micro_batch_size(section.batch_size, k)}: raise {row.phase}.accum_steps to "
                                  f"{pick} (micro-batch {micro_batch_size(section.batch_size, pick)})")
            else:
                copies = [f"the loaded params ({_gib(row.outside)} GiB: donate them to the train state)"] * (
                    row.outside > 0) + [f"the reference weights ({_gib(row.reference)} GiB: precompute reference "
                                        f"log-probs)"] * (row.reference > 0)
                row.advice.append(f"activations take ~{_gib(acts)} GiB per chip and the micro-batch is already "
                                  f"one row per batch shard ({micro_batch_size(section.batch_size, k)} over "
                                  f"{shards}): trade batch shards for mesh.tensor (activations split over heads / "
                                  f"MLP)" +
                                  (f", or free the engine's copies: {' and '.join(copies)}" if copies else ""))
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
            b = row.info.get("batch") or (int(m.group(1)) if m else 0)  # the decode row's detail counts rows
            shards = batch_shards(mesh)
            fit_b = max(shards, int(b * room / rest) // shards * shards) if b else 0
            row.advice.append(f"KV cache + activations take {_gib(rest)} GiB per chip: set sample.batch_size="
                              f"{fit_b} (prompts per batch; now {b})")


def _fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def format_plan(cfg, mcfg, sl: Slice, mesh, rows: list[PhaseRow]) -> str:
    n = len(sl.devices)
    mesh_txt = " x ".join(f"{a} {mesh.shape[a]}" for a in ("data", "fsdp", "tensor"))
    u = sl.unit
    head = (f"### {cfg.run.name} on {sl.name} ({sl.sold_as}): {n} x {sl.devices[0].device_kind} ({sl.chip.name}"
            f"{'' if u == 'chip' else ', one device per TensorCore'}), {_gib(sl.chip.hbm)} GiB HBM usable per {u}, "
            f"peak {sl.peak / 1e12:.1f} TFLOP/s bf16 per {u}\n\n"
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
        split = ""
        if r.step_s and r.phase in ("sft", "reward", "policy"):  # where a train step's time goes (compute vs ICI)
            coll = ", ".join(f"{k} {v[0] / 1e9:.1f} GB {v[1]:.3g} s" for k, v in
                             sorted(r.collectives.items(), key=lambda kv: -kv[1][1]) if v[0] >= 5e7)
            split = (f"\n  - time: compute {r.compute_s:.3g} s = matmul {r.matmul_s:.3g} s + other "
                     f"{r.compute_s - r.matmul_s:.3g} s (the model FLOPs alone at peak: "
                     f"{r.mfu * r.step_s:.3g} s); collectives {r.collective_s:.3g} s"
                     f"{f' ({coll})' if coll else ''}; "
                     f"{'compute' if r.compute_s >= r.collective_s else 'ICI'}-bound") if r.mfu else ""
        if split and r.phase == "policy" and "reference precomputed" in r.detail:  # the pass it moved out of the step
            pairs, T = cfg.policy.batch_size, cfg.data.max_length
            ref_s = forward_seconds(r, mcfg, 2 * pairs, T, n, lm_head=True)
            split += (f"\n  - with the reference pass before the phase (one forward of the step's {2 * pairs} "
                      f"sequences at this step's FLOP rate, {ref_s:.3g} s): {r.step_s + ref_s:.3g} s per step, MFU "
                      f"{100 * r.mfu * r.step_s / (r.step_s + ref_s):.1f}% counting it")
        notes.append(f"- **{r.phase}** ({r.detail}; compiled in {r.compile_s:.0f} s): {r.verdict}" + split +
                     "".join(f"\n  - fix: {a}" for a in r.advice))
    units = (f"\nGiB per {u}. 'outside step': " + OUTSIDE + f". TFLOP per {u} per step (decode: per generated "
             "token): matmul FLOPs of the compiled program (loops counted) / the analytic count (jaxalign.flops "
             "+ remat recompute + reference forward). compute s: the TPU compiler's cycle estimates summed (in "
             "brackets: instructions holding a matmul); ICI s: collective bytes per chip / ICI bandwidth (a model); "
             "est. step = max of the two; MFU = jaxalign.flops.mfu at that step time.")
    return head + "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n" + units + "\n"
