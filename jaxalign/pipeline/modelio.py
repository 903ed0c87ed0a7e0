"""Reading and writing the pipeline's models: the policy (a causal LM) and the reward model, as HF safetensors
folders in the work directory — the hand-off between phases and what users load."""
from __future__ import annotations

from pathlib import Path

import jax
from etils import epath

from jaxalign.models import read_params, read_reward_params, save_params
from jaxalign.models.export import complete_export, converted_copy
from jaxalign.models.hub import hub_repo_id, push_to_hub
from jaxalign.models.lora import save_peft_adapter
from jaxalign.sharding import to_host
from jaxalign.pipeline.context import RunContext
from jaxalign.pipeline.phases import Phase
from jaxalign.storage import is_remote, local_copy, staging_dir, upload_folder


def load_policy(ctx: RunContext, folder: epath.PathLike) -> dict[str, jax.Array]:
    """A causal LM's parameters, placed on the run's mesh (a bucket folder is read from a cached local copy)."""
    return read_params(local_copy(folder), ctx.model_cfg, mesh=ctx.mesh)


def load_reward(ctx: RunContext, folder: epath.PathLike, *, seed: int = 0) -> dict[str, jax.Array]:
    """A reward model (a trained one, or a backbone with a fresh head drawn from ``seed``) on the run's mesh."""
    return read_reward_params(folder, ctx.model_cfg, mesh=ctx.mesh, seed=seed)


def save_model(ctx: RunContext, params: dict[str, jax.Array], phase: Phase, *, reward: bool = False,
               adapters: dict[str, jax.Array] | None = None, base: epath.PathLike | None = None) -> epath.Path:
    """Write the phase's final model to ``phases/<phase>/model`` (every process joins the gather; process 0 writes;
    a bucket work directory gets a local folder uploaded). With LoRA ``params`` are the merged weights and
    ``adapters`` also go to ``phases/<phase>/adapter`` in PEFT's format, for ``base`` (the model they were trained
    on, named in adapter_config.json)."""
    out = ctx.workdir.phase(phase) / "model"
    if jax.process_count() > 1:
        params = {k: to_host(v) for k, v in params.items()}
        adapters = None if adapters is None else {k: to_host(v) for k, v in adapters.items()}
    if jax.process_index() != 0:
        return out
    head = "sequence_classification" if reward else "causal_lm"

    def write(model: Path, adapter: Path) -> None:
        save_params(params, ctx.model_cfg, model, head=head)
        export(ctx, model, phase, reward=reward)
        if adapters is not None:  # a reward model's head goes with its adapters (PEFT's modules_to_save)
            save_peft_adapter(adapters, ctx.lora, ctx.model_cfg, adapter, base_model_name_or_path=str(base),
                              score=params["score"] if reward else None)

    if not is_remote(out):
        write(Path(out), Path(out.parent / "adapter"))
        return out
    with staging_dir() as tmp:  # the tokenizer and transformers write local files: finish the folder, then upload it
        local = Path(tmp) / "model"
        write(local, Path(tmp) / "adapter")
        for extra in ("export", "adapter"):
            if (Path(tmp) / extra).is_dir():
                upload_folder(Path(tmp) / extra, out.parent / extra)
        upload_folder(local, out)
    return out


def export(ctx: RunContext, folder: epath.Path, phase: Phase, *, reward: bool) -> None:
    """Make a phase's model folder complete for transformers (tokenizer, chat template, generation config with the
    template's end-of-turn token, a pad id), then the ``export`` section: a cast copy, a hub upload. The folder later
    phases read keeps the training dtype (a bfloat16 round trip between rounds would drop small updates)."""
    cfg = ctx.cfg
    complete_export(folder, tokenizer=ctx.tokenizer, chat_template=cfg.data.chat_template or None, reward=reward)
    target = folder
    if cfg.export.dtype and cfg.export.dtype != cfg.model.param_dtype:
        target = converted_copy(folder, folder.parent / "export", cfg.export.dtype)
    if cfg.export.push_to_hub:
        push_to_hub(target, hub_repo_id(cfg.export.hub_id, run=cfg.run.name, phase=phase.name),
                    private=cfg.export.hub_private)
