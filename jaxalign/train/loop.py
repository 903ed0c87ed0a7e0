"""The loop every training phase runs: resume, step, log, checkpoint, and stop cleanly on preemption or a bad step.

:func:`drive` is that loop with the step left open: :func:`run_loop` fills it with batches of a grain dataset (SFT,
reward, pair phases), :mod:`jaxalign.train.onpolicy_loop` with rollouts the policy draws from its current weights.

- Resume: if the phase directory holds a committed checkpoint, the state and the data iterator (if any) are restored
  from it, so the resumed run sees exactly the batches the uninterrupted one would have (bit-exact on CPU).
- Preemption: SIGTERM / SIGINT set a flag; at the next step boundary every process agrees (an all-gather, not a file)
  and saves the same step, then the loop raises :class:`Preempted` (the launcher exits with ``EXIT_PREEMPTED``).
- Non-finite loss or gradient norm: the step itself left the state unchanged; :func:`finite` stops the phase with a
  diagnostic naming the step, the metric and the batch's row ids (:class:`NonFiniteError`), or with
  ``skip_nonfinite`` counts and goes on.
"""
from __future__ import annotations

import signal
import time
from typing import Any, Callable, Iterable

import jax
import numpy as np

from jaxalign import sharding

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again" — re-running the same command resumes


class Preempted(Exception):
    def __init__(self, phase: str, step: int):
        super().__init__(f"phase {phase!r} stopped by a signal at step {step} after saving a checkpoint; "
                         f"resume with the same command.")
        self.step = step


class NonFiniteError(RuntimeError):
    pass


