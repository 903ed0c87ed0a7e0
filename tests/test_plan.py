"""The AOT planner (jaxalign.plan): its HLO cost walk, its model configs, its error messages, and one real TPU compile.

The slow test compiles a tiny model's SFT step for a v5e:2x2 slice (4 chips) with the TPU compiler from ``libtpu``
(installed by the ``test`` extra; no TPU needed) and checks the table against arithmetic:

- parameters per chip = parameter count x 4 bytes (float32) / 4 shards, within 1% (TPU tiles could pad a dimension
  smaller than a tile; the tiny config keeps every sharded dimension a multiple of 128 so only the 1-D norms may pad);
- optimizer state per chip = 2 x parameters (AdamW's two moments) within 1%;
- matmul FLOPs of the compiled step within 2% of the analytic count (6 N + attention, plus what remat recomputes);
  a 10% bound would do; the count is exact on the 7B plans (docs/plan_tables.md).
"""
from __future__ import annotations

import importlib.util
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import plan as plan_lib
from jaxalign.plan.hlo import analyze, group_size, parse_instr, ring_bytes

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


# ---- fast: the HLO walk ------------------------------------------------------------------------------------------

def test_hlo_walk_multiplies_scanned_layers_by_trip_count():
    """cost_analysis() counts a while body once; the walk counts it once per iteration."""
    layers, m, k = 5, 32, 64

    def f(x, w):
        return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0]

    c = jax.jit(f).lower(jax.ShapeDtypeStruct((m, k), jnp.float32),
                         jax.ShapeDtypeStruct((layers, k, k), jnp.float32)).compile()
    costs = analyze(c.as_text(), 1)
    assert costs.flops == pytest.approx(layers * 2 * m * k * k)
    assert layers in costs.loops and costs.unknown_loops == 0


def test_hlo_parsing_pieces():
    ins = parse_instr('  %all-gather.9 = bf16[1,1024,1024]{2,1,0:T(8,128)(2,1)S(1)} all-gather(%fusion.2), '
                      "channel_id=3, replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0'}, dimensions={1}")
    assert ins.opcode == "all-gather" and ins.operands == ["fusion.2"]
    assert group_size(ins.attrs, 8) == 4
    assert group_size("replica_groups=[2,4]<=[8]", 8) == 4
    assert group_size("replica_groups={{0,1},{2,3}}", 4) == 2
    assert ring_bytes("all-gather", 100.0, 4) == 75.0
    assert ring_bytes("all-reduce", 100.0, 4) == 150.0
    tup = parse_instr("  %t = (s32[]{:T(128)}, bf16[4,8]{1,0:T(4,128)(2,1)}) tuple(%a, %b)")
    assert tup.opcode == "tuple" and tup.operands == ["a", "b"]


def test_parse_oom_messages():
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (90.00G) "
           "exceeds available HBM (15.75G).")
    need, have = plan_lib.parse_oom(msg)
    assert need == 90 * 2**30 and have == 15.75 * 2**30
    assert plan_lib.parse_oom("Used 20.5G of 15.48G hbm. Exceeded hbm capacity by 5.02G.")[0] == 20.5 * 2**30
    assert plan_lib.parse_oom("something else") is None


# ---- fast: the recipe models' configs ----------------------------------------------------------------------------

@pytest.mark.parametrize("hub_id, params_b, family", [
    ("mistralai/Mistral-7B-v0.1", 7.2417, "llama"),
    ("alignment-handbook/zephyr-7b-sft-full", 7.2417, "llama"),
    ("HuggingFaceH4/mistral-7b-sft-beta", 7.2417, "llama"),
    ("EleutherAI/pythia-1b", 1.0118, "neox"),
    ("Qwen/Qwen2.5-0.5B-Instruct", 0.4940, "llama"),
])
def test_recipe_model_configs(hub_id, params_b, family):
    from jaxalign.config import Config

    cfg = Config()
    cfg.model.path = hub_id
    mcfg = plan_lib.model_config(cfg)
    assert mcfg.family == family
    assert mcfg.num_params() / 1e9 == pytest.approx(params_b, abs=1e-4)


def test_unknown_model_names_the_folder():
    with pytest.raises(plan_lib.PlanError, match="configs/models"):
        plan_lib.resolve_model_file("nobody/unknown-model")


def test_without_libtpu_the_message_says_how_to_get_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    with pytest.raises(plan_lib.PlanError, match=r'pip install -e "\.\[tpu\]"'):
        plan_lib.get_slice("v5e:2x2")


