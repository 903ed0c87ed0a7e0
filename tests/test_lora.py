"""LoRA adapters against the base forward, a merged export, and PEFT on transformers (torch CPU)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_models import make_hf_model
from jaxalign import sharding
from jaxalign.losses import dpo_loss, sequence_logprobs, sft_loss, token_logprobs
from jaxalign.models import Decoder, forward, from_pretrained, param_axes, save_pretrained
from jaxalign.models.lora import (LoraConfig, adapter_logical_axes, init_adapters, join_trainable, load_peft_adapter,
                                  merge, save_peft_adapter, split_trainable, trainable_logical_axes, tree_bytes)

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

VARIANTS = ["llama", "qwen2", "llama3_tied"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_lora")
    made = {}

    def get(variant):
        if variant not in made:
            made[variant] = root / variant
            make_hf_model(variant, made[variant])
        return made[variant]

    return get


def _ids(b=3, t=17, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randint(3, 256, size=(b, t)).astype(np.int32))


def _trained(adapters, seed=1, std=0.05):
    """Adapters as training leaves them: A and B both moved off their init (B no longer zero)."""
    r = np.random.RandomState(seed)
    return {k: v + jnp.asarray(std * r.randn(*v.shape), v.dtype) for k, v in adapters.items()}


def _fwd(cfg, lcfg=None, **kw):
    if lcfg is None:
        return jax.jit(lambda p, x: forward(p, cfg, x, **kw))
    return jax.jit(lambda p, a, x: forward(p, cfg, x, lora=(a, lcfg), **kw))


def _max_rel(out, ref):
    return float(np.abs(np.asarray(out) - np.asarray(ref)).max() / np.abs(np.asarray(ref)).max())


@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_b_is_the_base_forward_bit_for_bit(variant, hf_dir):
    model = from_pretrained(hf_dir(variant))
    cfg, params, ids = model.cfg, model.param_dict(), _ids()
    lcfg = LoraConfig(rank=4, alpha=8)
    adapters = init_adapters(cfg, lcfg, jax.random.PRNGKey(0))
    assert all(np.abs(np.asarray(v)).max() > 0 for k, v in adapters.items() if k.endswith("_lora_a"))
    base = np.asarray(_fwd(cfg)(params, ids))
    np.testing.assert_array_equal(np.asarray(_fwd(cfg, lcfg)(params, adapters, ids)), base)
    # dropout (a training forward) on a zero B changes nothing either
    drop = LoraConfig(rank=4, alpha=8, dropout=0.5)
    out = jax.jit(lambda p, a, x, k: forward(p, cfg, x, lora=(a, drop), dropout_rng=k))(params, adapters, ids,
                                                                                         jax.random.PRNGKey(3))
    np.testing.assert_array_equal(np.asarray(out), base)


def test_lora_off_traces_the_base_program(hf_dir):
    """rank 0 (no adapters) or lora=None: the traced program is the base forward's, op for op."""
    model = from_pretrained(hf_dir("llama"))
    cfg, params, ids = model.cfg, model.param_dict(), _ids()
    off = LoraConfig(rank=0)
    assert init_adapters(cfg, off, jax.random.PRNGKey(0)) == {}
    base = str(jax.make_jaxpr(lambda p: forward(p, cfg, ids))(params))
    assert str(jax.make_jaxpr(lambda p: forward(p, cfg, ids, lora=({}, off)))(params)) == base
    key = jax.random.PRNGKey(0)
    assert str(jax.make_jaxpr(lambda p: forward(p, cfg, ids, lora=None, dropout_rng=key))(params)) == base
    on = LoraConfig(rank=2)
    ad = init_adapters(cfg, on, jax.random.PRNGKey(0))
    assert str(jax.make_jaxpr(lambda p: forward(p, cfg, ids, lora=(ad, on)))(params)) != base


