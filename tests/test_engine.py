"""The train steps on a tiny model: they learn, accumulation and meshes change nothing, the precomputed reference is the
in-step reference.

In-process (conftest gives 8 CPU devices). The steps are driven directly (``make_train_step`` + ``create_state``) on
batches from the real grain loaders, so each test compiles only what it checks.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest

import engine_fixtures as fx
from engine_script import _init_params
from jaxalign import sharding
from jaxalign.data.loader import pair_dataset, sft_dataset
from jaxalign.losses import get_objective
from jaxalign.train import reference as reference_mod
from jaxalign.train.optim import OptimConfig, make_optimizer
from jaxalign.train.reference import precompute_reference_logps
from jaxalign.train.state import create_state
from jaxalign.train.steps import StepConfig, make_eval_rewards, make_train_step

CFG = fx.tiny_cfg()
BUCKETS = (32,)


def one_device():
    return sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def host_batches(kind, examples, batch_size, n, *, epochs=None, seed=0):
    make = sft_dataset if kind == "sft" else pair_dataset
    ds = make(examples, global_batch_size=batch_size, pad_id=0, buckets=BUCKETS, seed=seed, num_epochs=epochs)
    it = iter(ds)
    return [{k: v for k, v in next(it).items() if k != "row_id"} for _ in range(n)]


class Trainer:
    """A state and a compiled step on ``mesh``; ``step(host_batch)`` returns float metrics."""

    def __init__(self, params, step_cfg, optim, mesh, example, *, ref_params=None, total_steps=100):
        self.mesh = mesh
        optimizer, schedule = make_optimizer(optim, total_steps)
        self.state = create_state(params, optimizer, mesh)
        self.ref = None
        if ref_params is not None:
            self.ref = jax.device_put(ref_params, jax.tree.map(lambda x: x.sharding, self.state.params))
        shardings = jax.tree.map(lambda x: x.sharding, self.state)
        self.fn = make_train_step(CFG, step_cfg, optimizer, schedule, mesh, shardings, example, self.ref)

    def step(self, host_batch):
        batch = sharding.shard_batch(host_batch, self.mesh)
        extra = () if self.ref is None else (self.ref,)
        self.state, metrics = self.fn(self.state, batch, *extra)
        return {k: float(v) for k, v in jax.device_get(metrics).items()}

    def params(self):
        return jax.device_get(self.state.params)


def numpy_params(seed):
    """init_params' distribution drawn with numpy (eager jax.random init compiles op by op: slow on a busy CPU)."""
    return _init_params(CFG, "sft", seed)


@pytest.fixture(scope="module")
def base_params():
    return numpy_params(0)


# ---- the steps learn -----------------------------------------------------------------------------------------------
def test_sft_loss_falls_on_a_fixed_batch(base_params):
    batch = host_batches("sft", fx.sft_examples(16), 16, 1)[0]
    tr = Trainer(base_params, StepConfig("sft"), OptimConfig(learning_rate=1e-2, warmup_ratio=0, schedule="constant"),
                 one_device(), batch)
    losses = [tr.step(batch)["loss"] for _ in range(25)]
    assert losses[0] == pytest.approx(np.log(fx.VOCAB), rel=0.05)  # a fresh model is near uniform
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(b < a for a, b in zip(losses[:10], losses[1:11])), losses[:11]


def test_reward_step_separates_pairs(base_params):
    examples = fx.pair_examples(32)
    params = {k: v for k, v in base_params.items() if k != "lm_head"}
    params["score"] = _init_params(CFG, "reward", 1)["score"]
    batches = host_batches("pair", examples, 16, 30, epochs=None)
    tr = Trainer(params, StepConfig("reward"), OptimConfig(learning_rate=3e-3, warmup_ratio=0, schedule="constant"),
                 one_device(), batches[0])
    metrics = [tr.step(b) for b in batches]
    assert metrics[-1]["loss"] < 0.5 * metrics[0]["loss"]
    # training accuracy over every pair, measured with the trained reward model
    full = host_batches("pair", examples, 32, 1, seed=1)[0]
    rewards = make_eval_rewards(CFG, one_device())
    rc = np.asarray(rewards(tr.state.params, full["chosen_input_ids"], full["chosen_attention_mask"]))
    rr = np.asarray(rewards(tr.state.params, full["rejected_input_ids"], full["rejected_attention_mask"]))
    accuracy = float(np.mean(rc > rr))
    assert accuracy > 0.95, accuracy


