"""grain pipelines from encoded examples to padded, sharded, checkpointable batches.

Contract:

- Order: the examples are shuffled with ``seed`` (a new permutation each epoch, grain folds the epoch into the seed),
  epochs are concatenated, and — for finite runs — cut to a whole number of global batches, so every process yields
  the same number of batches and only the last ``< global_batch_size`` rows of the whole run are dropped. Process
  ``p`` of ``P`` takes rows ``p, p + P, ...`` of that stream: its local batch ``k`` holds rows of global batch ``k``,
  the shards are disjoint and together cover the stream. ``process_index`` / ``process_count`` default to
  ``jax.process_index()`` / ``jax.process_count()``.
- Each local batch (``global_batch_size / process_count`` rows) is right-padded with ``pad_id`` to the smallest of
  ``buckets`` that fits its longest row, so a jitted step compiles once per bucket, not per batch.
- SFT batch: ``input_ids`` [B, T] int32, ``loss_mask`` [B, T] (1 where token t is a trained assistant token, aligned
  with ``input_ids``), ``attention_mask`` [B, T], ``row_id`` [B] (the source row, to diagnose a bad batch).
  Packed SFT (``pack=True``): several documents per row, plus ``segment_ids`` [B, T] (1, 2, ... per document, 0 on
  padding) and ``positions`` [B, T] (restarting at 0 for each document) for the decoder's ``segment_ids`` /
  ``positions`` arguments; ``row_id`` is then per token [B, T] (-1 on padding). The first token of every document has
  loss_mask 0, so a shifted loss never scores one document's first token from the previous document.
- Pair batch: ``chosen_input_ids``, ``chosen_loss_mask``, ``chosen_attention_mask``, ``rejected_*`` the same, all
  [B, T] with one T for both sides, and ``row_id`` [B]; plus ``ref_chosen_logps`` / ``ref_rejected_logps`` [B] float32
  when the examples carry them (precomputed reference log-probs, see ``jaxalign.train.reference``).
- The returned ``grain.IterDataset``'s iterator has ``get_state`` / ``set_state`` and works with
  ``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore`` under orbax; a restored iterator yields exactly the
  batches the original would have yielded next.
- Packing and multiple processes: packing makes the number of rows data-dependent, so with several processes use
  ``num_epochs=None`` (endless) and stop after a fixed number of steps.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import grain
import numpy as np

from jaxalign.data.report import DataError

# Keeps a background thread or two reading ahead without crowding small machines; batches are cheap to build.
_DEFAULT_READ_OPTIONS = dict(num_threads=2, prefetch_buffer_size=4)


def length_buckets(max_length: int, *, min_length: int = 64) -> tuple[int, ...]:
    """Powers of two from ``min_length`` below ``max_length``, then ``max_length`` itself (e.g. 64, 128, ..., 2048)."""
    if max_length < 1:
        raise DataError(f"max_length must be positive, got {max_length}.")
    buckets = []
    size = max(1, min_length)
    while size < max_length:
        buckets.append(size)
        size *= 2
    return tuple(buckets) + (max_length,)


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``length`` tokens; ``DataError`` when none does."""
    for size in sorted(buckets):
        if size >= length:
            return size
    raise DataError(f"A batch row has {length} tokens, more than the largest length bucket {max(buckets)}.")


def total_batches(num_examples: int, global_batch_size: int, num_epochs: int) -> int:
    """How many global batches a finite, unpacked run yields (epochs are concatenated before batching)."""
    return num_examples * num_epochs // global_batch_size


# ------------------------------------------------------------------------------------------------------- padding
REF_LOGP_FIELDS = ("ref_chosen_logps", "ref_rejected_logps")


