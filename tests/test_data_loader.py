"""grain loaders: seeded shuffle, process shards, length buckets, packing, and iterator checkpoints."""
import numpy as np
import pytest

from jaxalign.data.loader import length_buckets, pair_dataset, sft_dataset, total_batches
from jaxalign.data.report import DataError

PAD = 0
BUCKETS = (16, 32, 64)


def sft_examples(n=40, seed=0, max_len=60, lengths=None):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(4, max_len + 1)) if lengths is None else lengths[i]
        prompt = int(rng.integers(1, length))
        out.append({
            # Distinct, nonzero ids per row so a packed document can be traced back to its example.
            "input_ids": (np.arange(length) + 1000 * (i + 1)).astype(np.int32),
            "loss_mask": np.r_[np.zeros(prompt, bool), np.ones(length - prompt, bool)],
            "row_id": np.int32(i),
        })
    return out


def pair_examples(n=24, seed=1):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p, c, r = (int(x) for x in rng.integers(2, 20, size=3))
        prompt = np.full(p, 7, np.int32)
        out.append({
            "chosen_ids": np.r_[prompt, np.full(c, 8, np.int32)].astype(np.int32),
            "chosen_mask": np.r_[np.zeros(p, bool), np.ones(c, bool)],
            "rejected_ids": np.r_[prompt, np.full(r, 9, np.int32)].astype(np.int32),
            "rejected_mask": np.r_[np.zeros(p, bool), np.ones(r, bool)],
            "prompt_ids": prompt,
            "row_id": np.int32(i),
        })
    return out


def sft(examples, **kw):
    kw = {"global_batch_size": 8, "pad_id": PAD, "buckets": BUCKETS, "process_index": 0, "process_count": 1} | kw
    return sft_dataset(examples, **kw)


def rows_of(batches):
    return [b["row_id"].tolist() for b in batches]


def test_seeded_shuffle_is_reproducible_and_reshuffles_each_epoch():
    ex = sft_examples(n=40)
    first = rows_of(sft(ex, seed=3, num_epochs=2))
    assert first == rows_of(sft(ex, seed=3, num_epochs=2))
    assert first != rows_of(sft(ex, seed=4, num_epochs=2))
    flat = sum(first, [])
    assert len(first) == total_batches(40, 8, 2) == 10
    assert sorted(flat[:40]) == sorted(flat[40:]) == list(range(40))  # each epoch is a permutation
    assert flat[:40] != flat[40:]
    assert sum(rows_of(sft(ex, shuffle=False)), []) == list(range(40))
    # Left to JAX (one process here), the shard is the whole stream.
    assert rows_of(sft(ex, seed=3, num_epochs=2, process_index=None, process_count=None)) == first