def test_launcher_reports_missing_libtpu_as_bad_input(monkeypatch, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
    import tpu_run

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    code = tpu_run.main(["--config", "demo_cpu", "--plan", "v5e:2x2", "run.demo_task=false",
                         "model.path=Qwen/Qwen2.5-0.5B-Instruct"])
    assert code == 2
    assert '.[tpu]' in capsys.readouterr().err


def test_create_state_donates_the_loaded_params():
    """The plan counts no second copy of the weights in train phases ('outside step' 0) because the pipeline's train
    loop calls create_state(donate=True): the loaded device params go to the train state, the loaded arrays are
    deleted and the state holds the values. Without donate the caller's arrays stay usable."""
    import optax

    from jaxalign import sharding
    from jaxalign.train.state import create_state, param_shardings

    mesh = sharding.make_mesh(1, 2, 1, devices=jax.devices()[:2])
    host = {"embed": np.arange(32, dtype=np.float32).reshape(8, 4)}
    loaded = jax.device_put(host, param_shardings(host, mesh))  # as read_params places them
    state = create_state(loaded, optax.adamw(1e-3), mesh, donate=True)
    assert loaded["embed"].is_deleted()
    np.testing.assert_array_equal(np.asarray(state.params["embed"]), host["embed"])
    # host arrays: copied to the devices, and the copy donated
    again = create_state(host, optax.adamw(1e-3), mesh, donate=True)
    np.testing.assert_array_equal(np.asarray(again.params["embed"]), host["embed"])
    kept = jax.device_put(host, param_shardings(host, mesh))
    create_state(kept, optax.adamw(1e-3), mesh)
    assert not kept["embed"].is_deleted()


# ---- slow: a real AOT compile for a TPU slice ---------------------------------------------------------------------

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 512, "intermediate_size": 1024,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 128,
        "vocab_size": 2048, "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "hidden_act": "silu"}


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LIBTPU, reason='needs libtpu: pip install -e ".[tpu]" (the test extra installs it)')
def test_plan_tiny_sft_on_v5e_2x2(tmp_path):
    from jaxalign.config import load
    from jaxalign.flops import flops_per_token

    (tmp_path / "config.json").write_text(json.dumps(TINY))
    cfg = load("demo_cpu", ["run.demo_task=false", f"model.path={tmp_path}", "model.dtype=bfloat16",
                            "model.remat=full", "mesh.data=1", "mesh.fsdp=4", "data.max_length=256",
                            "sft.batch_size=8"])
    printed = []
    rows = plan_lib.plan_recipe(cfg, "v5e:2x2", phases=["sft"], print_fn=printed.append)
    (row,) = rows
    mcfg = plan_lib.model_config(cfg)

    expected_params = mcfg.num_params() * 4 / 4  # float32, every parameter sharded 4 ways over fsdp
    assert row.params == pytest.approx(expected_params, rel=0.01)
    assert row.opt_state == pytest.approx(2 * expected_params, rel=0.01)
    assert row.outside == 0 and row.reference == 0  # create_state donates the loaded params: no second copy
    assert row.exact and row.fits and row.verdict.startswith("FITS")
    assert row.total >= row.params + row.opt_state + row.outside
    assert row.hbm == pytest.approx(15.75 * 2**30)

    # FLOPs: compiled program vs analytic (flops_per_token + remat's extra forward), per chip
    assert row.flops == pytest.approx(row.model_flops, rel=0.02)
    seq = 255
    assert row.model_flops > 8 * 255 * flops_per_token(mcfg, seq) / 4  # remat adds to the 6N count
    # MFU is jaxalign.flops.mfu at the estimated step time
    assert row.step_s == max(row.compute_s, row.collective_s) > 0
    assert 0 < row.mfu < 1
    assert math.isclose(row.mfu, 8 * 256 * flops_per_token(mcfg, 256) / row.step_s / (197e12 * 4), rel_tol=1e-9)
    table = printed[0]
    assert "| sft |" in table and "v5e" in table and "FITS" in table
    assert np.isfinite(row.compile_s)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LIBTPU, reason='needs libtpu: pip install -e ".[tpu]" (the test extra installs it)')
