"""jaxalign's GRPO / RLOO update equals TRL 1.16's at the loss-and-gradient level.

What is compared: one tiny random-init Llama written by transformers (float32, CPU), 2 prompts x 4 completions of
different lengths (padded), fixed rewards hence advantages, and old / reference log-probs that differ from the current
ones (current + noise, so the clipped branch is taken on a good share of the tokens and the KL term is not zero). The
same numbers go to TRL's own loss code — ``GRPOTrainer.compute_loss`` / ``RLOOTrainer.compute_loss`` called on an
``inputs`` dict shaped as ``_generate_and_score_completions`` returns it, then ``loss.backward()`` — and to the loss
jaxalign's jitted ``StepConfig("onpolicy")`` step differentiates (``jaxalign.train.onpolicy_steps.onpolicy_loss_fn``
with an ``OnPolicySettings``), in jaxalign's rollout layout. The loss and every parameter's gradient (mapped to its HF
name) must agree. Before any loss, the per-token log-probs of both sides are compared on the response tokens: TRL
left-pads the prompts and right-pads the completions (positions shift with the left padding; RoPE makes that a no-op),
jaxalign right-pads prompt + response rows, so a layout mistake shows up there and not as a loss mismatch.

Mapping of TRL's options to jaxalign's (``OnPolicySettings``):

- GRPO ``loss_type="grpo"`` = ``length_norm="sequence"``; ``"bnpo"`` = ``"token"``; ``"dr_grpo"`` = ``"constant"``
  with ``max_new_tokens`` = TRL's ``max_completion_length`` (set above the longest completion, so the constant is not
  the padded width). TRL 1.16's default ``"dapo"`` divides by ``num_items_in_batch`` (the generation batch's completion
  tokens) x ``gradient_accumulation_steps / steps_per_generation / num_processes``; with one process and one
  micro-batch per generation batch that is the batch's token count, i.e. ``"bnpo"``, so it is tested as ``"token"``.
  With accumulation over several micro-batches, dapo normalises by the whole generation batch's tokens, which
  jaxalign's per-micro-batch ``"token"`` mean does not (not supported; neither are cispo / sapo / luspo / vespo,
  sequence-level importance sampling, ``delta``, entropy masks or vLLM importance correction).
- ``epsilon`` = ``clip``; ``beta`` = ``kl_coef`` (k3 as a loss term); ``use_bias_correction_kl`` (TRL 1.16 default
  True: the k3 term multiplied by the ratio pi / pi_old, differentiable) = ``kl_bias_correction`` (default True, TRL's);
  ``temperature`` = ``temperature`` (both divide the logits by it before the log-softmax).
- RLOO: TRL 1.16's ``RLOOTrainer`` loss (PPO-clipped ratio of whole-sequence probabilities, mean over sequences) =
  ``kind="rloo"``; its KL penalty lives in the rewards, hence in the advantages, which both sides receive as given.

Tolerances (float32): the loss to ``rtol`` 1e-5 (~100 float32 ulps: both sides sum the same ~30 tokens in different
orders through different matmul splittings) plus ``atol`` 1e-6, because the loss is a mean of O(1) terms whose
advantages sum to zero per group, so it can cancel to ~1e-3 while its rounding stays that of the O(1) terms; each
gradient tensor to ``atol`` 1e-4 x that tensor's largest entry (plus ``rtol`` 1e-4), and the global gradient norm to
``rtol`` 1e-4: TRL's fused LM head (``fused_lm_head=True``, a hand-written chunked log-softmax backward) and XLA group
the backward's float32 sums differently, and the clipped surrogate's gradient is a sum of terms of both signs, so its
small entries carry the larger relative rounding. Log-probs to ``atol`` 1e-5. Measured (``pytest -s`` prints one row
per case): log-probs within 5e-7, losses within 2e-7, gradients within 3e-6 (RLOO at temperature 0.7, ``lm_head``;
4e-7 elsewhere), gradient norms within 4e-6 relative. The plain-k3 and ratio-weighted KL cases differ by 1.2e-4 in the
loss, so the test tells TRL's two KL forms apart.

Not compared here: how each side turns rewards into advantages (TRL inline in ``_generate_and_score_completions``,
jaxalign ``rollout_advantages``); the same advantages go to both.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

N = 4  # completions per prompt
PROMPTS = ([11, 12, 13, 14, 15], [21, 22, 23])  # different lengths: TRL left-pads the shorter one
COMPLETION_LENGTHS = ((6, 4, 2, 5), (3, 6, 1, 4))
MAX_COMPLETION = 8  # Dr. GRPO's constant; above the longest completion (6) so it differs from the padded width
CLIP = 0.2
PAD = 0
LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-6
GRAD_RTOL, GRAD_ATOL_REL = 1e-4, 1e-4
LOGP_ATOL = 1e-5


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The model folder, jaxalign's config and params, and the rollout both sides see (ids, lengths, rewards)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from jaxalign.models.config import load_config
    from jaxalign.models.hf_io import read_params

    torch.set_num_threads(1)  # the CPU is shared with other work
    root = tmp_path_factory.mktemp("trl_parity_onpolicy")
    hf_cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                         pad_token_id=PAD, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(hf_cfg).save_pretrained(root / "model")
    # the trainers need a tokenizer to build; nothing is tokenised or generated here
    vocab = {f"t{i}": i for i in range(hf_cfg.vocab_size)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="t3"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="t0", bos_token="t1", eos_token="t2", unk_token="t3")

    rng = np.random.default_rng(0)
    prompts = [list(PROMPTS[p]) for p in range(len(PROMPTS)) for _ in range(N)]
    completions = [rng.integers(4, hf_cfg.vocab_size, size=n).tolist() for group in COMPLETION_LENGTHS for n in group]
    rewards = rng.normal(size=(len(PROMPTS), N)).astype(np.float32)
    cfg = load_config(root / "model")
    params = read_params(root / "model", cfg)
    return {"root": root, "tok": tok, "cfg": cfg, "params": params, "prompts": prompts, "completions": completions,
            "rewards": rewards, "rng": rng}


def trl_layout(prompts, completions):
    """``prompt_ids / prompt_mask`` left-padded, ``completion_ids / completion_mask`` right-padded, as
    ``_generate_and_score_completions`` pads them."""
    lp, lc = max(map(len, prompts)), max(map(len, completions))
    b = len(prompts)
    pid, pm = np.full((b, lp), PAD), np.zeros((b, lp), np.int64)
    cid, cm = np.full((b, lc), PAD), np.zeros((b, lc), np.int64)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        pid[i, lp - len(p):], pm[i, lp - len(p):] = p, 1
        cid[i, :len(c)], cm[i, :len(c)] = c, 1
    t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return {"prompt_ids": t(pid), "prompt_mask": t(pm), "completion_ids": t(cid), "completion_mask": t(cm)}


def ours_layout(prompts, completions):
    """jaxalign's rollout rows: prompt + response right-padded, ``loss_mask`` on the response tokens."""
    T = max(map(len, prompts)) + max(map(len, completions))
    b = len(prompts)
    ids, attn, loss = np.full((b, T), PAD, np.int32), np.zeros((b, T), np.int32), np.zeros((b, T), np.int32)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, :len(p) + len(c)] = p + c
        attn[i, :len(p) + len(c)] = 1
        loss[i, len(p):len(p) + len(c)] = 1
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


