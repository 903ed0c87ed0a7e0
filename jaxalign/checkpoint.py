"""Orbax checkpoints of a phase: train state, data-iterator state and a small JSON of metadata, saved together.

Orbax writes each step into a temporary directory and renames it on commit (in a bucket, which cannot rename: into the
step's folder, with a ``commit_success.txt`` written last), so a process killed mid-save leaves the previous step
restorable; ``latest_step`` only ever sees committed steps (uncommitted ones are reported and ignored). Paths are
``etils.epath`` paths, so the checkpoints may live in a bucket (``gs://...``): orbax and grain write through epath, the
arrays through tensorstore.
"""
from __future__ import annotations


import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from jaxalign.storage import is_remote


class DiskFullError(RuntimeError):
    pass


def _uncommitted(directory: epath.Path) -> list[str]:
    if not directory.is_dir():
        return []
    if is_remote(directory):
        # a bucket cannot rename a folder: orbax saves a step in place and writes commit_success.txt into it last
        return sorted(p.name for p in directory.iterdir()
                      if p.name.isdigit() and not (p / "commit_success.txt").exists())
    return sorted(p.name for p in directory.iterdir() if ".orbax-checkpoint-tmp" in p.name)


class PhaseCheckpointer:
    """Save every N steps, keep the last K, restore the latest committed step."""

    def __init__(self, directory: str | epath.PathLike, *, keep: int = 2, async_save: bool = True,
                 min_free_bytes: int = 0):
        directory = epath.Path(directory)
        self.directory = directory if is_remote(directory) else directory.absolute()
        self.min_free_bytes = min_free_bytes
        self.ignored = _uncommitted(self.directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def check_disk(self, need_bytes: int) -> None:
        if is_remote(self.directory):
            return  # a bucket has no free space to ask about; a failed write raises from orbax itself
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
        data_dir = self.directory / str(step) / "data"
        own = data_dir / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        elastic = data_iter is not None and data_dir.is_dir() and not own.exists()
        if data_iter is not None and not elastic:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        if elastic:
            _restore_data_elastic(data_dir, data_iter)
        return out["state"], out["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _restore_data_elastic(data_dir: epath.Path, data_iter: Any) -> None:
    """Restore a data iterator saved by a different number of processes (e.g. a 2-process run resumed on 1).

    grain names each process's iterator state ``process_{i}-of-{n}.json``. The loaders in ``jaxalign.data.loader``
    shard every global batch over the processes, so their state (``next_index``: the next global batch) is the same on
    every process and carries over to any process count. A state that differs between processes (e.g. packed SFT,
    whose row count is data-dependent per process) cannot be remapped: that is an error naming the saved count.
    """
    import json

    files = sorted(data_dir.glob("process_*-of-*.json"))
    if not files:
        raise ValueError(f"{data_dir}: no data-iterator state to restore.")
    states = [json.loads(f.read_text()) for f in files]
    if any(st != states[0] for st in states[1:]):
        raise ValueError(
            f"{data_dir} holds the data-iterator state of {len(files)} processes ({files[0].name} ...) and the states "
            f"differ, so they cannot be carried over to {jax.process_count()} process(es); resume with the process "
            f"count that wrote the checkpoint.")
    data_iter.set_state(states[0])
    if hasattr(data_iter, "start_prefetch"):
        data_iter.start_prefetch()


def free_bytes(path: str | epath.PathLike) -> int | None:
    """Free bytes on the disk that holds ``path`` (or would hold it); None for a bucket."""
    if is_remote(path):
        return None
    path = epath.Path(path)
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


__all__ = ["PhaseCheckpointer", "DiskFullError", "free_bytes"]
