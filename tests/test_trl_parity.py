"""jaxalign trains like TRL, step for step: the same tiny Llama, the same real OASST pairs and explicit settings on
both sides give the same per-step loss and logged metrics as TRL 1.16's trainers.

Setup (both sides): a random-init Llama (hidden 32, 2 layers, Mistral's 32k vocabulary) written by transformers, the
zephyr chat template with ``{{ bos_token }}`` in front (so the template, not a tokenizer flag, places BOS: TRL 1.x
tokenises with ``add_special_tokens=False``), ``data.completion_end=template`` (TRL trains the template's newline after
``</s>``), the 8 single-turn pairs of ``oasst_en100_rank_pairs`` with the fewest tokens (so the 32k-vocabulary head
stays cheap on CPU), float32 on CPU, AdamW (0.9, 0.999, 1e-8), constant learning rate, no warm-up, clipping at 1.0,
one full batch of 8 per step (the order within a batch only regroups float sums), 5 steps.

jaxalign's side runs through the CLI (``jaxalign.cli.main``, in this process) with the ``ultrachat_dpo`` recipe and
``key=value`` overrides, as a user would; TRL's through ``DPOTrainer.train()``.

Tolerances, from float32: the two frameworks group the same float32 sums differently (8 rows x ~50 tokens of 32k-way
log-softmax, matmuls split differently; TRL's fused LM-head backward differs from plain autograd by ~2e-5 relative in
the gradient norm at step 1 on this model), so each metric is compared to ``ATOL + RTOL |value|`` with RTOL = 1e-5
(~100 float32 ulps) and ATOL = 2e-5 for losses and rewards (values of order 0.1-1 after 5 Adam steps at lr 1e-3,
where a 1e-6 relative gradient difference moves each update by ~1e-9). TRL's logged gradient norm gets RTOL 5e-4:
its fused LM-head backward (``fused_lm_head=True``, chunked over the vocabulary) is itself 2e-5 (DPO) to 1.2e-4 (SFT)
away from plain PyTorch autograd on this model, while jaxalign's step-1 norm equals plain autograd's to 1e-5
(``test_sft_follows_trl_sft_trainer`` checks that directly). Measured differences are printed with ``pytest -s``
(max ~5e-6 on losses and rewards).

Conventions that differ and are fixed here by setting, not by tolerance: jaxalign's defaults end a response at EOS
(``data.completion_end=eos``, so demonstrations end like sampled responses) and add BOS for templates that omit it when
the tokenizer does (zephyr was trained so); TRL 1.x keeps the template's trailing newline and adds no BOS.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from real_model import smollm2  # noqa: F401  (the session fixture)

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")

TOKENIZER = "tokenizers/zephyr-mistral-7b"
PAIRS = "preference/oasst_en100_rank_pairs.jsonl"
ROWS = (95, 200, 132, 53, 58, 198, 207, 205)  # the 8 single-turn pairs with the fewest tokens, longer side first
STEPS = 5
LR = 1e-3
RTOL, ATOL = 1e-5, 2e-5
GRAD_NORM_RTOL = 5e-4  # TRL's fused LM-head backward: see plain_autograd_grad_norm


@pytest.fixture(scope="module")
def setup(shared_data, tmp_path_factory):
    """``(model folder, pairs.jsonl)``: a tiny random Llama with its tokenizer, and the 8 pairs in TRL's
    conversational preference format (prompt / chosen / rejected message lists)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("trl_parity")
    tok = AutoTokenizer.from_pretrained(shared_data / TOKENIZER)
    tok.chat_template = "{{ bos_token }}" + tok.chat_template
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rows = [json.loads(line) for line in (shared_data / PAIRS).read_text().splitlines()]
    pairs = [{"prompt": rows[i]["chosen"][:-1], "chosen": rows[i]["chosen"][-1:],
              "rejected": rows[i]["rejected"][-1:]} for i in ROWS]
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return root / "model", root / "pairs.jsonl"


def trl_args(config_cls, out: Path, **kw):
    torch.set_num_threads(1)  # two pytest workers share two cores
    return config_cls(output_dir=str(out), per_device_train_batch_size=8, gradient_accumulation_steps=1,
                      max_steps=STEPS, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
                      adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=1.0,
                      bf16=False, fp16=False, gradient_checkpointing=False, logging_steps=1, save_strategy="no",
                      report_to="none", seed=0, use_cpu=True, disable_tqdm=True, **kw)