def _pad(rows: Sequence[np.ndarray], length: int, value) -> np.ndarray:
    out = np.full((len(rows), length), value, np.int32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def pad_sft_batch(examples: Sequence[dict], *, pad_id: int, buckets: Sequence[int]) -> dict[str, np.ndarray]:
    """Stack SFT examples (``input_ids``, ``loss_mask``, ``row_id``) into a right-padded bucketed batch."""
    length = bucket_for(max(len(e["input_ids"]) for e in examples), buckets)
    ids = [e["input_ids"] for e in examples]
    return {
        "input_ids": _pad(ids, length, pad_id),
        "loss_mask": _pad([e["loss_mask"] for e in examples], length, 0),
        "attention_mask": _pad([np.ones(len(x), np.int32) for x in ids], length, 0),
        "row_id": np.asarray([e["row_id"] for e in examples], np.int32),
    }


def pad_pair_batch(examples: Sequence[dict], *, pad_id: int, buckets: Sequence[int]) -> dict[str, np.ndarray]:
    """Stack pair examples into ``chosen_*`` / ``rejected_*`` arrays padded to one shared bucket length."""
    longest = max(max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in examples)
    length = bucket_for(longest, buckets)
    batch = {"row_id": np.asarray([e["row_id"] for e in examples], np.int32)}
    for side in ("chosen", "rejected"):
        ids = [e[f"{side}_ids"] for e in examples]
        batch[f"{side}_input_ids"] = _pad(ids, length, pad_id)
        batch[f"{side}_loss_mask"] = _pad([e[f"{side}_mask"] for e in examples], length, 0)
        batch[f"{side}_attention_mask"] = _pad([np.ones(len(x), np.int32) for x in ids], length, 0)
    for key in REF_LOGP_FIELDS:  # precomputed reference log-probs (jaxalign.train.reference) ride along per row
        if key in examples[0]:
            batch[key] = np.asarray([e[key] for e in examples], np.float32)
    return batch


def _packable(example: dict) -> dict[str, np.ndarray]:
    # The row id rides along per token so that a packed row still tells which documents it holds.
    return {
        "input_ids": np.asarray(example["input_ids"], np.int32),
        "loss_mask": np.asarray(example["loss_mask"], np.int32),
        "row_id": np.full(len(example["input_ids"]), example["row_id"], np.int32),
    }


def _finish_packed(rows: Sequence[dict], *, buckets: Sequence[int]) -> dict[str, np.ndarray]:
    segment_ids = np.stack([r["input_ids_segment_ids"] for r in rows]).astype(np.int32)
    used = segment_ids > 0
    # Packed rows are padded to the packing length; trim to the bucket that holds the fullest row.
    longest = int(max((np.nonzero(u)[0][-1] + 1) if u.any() else 1 for u in used))
    length = bucket_for(longest, buckets)
    return {
        "input_ids": np.stack([r["input_ids"] for r in rows]).astype(np.int32)[:, :length],
        "loss_mask": np.stack([r["loss_mask"] for r in rows]).astype(np.int32)[:, :length],
        "attention_mask": used.astype(np.int32)[:, :length],
        "segment_ids": segment_ids[:, :length],
        "positions": np.stack([r["input_ids_positions"] for r in rows]).astype(np.int32)[:, :length],
        "row_id": np.stack([r["row_id"] for r in rows]).astype(np.int32)[:, :length],
    }


# ------------------------------------------------------------------------------------------------------ ordering
def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only where the caller leaves sharding to the running JAX processes

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} is outside 0..{process_count - 1}.")
    return process_index, process_count


def _local_rows(
    examples: Sequence[dict],
    *,
    global_batch_size: int,
    seed: int,
    shuffle: bool,
    num_epochs: int | None,
    process_index: int | None,
    process_count: int | None,
    whole_batches: bool,
) -> tuple[grain.MapDataset, int]:
    """This process's share of the shuffled, repeated rows, and the local batch size."""
    if not examples:
        raise DataError("No examples to load: every row was skipped (see the data report for the reasons).")
    index, count = _process(process_index, process_count)
    if global_batch_size < 1 or global_batch_size % count:
        raise DataError(
            f"global_batch_size={global_batch_size} must be a positive multiple of the process count {count}."
        )
    if num_epochs is not None and num_epochs < 1:
        raise DataError(f"num_epochs must be a positive integer or None (endless), got {num_epochs}.")
    ds = grain.MapDataset.source(list(examples))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    if num_epochs is not None and whole_batches:
        usable = len(ds) // global_batch_size * global_batch_size
        if usable == 0:
            raise DataError(
                f"{len(examples)} examples x {num_epochs} epoch(s) do not fill one global batch of {global_batch_size}."
            )
        ds = ds[:usable]
    return ds[index::count], global_batch_size // count


