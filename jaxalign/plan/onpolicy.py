"""The on-policy policy step's plan (``policy.kind`` = rloo | grpo | ppo): the abstract mini-batch and the state the
phase holds, and where each piece lives.

- in the step (the compiled program's arguments): the policy's params (+ PPO's value head, [H]) and AdamW state, the
  mini-batch of ``policy.batch_size`` sequences with its rollout targets (old log-probs, advantages; GRPO's reference
  log-probs; PPO's returns and old values);
- on the chips between steps (``reference`` and ``outside`` columns): the frozen reference weights and the reward
  model (backbone + head), both in ``model.param_dtype``, which the rollout's forward passes use; the sampler's
  compute-dtype copies and KV cache belong to the sample row (the sampler runs between steps, not with them).

online_dil uses the pair step (``policy.objective``; its reference as :func:`jaxalign.rules.policy_reference` decides,
never precomputed): :func:`jaxalign.plan.phases.plan_train` plans it like any pair objective.
"""
from __future__ import annotations

from jaxalign.rules import REWARD_KINDS  # the on-policy kinds this module plans

__all__ = ["REWARD_KINDS", "onpolicy_inputs", "plan_onpolicy"]


def onpolicy_inputs(cfg, mcfg, mesh):
    """The step's abstract inputs (:class:`jaxalign.plan.phases.TrainInputs`): params (with LoRA: the adapters,
    + PPO's value head) and frozen base (None without LoRA), the mini-batch of ``policy.batch_size`` sequences, the
    rollout batch (:func:`jaxalign.plan.phases.rollout_batch`), and the abstract trees resident beside it
    (reference, reward model). With LoRA the reference is the frozen base with the adapters off (round 1 / policy.
    reference=previous, as the pair plan assumes): nothing resident for it."""
    import dataclasses

    import jax.numpy as jnp

    from jaxalign.models.value import VALUE_AXES, VALUE_HEAD
    from jaxalign.plan.phases import TrainInputs, abstract_params, lora_split_abstract, rollout_batch, sds
    from jaxalign.sharding import batch_sharding, named_sharding
    from jaxalign.pipeline.onpolicy import settings_of
    from jaxalign.train.steps import StepConfig

    p = cfg.policy
    s = settings_of(cfg)
    prompts, n = rollout_batch(cfg)

    step_cfg = StepConfig("onpolicy", accum_steps=p.accum_steps, onpolicy=s)
    params = abstract_params(mcfg, mesh)
    if p.kind == "ppo":
        h = (mcfg.hidden_size,)
        params[VALUE_HEAD] = sds(h, jnp.dtype(mcfg.param_dtype), named_sharding(VALUE_AXES, h, mesh))
    b, t = p.batch_size, cfg.data.max_length
    tok, per_tok, per_seq = batch_sharding(mesh, 2), (b, t - 1), (b,)
    batch = {k: sds((b, t), jnp.int32, tok) for k in ("input_ids", "attention_mask", "loss_mask")}
    batch["old_logps"] = sds(per_tok, jnp.float32, tok)
    if p.kind == "ppo":
        batch.update({k: sds(per_tok, jnp.float32, tok) for k in ("advantages", "returns", "old_values")})
    else:
        batch["advantages"] = sds(per_seq, jnp.float32, batch_sharding(mesh, 1))
    if p.kind == "grpo":
        batch["ref_logps"] = sds(per_tok, jnp.float32, tok)
    resident = {"reference": abstract_params(mcfg, mesh), "reward_model": abstract_params(mcfg, mesh, reward=True)}
    lora, frozen = cfg.model.lora.build(), None
    if lora is not None:
        params, frozen = lora_split_abstract(params, mcfg, mesh, lora, cfg.model.lora.base_dtype,
                                             trainable=(VALUE_HEAD,) if p.kind == "ppo" else ())
        step_cfg = dataclasses.replace(step_cfg, lora=lora)
        resident["reference"] = {}
    detail = (f"{p.kind}, {b} seqs x {t} tok per mini-batch, rollout {prompts * n} seqs ({prompts} prompts x {n}), "
              f"{p.inner_epochs} inner epoch(s){', value head' if p.kind == 'ppo' else ''}"
              f"{f', accum {p.accum_steps}' if p.accum_steps > 1 else ''}, remat {mcfg.remat}; "
              + (f"LoRA r={lora.rank}, the frozen base is the reference; RM resident" if lora else
                 "reference + RM resident"))
    return TrainInputs(step_cfg, params, frozen, None, batch, detail, rollout=(prompts, n), resident=resident)


def plan_onpolicy(cfg, mcfg, mesh, sl):
    """Compile the on-policy step for the slice -> a ``PhaseRow`` (params + value head and optimizer state in the
    step; reference in the ``reference`` column, the reward model in ``outside``)."""
    import jax
    import jax.numpy as jnp

    from jaxalign.plan.phases import PhaseRow, compile_and_measure, compiled_bytes, model_step_flops, tree_bytes
    from jaxalign.plan.tpu import PlanError
    from jaxalign.sharding import batch_split_problem
    from jaxalign.train.optim import make_optimizer
    from jaxalign.train.state import TrainState, state_shardings
    from jaxalign.train.steps import make_train_step

    p = cfg.policy
    problem = batch_split_problem("policy", p.batch_size, p.accum_steps, mesh)
    if problem:
        raise PlanError(problem)
    inputs = onpolicy_inputs(cfg, mcfg, mesh)
    step_cfg, params, frozen, batch, resident = (inputs.step_cfg, inputs.params, inputs.frozen, inputs.batch,
                                                 inputs.resident)
    optimizer, schedule = make_optimizer(p.optim(), 1000)
    abstract = jax.eval_shape(lambda q: TrainState(jnp.zeros((), jnp.int32), q, optimizer.init(q)), params)
    shard = state_shardings(abstract, mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shard)
    row = PhaseRow("policy", inputs.detail, hbm=sl.chip.hbm)
    row.params = compiled_bytes(params) + (compiled_bytes(frozen) if frozen is not None else 0.0)
    row.opt_state = compiled_bytes(state.opt_state)
    row.reference = compiled_bytes(resident["reference"]) if resident["reference"] else 0.0
    row.outside = compiled_bytes(resident["reward_model"])
    t = cfg.data.max_length
    compile_and_measure(row, sl, mcfg, lambda: make_train_step(mcfg, step_cfg, optimizer, schedule, mesh, shard,
                                                               batch, None, frozen),
                        (state, batch) + step_cfg.extra_args(frozen), tokens=p.batch_size * t, seq_len=t,
                        backward=True, extra_args=tree_bytes(batch))
    row.model_flops = model_step_flops(mcfg, p.batch_size * (t - 1) / len(sl.devices), t - 1, remat=mcfg.remat,
                                       reference=False, lora=frozen is not None)
    return row