@pytest.mark.parametrize("objective", ["dpo", "dil_lsif"])
def test_policy_steps_raise_accuracy(base_params, objective):
    batch = host_batches("pair", fx.pair_examples(16), 16, 1)[0]
    tr = Trainer(base_params, StepConfig("policy", objective=get_objective(objective)[1]),
                 OptimConfig(learning_rate=3e-3, warmup_ratio=0, schedule="constant"), one_device(), batch,
                 ref_params=base_params)
    metrics = [tr.step(batch) for _ in range(15)]
    acc = [m["rewards/accuracies"] for m in metrics]  # measured before each update
    assert acc[0] <= 0.25  # policy == reference: implicit rewards are 0 up to rounding
    assert acc[-1] >= 0.9, acc
    assert metrics[-1]["loss"] < metrics[0]["loss"]


# ---- the precomputed reference ---------------------------------------------------------------------------------------
def test_precomputed_reference_matches_in_step_reference(base_params, tmp_path, monkeypatch):
    mesh = sharding.make_mesh(2, 2, 2)
    examples = fx.pair_examples(24)
    # the policy differs from the reference, so the log-ratios are not trivially zero
    policy = numpy_params(7)
    _, objective = get_objective("dpo")
    kw = dict(reduce=objective.reduce, mesh=mesh, batch_size=16, pad_id=0, buckets=BUCKETS, cache_dir=tmp_path)
    with_ref = precompute_reference_logps(base_params, CFG, examples, **kw)  # 24 rows: the last batch is filled
    assert all(isinstance(e["ref_chosen_logps"], float) and "ref_rejected_logps" in e for e in with_ref)
    assert len(list(tmp_path.glob("ref_logps-*.npz"))) == 1

    batches = host_batches("pair", with_ref, 8, 3)
    assert batches[0]["ref_chosen_logps"].dtype == np.float32 and batches[0]["ref_chosen_logps"].shape == (8,)
    optim = OptimConfig(learning_rate=1e-3, warmup_ratio=0)
    in_step = Trainer(policy, StepConfig("policy", objective=get_objective("dpo")[1]), optim, mesh,
                      {k: v for k, v in batches[0].items() if not k.startswith("ref_")}, ref_params=base_params)
    pre = Trainer(policy, StepConfig("policy", objective=get_objective("dpo")[1], reference_logps="precomputed"), optim, mesh,
                  batches[0])
    for b in batches:
        m_in = in_step.step({k: v for k, v in b.items() if not k.startswith("ref_")})
        m_pre = pre.step(b)
        assert abs(m_in["loss"] - m_pre["loss"]) <= 1e-5, (m_in["loss"], m_pre["loss"])
        for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies"):
            assert m_in[name] == pytest.approx(m_pre[name], abs=1e-5)

    # the second call reads the cache: no reference forward pass at all
    def no_compute(*a, **k):
        raise AssertionError("precompute_reference_logps recomputed although the cache holds the values")

    monkeypatch.setattr(reference_mod, "make_eval_logps", no_compute)
    again = precompute_reference_logps(base_params, CFG, examples, **kw)
    assert [(e["ref_chosen_logps"], e["ref_rejected_logps"]) for e in again] == \
        [(e["ref_chosen_logps"], e["ref_rejected_logps"]) for e in with_ref]
    # another model or another dataset is another cache entry
    fp = reference_mod.model_fingerprint
    assert fp(base_params, CFG, "sum") != fp(policy, CFG, "sum") != fp(base_params, CFG, "mean")
    assert reference_mod.dataset_fingerprint(examples) != reference_mod.dataset_fingerprint(examples[:-1])