@pytest.mark.parametrize("variant", VARIANTS)
def test_merged_export_equals_adapter_forward(variant, hf_dir, tmp_path):
    model = from_pretrained(hf_dir(variant))
    cfg, params, ids = model.cfg, model.param_dict(), _ids()
    lcfg = LoraConfig(rank=4, alpha=16)
    adapters = _trained(init_adapters(cfg, lcfg, jax.random.PRNGKey(0)))
    lora_out = _fwd(cfg, lcfg)(params, adapters, ids)
    base = _fwd(cfg)(params, ids)
    assert _max_rel(lora_out, base) > 1e-2  # the adapters do change the model
    save_pretrained(Decoder(cfg, merge(params, adapters, cfg, lcfg)), tmp_path / "merged")
    reloaded = from_pretrained(tmp_path / "merged")
    merged_out = _fwd(cfg)(reloaded.param_dict(), ids)
    assert _max_rel(merged_out, lora_out) <= 1e-5


def _hf_logits(folder, adapter_folder, ids):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, str(adapter_folder)).eval()
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("variant,targets", [("llama", ("q", "k", "v", "o", "gate", "up", "down")),
                                             ("qwen2", ("q", "v", "down")), ("llama3_tied", ("k", "o", "up")),
                                             ("gpt_neox", ("q", "k", "v", "o", "up", "down")),
                                             ("gpt_neox_serial", ("v", "down"))])
def test_peft_loads_our_adapter(variant, targets, hf_dir, tmp_path):
    folder = hf_dir(variant)
    model = from_pretrained(folder)
    cfg, params, ids = model.cfg, model.param_dict(), _ids()
    lcfg = LoraConfig(rank=4, alpha=8, dropout=0.1, targets=targets)
    adapters = _trained(init_adapters(cfg, lcfg, jax.random.PRNGKey(0)))
    ours = np.asarray(_fwd(cfg, lcfg)(params, adapters, ids))
    assert _max_rel(ours, _fwd(cfg)(params, ids)) > 1e-2
    save_peft_adapter(adapters, lcfg, cfg, tmp_path / "adapter", base_model_name_or_path=str(folder))
    ref = _hf_logits(folder, tmp_path / "adapter", ids)
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()
    # and back: our reader restores the same arrays and config
    back, back_cfg = load_peft_adapter(tmp_path / "adapter", cfg)
    assert (back_cfg.rank, back_cfg.alpha, back_cfg.dropout) == (lcfg.rank, lcfg.alpha, lcfg.dropout)
    if cfg.family != "neox" or not {"q", "k", "v"} & set(targets):
        assert back_cfg.targets == targets
    for k, v in adapters.items():
        np.testing.assert_array_equal(np.asarray(back[k]), np.asarray(v), err_msg=k)


