"""What a recipe writes to its work directory, phase by phase: the disk (or bucket) it needs.

Counted from the shapes and the config, no compile: a training phase's orbax checkpoint is the master weights plus the
optimizer's moments (AdamW 2, RMSprop 1, SGD 0, all in ``model.param_dtype``), ``reliability.keep_checkpoints`` of
them while it runs; a finished phase deletes them (``reliability.keep_finished_checkpoints=true`` keeps them), and
keeps its exported HF model (the weights once, in ``model.param_dtype``), ``samples.json`` (token ids as JSON, ~6
bytes a token, every response at ``max_new_tokens`` — an upper bound) and the reference log-prob cache (two float32 per
pair). ``peak`` is what is on disk while the phase runs: everything kept by earlier phases plus its own checkpoints.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from jaxalign.models.lora import adapter_shapes
from jaxalign.pipeline.phases import plan as phase_plan
from jaxalign.rules import candidates_per_prompt, round_prompts

JSON_BYTES_PER_TOKEN = 6  # up to 5 digits and ", " per token id
MOMENTS = {"adamw": 2, "rmsprop": 1, "sgd": 0}


@dataclasses.dataclass
class DiskRow:
    phase: str
    checkpoint: float = 0.0  # one orbax checkpoint
    checkpoints_while_running: float = 0.0  # keep_checkpoints of them
    kept: float = 0.0  # what stays after the phase (model, samples, reference cache, kept checkpoints)
    peak: float = 0.0  # on disk while the phase runs
    note: str = ""


def _prompts(cfg) -> tuple[int, str]:
    """Prompts per round (:func:`jaxalign.rules.round_prompts`, as the sample phase plans them), and where the number
    comes from."""
    from jaxalign.plan.sampling import UNKNOWN_PROMPTS

    n = round_prompts(cfg)
    if n is None:
        return UNKNOWN_PROMPTS, f"per {UNKNOWN_PROMPTS // 1000}k prompts (the dataset's size is not in the config)"
    return n, "sample.limit" if n == cfg.sample.limit else "data.train.limit"


def disk_plan(cfg, mcfg) -> list[DiskRow]:
    bytes_per = np.dtype(mcfg.param_dtype).itemsize
    policy_params = mcfg.num_params()
    head = mcfg.vocab_size * mcfg.hidden_size
    reward_params = policy_params - (0 if mcfg.tie_word_embeddings else head) + mcfg.hidden_size
    prompts, source = _prompts(cfg)
    keep = cfg.reliability.keep_checkpoints
    lora = cfg.model.lora.build()
    adapters = 0 if lora is None else sum(math.prod(s) for s in adapter_shapes(mcfg, lora).values())
    rows, kept_total = [], 0.0
    for phase in phase_plan(cfg):
        row = DiskRow(phase.name)
        if phase.kind in ("sft", "reward", "policy"):
            section = getattr(cfg, phase.kind)
            params = reward_params if phase.kind == "reward" else policy_params
            # LoRA: a checkpoint holds the adapters (+ the reward head) and their moments, not the frozen base
            trained = params if lora is None else adapters + (mcfg.hidden_size if phase.kind == "reward" else 0)
            row.checkpoint = trained * bytes_per * (1 + MOMENTS.get(section.optimizer, 2))
            row.checkpoints_while_running = keep * row.checkpoint
            row.kept = (params + (0 if lora is None else adapters)) * bytes_per  # merged model/ (+ adapter/)
            row.note = f"model {params / 1e9:.2f} B params" + (
                "" if lora is None else f", LoRA {trained / 1e6:.1f} M trained")
            if phase.kind == "policy" and cfg.policy.precompute_reference:
                row.kept += 2 * 4 * prompts
            if cfg.reliability.keep_finished_checkpoints:
                row.kept += row.checkpoints_while_running
        elif phase.kind == "sample":
            n = candidates_per_prompt(cfg) + (1 if cfg.run.method == "afd" or (
                cfg.run.method == "irl" and cfg.sample.negative_temperature >= 0) else 0)
            row.kept = prompts * n * cfg.sample.max_new_tokens * JSON_BYTES_PER_TOKEN
            row.note = f"{prompts} prompts ({source}) x {n} responses x {cfg.sample.max_new_tokens} tokens"
        elif phase.kind == "eval":
            n = 1 + cfg.eval.best_of_n
            row.kept = cfg.eval.num_prompts * n * cfg.eval.max_new_tokens * 2 * JSON_BYTES_PER_TOKEN
        row.peak = kept_total + row.checkpoints_while_running
        kept_total += row.kept
        rows.append(row)
    return rows


def format_disk(cfg, rows: list[DiskRow]) -> str:
    gib = 2.0**30

    def g(x: float) -> str:
        return f"{x / gib:,.1f}" if x >= 0.05 * gib else f"{x / 2**20:,.1f} MiB"

    lines = ["| phase | one checkpoint GiB | checkpoints while running (x keep) | kept after the phase | "
             "on disk while running | what |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.phase} | {g(r.checkpoint) if r.checkpoint else '-'} | "
                     f"{g(r.checkpoints_while_running) if r.checkpoint else '-'} | {g(r.kept)} | {g(r.peak)} | "
                     f"{r.note} |")
    total = sum(r.kept for r in rows)
    peak = max((r.peak for r in rows), default=0.0)
    deleted = "kept" if cfg.reliability.keep_finished_checkpoints else "deleted when the phase finishes"
    return ("Disk (work directory; GiB unless marked): training checkpoints x reliability.keep_checkpoints="
            f"{cfg.reliability.keep_checkpoints}, {deleted} (reliability.keep_finished_checkpoints).\n\n"
            + "\n".join(lines) + f"\n\n**needs {g(peak)} GiB at the peak, {g(total)} GiB when the run ends**\n")