def test_plan_tiny_sampler_on_v5e_2x2(tmp_path, monkeypatch):
    """The sample phase plans the sampler's own prefill / decode kernels: the shapes come from the driver's
    bucket_length, the KV cache per chip from kv_cache_bytes over the batch shards, and the decoding settings from
    DecodeMode.from_settings (top-p sorts the vocabulary in the decode program; greedy does not)."""
    from jaxalign.config import load
    from jaxalign.sampling import kv_cache_bytes

    (tmp_path / "config.json").write_text(json.dumps(TINY))
    base = ["run.demo_task=false", f"model.path={tmp_path}", "model.dtype=bfloat16", "mesh.data=1", "mesh.fsdp=4",
            "data.max_length=128", "data.max_prompt_length=48", "sample.max_new_tokens=40", "sample.batch_size=6",
            "policy.pairs=best_of_n", "policy.num_samples=2", "sample.top_k=0", "sample.top_p=0.9"]
    sorts = {}
    for temperature in (0.7, 0.0):
        dump = tmp_path / f"dump{temperature}"
        monkeypatch.setenv("JAXALIGN_PLAN_DUMP", str(dump))
        cfg = load("demo_cpu", base + [f"sample.temperature={temperature}"])
        pre, dec = plan_lib.plan_recipe(cfg, "v5e:2x2", phases=["sample"], print_fn=None)
        mcfg = plan_lib.model_config(cfg)
        # batch 6 rounded up to the 4 batch shards = 8 prompts x 2 samples; prompt 48 -> 64, 40 new -> 64 slots
        assert pre.phase == "sample: prefill" and dec.phase == "sample: decode"
        assert pre.detail.startswith("8 prompts x 2 samples") and "prompt 64 + 64 new" in pre.detail
        assert dec.detail.startswith("16 rows") and "cache 128" in dec.detail
        assert pre.exact and dec.exact and pre.fits and dec.fits
        # the shared-prefix layout (N = 2): 8 prompts' 64 slots once + 16 rows' 64 new-token slots
        assert dec.kv_cache == pre.kv_cache == (kv_cache_bytes(mcfg, 8, 64) + kv_cache_bytes(mcfg, 16, 64)) / 4
        # matmul FLOPs of the compiled kernels against prefill_flops / flops_per_token (exact on this config)
        assert pre.flops == pytest.approx(pre.model_flops, rel=0.02)
        assert dec.flops == pytest.approx(dec.model_flops, rel=0.02)
        sorts[temperature] = " sort(" in (dump / "sample_decode.hlo.txt").read_text()
    assert sorts == {0.7: True, 0.0: False}


# ---- fast: what a round costs (jaxalign.plan.hours), written out independently -----------------------------------

def _fake_slice(chips: int = 16):
    from jaxalign.plan.tpu import CHIPS, Slice

    return Slice("v5e:4x4", [object()] * chips, CHIPS["tpu v5 lite"], 197e12, (4, 4))


def _irl_rows(cfg, mcfg, sl):
    """Planned rows as the compiler would leave them (times and FLOPs made up), shapes from ultrachat_irl."""
    from jaxalign.plan.hours import decode_bytes_read

    PhaseRow = plan_lib.PhaseRow
    rows = []
    for label, prompts, n, batch, max_new, pre_s, dec_s in (("sample", 20000, 8, 96, 256, 1.7, 0.30),
                                                           ("eval sampling", 64, 1, 64, 512, 0.4, 0.24)):
        cache = 512 + max_new
        info = dict(label=label, prompts=prompts, samples=n, batch=batch, batch_source="planned: largest that fits",
                    largest_batch=batch, unshared_batch=0, max_new=max_new, prompt_len=512, cache_len=cache,
                    bytes_read=decode_bytes_read(mcfg, batch, n, 512, cache, None))
        rows.append(PhaseRow(f"{label}: prefill", info=info, step_s=pre_s, compute_s=pre_s))
        rows.append(PhaseRow(f"{label}: decode", info=info, step_s=dec_s, compute_s=dec_s / 4))
    rows.append(PhaseRow("reward", step_s=5.0, flops=444e12))
    rows.append(PhaseRow("policy", step_s=6.8, flops=571e12))
    return rows