def test_peft_loads_our_reward_adapter_with_its_head(hf_dir, tmp_path):
    """A reward model's adapters + its fully trained head, saved as a SEQ_CLS adapter (head as modules_to_save):
    PEFT on AutoModelForSequenceClassification scores a batch as jaxalign's reward_forward does (1e-4)."""
    from transformers import AutoModelForSequenceClassification

    from jaxalign.models.reward import init_score, reward_forward

    folder = hf_dir("llama")
    model = from_pretrained(folder)
    cfg, params = model.cfg, model.param_dict()
    lcfg = LoraConfig(rank=4, alpha=8, targets=("q", "v", "down"))
    adapters = _trained(init_adapters(cfg, lcfg, jax.random.PRNGKey(1)))
    params["score"] = init_score(cfg, jax.random.PRNGKey(2))
    ids = _ids(3, 9, seed=5)
    ours = np.asarray(reward_forward(params, cfg, ids, lora=(adapters, lcfg)))
    save_peft_adapter(adapters, lcfg, cfg, tmp_path / "adapter", base_model_name_or_path=str(folder),
                      score=params["score"])
    base = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, dtype=torch.float32)
    base.config.pad_token_id = 0  # no padding in these rows: any id lets transformers take the last token
    pm = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        ref = pm(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()[:, 0]
    assert np.abs(ours - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_reads_an_adapter_peft_itself_saved(hf_dir, tmp_path):
    """PEFT's own save_pretrained (random A and B, rsLoRA scaling) read by load_peft_adapter gives PEFT's logits."""
    from transformers import AutoModelForCausalLM

    folder = hf_dir("qwen2")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    pcfg = peft.LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj", "o_proj", "gate_proj"],
                           init_lora_weights=False, use_rslora=True)
    pm = peft.get_peft_model(base, pcfg).eval()
    pm.save_pretrained(tmp_path / "peft")
    ids = _ids(2, 11, seed=4)
    with torch.no_grad():
        ref = pm(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()
    model = from_pretrained(folder)
    adapters, lcfg = load_peft_adapter(tmp_path / "peft", model.cfg)
    assert lcfg.targets == ("q", "o", "gate") and lcfg.rank == 3
    assert math.isclose(lcfg.scale, 5 / math.sqrt(3), rel_tol=1e-6)
    ours = np.asarray(_fwd(model.cfg, lcfg)(model.param_dict(), adapters, ids))
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def test_training_starts_from_the_init_adapter_folder_and_refuses_another_rank(hf_dir, tmp_path):
    """``model.lora.init_adapter``: a folder written by save_peft_adapter is accepted when model.lora declares its rank,
    alpha and targets (in any order), and the phase's starting adapters are its arrays exactly; a folder of another
    rank is refused when the recipe loads, in one sentence naming both."""
    from types import SimpleNamespace

    from jaxalign import config as config_lib
    from jaxalign.config import ConfigError
    from jaxalign.pipeline.training import start_adapters

    model = from_pretrained(hf_dir("llama"))
    lcfg = LoraConfig(rank=4, alpha=8, targets=("q", "v", "down"))
    saved = _trained(init_adapters(model.cfg, lcfg, jax.random.PRNGKey(3)))
    folder = save_peft_adapter(saved, lcfg, model.cfg, tmp_path / "adapter")
    lora = ["model.lora.rank=4", "model.lora.alpha=8", "model.lora.targets=down,v,q",
            f"model.lora.init_adapter={folder}"]
    cfg = config_lib.load("ultrachat_dpo", lora)
    # the ctx fields start_adapters reads; the seed would draw fresh adapters, which must not happen here
    ctx = SimpleNamespace(cfg=cfg, model_cfg=model.cfg, lora=cfg.model.lora.build())
    start = start_adapters(ctx, seed=0)
    assert sorted(start) == sorted(saved)
    for k, v in saved.items():
        np.testing.assert_array_equal(np.asarray(start[k]), np.asarray(v), err_msg=k)
    with pytest.raises(ConfigError, match=r"the adapter has r=4, alpha=8 and targets q,v,down \(adapter_config.json\) "
                                          r"but model.lora has rank=8, alpha=8 and targets down,v,q"):
        config_lib.load("ultrachat_dpo", lora + ["model.lora.rank=8"])
    with pytest.raises(ConfigError, match="not a usable PEFT LoRA adapter folder"):
        config_lib.load("ultrachat_dpo", lora[:3] + [f"model.lora.init_adapter={tmp_path / 'missing'}"])


def _sft(params, adapters, cfg, lcfg, ids):
    logits = forward(params, cfg, ids[:, :-1], lora=(adapters, lcfg))
    return sft_loss(logits, ids[:, 1:], jnp.ones(ids[:, 1:].shape))[0]


def test_grads_reach_only_the_adapters_and_the_base_grad_is_not_computed(hf_dir):
    model = from_pretrained(hf_dir("llama"))
    cfg, params, ids = model.cfg, model.param_dict(), _ids(4, 33)
    lcfg = LoraConfig(rank=4, alpha=8)
    adapters = _trained(init_adapters(cfg, lcfg, jax.random.PRNGKey(0)))
    trainable, frozen = split_trainable(params, adapters)
    assert set(trainable) == set(adapters) and set(frozen) == set(params)

    def loss(tr, fr):
        p, a = join_trainable(tr, jax.lax.stop_gradient(fr))
        return _sft(p, a, cfg, lcfg, ids)

    g = jax.jit(jax.grad(loss))(trainable, frozen)
    assert set(g) == set(adapters)
    for k, v in g.items():
        assert np.abs(np.asarray(v)).max() > 0, k
    # the same gradient as differentiating everything, restricted to the adapters
    g_all = jax.jit(jax.grad(lambda p, a: _sft(p, a, cfg, lcfg, ids), argnums=(0, 1)))(params, adapters)
    for k in adapters:
        np.testing.assert_allclose(np.asarray(g[k]), np.asarray(g_all[1][k]), rtol=1e-5, atol=1e-8, err_msg=k)

    # Not computed at all: the compiled adapter-only step does at least the base weight-gradient matmuls' FLOPs less
    # (2 * tokens * matrix params, the lm head included) than the step that also differentiates the base.
    def flops(fn, *args):
        return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]

    f_adapters = flops(jax.grad(loss), trainable, frozen)
    f_all = flops(jax.grad(lambda p, a: _sft(p, a, cfg, lcfg, ids), argnums=(0, 1)), params, adapters)
    matrices = sum(v.size for k, v in params.items() if k.startswith("w") or k == "lm_head")
    weight_grad = 2 * ids[:, :-1].size * matrices
    assert f_all - f_adapters >= 0.9 * weight_grad, (f_all, f_adapters, weight_grad)


def test_trainable_extra_names_and_bf16_frozen_base(hf_dir):
    model = from_pretrained(hf_dir("qwen2"))
    cfg, params, ids = model.cfg, model.param_dict(), _ids()
    lcfg = LoraConfig(rank=2)
    adapters = _trained(init_adapters(cfg, lcfg, jax.random.PRNGKey(0)))
    tr, fr = split_trainable(params, adapters, trainable=("final_norm",), base_dtype=jnp.bfloat16)
    assert "final_norm" in tr and "final_norm" not in fr and tr["final_norm"].dtype == jnp.float32
    axes = trainable_logical_axes(tr)
    assert axes["final_norm"] == ("embed",) and axes["wq_lora_b"] == ("layers", "lora_rank", "heads", "head_dim")
    assert all(v.dtype == jnp.bfloat16 for v in fr.values())
    assert tree_bytes(fr) * 2 == tree_bytes({k: v for k, v in params.items() if k != "final_norm"})
    p, a = join_trainable(tr, fr)
    assert set(p) == set(params) and set(a) == set(adapters)
    out = _fwd(cfg, lcfg)(p, a, ids)
    ref = _fwd(cfg, lcfg)(params, adapters, ids)
    assert _max_rel(out, ref) < 2e-2  # bf16-rounded base weights, float32 compute
    with pytest.raises(KeyError):
        split_trainable(params, adapters, trainable=("score",))


def test_dropout_only_with_a_key(hf_dir):
    model = from_pretrained(hf_dir("llama"))
    cfg, params, ids = model.cfg, model.param_dict(), _ids()
    lcfg = LoraConfig(rank=4, dropout=0.3)
    adapters = _trained(init_adapters(cfg, lcfg, jax.random.PRNGKey(0)))
    f = jax.jit(lambda a, k: forward(params, cfg, ids, lora=(a, lcfg), dropout_rng=k))
    evalf = _fwd(cfg, lcfg)(params, adapters, ids)
    no_drop = _fwd(cfg, LoraConfig(rank=4, dropout=0.0))(params, adapters, ids)
    np.testing.assert_array_equal(np.asarray(evalf), np.asarray(no_drop))
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    np.testing.assert_array_equal(np.asarray(f(adapters, k1)), np.asarray(f(adapters, k1)))
    assert _max_rel(f(adapters, k1), evalf) > 1e-3
    assert _max_rel(f(adapters, k1), f(adapters, k2)) > 1e-3


def _dpo(adapters, params, ref_params, cfg, lcfg, batch):
    ids, mask = batch
    def logps(p, lora):
        logits = forward(p, cfg, ids[:, :-1], lora=lora)
        return sequence_logprobs(token_logprobs(logits, ids[:, 1:]), mask[:, 1:])
    pol = logps(params, (adapters, lcfg))
    ref = jax.lax.stop_gradient(logps(ref_params, None))
    n = ids.shape[0] // 2
    return dpo_loss(pol[:n], pol[n:], ref[:n], ref[n:], beta=0.1)[0]


def test_reference_is_the_base_with_adapters_off(hf_dir):
    """DPO whose reference is the policy's own base with adapters off = DPO with a separate frozen copy of the base,
    in loss and adapter gradients, while the step holds one copy of the base weights instead of two."""
    model = from_pretrained(hf_dir("llama"))
    cfg, params = model.cfg, model.param_dict()
    lcfg = LoraConfig(rank=4, alpha=8)
    adapters = _trained(init_adapters(cfg, lcfg, jax.random.PRNGKey(0)))
    ids = _ids(8, 25, seed=7)  # 4 chosen rows then 4 rejected rows
    mask = jnp.asarray(np.arange(25)[None, :] >= 6, jnp.float32) * jnp.ones((8, 1))
    copy = jax.tree.map(lambda x: jnp.array(x, copy=True), params)

    shared = jax.jit(jax.value_and_grad(lambda a, p, b: _dpo(a, p, p, cfg, lcfg, b)))
    separate = jax.jit(jax.value_and_grad(lambda a, p, r, b: _dpo(a, p, r, cfg, lcfg, b)))
    (l1, g1), (l2, g2) = shared(adapters, params, (ids, mask)), separate(adapters, params, copy, (ids, mask))
    assert abs(float(l1) - math.log(2)) > 1e-3  # the adapters moved the policy away from the reference
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-5)
    for k in adapters:
        np.testing.assert_allclose(np.asarray(g1[k]), np.asarray(g2[k]), rtol=1e-5,
                                   atol=1e-5 * np.abs(np.asarray(g2[k])).max(), err_msg=k)
    one = shared.lower(adapters, params, (ids, mask)).compile().memory_analysis().argument_size_in_bytes
    two = separate.lower(adapters, params, copy, (ids, mask)).compile().memory_analysis().argument_size_in_bytes
    base = tree_bytes(params)
    print(f"\nbase weights {base:,} B; step arguments: shared reference {one:,} B, separate copy {two:,} B")
    assert two - one == base