def to_ours(x, prompts, completions):
    """TRL's per-completion-token ``[B, Lc]`` array -> jaxalign's ``[B, T - 1]`` target-aligned one: response token
    k of row i is target ``len(prompt_i) + k - 1``."""
    T = max(map(len, prompts)) + max(map(len, completions))
    out = np.zeros((len(prompts), T - 1), np.float32)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        out[i, len(p) - 1:len(p) - 1 + len(c)] = x[i, :len(c)]
    return out


def to_trl(x, prompts, completions):
    lc = max(map(len, completions))
    out = np.zeros((len(prompts), lc), np.float32)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        out[i, :len(c)] = x[i, len(p) - 1:len(p) - 1 + len(c)]
    return out


def make_trainer(world, tmp_path, kind, **kw):
    from datasets import Dataset

    config_cls, trainer_cls = ((trl.GRPOConfig, trl.GRPOTrainer) if kind == "grpo"
                               else (trl.RLOOConfig, trl.RLOOTrainer))
    args = config_cls(output_dir=str(tmp_path / f"trl_{kind}"), use_cpu=True, report_to="none", bf16=False, fp16=False,
                      per_device_train_batch_size=len(world["prompts"]), gradient_accumulation_steps=1,
                      num_generations=N, max_completion_length=MAX_COMPLETION, epsilon=CLIP, disable_tqdm=True,
                      save_strategy="no", seed=0, **kw)
    trainer = trainer_cls(model=str(world["root"] / "model"),
                          reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
                          train_dataset=Dataset.from_list([{"prompt": "t5 t6"}] * 8), processing_class=world["tok"])
    # set by Trainer's training loop, which is not run: one micro-batch per optimizer step
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    return trainer