def test_round_hours_are_the_formula_written_out():
    """Each item of a round: sampling = batches x (prefill + (max_new - 1) decode steps) (responses run to
    max_new_tokens); IRL's negatives: one sample per prompt, batch x N prompts per batch; reward / policy = steps x
    step time; forward passes at the train step's FLOP rate; the total is the sum of its items."""
    from jaxalign.config import load
    from jaxalign.plan.hours import decode_bytes_read, round_items, sampling_estimate

    cfg = load("ultrachat_irl")
    mcfg = plan_lib.model_config(cfg)
    sl = _fake_slice()
    rows = _irl_rows(cfg, mcfg, sl)
    h, v, L, T = 4096, 32000, 32, 1024
    n_matmul = L * (h * 128 * (32 + 2 * 8) + 32 * 128 * h + 3 * h * 14336) + h * v  # Mistral-7B
    fwd_rm = 2 * (n_matmul - h * v) + 4 * L * T * 32 * 128  # per token, no LM head

    expected = {
        "sample: draws": math.ceil(20000 / 96) * (1.7 + 255 * 0.30),
        "sample: negatives": math.ceil(20000 / (96 * 8)) * (8 * 1.7 + 255 * 0.30),
        "reward": math.ceil(20000 / 64) * 5.0,
        "policy: RM scores the samples": 20000 * 8 * T * fwd_rm / 16 / (444e12 / 5.0),
        "policy": math.ceil(20000 / 64) * 6.8,
        "eval: sampling": 1 * (0.4 + 511 * 0.24),
        "eval: RM scoring": (2 * 64 + 2 * 1000) * T * fwd_rm / 16 / (444e12 / 5.0),
    }
    items = round_items(cfg, mcfg, rows, sl, 1)
    got = {name: s for name, _, s in items[:-1]}
    assert got.keys() == expected.keys()
    for k in expected:
        assert got[k] == pytest.approx(expected[k], rel=1e-9), k
    assert items[-1][0] == "round 1 total" and items[-1][2] == pytest.approx(sum(expected.values()), rel=1e-12)
    # round 2's RM trains on both rounds' pairs (reward.accumulate_pairs), nothing else changes
    two = {name: s for name, _, s in round_items(cfg, mcfg, rows, sl, 2)}
    assert two["reward"] == pytest.approx(math.ceil(40000 / 64) * 5.0)
    assert two["round 2 total"] == pytest.approx(sum(expected.values()) + two["reward"] - expected["reward"])

    est = sampling_estimate(rows[0], rows[1], sl, cfg)
    assert est.tokens_per_s == pytest.approx(96 * 8 / 0.30)
    # bytes, bf16 cache, no mesh: one shard. The shared-prefix layout (N = 8) reads each prompt's 512 slots once
    # and each row's 256 new slots; eval (N = 1) and the repeated layout read every row's whole cache
    slot = 2 * L * 8 * 128 * 2
    kv = slot * (96 * 512 + 96 * 8 * 256)
    assert est.bytes_read["kv"] == kv and est.bytes_read["weights"] == 2 * n_matmul
    assert rows[2].info["bytes_read"]["kv"] == slot * 64 * (512 + 512)
    assert decode_bytes_read(mcfg, 96, 8, 512, 768, None, shared_prefix=False)["kv"] == slot * 96 * 8 * 768
    assert est.roofline == pytest.approx((2 * n_matmul + kv) / 819e9 / (0.30 / 4))
    assert est.roofline_step == pytest.approx((2 * n_matmul + kv) / 819e9 / 0.30)


def _tiny_model():
    """A one-layer random-init Llama config for the sampler tests (64-token vocabulary)."""
    from jaxalign.models import ModelConfig

    return ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                       num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=128, sliding_windows=(None,),
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)


def test_planned_decode_batch_is_the_boundary():
    """Without sample.batch_size the plan's decode batch is the largest multiple of the batch shards whose sampling
    bytes fit the budget, no more than the round's prompts rounded up to the shards, and one prompt per shard (the row
    then says it does not fit) when none fits; the largest batch in the repeated layout is searched alike."""
    from jaxalign import sharding
    from jaxalign.config import load
    from jaxalign.plan.sampling import decode_batch, sampler_shape
    from jaxalign.sampling import sampling_bytes_per_device

    tiny, mesh = _tiny_model(), sharding.make_mesh(-1, 1, 1, devices=jax.devices()[:4])
    cfg = load("demo_cpu", ["sample.limit=37"])
    shape = sampler_shape(cfg, "sample")

    def need(b, shared_prefix=None):
        return sampling_bytes_per_device(tiny, prompts_per_batch=b, num_samples=shape.samples, mesh=mesh,
                                         prompt_len=shape.prompt_len, cache_len=shape.cache_len,
                                         shared_prefix=shared_prefix)["total"]

    planned = "planned: largest that fits"
    assert decode_batch(cfg, tiny, shape, mesh, need(16))[:3] == (16, planned, 16)
    assert decode_batch(cfg, tiny, shape, mesh, need(16) - 1)[:3] == (12, planned, 12)
    assert decode_batch(cfg, tiny, shape, mesh, need(12, shared_prefix=False))[3] == 12
    assert decode_batch(cfg, tiny, shape, mesh, need(10**4))[:3] == (40, planned, 40)  # 37 prompts, 4 shards
    assert decode_batch(cfg, tiny, shape, mesh, need(4) - 1) == (4, planned, 0, 0)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LIBTPU, reason='needs libtpu: pip install -e ".[tpu]" (the test extra installs it)')