# ---- accumulation and meshes change nothing --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_gradient_accumulation_equals_one_big_batch(base_params, kind):
    """k=4 micro-batches of 4 rows vs one batch of 16, on a (2,2,2) mesh (each micro-batch spans the 4 batch shards).

    Plain SGD at learning rate 1 without clipping, so the params after one step differ by exactly the gradient; the
    accumulated and the one-batch gradients agree to float32 summation order: |diff| <= 1e-6 + 1e-5 * |value|.
    """
    mesh = sharding.make_mesh(2, 2, 2)
    if kind == "sft":
        batch = host_batches("sft", fx.sft_examples(16), 16, 1)[0]
        cfgs = [StepConfig("sft", accum_steps=k) for k in (1, 4)]
        ref = None
    else:
        batch = host_batches("pair", fx.pair_examples(16), 16, 1)[0]
        cfgs = [StepConfig("policy", objective=get_objective("dpo")[1], accum_steps=k) for k in (1, 4)]
        ref = base_params
    policy = numpy_params(3)
    optim = OptimConfig(name="sgd", learning_rate=1.0, warmup_ratio=0, schedule="constant", max_grad_norm=0)
    out = []
    for step_cfg in cfgs:
        tr = Trainer(policy, step_cfg, optim, mesh, batch, ref_params=ref)
        out.append((tr.step(batch), tr.params()))
    (m1, p1), (m4, p4) = out
    for name in m1:
        assert m4[name] == pytest.approx(m1[name], rel=1e-5, abs=1e-6), name
    for name in p1:
        np.testing.assert_allclose(p4[name] - policy[name], p1[name] - policy[name], rtol=1e-5, atol=1e-6,
                                   err_msg=name)


@pytest.mark.slow
def test_meshes_give_the_single_device_trajectory(base_params):
    """Five AdamW steps (lr 1e-2) of SFT on (8,1,1), (2,2,2) and (1,1,8): the losses match one device to 1e-5
    (relative), the params to 1e-4 (absolute)."""
    batches = host_batches("sft", fx.sft_examples(40), 8, 5)
    optim = OptimConfig(learning_rate=1e-2, warmup_ratio=0)
    runs = {}
    for shape in [(1, 1, 1), (8, 1, 1), (2, 2, 2), (1, 1, 8)]:
        mesh = one_device() if shape == (1, 1, 1) else sharding.make_mesh(*shape)
        tr = Trainer(base_params, StepConfig("sft"), optim, mesh, batches[0], total_steps=5)
        runs[shape] = ([tr.step(b)["loss"] for b in batches], tr.params())
    losses, params = runs.pop((1, 1, 1))
    assert losses[-1] < losses[0]
    for shape, (other, other_params) in runs.items():
        np.testing.assert_allclose(other, losses, rtol=1e-5, err_msg=str(shape))
        for name in params:
            # Adam's update is ~lr * sign(g) where g ~ 0, so rounding-level gradient differences show at ~1e-5:
            # the params agree to 1% of one learning-rate step
            np.testing.assert_allclose(other_params[name], params[name], rtol=0, atol=1e-4,
                                       err_msg=f"{shape} {name}")


# ---- held-out evaluation: the length-matched accuracy ----------------------------------------------------------------
def test_heldout_accuracy_within_length_matched_pairs(base_params):
    """``rewards/accuracies_length_matched`` is the plain held-out accuracy of the evaluator run on only the pairs
    whose responses are within 10% in length; pairs are picked by their masks, checked here against the rule."""
    from jaxalign.train.run import length_matched, make_evaluator

    examples = fx.pair_examples(64, seed=3)  # chosen and rejected of equal length: shorten every other rejected
    for e in examples[1::2]:
        e["rejected_ids"], e["rejected_mask"] = e["rejected_ids"][:-2], e["rejected_mask"][:-2]
    lens = [(int(e["chosen_mask"].sum()), int(e["rejected_mask"].sum())) for e in examples]
    rule = [abs(a - b) <= max(1, 0.1 * max(a, b)) for a, b in lens]
    assert [length_matched(e) for e in examples] == rule and 8 <= sum(rule) < len(rule), lens
    step = StepConfig("policy", objective=get_objective("dpo")[1])
    ref = numpy_params(1)  # a different reference: accuracies are not all ties
    kw = dict(batch_size=8, pad_id=0, buckets=BUCKETS, ref_params=ref)
    full = make_evaluator(CFG, step, one_device(), examples, **kw)

    class State:
        params = base_params

    got = full(State)
    matched = [e for e, ok in zip(examples, rule) if ok]
    alone = make_evaluator(CFG, step, one_device(), matched[: len(matched) // 8 * 8], **kw)(State)
    assert got["length_matched"] == len(matched) // 8 * 8
    assert got["rewards/accuracies_length_matched"] == pytest.approx(alone["rewards/accuracies"], abs=1e-6)
    assert got["rewards/accuracies"] != got["rewards/accuracies_length_matched"] or sum(rule) == len(rule)