def trl_steps(trainer) -> list[dict]:
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


def jaxalign_cli(workdir: Path, overrides: list[str], phase: str) -> list[dict]:
    from jaxalign.cli import main

    assert main(["--workdir", str(workdir), *overrides]) == 0
    rows = [json.loads(line) for line in (workdir / "phases" / phase / "tb" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("split") == "train"]


def compare(name: str, trl_rows: list[dict], ours: list[dict], keys: dict[str, str]) -> None:
    """Per step, each TRL metric (``keys``: TRL name -> jaxalign name) within the float32 bound; prints the table."""
    assert len(trl_rows) == len(ours) == STEPS, (len(trl_rows), len(ours))
    print(f"\n{name}: step | " + " | ".join(f"{k} TRL / jaxalign" for k in keys))
    worst = {k: 0.0 for k in keys}
    for step, (a, b) in enumerate(zip(trl_rows, ours), 1):
        cells = []
        for k_trl, k_ours in keys.items():
            x, y = float(a[k_trl]), float(b[k_ours])
            rtol = GRAD_NORM_RTOL if k_trl == "grad_norm" else RTOL
            assert math.isfinite(y) and abs(x - y) <= ATOL + rtol * abs(x), (name, step, k_trl, x, y)
            worst[k_trl] = max(worst[k_trl], abs(x - y))
            cells.append(f"{x:.6g} / {y:.6g}")
        print(f"  {step} | " + " | ".join(cells))
    print("  max |difference|: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))


DPO_METRICS = {"loss": "loss", "grad_norm": "grad_norm", "rewards/chosen": "rewards/chosen",
               "rewards/rejected": "rewards/rejected", "rewards/margins": "rewards/margins",
               "rewards/accuracies": "rewards/accuracies", "logps/chosen": "logps/chosen",
               "logps/rejected": "logps/rejected"}


def dpo_overrides(model: Path, pairs: Path, objective: str, *extra: str) -> list[str]:
    return ["--config", "ultrachat_dpo", f"model.path={model}", "model.dtype=float32", "model.remat=none",
            f"data.train.source={pairs}", "data.train.split=train", "data.eval_prompts.source=", "data.completion_end=template",
            "data.max_length=512", "data.max_prompt_length=256", "eval.num_prompts=1", "eval.max_new_tokens=4", "run.phases=policy", "run.show_progress=false",
            "policy.batch_size=8", "policy.accum_steps=1", f"policy.epochs={STEPS}", "policy.schedule=constant",
            "policy.warmup_ratio=0", f"policy.learning_rate={LR}", "policy.weight_decay=0",
            "policy.max_grad_norm=1.0", f"policy.objective={objective}", "policy.beta=0.1", *extra]


# TRL loss_type -> (jaxalign objective, extra overrides, TRL settings, metrics compared). TRL 1.16 IPO divides
# summed log-ratio by the completion length inside the loss but logs rewards / logps from the sums; jaxalign's ipo
# reduces by the mean before the loss (the same loss), so its rewards / logps are per token: compare loss and gradient.
DPO_CASES = {
    "sigmoid": ("dpo", (), {}, DPO_METRICS),
    "hinge": ("hinge", (), {}, DPO_METRICS),
    "robust": ("robust", (), {"label_smoothing": 0.1}, DPO_METRICS),  # jaxalign's robust: label_smoothing 0.1
    "ipo": ("ipo", (), {}, {"loss": "loss", "grad_norm": "grad_norm"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", list(DPO_CASES))
def test_dpo_follows_trl_dpo_trainer(setup, tmp_path, loss_type):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    model, pairs = setup
    objective, extra, trl_kw, metrics = DPO_CASES[loss_type]
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    args = trl_args(DPOConfig, tmp_path / "trl", beta=0.1, loss_type=[loss_type], max_length=512, **trl_kw)
    trainer = DPOTrainer(model=str(model), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(model))
    theirs = trl_steps(trainer)
    ours = jaxalign_cli(tmp_path / "jaxalign", dpo_overrides(model, pairs, objective, *extra), "r1_policy")
    compare(f"DPO loss_type={loss_type}", theirs, ours, metrics)
    # the run trained: the loss moved away from its start by far more than the bound
    assert abs(theirs[-1]["loss"] - theirs[0]["loss"]) > 1000 * ATOL


SIMPO_BETA, SIMPO_GAMMA = 2.0, 1.0  # the SimPO paper's beta; gamma off both sides' default 0.5, so the key must arrive
# zephyr's assistant turn, and the same turn ending at its EOS (no trailing newline)
ZEPHYR_TURN = "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
EOS_ENDED_TURN = "{{ '<|assistant|>\n'  + message['content'] + eos_token }}"


@pytest.mark.slow
def test_simpo_follows_trl_cpo_trainer(setup, tmp_path):
    """SimPO (Meng et al. 2024) against TRL 1.16's ``trl.experimental.cpo.CPOTrainer`` with ``loss_type="simpo"``,
    ``cpo_alpha=0`` (pure SimPO: no NLL term on the chosen side) and ``simpo_gamma``: both compute
    ``-logsig(beta (mean logp_w - mean logp_l) - gamma)`` on per-token mean log-probs, reference-free, and log
    ``rewards/* = beta * mean logp`` and ``logps/*`` = the mean log-probs, so every metric below means the same on both
    sides. Not compared, by definition: TRL's ``logits/chosen|rejected`` (the mean raw logit over the padded batch,
    which jaxalign does not log) and ``nll_loss`` (0 with ``cpo_alpha=0``).

    Tokens: CPOTrainer keeps TRL's pre-1.0 ``tokenize_row``, which appends EOS to a completion whose last token is not
    EOS; zephyr's template ends the assistant turn with ``</s>\\n``, so TRL would train ``</s> \\n </s>`` where no
    jaxalign setting does. The model folder here therefore carries the zephyr template with the assistant turn ending at
    ``</s>``: then CPOTrainer's ids and labels equal jaxalign's, row for row (checked while writing this test, with
    either ``data.completion_end``). CPOTrainer runs the plain transformers forward (no fused LM head), so its gradient
    norm is plain autograd's."""
    import shutil

    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    base, pairs = setup
    model = tmp_path / "model"
    shutil.copytree(base, model)
    tok = AutoTokenizer.from_pretrained(model)
    assert ZEPHYR_TURN in tok.chat_template
    tok.chat_template = tok.chat_template.replace(ZEPHYR_TURN, EOS_ENDED_TURN)
    tok.save_pretrained(model)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    args = trl_args(CPOConfig, tmp_path / "trl", loss_type="simpo", cpo_alpha=0.0, beta=SIMPO_BETA,
                    simpo_gamma=SIMPO_GAMMA, max_length=512, remove_unused_columns=False)
    theirs = trl_steps(CPOTrainer(model=str(model), args=args, train_dataset=Dataset.from_list(rows),
                                  processing_class=AutoTokenizer.from_pretrained(model)))
    ours = jaxalign_cli(tmp_path / "jaxalign", dpo_overrides(model, pairs, "simpo", f"policy.beta={SIMPO_BETA}",
                                                             f"policy.simpo_gamma={SIMPO_GAMMA}"), "r1_policy")
    compare("SimPO (CPOTrainer loss_type=simpo, cpo_alpha=0)", theirs, ours, DPO_METRICS)
    assert all(t["nll_loss"] == 0.0 for t in theirs)  # pure SimPO on TRL's side
    assert abs(theirs[-1]["loss"] - theirs[0]["loss"]) > 1000 * ATOL


@pytest.mark.slow
def test_sft_follows_trl_sft_trainer(setup, tmp_path):
    """Completion-only SFT (TRL's default for prompt / completion data): the token-mean NLL over the batch."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    model, pairs = setup
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(json.dumps({"messages": r["prompt"] + r["chosen"]}) + "\n" for r in rows))
    args = trl_args(SFTConfig, tmp_path / "trl", max_length=512, completion_only_loss=True, packing=False)
    trainer = SFTTrainer(model=str(model), args=args, processing_class=AutoTokenizer.from_pretrained(model),
                         train_dataset=Dataset.from_list([{"prompt": r["prompt"], "completion": r["chosen"]}
                                                          for r in rows]))
    theirs = trl_steps(trainer)
    ours = jaxalign_cli(tmp_path / "jaxalign", [
        "--config", "ultrachat_dpo", "run.method=sft", "sft.enabled=true", f"model.path={model}", "model.dtype=float32",
        "model.remat=none", f"data.train.source={demos}", "data.train.split=train", "data.train.format=auto",
        "data.eval_prompts.source=", "data.completion_end=template", "data.max_length=512",
        "data.max_prompt_length=256", "eval.num_prompts=1", "eval.max_new_tokens=4", "run.show_progress=false",
        "sft.batch_size=8", "sft.accum_steps=1", f"sft.epochs={STEPS}", "sft.schedule=constant",
        "sft.warmup_ratio=0", f"sft.learning_rate={LR}", "sft.weight_decay=0", "sft.max_grad_norm=1.0"], "sft")
    compare("SFT", theirs, ours, {"loss": "loss", "grad_norm": "grad_norm",
                                  "mean_token_accuracy": "mean_token_accuracy"})
    assert theirs[0]["loss"] - theirs[-1]["loss"] > 1000 * ATOL
    # the gradient before the first update, from the plain (unfused) transformers forward on TRL's own tokens
    reference = plain_autograd_grad_norm(model, trainer.train_dataset)
    print(f"step-1 gradient norm: plain autograd {reference:.7g}, jaxalign {ours[0]['grad_norm']:.7g}, "
          f"TRL fused head {theirs[0]['grad_norm']:.7g}")
    assert abs(ours[0]["grad_norm"] - reference) <= RTOL * reference


def plain_autograd_grad_norm(model: Path, tokenized) -> float:
    """The completion-only SFT loss's gradient norm from transformers' logits and torch autograd, no fused head."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    total, count = 0.0, 0
    for row in tokenized:
        ids, labels = torch.tensor([row["input_ids"]]), torch.tensor(row["labels"][1:])
        logps = lm(ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
        total = total - (logps * (labels != -100)).sum()
        count += int((labels != -100).sum())
    (total / count).backward()
    return float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in lm.parameters() if p.grad is not None)))


@pytest.mark.slow
@pytest.mark.parametrize("center", [0.0, 0.01], ids=["plain", "centered"])
def test_bradley_terry_reward_follows_trl_reward_trainer(setup, tmp_path, center):
    """Bradley-Terry reward training from one sequence-classification checkpoint (its score head included), with
    and without TRL's ``center_rewards_coefficient``; jaxalign's side is the CLI's ``run.method=reward`` (the given
    preference pairs, as ``RewardTrainer``) with the checkpoint as ``model.reward_path``."""
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    causal, pairs = setup
    rm = tmp_path / "rm"
    torch.manual_seed(1)
    LlamaForSequenceClassification.from_pretrained(causal, num_labels=1).save_pretrained(rm)
    tok = AutoTokenizer.from_pretrained(causal)
    tok.save_pretrained(rm)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    args = trl_args(RewardConfig, tmp_path / "trl", max_length=512, center_rewards_coefficient=center or None)
    theirs = trl_steps(RewardTrainer(model=str(rm), args=args, processing_class=tok,
                                     train_dataset=Dataset.from_list(rows)))
    ours = jaxalign_cli(tmp_path / "jaxalign", [
        "--config", "ultrachat_dpo", "run.method=reward", "run.phases=reward", f"model.path={causal}",
        f"model.reward_path={rm}", "model.dtype=float32", "model.remat=none", f"data.train.source={pairs}",
        "data.train.split=train", "data.eval_prompts.source=", "data.completion_end=template", "data.max_length=512",
        "data.max_prompt_length=256", "eval.num_prompts=1", "eval.max_new_tokens=4", "run.show_progress=false",
        "reward.batch_size=8", "reward.accum_steps=1",
        f"reward.epochs={STEPS}", "reward.schedule=constant", "reward.warmup_ratio=0", f"reward.learning_rate={LR}",
        "reward.weight_decay=0", "reward.max_grad_norm=1.0", f"reward.center_coef={center}"], "r1_reward")
    compare(f"RewardTrainer center_rewards_coefficient={center}", theirs, ours,
            {"loss": "loss", "grad_norm": "grad_norm", "accuracy": "rewards/accuracies",
             "margin": "rewards/margins"})


@pytest.mark.parametrize("variant", ["llama", "qwen2", "qwen3", "gpt_neox"])
def test_weight_decay_falls_on_the_parameters_transformers_trainer_decays(variant, tmp_path):
    """AdamW's decay mask equals transformers' Trainer's (``get_decay_parameter_names``: no bias, no norm), name for
    name through the checkpoint mapping, so a recipe's ``weight_decay`` decays what a TRL run decays."""
    from transformers import Trainer

    from hf_models import make_hf_model
    from jaxalign.models.config import load_config
    from jaxalign.models.decoder import init_params
    from jaxalign.models.hf_names import hf_prefix, hf_top_names, layer_sources
    from jaxalign.train.optim import weight_decay_mask

    hf = make_hf_model(variant, tmp_path)
    decayed = set(Trainer.get_decay_parameter_names(None, hf))
    cfg = load_config(tmp_path)
    mask = weight_decay_mask(init_params(cfg, __import__("jax").random.key(0)))
    assert set(mask.values()) == {True, False}
    for name, decays in mask.items():
        if name == "lm_head":  # the module's name (transformers 5 calls GPT-NeoX's embed_out lm_head too)
            hf_names = ["lm_head.weight"]
        elif name in hf_top_names(cfg):
            hf_names = [hf_top_names(cfg)[name]]
        else:
            hf_names = [f"{hf_prefix(cfg)}layers.{i}.{layer_sources(cfg, name)}" for i in range(cfg.num_layers)]
        for hf_name in hf_names:
            assert (hf_name in decayed) == decays, (name, hf_name, decays)


SMOLLM2_LR, LORA_LR = 1e-5, 1e-4
LORA_RANK, LORA_ALPHA = 8, 16
# every linear projection of a Llama block, in PEFT's names and in model.lora.targets' order
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def smollm2_steps(smollm2: Path, pairs: Path, out: Path, lr: float, adapter: Path | None = None
                  ) -> tuple[list[dict], list[dict]]:
    """``(TRL's steps, jaxalign's steps)`` of DPO sigmoid on SmolLM2-135M-Instruct at ``lr``, each side alone in its
    own process (jaxalign's through ``launch/tpu_run.py``), so the two never hold a 135M-parameter model, its
    reference and AdamW state in memory at once. With ``adapter`` (a PEFT folder) both train LoRA adapters that start
    from its weights."""
    import subprocess
    import sys

    from tiny_recipe import LAUNCHER, subprocess_env

    overrides = [o for o in dpo_overrides(smollm2, pairs, "dpo") if not o.startswith("policy.learning_rate")]
    overrides.append(f"policy.learning_rate={lr}")
    if adapter is not None:
        overrides += [f"model.lora.rank={LORA_RANK}", f"model.lora.alpha={LORA_ALPHA}",
                      "model.lora.targets=q,k,v,o,gate,up,down", f"model.lora.init_adapter={adapter}"]
    run = subprocess.run([sys.executable, str(LAUNCHER), "--workdir", str(out / "jaxalign"), *overrides],
                         env=subprocess_env(devices=1), capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ours = [json.loads(line) for line in
            (out / "jaxalign" / "phases" / "r1_policy" / "tb" / "metrics.jsonl").read_text().splitlines()]
    trl_run = subprocess.run([sys.executable, "-c", TRL_DPO_SCRIPT, str(smollm2), str(pairs), str(out / "trl"),
                              str(lr), str(adapter or "")], env=subprocess_env(devices=1), capture_output=True,
                             text=True)
    assert trl_run.returncode == 0, trl_run.stderr[-3000:]
    theirs = json.loads((out / "trl" / "steps.json").read_text())
    return theirs, [r for r in ours if r.get("split") == "train"]


@pytest.mark.slow
def test_dpo_on_smollm2_follows_trl(smollm2, setup, tmp_path):
    """The same check on a real pretrained model and its own tokenizer: SmolLM2-135M-Instruct (ChatML, a default
    system prompt, tied embeddings, pad == EOS == ``<|im_end|>``), fully fine-tuned, DPO sigmoid, lr 1e-5."""
    theirs, ours = smollm2_steps(smollm2, setup[1], tmp_path, SMOLLM2_LR)
    compare("DPO on SmolLM2-135M-Instruct", theirs, ours, DPO_METRICS)
    assert theirs[-1]["rewards/margins"] > 1000 * ATOL


@pytest.mark.slow
def test_lora_dpo_on_smollm2_follows_trl(smollm2, setup, tmp_path):
    """LoRA on SmolLM2-135M-Instruct: rank 8, alpha 16 on every linear projection (q, k, v, o, gate, up, down), DPO
    sigmoid, lr 1e-4, 5 steps, both sides from the SAME initial adapter: PEFT draws it once (A random, B zero) and saves
    it; TRL trains ``PeftModel.from_pretrained(base, folder, is_trainable=True)`` passed to ``DPOTrainer``, jaxalign
    starts its adapters from the folder (``model.lora.init_adapter``).

    The reference: TRL 1.16 handed a PeftModel takes a frozen copy of the loaded adapter (adapter ``"ref"``) as the
    reference; jaxalign's is the frozen base with the adapters off (``reference_logps="base"``). With B = 0 both are
    the base model exactly (the adapter's term is zero), so step 1's rewards are 0 on both sides.

    Tolerance: the module's, unchanged. Only the adapters train (2.4M parameters) and the frozen 135M base is shared,
    so the float32 regrouping differences are those of the full fine-tune check; lr 1e-4 moves the rewards further
    (order 0.1 after 5 steps) but Adam's update is ``lr * m / sqrt(v)``, insensitive to a 1e-5 relative gradient
    difference. A wrong starting adapter would not pass: step 1's gradient of B is ``(alpha / r) (dL/dy) (A x)^T``,
    so the logged gradient norm already depends on A."""
    import subprocess
    import sys

    from tiny_recipe import subprocess_env

    adapter = tmp_path / "adapter"
    made = subprocess.run([sys.executable, "-c", PEFT_ADAPTER_SCRIPT, str(smollm2), str(adapter)],
                          env=subprocess_env(devices=1), capture_output=True, text=True)
    assert made.returncode == 0, made.stderr[-3000:]
    theirs, ours = smollm2_steps(smollm2, setup[1], tmp_path, LORA_LR, adapter)
    compare("LoRA DPO on SmolLM2-135M-Instruct", theirs, ours, DPO_METRICS)
    assert theirs[0]["rewards/margins"] == ours[0]["rewards/margins"] == 0.0  # the reference is the start, exactly
    assert theirs[-1]["rewards/margins"] > 1000 * ATOL


# the initial LoRA adapter, drawn once by PEFT (A: kaiming-uniform, B: zero) and saved with save_pretrained
PEFT_ADAPTER_SCRIPT = f"""
import sys
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
torch.manual_seed(0)
base = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
config = LoraConfig(r={LORA_RANK}, lora_alpha={LORA_ALPHA}, lora_dropout=0.0, target_modules={list(LORA_MODULES)},
                    task_type="CAUSAL_LM")
get_peft_model(base, config).save_pretrained(sys.argv[2])
"""

# TRL's side of the SmolLM2 checks, in its own process: the settings of trl_args at the given lr; with an adapter folder
# the model is a PeftModel loaded from it, trainable, as a user resuming from an adapter passes it to DPOTrainer
TRL_DPO_SCRIPT = """
import json, sys
from pathlib import Path
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer
torch.set_num_threads(1)
path, pairs, out, lr, adapter = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
model = path
if adapter:
    from peft import PeftModel
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), adapter,
                                      is_trainable=True)
rows = [json.loads(line) for line in pairs.read_text().splitlines()]
args = DPOConfig(output_dir=str(out), per_device_train_batch_size=8, gradient_accumulation_steps=1, max_steps=5,
                 learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, adam_beta1=0.9, adam_beta2=0.999,
                 adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=1.0, bf16=False, fp16=False,
                 gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to="none", seed=0,
                 use_cpu=True, disable_tqdm=True, beta=0.1, loss_type=["sigmoid"], max_length=512)
trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                     processing_class=AutoTokenizer.from_pretrained(path))
trainer.train()
out.mkdir(parents=True, exist_ok=True)
(out / "steps.json").write_text(json.dumps([h for h in trainer.state.log_history if "loss" in h]))
"""
