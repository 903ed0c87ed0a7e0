"""Reference log-probabilities computed once before a preference phase, cached on disk, carried in the batches.

With ``StepConfig(reference="precomputed")`` the train step reads ``ref_chosen_logps`` / ``ref_rejected_logps`` from the
batch instead of running the frozen reference model every step (one forward pass of the reference per example for the
whole phase instead of one per example per epoch, and no reference weights on the devices while training).
:func:`precompute_reference_logps` adds those two float fields to each pair example; the pair loader
(``jaxalign.data.loader.pad_pair_batch``) stacks them into the batch.

The cache is one ``.npz`` per (dataset, model, reduction): its name holds a fingerprint of the examples' token ids and
loss masks, and of the model (its config and a hash of every parameter's bytes), so a changed dataset or reference model
never reuses stale values. The cache folder may be a bucket (``gs://...``): it is read and written through epath.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
from typing import Any, Sequence

import jax
import numpy as np
from etils import epath

from jaxalign import sharding
from jaxalign.sharding import to_host
from jaxalign.data.loader import pad_pair_batch
from jaxalign.models.config import ModelConfig
from jaxalign.storage import write_atomic
from jaxalign.train.steps import make_eval_logps

_ARRAY_KEYS = ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask")


def dataset_fingerprint(examples: Sequence[dict]) -> str:
    """sha256 over every example's chosen / rejected token ids and loss masks, in order."""
    h = hashlib.sha256()
    h.update(str(len(examples)).encode())
    for e in examples:
        for key in _ARRAY_KEYS:
            a = np.asarray(e[key])
            a = a.astype(np.int32) if key.endswith("_ids") else a.astype(bool).astype(np.uint8)
            h.update(key.encode())
            h.update(str(a.shape).encode())
            h.update(a.tobytes())
    return h.hexdigest()


def model_fingerprint(params: dict[str, Any], cfg: ModelConfig, reduce: str) -> str:
    """sha256 over the config, the log-prob reduction, and every parameter's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    h.update(json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str).encode())
    h.update(reduce.encode())
    for name in sorted(params):
        a = to_host(params[name])
        h.update(f"{name}:{a.dtype}:{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def cache_path(cache_dir: str | epath.PathLike, examples: Sequence[dict], params, cfg: ModelConfig,
               reduce: str) -> epath.Path:
    return epath.Path(cache_dir) / (f"ref_logps-{reduce}-data{dataset_fingerprint(examples)[:20]}-"
                              f"model{model_fingerprint(params, cfg, reduce)[:20]}.npz")


def _with_fields(examples: Sequence[dict], chosen: np.ndarray, rejected: np.ndarray) -> list[dict]:
    return [dict(e, ref_chosen_logps=float(c), ref_rejected_logps=float(r))
            for e, c, r in zip(examples, chosen, rejected)]


def precompute_reference_logps(
    params: dict[str, jax.Array],
    cfg: ModelConfig,
    examples: Sequence[dict],
    *,
    reduce: str,
    mesh,
    batch_size: int,
    pad_id: int,
    buckets: Sequence[int],
    cache_dir: str | epath.PathLike | None = None,
) -> list[dict]:
    """Return copies of ``examples`` with ``ref_chosen_logps`` / ``ref_rejected_logps`` (floats) added.

    ``params`` is the frozen reference model, ``reduce`` the objective's reduction (``"sum"`` | ``"mean"``, see
    ``jaxalign.losses.get_objective``). The examples go through ``batch_size`` rows at a time (the last batch is
    filled with copies of its last row); ``batch_size`` must divide by the mesh's batch shards and the process count.
    With several processes each gives its share of every batch and all of them get every value. With ``cache_dir`` the
    values are read from / written to an ``.npz`` named by the dataset and model fingerprints (process 0 writes).
    """
    examples = list(examples)
    if not examples:
        return []
    path = None
    if cache_dir is not None:
        path = cache_path(cache_dir, examples, params, cfg, reduce)
        if path.is_file():
            with np.load(io.BytesIO(path.read_bytes())) as z:
                chosen, rejected, rows = z["chosen"], z["rejected"], z["row_id"]
            if len(chosen) == len(examples) and np.array_equal(rows, [int(e["row_id"]) for e in examples]):
                print(f"reference log-probs: read {len(examples)} rows from the cache {path}")
                return _with_fields(examples, chosen, rejected)
    procs, pid = jax.process_count(), jax.process_index()
    shards = sharding.batch_shards(mesh)
    if batch_size < 1 or batch_size % math.lcm(shards, procs):
        raise ValueError(f"batch_size={batch_size} must be a positive multiple of the mesh's batch shards ({shards}) "
                         f"and of the process count ({procs}).")
    fn = make_eval_logps(cfg, reduce, mesh)
    n = len(examples)
    chosen = np.zeros(n, np.float32)
    rejected = np.zeros(n, np.float32)
    local = batch_size // procs
    for start in range(0, n, batch_size):
        idx = list(range(start, min(start + batch_size, n)))
        idx += [idx[-1]] * (batch_size - len(idx))  # fill the last batch with copies of its last row
        mine = idx[pid * local:(pid + 1) * local]
        batch = pad_pair_batch([examples[i] for i in mine], pad_id=pad_id, buckets=buckets)
        batch = {k: v for k, v in batch.items() if k != "row_id" and not k.startswith("ref_")}
        batch["_index"] = np.asarray(mine, np.int32)
        arrays = sharding.shard_batch(batch, mesh)
        c, r = fn(params, {k: v for k, v in arrays.items() if k != "_index"})
        c, r, where = (to_host(x) for x in (c, r, arrays["_index"]))
        chosen[where], rejected[where] = c, r
    if path is not None and pid == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, chosen=chosen, rejected=rejected, row_id=np.asarray([int(e["row_id"]) for e in examples]))
        write_atomic(path, buf.getvalue())
        print(f"reference log-probs: computed {n} rows, cached at {path}")
    return _with_fields(examples, chosen, rejected)


__all__ = ["precompute_reference_logps", "dataset_fingerprint", "model_fingerprint", "cache_path"]
