"""Orbax checkpoints of a phase: train state, data-iterator state and a small JSON of metadata, saved together.

Orbax writes each step into a temporary directory and renames it on commit, so a process killed mid-save leaves the
previous step restorable; ``latest_step`` only ever sees committed steps (uncommitted ones are reported and ignored).
"""
from __future__ import annotations


import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class DiskFullError(RuntimeError):
    pass


def _uncommitted(directory: Path) -> list[str]:
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if ".orbax-checkpoint-tmp" in p.name)


class PhaseCheckpointer:
    """Save every N steps, keep the last K, restore the latest committed step."""

    def __init__(self, directory: str | Path, *, keep: int = 2, async_save: bool = True,
                 min_free_bytes: int = 0):
        self.directory = Path(directory).absolute()
        self.min_free_bytes = min_free_bytes
        self.ignored = _uncommitted(self.directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def check_disk(self, need_bytes: int) -> None:
        free = shutil.disk_usage(self.directory).free
        if free < need_bytes + self.min_free_bytes:
            raise DiskFullError(
                f"{self.directory}: {free / 2**30:.2f} GiB free but the checkpoint needs about "
                f"{need_bytes / 2**30:.2f} GiB (+{self.min_free_bytes / 2**30:.2f} GiB reserve). The previous "
                f"checkpoint (step {self.latest_step()}) is intact; free space and re-run the same command to resume."
            )

    def save(self, step: int, state: Any, data_iter: Any = None, meta: dict | None = None, *, force: bool = False):
        import grain

        nbytes = sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes")) // max(1, jax.process_count())
        self.check_disk(nbytes)
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta or {})}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state: Any, data_iter: Any = None):
        """Restore ``step`` into the structure/shardings of ``abstract_state`` (and ``data_iter`` in place)."""
        import grain

        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        items = {"state": ocp.args.StandardRestore(target), "meta": ocp.args.JsonRestore()}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        return out["state"], out["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def free_bytes(path: str | Path) -> int:
    path = Path(path)
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


__all__ = ["PhaseCheckpointer", "DiskFullError", "free_bytes"]