def test_planned_decode_batch_is_the_largest_that_fits(tmp_path):
    """Without sample.batch_size the sample phase plans the largest batch the sampler's memory model admits in 90% of
    HBM after the weights (no 256-row cap), compiles prefill and decode at that batch, and both compiled programs fit
    the chip; one more batch shard of prompts would not fit the budget. The sampling table and the round total print."""
    from jaxalign.config import load
    from jaxalign.plan.report import FIT_MARGIN
    from jaxalign.sampling import sampling_bytes_per_device

    (tmp_path / "config.json").write_text(json.dumps({**TINY, "vocab_size": 32768, "hidden_size": 1024,
                                                      "num_key_value_heads": 4}))
    cfg = load("demo_cpu", ["run.demo_task=false", f"model.path={tmp_path}", "model.dtype=bfloat16", "mesh.data=1",
                            "mesh.fsdp=4", "data.max_length=1024", "data.max_prompt_length=512",
                            "sample.max_new_tokens=512", "sample.batch_size=0", "sample.limit=100000",
                            "policy.pairs=best_of_n", "policy.num_samples=4"])
    printed = []
    pre, dec = plan_lib.plan_recipe(cfg, "v5e:2x2", phases=["sample"], print_fn=printed.append)
    i = pre.info
    assert i["batch_source"].startswith("planned") and i["batch"] == i["largest_batch"] > 256 // 4
    assert pre.exact and dec.exact and pre.total <= pre.hbm and dec.total <= dec.hbm
    mcfg = plan_lib.model_config(cfg).replace(remat="none")
    budget = FIT_MARGIN * pre.hbm - pre.outside - pre.params
    size = dict(num_samples=4, prompt_len=512, cache_len=1024, mesh=plan_lib.make_mesh(cfg, plan_lib.get_slice(
        "v5e:2x2")))
    assert sampling_bytes_per_device(mcfg, prompts_per_batch=i["batch"], **size)["total"] <= budget
    assert sampling_bytes_per_device(mcfg, prompts_per_batch=i["batch"] + 4, **size)["total"] > budget
    assert 0 < i["unshared_batch"] < i["batch"]  # the prompt's KV stored once leaves room for more prompts
    assert "tokens/s (slice)" in printed[1] and "HBM roofline" in printed[1]


# ---- fast: --plan plans the batches the run uses -----------------------------------------------------------------
#
# For every recipe in configs/ and every policy.kind its method accepts, the numbers `--plan v5p:2x2x1` plans with
# (jaxalign.plan: sampler_shape / decode_batch, train_inputs, onpolicy_inputs; nothing compiled, the weights abstract)
# against what the run's own code computes for the same config (jaxalign.pipeline: prompts_of_round, plan_rollouts,
# Rollouts, step_config; a section's PhaseSettings and StepConfig as train_phase / train_onpolicy get them) on a
# RunContext holding only what those functions read. What only a real run computes — the samples per prompt the
# sample phase passes to the sampler (sample.run: rules.candidates_per_prompt) and the decode batch the sampler picks
# (generate_from_params) — is compared with the rule the run calls, and that sampler's pick with the plan's on a tiny
# random model below.

PLAN_TOPOLOGY = "v5p:2x2x1"  # 4 chips: mesh fsdp 4 for the recipes' fsdp=-1, data 4 for data=-1
RECIPE_KINDS_CHECKED = 29  # recipe x policy.kind combinations that load (the on-policy kinds need an IRL / SPIN round)
RECIPE_KINDS_REFUSED = 26  # ... that config validation refuses (and --plan with them too)
STAND_IN_MODELS = 12  # combinations whose model has no config.json the planner can find (demo task, SmolLM2, runs/)


def _plan_slice():
    """The slice --plan compiles for: libtpu's topology when installed, else 4 CPU devices standing in for the chips
    (the numbers compared here do not depend on the compiler)."""
    from jaxalign.plan.tpu import CHIPS, Slice

    if HAS_LIBTPU:
        return plan_lib.get_slice(PLAN_TOPOLOGY)
    return Slice(PLAN_TOPOLOGY, jax.devices()[:4], CHIPS["tpu v5"], 459e12, (2, 2, 1))


def _run_context(cfg, mesh, mcfg, demonstrations: int):
    """A RunContext with ``demonstrations`` rows whose prompts fill data.max_prompt_length (the longest the encoder
    keeps): all that prompts_of_round / plan_rollouts / step_config / Rollouts read."""
    from jaxalign.data.loader import length_buckets
    from jaxalign.data.tokenize import EncodedRecord, EncodedSequence
    from jaxalign.pipeline.context import RunContext
    from jaxalign.pipeline.phases import plan

    prompt = np.full(cfg.data.max_prompt_length, 5, np.int32)
    answer = EncodedSequence(np.full(cfg.data.max_length, 5, np.int32), np.ones(cfg.data.max_length, bool))
    rows = [EncodedRecord(i, str(i), prompt, chosen=answer) for i in range(demonstrations)]
    return RunContext(cfg=cfg, workdir=None, phases=plan(cfg), mesh=mesh, model_cfg=mcfg, tokenizer=None,
                      encoder=None, train=rows, eval_records=[], eval_prefs=[],
                      buckets=length_buckets(cfg.data.max_length, min_length=min(64, cfg.data.max_length)),
                      heldout_pairs=[], heldout_sft=[], lora=cfg.model.lora.build())


