"""The policy phase: the policy improves on (chosen, rejected) pairs with the recipe's pair objective (DPO family,
DIL, SimPO), regularised towards a frozen reference.

The reference (``policy.reference``) is the SFT model, or the previous round's policy (SPIN). Its log-probs reach the
step one of three ways (``Policy.reference_logps``): its frozen weights evaluated in every step, precomputed once
before the phase (``policy.precompute_reference``; the weights then leave the devices before training starts), or not
at all for a reference-free objective. With LoRA, when the reference is the phase's starting model (round 1, or
``policy.reference=previous``), it is the frozen base with the adapters switched off (``reference_logps="base"``):
one copy of the weights on the devices.

With an on-policy ``policy.kind`` (rloo / grpo / ppo / online_dil) the phase is :mod:`jaxalign.pipeline.onpolicy`'s:
same phase kind, directory, fingerprint and report row, but it samples the policy itself batch by batch.
"""
from __future__ import annotations

from jaxalign.pipeline import onpolicy
from jaxalign.pipeline.context import RunContext
from jaxalign.pipeline.modelio import load_policy, save_model
from jaxalign.pipeline.pairs import policy_pairs
from jaxalign.pipeline.phases import Phase
from jaxalign.pipeline.training import final_metrics, train_phase
from jaxalign.rules import micro_batch_size, policy_reference
from jaxalign.train.reference import precompute_reference_logps


def run(ctx: RunContext, phase: Phase) -> dict[str, float]:
    cfg = ctx.cfg
    if cfg.policy.kind != "pairs":  # rloo / grpo / ppo / online_dil: the policy samples itself
        return onpolicy.run(ctx, phase)
    pairs, measured = policy_pairs(ctx, phase)
    start = ctx.workdir.policy_model(phase.round - 1)
    params = load_policy(ctx, start)
    ref_folder = start if cfg.policy.reference == "previous" else ctx.workdir.sft_model()
    # LoRA on the reference itself: the frozen base with the adapters off is the reference, no second copy
    base_is_reference = ctx.lora is not None and str(ref_folder) == str(start)
    step = cfg.policy.step(reference_logps=policy_reference(
        cfg, uses_reference=cfg.policy.build_objective().uses_reference, base_is_reference=base_is_reference))
    ref_params = None
    if step.reference_logps in ("precomputed", "in_step"):
        ref_params = params if base_is_reference else load_policy(ctx, ref_folder)
    heldout = ctx.heldout_pairs
    if step.reference_logps == "precomputed":
        kw = dict(reduce=step.objective.reduce, mesh=ctx.mesh, pad_id=ctx.encoder.pad_id, buckets=ctx.buckets,
                  batch_size=micro_batch_size(cfg.policy.batch_size, cfg.policy.accum_steps),
                  cache_dir=ctx.workdir.phase(phase) / "reference")
        pairs = precompute_reference_logps(ref_params, ctx.model_cfg, pairs, **kw)
        heldout = precompute_reference_logps(ref_params, ctx.model_cfg, heldout, **kw) if heldout else []
        ref_params = None
    trained = train_phase(ctx, phase, cfg.policy, step, params, pairs, ref_params=ref_params, heldout=heldout)
    save_model(ctx, trained.params, phase, adapters=trained.adapters, base=start)
    return {**final_metrics(ctx, phase), **measured, "pairs": len(pairs)}
