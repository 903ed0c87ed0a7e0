"""The SFT phase: behaviour cloning on the demonstrations (completion-only NLL), from the recipe's base model."""
from __future__ import annotations

from jaxalign.data.tokenize import sft_example
from jaxalign.pipeline.context import RunContext
from jaxalign.pipeline.modelio import load_policy, save_model
from jaxalign.pipeline.phases import Phase
from jaxalign.pipeline.training import final_metrics, train_phase


def run(ctx: RunContext, phase: Phase) -> dict[str, float]:
    examples = [sft_example(e) for e in ctx.demonstrations]
    params = load_policy(ctx, ctx.workdir.base_model)
    trained = train_phase(ctx, phase, ctx.cfg.sft, ctx.cfg.sft.step(), params, examples)
    save_model(ctx, trained.params, phase, adapters=trained.adapters, base=ctx.workdir.base_model)
    return final_metrics(ctx, phase)