def _sampler_pick(batch_size: int, prompts: int, longest: int, n: int, scfg, max_new: int, mesh, budget: int) -> int:
    """The prompts per batch generate_from_params picks for ``prompts`` prompts (the longest of ``longest`` tokens)
    before it compiles anything, on an accelerator (no row cap): from ``sample.batch_size`` (draw passes
    ``batch_size or None``), or plan_batch_size for the budget. Checked against generate_from_params itself in
    test_the_samplers_own_decode_batch_is_the_planned_one."""
    from jaxalign.sampling.memory import plan_batch_size
    from jaxalign.sampling.sampler import bucket_length
    from jaxalign.sharding import batch_shards

    shards = batch_shards(mesh)
    if batch_size:
        return math.ceil(min(batch_size, prompts) / shards) * shards
    p_len = bucket_length(longest, what="prompt")
    return plan_batch_size(scfg, num_prompts=prompts, prompt_len=p_len,
                           cache_len=p_len + bucket_length(max_new, what="length"), num_samples=n,
                           budget_bytes=budget, mesh=mesh, cache_dtype=jnp.dtype(scfg.dtype), max_rows=prompts * n)


def _check_sampling(cfg, name, mesh, mcfg, budget, ctx, problems: list) -> None:
    import dataclasses

    from jaxalign.pipeline.sample import prompts_of_round
    from jaxalign.plan.sampling import decode_batch, sampler_shape
    from jaxalign.rules import candidates_per_prompt

    shape = sampler_shape(cfg, "sample")
    rows = prompts_of_round(ctx, 1)
    prompts, longest = len(rows), max(len(e.prompt_ids) for e in rows)
    for k in range(2, cfg.run.num_rounds() + 1):  # a later round answers as many (the next window of them)
        if len(prompts_of_round(ctx, k)) != prompts:
            problems.append(f"{name}: round {k} answers {len(prompts_of_round(ctx, k))} prompts, round 1 {prompts}")
    n = candidates_per_prompt(cfg)  # what sample.run passes to the sampler as num_samples
    if (shape.prompts, shape.samples) != (prompts, n):
        problems.append(f"{name}: sample phase planned {shape.prompts} prompts x {shape.samples}, the run draws "
                        f"{prompts} x {n}")
    scfg = mcfg.replace(remat="none")
    for fixed in (0, 6, prompts + 5):  # planned; fixed, not a multiple of the 4 shards; more than the prompts
        c = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, batch_size=fixed))
        planned, how, _, _ = decode_batch(c, scfg, sampler_shape(c, "sample"), mesh, budget)
        run = _sampler_pick(fixed, prompts, longest, n, scfg, c.sample.max_new_tokens, mesh, budget)
        if planned != run or (how == "sample.batch_size") != bool(fixed):
            problems.append(f"{name}: sample.batch_size={fixed}: planned decode batch {planned} ({how}), the run's "
                            f"sampler picks {run}")


def _check_training(cfg, name, kind, mesh, mcfg, ctx, problems: list) -> None:
    from jaxalign.pipeline import onpolicy
    from jaxalign.pipeline.phases import Phase
    from jaxalign.pipeline.sample import prompts_of_round
    from jaxalign.plan.onpolicy import REWARD_KINDS, onpolicy_inputs
    from jaxalign.plan.phases import train_inputs

    section = getattr(cfg, kind)
    on_policy = kind == "policy" and cfg.policy.kind != "pairs"
    planned = (onpolicy_inputs(cfg, mcfg, mesh) if on_policy and cfg.policy.kind in REWARD_KINDS
               else train_inputs(kind, cfg, mcfg, mesh))
    # the run: train_phase / onpolicy.run give train() / train_onpolicy() the section's PhaseSettings (the global
    # batch, an on-policy mini-batch) and the step config whose accum_steps splits it
    settings = section.settings(seed=0, run=cfg.run, reliability=cfg.reliability)
    if not on_policy:
        step = section.step()
    else:
        step = onpolicy.step_config(ctx, base_is_reference=ctx.lora is not None, seed=0)
    micro = settings.global_batch_size // step.accum_steps  # as train() sizes its held-out batches
    got = (planned.global_batch, planned.step_cfg.accum_steps, planned.micro_batch, planned.step_cfg.kind)
    want = (settings.global_batch_size, step.accum_steps, micro, step.kind)
    if got != want:
        problems.append(f"{name}: {kind}: planned (batch, accum_steps, micro-batch, step) {got}, the run {want}")
    if not on_policy:
        return
    if planned.step_cfg.onpolicy != step.onpolicy:
        problems.append(f"{name}: {kind}: planned on-policy settings {planned.step_cfg.onpolicy}, the run's "
                        f"{step.onpolicy}")
    if step.kind == "policy" and planned.step_cfg.reference_logps != step.reference_logps:
        problems.append(f"{name}: online_dil: planned reference {planned.step_cfg.reference_logps}, the run's "
                        f"{step.reference_logps}")
    rows = prompts_of_round(ctx, 1)
    per, _, _ = onpolicy.plan_rollouts(ctx, len(rows))
    rollouts = onpolicy.Rollouts(ctx, Phase("r1/policy", "policy", 1), rows, per=per, per_epoch=1, seed=0,
                                  ref=None, frozen=None, reward_fn=lambda rs, responses: np.zeros(len(rs)))
    if planned.rollout != (rollouts.per, rollouts.n):
        problems.append(f"{name}: {cfg.policy.kind}: planned rollout batch {planned.rollout} (prompts, samples), the "
                        f"run draws {rollouts.per} x {rollouts.n}")