def trl_logps(trainer, inputs):
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attn,
                                                                 inputs["completion_ids"].size(1))
    return logps.numpy()


def ours_logps(world, batch, temperature):
    from jaxalign.train.onpolicy_steps import tempered_token_logps

    # every case of a temperature shares the rollout, and the eager forward costs a second on this CPU
    cache = world.setdefault("ours_logps", {})
    if temperature not in cache:
        logp, _ = tempered_token_logps(world["params"], world["cfg"], jnp.asarray(batch["input_ids"]),
                                       jnp.asarray(batch["attention_mask"]), temperature)
        cache[temperature] = np.asarray(logp)
    return cache[temperature]


def rollout(world, trainer, temperature):
    """The shared rollout: both layouts, TRL's current log-probs (checked against jaxalign's) and old / reference
    log-probs = current + noise on the response tokens."""
    prompts, completions = world["prompts"], world["completions"]
    theirs, ours = trl_layout(prompts, completions), ours_layout(prompts, completions)
    mask = theirs["completion_mask"].numpy().astype(np.float32)
    current = trl_logps(trainer, theirs)
    ours_current = to_trl(ours_logps(world, ours, temperature), prompts, completions)
    np.testing.assert_allclose(ours_current * mask, current * mask, atol=LOGP_ATOL, rtol=0)
    rng = np.random.default_rng(int(temperature * 100))
    # noise of 0.3 nats puts about half the ratios outside [0.8, 1.2]
    old = ((current + rng.normal(scale=0.3, size=current.shape)) * mask).astype(np.float32)
    ref = ((current + rng.normal(scale=0.5, size=current.shape)) * mask).astype(np.float32)
    outside = (np.abs(np.exp(current - old) - 1.0) > CLIP) & (mask > 0)
    assert 0.2 < outside.sum() / mask.sum() < 0.8, "the noise should put the clipped branch on part of the tokens"
    return {"trl": theirs, "ours": ours, "mask": mask, "old": old, "ref": ref, "current": current,
            "logp_diff": float(np.abs((ours_current - current) * mask).max())}


def hf_grads(trainer):
    return {n: p.grad.detach().numpy().copy() for n, p in trainer.model.named_parameters() if p.grad is not None}


def ours_loss_and_grads(world, batch, settings):
    from jaxalign.models.hf_io import _iter_hf_tensors
    from jaxalign.train.onpolicy_steps import onpolicy_loss_fn

    fn = jax.jit(jax.value_and_grad(lambda p, b: onpolicy_loss_fn(p, world["cfg"], b, settings)[0]))
    loss, grads = fn(world["params"], {k: jnp.asarray(v) for k, v in batch.items()})
    return float(loss), dict(_iter_hf_tensors(world["cfg"], grads, with_lm_head=True))


def compare(case, trl_loss, trl_grads, our_loss, our_grads, logp_diff):
    assert set(our_grads) == set(trl_grads), (sorted(our_grads), sorted(trl_grads))
    worst, worst_name = 0.0, ""
    for name, g in trl_grads.items():
        diff = float(np.abs(our_grads[name] - g).max())
        if diff > worst:
            worst, worst_name = diff, name
    norm_t = float(np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in trl_grads.values())))
    norm_o = float(np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in our_grads.values())))
    print(f"\n{case:<34} TRL loss {trl_loss:+.8f}  jaxalign {our_loss:+.8f}  |dloss| {abs(trl_loss - our_loss):.1e}  "
          f"grad norm {norm_t:.6f} vs {norm_o:.6f}  max|dgrad| {worst:.1e} ({worst_name})  max|dlogp| {logp_diff:.1e}")
    np.testing.assert_allclose(our_loss, trl_loss, rtol=LOSS_RTOL, atol=LOSS_ATOL)
    assert norm_t > 0
    np.testing.assert_allclose(norm_o, norm_t, rtol=GRAD_RTOL)
    for name, g in trl_grads.items():
        np.testing.assert_allclose(our_grads[name], g, rtol=GRAD_RTOL, atol=GRAD_ATOL_REL * np.abs(g).max(),
                                   err_msg=f"{case}: {name}")