def _check_lengths(examples: Sequence[dict], keys: Sequence[str], limit: int, what: str) -> None:
    for e in examples:
        for key in keys:
            if len(e[key]) > limit:
                raise DataError(
                    f"Row {int(e['row_id'])} has {len(e[key])} tokens in {key!r}, more than the {what} {limit}; "
                    "encode with max_length at most that (or add a larger bucket)."
                )


# ---------------------------------------------------------------------------------------------------- pipelines
def sft_dataset(
    examples: Sequence[dict],
    *,
    global_batch_size: int,
    pad_id: int,
    buckets: Sequence[int],
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = 1,
    process_index: int | None = None,
    process_count: int | None = None,
    pack: bool = False,
    pack_length: int | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
    """Batches of SFT examples (``sft_example`` dicts); see the module docstring for layout and guarantees.

    ``pack=True`` packs documents first-fit into rows of ``pack_length`` tokens (default: the largest bucket).
    """
    buckets = tuple(sorted(buckets))
    length = (pack_length or buckets[-1]) if pack else buckets[-1]
    if length > buckets[-1]:
        raise DataError(f"pack_length={length} is longer than the largest length bucket {buckets[-1]}.")
    _check_lengths(examples, ["input_ids"], length, "packing length" if pack else "largest bucket")
    rows, local_batch = _local_rows(
        examples,
        global_batch_size=global_batch_size,
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
        process_index=process_index,
        process_count=process_count,
        whole_batches=not pack,
    )
    options = read_options or grain.ReadOptions(**_DEFAULT_READ_OPTIONS)
    if not pack:
        batch_fn = functools.partial(pad_sft_batch, pad_id=pad_id, buckets=buckets)
        return rows.batch(local_batch, drop_remainder=True, batch_fn=batch_fn).to_iter_dataset(options)
    packable = rows.map(_packable).to_iter_dataset(options)
    packed = grain.experimental.FirstFitPackIterDataset(
        packable,
        length_struct={"input_ids": length, "loss_mask": length, "row_id": length},
        # One packing round fills exactly one local batch.
        num_packing_bins=local_batch,
        seed=seed,
        shuffle_bins=shuffle,
        meta_features=("loss_mask", "row_id"),
        padding_struct={"input_ids": pad_id, "loss_mask": 0, "row_id": -1},
    )
    return packed.batch(local_batch, drop_remainder=True, batch_fn=functools.partial(_finish_packed, buckets=buckets))


def pair_dataset(
    examples: Sequence[dict],
    *,
    global_batch_size: int,
    pad_id: int,
    buckets: Sequence[int],
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = 1,
    process_index: int | None = None,
    process_count: int | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
    """Batches of preference pairs (``pair_example`` dicts); see the module docstring for layout and guarantees."""
    buckets = tuple(sorted(buckets))
    _check_lengths(examples, ["chosen_ids", "rejected_ids"], buckets[-1], "largest bucket")
    rows, local_batch = _local_rows(
        examples,
        global_batch_size=global_batch_size,
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
        process_index=process_index,
        process_count=process_count,
        whole_batches=True,
    )
    batch_fn = functools.partial(pad_pair_batch, pad_id=pad_id, buckets=buckets)
    options = read_options or grain.ReadOptions(**_DEFAULT_READ_OPTIONS)
    return rows.batch(local_batch, drop_remainder=True, batch_fn=batch_fn).to_iter_dataset(options)