@pytest.mark.parametrize("shape", [(1, 4, 2), (1, 1, 8)])
def test_sharded_adapters_follow_their_base(shape, hf_dir):
    folder = hf_dir("llama")
    ref_model = from_pretrained(folder)
    cfg, ids = ref_model.cfg, _ids(8, 16, seed=5)
    lcfg = LoraConfig(rank=4)
    adapters = _trained(init_adapters(cfg, lcfg, jax.random.PRNGKey(0)))
    ref = _fwd(cfg, lcfg)(ref_model.param_dict(), adapters, ids)
    grad = jax.grad(_sft, argnums=1)
    ref_g = jax.jit(grad, static_argnums=(2, 3))(ref_model.param_dict(), adapters, cfg, lcfg, ids)

    mesh = sharding.make_mesh(*shape)
    params = from_pretrained(folder, mesh=mesh).param_dict()
    axes = adapter_logical_axes(adapters)
    a_shard = sharding.tree_shardings(adapters, axes, mesh)
    p_shard = sharding.tree_shardings(params, param_axes(params), mesh)
    for name, spec in a_shard.items():
        base = name.rsplit("_lora_", 1)[0]
        bspec, aspec = tuple(p_shard[base].spec), tuple(spec.spec)
        bspec += (None,) * (params[base].ndim - len(bspec))
        aspec += (None,) * (adapters[name].ndim - len(aspec))
        k = adapters[name].ndim - 2  # non-rank, non-layer dims of this factor
        expect = bspec[1:1 + k] if name.endswith("_lora_a") else bspec[len(bspec) - k:]
        got = aspec[1:1 + k] if name.endswith("_lora_a") else aspec[2:]
        assert got == expect and None in (aspec[1 + k] if name.endswith("_lora_a") else aspec[1],), name
    adapters = jax.device_put(adapters, a_shard)
    x = sharding.shard_batch({"ids": np.asarray(ids)}, mesh)["ids"]
    with sharding.activate(mesh):
        out = _fwd(cfg, lcfg)(params, adapters, x)
        g = jax.jit(grad, static_argnums=(2, 3), out_shardings=a_shard)(params, adapters, cfg, lcfg, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
    for k in adapters:
        r = np.asarray(ref_g[k])
        np.testing.assert_allclose(np.asarray(g[k]), r, rtol=1e-4, atol=1e-5 * np.abs(r).max(), err_msg=k)


def test_init_matches_peft_and_config_is_checked():
    from jaxalign.models import ModelConfig

    cfg = ModelConfig(model_type="llama", vocab_size=64, hidden_size=48, intermediate_size=80, num_layers=3,
                      num_heads=4, num_kv_heads=2, head_dim=12, max_position_embeddings=64,
                      sliding_windows=(None,) * 3)
    ad = init_adapters(cfg, LoraConfig(rank=8), jax.random.PRNGKey(0))
    # PEFT: kaiming_uniform_(a=sqrt(5)) on lora_A [r, fan_in] is U(-1/sqrt(fan_in), 1/sqrt(fan_in)); lora_B zero
    for name, fan_in in [("wq_lora_a", 48), ("wo_lora_a", 48), ("w_down_lora_a", 80)]:
        a = np.asarray(ad[name])
        bound = 1 / math.sqrt(fan_in)
        assert a.max() <= bound and a.min() >= -bound and a.max() > 0.9 * bound and a.min() < -0.9 * bound
        assert abs(a.std() - bound / math.sqrt(3)) < 0.1 * bound
    assert not any(np.asarray(v).any() for k, v in ad.items() if k.endswith("_lora_b"))
    assert not np.array_equal(np.asarray(ad["wq_lora_a"]), np.asarray(ad["wk_lora_a"]))
    assert ad["wo_lora_a"].shape == (3, 4, 12, 8) and ad["wk_lora_b"].shape == (3, 8, 2, 12)
    for bad in [dict(rank=-1), dict(rank=4, targets=("q", "attn")), dict(rank=4, dropout=1.0),
                dict(rank=4, targets=())]:
        with pytest.raises(ValueError):
            LoraConfig(**bad)


def test_reward_model_trains_adapters_and_its_head():
    """The reward head stays trainable beside the adapters; its rewards move with both, the base is frozen."""
    from jaxalign.losses import bradley_terry_loss
    from jaxalign.models import ModelConfig, RewardModel, reward_forward

    cfg = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64, sliding_windows=(None,) * 2)
    params = RewardModel(cfg).param_dict()
    lcfg = LoraConfig(rank=2, targets=("q", "v"))
    adapters = _trained(init_adapters(cfg, lcfg, jax.random.PRNGKey(0)))
    tr, fr = split_trainable(params, adapters, trainable=("score",))
    ids = jnp.asarray(np.random.RandomState(0).randint(3, 64, size=(4, 9)).astype(np.int32))

    def loss(tr, fr):
        p, a = join_trainable(tr, jax.lax.stop_gradient(fr))
        r = reward_forward(p, cfg, ids, lora=(a, lcfg))
        return bradley_terry_loss(r[:2], r[2:])[0]

    g = jax.jit(jax.grad(loss))(tr, fr)
    assert set(g) == {"score"} | set(adapters)
    axes = trainable_logical_axes(tr)
    assert axes["score"] == ("embed",) and axes["wv_lora_a"][-1] == "lora_rank"
    assert all(np.abs(np.asarray(v)).max() > 0 for v in g.values())
    r_base = reward_forward(params, cfg, ids)
    r_lora = reward_forward(params, cfg, ids, lora=(adapters, lcfg))
    assert np.abs(np.asarray(r_lora) - np.asarray(r_base)).max() > 1e-4
