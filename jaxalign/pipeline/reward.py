"""The reward phase: a Bradley-Terry reward model (IRL: demonstration vs own sample) or AfD's discriminator.

Round k's RM starts from the SFT backbone with a fresh head (``reward.reinit_each_round``, as the IRL authors do) or
from round k-1's RM, or from ``model.reward_path`` when the recipe names a separate backbone. With LoRA (``model.lora.rank``) the backbone is
frozen and its adapters train together with the whole score head; the phase exports the merged model and a PEFT
sequence-classification adapter (the head as ``modules_to_save``) for the backbone it started from.
"""
from __future__ import annotations

from jaxalign.pipeline.context import RunContext
from jaxalign.pipeline.modelio import load_reward, save_model
from jaxalign.pipeline.pairs import reward_pairs
from jaxalign.pipeline.phases import Phase
from jaxalign.pipeline.training import final_metrics, train_phase


def run(ctx: RunContext, phase: Phase) -> dict[str, float]:
    cfg = ctx.cfg
    previous = ctx.workdir.reward_model(phase.round - 1) if phase.round > 1 else None
    init = (previous if not cfg.reward.reinit_each_round else None) or cfg.model.reward_path or \
        ctx.workdir.sft_model()
    params = load_reward(ctx, init, seed=cfg.run.seed + phase.round)
    trained = train_phase(ctx, phase, cfg.reward, cfg.reward.step(), params, reward_pairs(ctx, phase.round))
    # LoRA: model/ = the merged backbone with its head; adapter/ = the adapters + the head as PEFT's modules_to_save
    save_model(ctx, trained.params, phase, reward=True, adapters=trained.adapters, base=init)
    return final_metrics(ctx, phase)