class PreemptionGuard:
    """Turns SIGTERM / SIGINT into a flag checked at step boundaries (a second SIGINT interrupts at once)."""

    def __init__(self):
        self.flag = False
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave the default handlers
                pass
        return self

    def _handle(self, signum, frame):
        if self.flag and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.flag, self.signum = True, signum

    def __exit__(self, exc_type, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        if self.flag and exc_type is None and self._old:
            # a signal after the last step boundary's check would be lost: hand it to the handlers outside
            signal.raise_signal(self.signum)

    def agreed(self) -> bool:
        """True on every process if any process got a signal (a collective, so all stop at the same step)."""
        if jax.process_count() == 1:
            return self.flag
        from jax.experimental import multihost_utils

        return bool(np.asarray(multihost_utils.process_allgather(np.asarray([self.flag], np.int32))).any())


def finite(phase: str, step: int, metrics: dict[str, float], *, skip: bool, checkpointer,
           counters: dict[str, int], rows: Iterable[int] = (), where: str = "") -> bool:
    """The non-finite rule, on a step's metrics (its ``nonfinite`` flag is popped): True for a finite step; for a
    non-finite one (the step left the state unchanged) :class:`NonFiniteError` naming the step (``where`` says which
    part of it), the metric, the batch's row ids and the last good checkpoint, or with ``skip`` a count in
    ``counters["nonfinite_steps_skipped"]`` and False."""
    if not metrics.pop("nonfinite"):
        return True
    bad = [k for k in ("loss", "grad_norm") if not np.isfinite(metrics.get(k, 0.0))]
    ids = sorted(set(r for r in np.asarray(rows).ravel().tolist() if r >= 0))[:32]
    msg = (f"[{phase}] step {step}{where}: {', '.join(bad) or 'loss'} is not finite "
           f"({', '.join(f'{k}={metrics.get(k)}' for k in ('loss', 'grad_norm'))})"
           + (f"; batch row ids {ids}." if ids else "."))
    if not skip:
        checkpointer.wait()
        last = checkpointer.latest_step()
        at = (f"the last good checkpoint is step {last}" if last is not None else
              "there is no checkpoint yet (a re-run starts the phase from its beginning)")
        raise NonFiniteError(msg + f" The state was not updated; {at}. Set skip_nonfinite=true to skip "
                                   f"such steps, or lower the learning rate.")
    counters["nonfinite_steps_skipped"] = counters.get("nonfinite_steps_skipped", 0) + 1
    print(msg + " Skipped (skip_nonfinite).")
    return False


def drive(
    *,
    phase: str,
    state: Any,
    advance: Callable[[Any, int], tuple[Any, dict[str, float]] | None],
    total_steps: int,
    checkpointer,
    writer,
    save_every: int,
    data_iter: Any = None,
    on_step: Callable[[int], None] | None = None,
    evaluate: Callable[[Any], dict[str, float]] | None = None,
    eval_every: int = 0,
) -> Any:
    """Train ``state`` for ``total_steps`` steps, resuming from the checkpointer's latest step.

    ``advance(state, step)`` trains step ``step`` (1-based) and returns ``(state, metrics)``, or None when its data
    ran out (the phase ends there). ``data_iter`` (optional) is the iterator ``advance`` reads: checkpointed and
    restored with the state. ``on_step(step)`` runs after the step, before the checkpoint decision; ``evaluate(state)``
    (optional) gives held-out metrics, logged every ``eval_every`` steps and at the last step.
    """
    start = 0
    latest = checkpointer.latest_step()
    if latest is not None:
        state, _ = checkpointer.restore(latest, state, data_iter)
        start = latest
    if checkpointer.ignored:
        print(f"[{phase}] ignored partially written checkpoint(s) {checkpointer.ignored} (a save was interrupted).")
    step = start
    with PreemptionGuard() as guard:
        while step < total_steps:
            out = advance(state, step + 1)
            if out is None:
                break
            state, metrics = out
            step += 1
            writer.log(step, metrics, advance=1)
            if evaluate is not None and (step == total_steps or (eval_every and step % eval_every == 0)):
                writer.log(step, evaluate(state), prefix="eval")
            if on_step is not None:
                on_step(step)
            stop = guard.agreed()
            if stop or step % save_every == 0 or step == total_steps:
                checkpointer.save(step, state, data_iter, {"phase": phase, "step": step}, force=stop)
                writer.flush()  # a run resumed from this checkpoint re-logs only the steps after it
            if stop:
                checkpointer.wait()
                raise Preempted(phase, step)
        if checkpointer.latest_step() != step:
            checkpointer.save(step, state, data_iter, {"phase": phase, "step": step}, force=True)
        checkpointer.wait()
        # a signal that arrived after the last step's check (while its checkpoint was written) still stops the run:
        # the phase is not marked finished, and a re-run resumes from that checkpoint
        if guard.agreed():
            raise Preempted(phase, step)
    return state


def run_loop(
    *,
    phase: str,
    state: Any,
    step_fn: Callable,
    dataset: Iterable,
    total_steps: int,
    mesh,
    checkpointer,
    writer,
    save_every: int,
    skip_nonfinite: bool = False,
    extra_args: tuple = (),
    mfu_fn: Callable[[float, int], float] | None = None,
    counters: dict[str, int] | None = None,
    on_step: Callable[[int], None] | None = None,
    on_batch: Callable[[int, dict], None] | None = None,
    evaluate: Callable[[Any], dict[str, float]] | None = None,
    eval_every: int = 0,
) -> Any:
    """Train ``state`` for ``total_steps`` steps of ``step_fn`` over ``dataset`` (a grain IterDataset).

    ``on_batch(step, host_batch)`` (optional) sees each host batch before it is trained on as step ``step`` (1-based),
    e.g. to log its ``row_id``s; the other arguments are :func:`drive`'s.
    """
    counters = counters if counters is not None else {}
    it = iter(dataset)

    def advance(state, step: int):
        try:
            host_batch = next(it)
        except StopIteration:
            print(f"[{phase}] data ran out at step {step - 1} of {total_steps}; finishing the phase here.")
            return None
        if on_batch is not None:
            on_batch(step, host_batch)
        t0 = time.perf_counter()
        batch = sharding.shard_batch({k: v for k, v in host_batch.items() if k != "row_id"}, mesh)
        state, metrics = step_fn(state, batch, *extra_args)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        dt = time.perf_counter() - t0
        finite(phase, step, metrics, skip=skip_nonfinite, checkpointer=checkpointer, counters=counters,
               rows=host_batch.get("row_id", ()))
        tokens = float(np.sum(host_batch["attention_mask"])) if "attention_mask" in host_batch else float(
            np.sum(host_batch.get("chosen_attention_mask", 0)) + np.sum(host_batch.get("rejected_attention_mask", 0)))
        # each process holds an equal share of the global batch: scale its count to the global one (estimate), so
        # tokens/s and MFU (divided by the peak of every device in the mesh) are global figures
        tokens *= jax.process_count()
        metrics["tokens_per_second"] = tokens / dt
        if mfu_fn is not None:
            seq = next(v.shape[1] for k, v in host_batch.items() if k.endswith("input_ids"))
            metrics["mfu"] = mfu_fn(tokens / dt, seq)
        return state, metrics

    return drive(phase=phase, state=state, advance=advance, total_steps=total_steps, checkpointer=checkpointer,
                 writer=writer, save_every=save_every, data_iter=it, on_step=on_step, evaluate=evaluate,
                 eval_every=eval_every)