def test_plan_uses_the_runs_batches_for_every_recipe_and_policy_kind(tmp_path):
    """Each recipe x policy.kind that loads, on the v5p:2x2x1 mesh: the sample phase's prompts per round (every round)
    and samples per prompt, its decode batch (planned from the budget; sample.batch_size 6; more than the prompts);
    each train phase's global batch, accum_steps, micro-batch and step kind; an on-policy phase's step settings
    (online_dil: its reference) and rollout batch (prompts x samples). Every mismatch is listed; the counts of
    combinations checked and refused are pinned, so the test cannot pass by checking nothing."""
    from jaxalign.config import CONFIG_DIR, ConfigError, load
    from jaxalign.plan import phases_to_plan
    from jaxalign.plan.sampling import UNKNOWN_PROMPTS, sampler_budget
    from jaxalign.rules import POLICY_KINDS

    stand_in = tmp_path / "stand_in"  # a small Llama shape for a model the planner has no config.json for
    stand_in.mkdir()
    (stand_in / "config.json").write_text(json.dumps(TINY))
    sl = _plan_slice()
    models: dict[str, object] = {}
    budgets: dict[tuple, int] = {}  # the sampler's budget per model and mesh (HBM less both copies of the weights)
    checked, refused, stand_ins, problems = [], [], 0, []
    for name in sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")):
        for kind in POLICY_KINDS:
            try:
                cfg = load(name, [f"policy.kind={kind}"])
            except ConfigError:
                refused.append((name, kind))
                continue
            checked.append((name, kind))
            try:
                in_models = plan_lib.resolve_model_file(cfg.model.path).parent == plan_lib.MODELS_DIR
            except plan_lib.PlanError:
                in_models = False
            if not in_models:  # the demo task's model, SmolLM2, a local runs/ folder: plan the stand-in's shapes
                cfg.model.path, stand_ins = str(stand_in), stand_ins + 1
            if cfg.model.path not in models:
                models[cfg.model.path] = plan_lib.model_config(cfg)
            mcfg, mesh = models[cfg.model.path], plan_lib.make_mesh(cfg, sl)
            phases = phases_to_plan(cfg)
            ctx = None
            if "sample" in phases or kind != "pairs":
                # the demonstrations the run reads: data.train.limit of them, else a dataset larger than
                # sample.limit, else (the config bounds nothing) the dataset size the plan assumes
                available = cfg.data.train.limit or 2 * cfg.sample.limit or UNKNOWN_PROMPTS
                ctx = _run_context(cfg, mesh, mcfg, available)
            if "sample" in phases:
                key = (cfg.model.path, tuple(mesh.shape.items()))
                if key not in budgets:
                    budgets[key] = sampler_budget(mcfg, mesh, sl)
                _check_sampling(cfg, name, mesh, mcfg, budgets[key], ctx, problems)
            for phase in ("sft", "reward", "policy"):
                if phase in phases:
                    _check_training(cfg, name, phase, mesh, mcfg, ctx, problems)
    assert problems == []
    assert (len(checked), len(refused), stand_ins) == (RECIPE_KINDS_CHECKED, RECIPE_KINDS_REFUSED, STAND_IN_MODELS)
    assert {k for _, k in checked} == set(POLICY_KINDS)  # every kind is checked with some recipe


def test_online_dil_plans_the_reference_the_run_holds():
    """policy.precompute_reference is for the pair kind: online_dil draws its pairs afresh every rollout and holds the
    reference (in the step, or the LoRA base), so its plan does too (jaxalign.rules.policy_reference), as
    pipeline.onpolicy.step_config builds the run's step."""
    from jaxalign.config import load
    from jaxalign.pipeline.onpolicy import step_config
    from jaxalign.plan.phases import train_inputs

    sl = _plan_slice()
    mcfg = plan_lib.model_config(load("tldr_irl"))
    for name in ("tldr_irl", "instructions_irl"):  # full fine-tuning, LoRA
        for precompute in ("false", "true"):
            cfg = load(name, ["policy.kind=online_dil", f"policy.precompute_reference={precompute}"])
            mesh = plan_lib.make_mesh(cfg, sl)
            planned = train_inputs("policy", cfg, mcfg, mesh).step_cfg
            run = step_config(_run_context(cfg, mesh, mcfg, 8), base_is_reference=cfg.model.lora.rank > 0, seed=0)
            assert planned.reference_logps == run.reference_logps == ("base" if cfg.model.lora.rank else "in_step")
            assert (planned.kind, planned.accum_steps, planned.objective) == (run.kind, run.accum_steps, run.objective)