@pytest.mark.parametrize("count", [2, 4])
def test_process_shards_are_disjoint_and_cover_the_global_batches(count):
    ex = sft_examples(n=44)  # 44 rows: not a multiple of the global batch, so the remainder logic runs
    whole = rows_of(sft(ex, seed=5, num_epochs=2))
    shards = [rows_of(sft(ex, seed=5, num_epochs=2, process_index=p, process_count=count)) for p in range(count)]
    assert {len(s) for s in shards} == {len(whole)} == {total_batches(44, 8, 2)}  # same step count everywhere
    for step, global_rows in enumerate(whole):
        local = [s[step] for s in shards]
        assert all(len(rows) == 8 // count for rows in local)
        assert sorted(sum(local, [])) == sorted(global_rows)  # disjoint and covering, batch by batch


def test_batches_pad_to_configured_buckets_only():
    # Rows in runs of 8 of growing length, read in order, so batches land in different buckets.
    lengths = [4 + (i % 12) + 12 * (i // 16) for i in range(64)]
    ex = sft_examples(n=64, lengths=lengths)
    seen = set()
    for batch in sft(ex, shuffle=False, num_epochs=1):
        ids, mask, attn = batch["input_ids"], batch["loss_mask"], batch["attention_mask"]
        assert ids.dtype == mask.dtype == attn.dtype == batch["row_id"].dtype == np.int32
        assert ids.shape == mask.shape == attn.shape and batch["row_id"].shape == (8,)
        seen.add(ids.shape[1])
        lengths = attn.sum(1)
        assert ids.shape[1] == min(b for b in BUCKETS if b >= lengths.max())  # the smallest bucket that fits
        for row, length, rid in zip(range(8), lengths, batch["row_id"]):
            source = ex[rid]
            assert length == len(source["input_ids"])
            assert (ids[row, :length] == source["input_ids"]).all() and (ids[row, length:] == PAD).all()
            assert (mask[row, :length] == source["loss_mask"]).all() and not mask[row, length:].any()
    assert seen == set(BUCKETS)
    assert length_buckets(2048) == (64, 128, 256, 512, 1024, 2048)
    assert length_buckets(100, min_length=16) == (16, 32, 64, 100)


def test_pair_batches_share_one_bucket():
    ex = pair_examples()
    batches = list(pair_dataset(ex, global_batch_size=4, pad_id=PAD, buckets=(8, 16, 32, 64), seed=0,
                                process_index=0, process_count=1))
    assert len(batches) == 6
    for b in batches:
        keys = {f"{s}_{k}" for s in ("chosen", "rejected") for k in ("input_ids", "loss_mask", "attention_mask")}
        assert set(b) == keys | {"row_id"}
        assert len({b[k].shape for k in keys}) == 1 and b["chosen_input_ids"].shape[1] in (8, 16, 32, 64)
        for i, rid in enumerate(b["row_id"]):
            n = len(ex[rid]["rejected_ids"])
            assert (b["rejected_input_ids"][i, :n] == ex[rid]["rejected_ids"]).all()
            assert b["rejected_attention_mask"][i].sum() == n


def test_packing_keeps_documents_apart():
    ex = sft_examples(n=40, max_len=30)
    batches = list(sft(ex, global_batch_size=4, pack=True, pack_length=64, num_epochs=1, seed=2))
    assert batches
    docs_seen, multi_doc_rows = [], 0
    for b in batches:
        assert b["input_ids"].shape[1] in BUCKETS and set(b) == {
            "input_ids", "loss_mask", "attention_mask", "segment_ids", "positions", "row_id"
        }
        for row in range(b["input_ids"].shape[0]):
            seg, pos = b["segment_ids"][row], b["positions"][row]
            assert ((seg > 0) == (b["attention_mask"][row] == 1)).all()
            assert (b["input_ids"][row][seg == 0] == PAD).all() and (b["row_id"][row][seg == 0] == -1).all()
            for s in sorted(set(seg[seg > 0].tolist())):
                where = np.nonzero(seg == s)[0]
                assert (np.diff(where) == 1).all()  # one contiguous document per segment id
                rid = set(b["row_id"][row][where].tolist())
                assert len(rid) == 1
                source = ex[rid.pop()]
                assert (b["input_ids"][row][where] == source["input_ids"]).all()  # whole, unsplit document
                assert (b["loss_mask"][row][where] == source["loss_mask"]).all()
                assert (pos[where] == np.arange(len(where))).all()  # positions restart per document
                docs_seen.append(int(source["row_id"]))
            # Documents are numbered 1..k left to right, so the decoder's mask seg[i] == seg[j] keeps them apart.
            ids_in_row = [int(x) for x in seg[seg > 0]]
            assert sorted(set(ids_in_row)) == list(range(1, max(ids_in_row) + 1)) and ids_in_row == sorted(ids_in_row)
            multi_doc_rows += max(ids_in_row) > 1
    assert len(docs_seen) == len(set(docs_seen))  # no document packed twice within one epoch
    assert multi_doc_rows > 0 and len(set(docs_seen)) > 4 * len(batches)  # several documents per row


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("kind", ["sft", "pairs", "packed"])
def test_iterator_state_round_trip(kind):
    if kind == "pairs":
        ds = pair_dataset(pair_examples(), global_batch_size=4, pad_id=PAD, buckets=(64,), seed=1, num_epochs=3,
                          process_index=1, process_count=2)
    else:
        ds = sft(sft_examples(), seed=1, num_epochs=3, pack=kind == "packed", pack_length=64, global_batch_size=4)
    it = iter(ds)
    _take(it, 5)
    state = it.get_state()
    expected = _take(it, 6)
    fresh = iter(ds)
    fresh.set_state(state)
    _same(_take(fresh, 6), expected)


def test_iterator_restores_through_orbax_checkpoint_manager(tmp_path):
    import grain
    import orbax.checkpoint as ocp

    ds = sft(sft_examples(), seed=7, num_epochs=None, global_batch_size=4)
    params = {"w": np.arange(4.0)}
    it = iter(ds)
    _take(it, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(3, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    expected = _take(it, 5)
    fresh = iter(ds)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        restored = manager.restore(3, args=ocp.args.Composite(params=ocp.args.StandardRestore(params),
                                                               data=grain.checkpoint.CheckpointRestore(fresh)))
    assert np.array_equal(restored["params"]["w"], params["w"])
    _same(_take(fresh, 5), expected)


def test_loader_input_errors():
    with pytest.raises(DataError, match="every row was skipped"):
        sft([])
    with pytest.raises(DataError, match="multiple of the process count"):
        sft(sft_examples(), global_batch_size=6, process_count=4)
    with pytest.raises(DataError, match="Row 0 has 70 tokens"):
        sft([{"input_ids": np.ones(70, np.int32), "loss_mask": np.ones(70, bool), "row_id": np.int32(0)}])
    with pytest.raises(DataError, match="do not fill one global batch"):
        sft(sft_examples(n=3))
