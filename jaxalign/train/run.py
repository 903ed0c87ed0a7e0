"""One training phase end to end: examples -> grain batches -> sharded steps -> orbax checkpoints -> final params.

The pipeline's sft / reward / policy phases and the tests all call :func:`train`; a phase directory holds
``checkpoints/`` (orbax, resumable) and ``tb/`` (tensorboard events + metrics.jsonl); it may be a bucket folder.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Sequence

import jax
from etils import epath

from jaxalign.checkpoint import PhaseCheckpointer
from jaxalign import sharding
from jaxalign.data.loader import pad_pair_batch, pad_sft_batch, pair_dataset, sft_dataset, total_batches
from jaxalign.flops import device_peak_flops, mfu
from jaxalign.metrics import MetricsWriter
from jaxalign.models.config import ModelConfig
from jaxalign.rules import micro_batch_size
from jaxalign.train.loop import run_loop
from jaxalign.train.optim import OptimConfig, make_optimizer
from jaxalign.train.state import create_state, param_shardings
from jaxalign.train.steps import StepConfig, make_eval_step, make_train_step


@dataclasses.dataclass(frozen=True)
class PhaseSettings:
    global_batch_size: int = 8
    num_epochs: int = 1
    max_steps: int = 0  # 0 = as many as the epochs give
    seed: int = 0
    save_every: int = 50
    keep_checkpoints: int = 2
    async_checkpointing: bool = True
    skip_nonfinite: bool = False
    pack: bool = False
    show_progress: bool = True
    trackers: str = "tensorboard"  # jaxalign.metrics.MetricsWriter's trackers
    logging_steps: int = 1
    run_name: str = ""
    wandb_project: str = ""

    @contextlib.contextmanager
    def outputs(self, phase_dir: str | epath.PathLike, *, total_steps: int,
                desc: str) -> Iterator[tuple[PhaseCheckpointer, MetricsWriter]]:
        """The phase's checkpointer (``checkpoints/``) and metrics writer (``tb/``: these trackers, logging steps and
        wandb run; its progress bar starts at the last checkpoint), closed on the way out. Every training loop opens
        them here, so what a phase keeps and where its metrics go is decided in one place."""
        phase_dir = epath.Path(phase_dir)
        checkpointer = PhaseCheckpointer(phase_dir / "checkpoints", keep=self.keep_checkpoints,
                                         async_save=self.async_checkpointing)
        try:
            writer = MetricsWriter(phase_dir / "tb", total_steps=total_steps, desc=desc,
                                   show_progress=self.show_progress, initial_step=checkpointer.latest_step() or 0,
                                   trackers=self.trackers, logging_steps=self.logging_steps, run_name=self.run_name,
                                   wandb_project=self.wandb_project)
            try:
                yield checkpointer, writer
            finally:
                writer.close()
        finally:
            checkpointer.close()


def phase_steps(num_examples: int, s: PhaseSettings) -> int:
    n = total_batches(num_examples, s.global_batch_size, s.num_epochs)
    return min(n, s.max_steps) if s.max_steps else n


def make_dataset(kind: str, examples: Sequence[dict], s: PhaseSettings, *, pad_id: int, buckets: Sequence[int]):
    common = dict(global_batch_size=s.global_batch_size, pad_id=pad_id, buckets=buckets, seed=s.seed,
                  num_epochs=s.num_epochs)
    if kind == "sft":
        return sft_dataset(examples, pack=s.pack, **common)
    return pair_dataset(examples, **common)


LENGTH_MATCH = 0.1  # a held-out pair is length-matched when its responses' token counts differ by <= 10%


def length_matched(pair: dict) -> bool:
    """Whether a pair example's chosen and rejected responses have about the same length (within LENGTH_MATCH of the
    longer one, at least one token), so that its accuracy cannot come from preferring the longer or shorter one."""
    lc, lr = int(sum(pair["chosen_mask"])), int(sum(pair["rejected_mask"]))
    return abs(lc - lr) <= max(1, LENGTH_MATCH * max(lc, lr))


def make_evaluator(cfg: ModelConfig, step_cfg: StepConfig, mesh, examples: Sequence[dict], *, batch_size: int,
                   pad_id: int, buckets: Sequence[int], ref_params=None,
                   frozen=None) -> Callable[[Any], dict[str, float]] | None:
    """``evaluate(state) -> metrics``: the step's loss and metrics on held-out ``examples``, the mean over full batches
    of ``batch_size`` (a remainder smaller than a batch is left out); None when not one batch is there. For pairs, also
    ``rewards/accuracies_length_matched`` over the :func:`length_matched` pairs (and their count ``length_matched``)
    when they fill a batch."""
    n = len(examples) // batch_size * batch_size
    if not n:
        return None
    pad = pad_sft_batch if step_cfg.kind == "sft" else pad_pair_batch

    def batches_of(rows):
        return [{k: v for k, v in pad(rows[i:i + batch_size], pad_id=pad_id, buckets=buckets).items()
                 if k != "row_id"} for i in range(0, len(rows) // batch_size * batch_size, batch_size)]

    batches = batches_of(examples)
    matched = batches_of([e for e in examples if length_matched(e)]) if step_cfg.kind != "sft" else []
    fn = make_eval_step(cfg, step_cfg, mesh)
    extra = step_cfg.extra_args(frozen, ref_params)

    def mean_over(params, bs) -> dict[str, float]:
        sums: dict[str, float] = {}
        for host in bs:
            for k, v in jax.device_get(fn(params, sharding.global_batch(host, mesh), *extra)).items():
                sums[k] = sums.get(k, 0.0) + float(v)
        return {k: v / len(bs) for k, v in sums.items()}

    def evaluate(state) -> dict[str, float]:
        out = mean_over(state.params, batches)
        if matched and "rewards/accuracies" in out:
            out["rewards/accuracies_length_matched"] = mean_over(state.params, matched)["rewards/accuracies"]
            out["length_matched"] = float(len(matched) * batch_size)
        return out

    return evaluate


def train(
    *,
    cfg: ModelConfig,
    params: dict[str, jax.Array],
    examples: Sequence[dict],
    phase_dir: str | epath.PathLike,
    mesh,
    step_cfg: StepConfig,
    optim: OptimConfig,
    settings: PhaseSettings,
    pad_id: int,
    buckets: Sequence[int],
    ref_params: dict[str, jax.Array] | None = None,
    frozen: dict[str, jax.Array] | None = None,
    counters: dict[str, int] | None = None,
    on_step=None,
    name: str | None = None,
    on_batch=None,
    eval_examples: Sequence[dict] = (),
    eval_every: int = 0,
) -> dict[str, jax.Array]:
    """Train ``params`` on ``examples``; resumable: a re-run with the same arguments continues from the last save.

    ``params`` are donated to the train state (device arrays passed in are deleted): pass a copy to keep them.
    With ``step_cfg.lora`` they are the trainable tree (``jaxalign.models.lora.split_trainable``) and ``frozen`` the
    base: placed by the usual rules, a step argument, not donated and not checkpointed; the trained tree is returned.
    ``eval_examples``: held-out examples evaluated every ``eval_every`` steps (0: only) and at the last step, logged
    with the ``eval`` prefix (tensorboard ``eval/loss``, ``eval/rewards/accuracies``: TRL's tags)."""
    phase_dir = epath.Path(phase_dir)
    name = name or phase_dir.name
    total = phase_steps(len(examples), settings)
    optimizer, schedule = make_optimizer(optim, total)
    state = create_state(params, optimizer, mesh, donate=True)
    dataset = make_dataset(step_cfg.kind, examples, settings, pad_id=pad_id, buckets=buckets)
    example = {k: v for k, v in next(iter(dataset)).items() if k != "row_id"}
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    if step_cfg.lora is not None:
        frozen = jax.device_put(frozen, param_shardings(frozen, mesh))
    ref_params = ref_params if step_cfg.takes_reference_params else None
    step_fn = make_train_step(cfg, step_cfg, optimizer, schedule, mesh, state_sharding, example, ref_params, frozen)
    extra = step_cfg.extra_args(frozen, ref_params)
    peak = device_peak_flops()
    # the one MFU formula (jaxalign.flops.mfu), as the TPU plan uses it: model FLOPs of the trained tokens / the peak
    # of every device in the mesh
    mfu_fn = None if not peak else (lambda tps, seq: mfu(tps, cfg, seq, peak * len(mesh.devices.flat)))  # noqa: E731
    with settings.outputs(phase_dir, total_steps=total, desc=name) as (checkpointer, writer):
        state = run_loop(phase=name, state=state, step_fn=step_fn, dataset=dataset, total_steps=total, mesh=mesh,
                         checkpointer=checkpointer, writer=writer, save_every=settings.save_every,
                         skip_nonfinite=settings.skip_nonfinite, extra_args=extra, mfu_fn=mfu_fn,
                         counters=counters, on_step=on_step, on_batch=on_batch,
                         evaluate=make_evaluator(cfg, step_cfg, mesh, eval_examples,
                                                 batch_size=micro_batch_size(settings.global_batch_size, step_cfg.accum_steps),
                                                 pad_id=pad_id, buckets=buckets, ref_params=ref_params,
                                                 frozen=frozen),
                         eval_every=eval_every)
    return state.params