def test_the_samplers_own_decode_batch_is_the_planned_one():
    """The run's sampler (pipeline.sample.draw -> generate_from_params) on a tiny random model over 2 CPU devices
    picks the decode batch the plan's decode_batch gives for the same recipe: sample.batch_size=5 for a round of 3
    prompts is 4 (no more than the prompts, rounded up to the 2 batch shards; the plan once said 6), and without
    it the largest batch the budget fits (4 of a round's 7 prompts), as on an accelerator (no row cap). One compiled
    shape for both: a few seconds."""
    from jaxalign import sharding
    from jaxalign.config import load
    from jaxalign.models.decoder import param_shapes
    from jaxalign.pipeline.sample import draw, prompts_of_round
    from jaxalign.plan.sampling import decode_batch, sampler_shape
    from jaxalign.rules import candidates_per_prompt
    from jaxalign.sampling import generate_from_params, sampling_bytes_per_device

    tiny = _tiny_model()
    rng = np.random.default_rng(0)
    params = {k: rng.normal(0, 0.5, s).astype(np.float32) for k, s in param_shapes(tiny).items()}
    mesh = sharding.make_mesh(-1, 1, 1, devices=jax.devices()[:2])

    cfg = load("demo_cpu", ["sample.limit=3", "sample.batch_size=5", "run.show_progress=false"])
    ctx = _run_context(cfg, mesh, tiny, 50)
    prompts = [e.prompt_ids.tolist() for e in prompts_of_round(ctx, 1)]
    shape = sampler_shape(cfg, "sample")
    assert (shape.prompts, shape.samples) == (len(prompts), candidates_per_prompt(cfg)) == (3, 4)
    planned, how, _, _ = decode_batch(cfg, tiny, shape, mesh, budget=2**30)
    res = draw(ctx, params, prompts, num_samples=shape.samples, temperature=cfg.sample.temperature,
               max_new_tokens=cfg.sample.max_new_tokens, seed=0)
    assert (how, planned) == ("sample.batch_size", res.stats.prompts_per_batch) and planned == 4

    cfg = load("demo_cpu", ["sample.limit=7", "run.show_progress=false"])
    ctx = _run_context(cfg, mesh, tiny, 50)
    prompts = [e.prompt_ids.tolist() for e in prompts_of_round(ctx, 1)]
    shape = sampler_shape(cfg, "sample")
    assert shape.prompts == len(prompts) == 7
    budget = sampling_bytes_per_device(tiny, prompts_per_batch=4, num_samples=shape.samples,
                                       prompt_len=shape.prompt_len, cache_len=shape.cache_len, mesh=mesh)["total"]
    planned, how, largest, _ = decode_batch(cfg, tiny, shape, mesh, budget)
    s = cfg.sample
    res = generate_from_params(params, tiny, prompts, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                               top_p=s.top_p, top_k=s.top_k, num_samples=shape.samples, mesh=mesh,
                               memory_budget_bytes=budget, max_rows=len(prompts) * shape.samples,
                               show_progress=False)
    assert how.startswith("planned") and planned == largest == 4
    assert (res.stats.shrunk_from or res.stats.prompts_per_batch) == planned  # its pick before any compiled check
    assert _sampler_pick(0, len(prompts), max(map(len, prompts)), shape.samples, tiny, s.max_new_tokens, mesh,
                         budget) == planned
    assert _sampler_pick(5, 3, 24, shape.samples, tiny, s.max_new_tokens, mesh, budget) == 4


def test_a_planned_decode_batch_shrinks_as_often_as_the_samplers():
    """generate_from_params checks a planned batch by what XLA compiled up to 3 times, shrinking it
    (sampling.memory.shrunk_batch) after each failed check, and runs the batch after the last shrink. The plan's
    settle_batch compiles that batch too (it once stopped a shrink short): with compiled bytes of 50 + B against 90
    usable, 64 -> 50 -> 45 -> 42 (the run's batch, still over: the row says so); a fixed batch is never shrunk."""
    from jaxalign.plan.sampling import SHRINKS, settle_batch

    compiled = []

    def compile_at(B, how):
        compiled.append(B)
        return [plan_lib.PhaseRow("sample: decode", how, total=50.0 + B, hbm=100.0)]

    rows = settle_batch(64, "planned: largest that fits", compile_at, fixed=False, largest=64, shards=1)
    assert SHRINKS == 3 and compiled == [64, 50, 45, 42] and rows[0].total == 92 and "shrunk" in rows[0].detail
    compiled.clear()
    settle_batch(64, "sample.batch_size", compile_at, fixed=True, largest=64, shards=1)
    assert compiled == [64]