GRPO_NORMS = {"grpo": "sequence", "bnpo": "token", "dr_grpo": "constant", "dapo": "token"}
# (TRL loss_type, beta, use_bias_correction_kl, temperature); the correction only matters with beta > 0
GRPO_CASES = [(loss_type, beta, True, 1.0) for loss_type in ("grpo", "bnpo", "dr_grpo") for beta in (0.0, 0.04)]
GRPO_CASES += [("dapo", 0.04, True, 1.0)]  # TRL's default; with beta = 0 it is bnpo's case again
GRPO_CASES += [("grpo", 0.04, False, 1.0), ("bnpo", 0.04, False, 1.0), ("grpo", 0.04, True, 0.7)]


def _case_id(loss_type, beta, bias_correction, temperature):
    kl = "nokl" if beta == 0 else ("iskl" if bias_correction else "k3")
    return f"{loss_type}-beta{beta}-{kl}-T{temperature}"


@pytest.mark.parametrize("loss_type,beta,bias_correction,temperature", GRPO_CASES,
                         ids=[_case_id(*c) for c in GRPO_CASES])
def test_grpo_loss_and_gradients_follow_trl(world, tmp_path, loss_type, beta, bias_correction, temperature):
    from jaxalign.losses import grpo_advantages
    from jaxalign.train.onpolicy_steps import OnPolicySettings

    trainer = make_trainer(world, tmp_path, "grpo", loss_type=loss_type, beta=beta, temperature=temperature,
                           use_bias_correction_kl=bias_correction)
    r = rollout(world, trainer, temperature)
    # TRL's advantages: (r - group mean) / (torch.std + 1e-4), Bessel-corrected
    adv = np.asarray(grpo_advantages(world["rewards"], ddof=1)).reshape(-1)
    inputs = {**r["trl"], "advantages": torch.tensor(adv), "old_per_token_logps": torch.tensor(r["old"]),
              "ref_per_token_logps": torch.tensor(r["ref"]),
              "num_items_in_batch": r["trl"]["completion_mask"].sum()}
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    loss = float(loss.detach())

    prompts, completions = world["prompts"], world["completions"]
    batch = {**r["ours"], "advantages": adv, "old_logps": to_ours(r["old"], prompts, completions),
             "ref_logps": to_ours(r["ref"], prompts, completions)}
    settings = OnPolicySettings(kind="grpo", num_samples=N, temperature=temperature, clip=CLIP, kl_coef=beta,
                                length_norm=GRPO_NORMS[loss_type], kl_bias_correction=bias_correction,
                                max_new_tokens=MAX_COMPLETION)
    our_loss, our_grads = ours_loss_and_grads(world, batch, settings)
    compare(f"grpo {_case_id(loss_type, beta, bias_correction, temperature)}", loss,
            hf_grads(trainer), our_loss, our_grads, r["logp_diff"])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rloo_loss_and_gradients_follow_trl(world, tmp_path, temperature):
    from jaxalign.losses import rloo_advantages
    from jaxalign.train.onpolicy_steps import OnPolicySettings

    trainer = make_trainer(world, tmp_path, "rloo", temperature=temperature)
    r = rollout(world, trainer, temperature)
    adv = np.asarray(rloo_advantages(world["rewards"])).reshape(-1)
    # sequence ratios of ~30 tokens of noise: some rows well outside the clip range, some inside
    old_seq = (r["old"] * r["mask"]).sum(-1)
    inputs = {**r["trl"], "advantages": torch.tensor(adv), "old_logps": torch.tensor(old_seq)}
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    loss = float(loss.detach())

    prompts, completions = world["prompts"], world["completions"]
    batch = {**r["ours"], "advantages": adv, "old_logps": to_ours(r["old"], prompts, completions)}
    settings = OnPolicySettings(kind="rloo", num_samples=N, temperature=temperature, clip=CLIP)
    our_loss, our_grads = ours_loss_and_grads(world, batch, settings)
    seq_ratio = np.exp((r["current"] - r["old"]) * r["mask"]).prod(-1)
    clipped = int(((np.abs(seq_ratio - 1) > CLIP)).sum())
    assert 0 < clipped < len(adv), "some sequence ratios should sit outside the clip range and some inside"
    compare(f"rloo T={temperature} ({clipped}/{len(adv)} outside clip)", loss, hf_grads(trainer), our_loss,
            our_grads, r["logp_diff"])
