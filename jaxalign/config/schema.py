"""The config schema: one dataclass per section, every key with its type, default and meaning (the ``# comment`` on
its line is what ``jaxalign --help`` prints). A section builds what it configures (``Policy.step()``,
``Train.settings()``); loading and overrides are :mod:`jaxalign.config.loading`, the checks
:mod:`jaxalign.config.checks`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from jaxalign.config.lora import Lora
from jaxalign.losses import Objective, get_objective
from jaxalign.rules import DEFAULT_ROUND, ONE_ROUND_METHODS, ONLINE_ROUND
from jaxalign.train.optim import OptimConfig
from jaxalign.train.run import PhaseSettings
from jaxalign.train.steps import StepConfig

@dataclasses.dataclass
class Run:
    name: str = "run"  # names the run: the default work directory runs/<name>, tracker runs, the report
    method: str = "irl"  # irl / spin: rounds of sample + train; dil / dpo / reward / afd: one round; sft: SFT only
    rounds: int = 2  # IRL / SPIN rounds (>= 1; the one-round methods ignore it)
    seed: int = 0  # seeds data order, initialisation and sampling (0 .. 2**31-1)
    workdir: str = ""  # where the run writes (--workdir sets it); "" = runs/<run.name>
    demo_task: bool = False  # build the self-generated demo task (tokenizer, tiny model, data) into the workdir
    phases: str = ""  # a round's phase order, e.g. "sample,reward,policy,eval" (default: the method's)
    show_progress: bool = True  # a progress bar per training phase
    trackers: str = "tensorboard"  # comma-separated: tensorboard, wandb ("" = metrics.jsonl only)
    logging_steps: int = 1  # trackers get every N-th train step and the last; metrics.jsonl gets every step
    wandb_project: str = ""  # wandb project (default "jaxalign"); run.name groups the run's phases

    def round_phases(self, policy_kind: str = "pairs") -> list[str]:
        """The phase kinds of one round, in order (``policy.kind=online_dil`` samples inside its policy phase and
        trains no reward model: its default round is ``policy,eval``)."""
        text = self.phases or (ONLINE_ROUND if policy_kind == "online_dil" else DEFAULT_ROUND.get(self.method, ""))
        return [p.strip() for p in text.split(",") if p.strip()]

    def num_rounds(self) -> int:
        return 1 if self.method in ONE_ROUND_METHODS else self.rounds


@dataclasses.dataclass
class Model:
    path: str = ""  # hub id or local folder (config.json + safetensors)
    tokenizer: str = ""  # hub id or local folder of the tokenizer ("" = model.path's)
    dtype: str = "float32"  # compute dtype (bfloat16 on accelerators)
    param_dtype: str = "float32"  # dtype the trained weights are kept (and saved) in
    remat: str = "none"  # recompute activations in the backward pass: none | full | dots (keeps the matmul outputs)
    reward_path: str = ""  # optional separate backbone for the reward model (default: the SFT model)
    lora: Lora = dataclasses.field(default_factory=Lora)


@dataclasses.dataclass
class Mesh:
    data: int = -1  # devices on the data-parallel axis; -1 = all the other axes leave (data x fsdp x tensor = devices)
    fsdp: int = 1  # devices the parameters and optimizer state are sharded over (ZeRO-3 / FSDP); -1 = all remaining
    tensor: int = 1  # devices each layer's matrices are split over (tensor parallelism); -1 = all remaining


@dataclasses.dataclass
class Dataset:
    source: str = ""  # hub id, or a local .json / .jsonl / .parquet file, folder or glob ("" = none)
    split: str = "train"  # split to read; a slice works too, e.g. "train[:1000]"
    name: str = ""  # hub config name
    data_dir: str = ""  # a folder inside the hub repository (Anthropic/hh-rlhf: harmless-base, helpful-base)
    format: str = "auto"  # the rows' layout (jaxalign.data.formats); auto = detected from the column names
    limit: int = 0  # read only the first N rows (0 = all rows)


@dataclasses.dataclass
class Data:
    train: Dataset = dataclasses.field(default_factory=Dataset)  # demonstrations (or preference pairs for dil/dpo)
    eval_prompts: Dataset = dataclasses.field(default_factory=Dataset)  # prompts for per-round answers / gold metric
    eval_prefs: Dataset = dataclasses.field(default_factory=Dataset)  # held-out preference pairs for RM accuracy
    max_length: int = 1024  # tokens of prompt + response; a longer response is cut at its end
    max_prompt_length: int = 512  # tokens of the prompt; a longer prompt keeps its end (< data.max_length)
    chat_template: str = ""  # a named fallback ("zephyr", "chatml") for tokenizers without one
    completion_end: str = "eos"  # "eos": responses end at EOS, as samples do; "template": + the glue after it (TRL 1.x)
    gold_metric: str = ""  # a scorer in jaxalign.tasks.SCORERS: demo | instructions ("" = none)
    num_proc: int = 1  # tokenising workers (datasets.map); worth it from a few thousand rows up
    # tokenised data cached on disk: "auto" (<workdir>/cache; ~/.cache/jaxalign for gs://), "off" or a local folder
    cache: str = "auto"


@dataclasses.dataclass
class Train:
    """Shared by the sft / reward / policy sections; each section builds its optimizer and loop settings."""

    learning_rate: float = 1e-5  # peak learning rate (> 0), reached after the warmup
    optimizer: str = "adamw"  # adamw (decoupled weight decay, betas 0.9 / 0.999) | rmsprop | sgd
    schedule: str = "cosine"  # the learning rate after the warmup: decays to 0 (cosine, linear) or stays (constant)
    warmup_ratio: float = 0.1  # fraction of the phase's optimizer steps spent warming up linearly from 0 (0 .. 1)
    weight_decay: float = 0.0  # AdamW's decoupled weight decay (norm scales and biases excluded)
    max_grad_norm: float = 1.0  # clip the gradient's global norm to this (0 = no clipping)
    batch_size: int = 8  # global batch per optimizer step (sequences or pairs), over all devices and accum_steps
    accum_steps: int = 1  # micro-batches per optimizer step (gradient accumulation); batch_size must divide by it
    epochs: int = 1  # passes over the phase's data
    max_steps: int = 0  # stop after this many optimizer steps (0 = as many as the epochs give)
    save_every: int = 100  # optimizer steps between checkpoints (a preempted phase resumes from the last one)

    def optim(self) -> OptimConfig:
        return OptimConfig(name=self.optimizer, learning_rate=self.learning_rate, schedule=self.schedule,
                           warmup_ratio=self.warmup_ratio, weight_decay=self.weight_decay,
                           max_grad_norm=self.max_grad_norm)

    def settings(self, *, seed: int, run: Run, reliability: "Reliability") -> PhaseSettings:
        return PhaseSettings(global_batch_size=self.batch_size, num_epochs=self.epochs, max_steps=self.max_steps,
                             seed=seed, save_every=self.save_every, keep_checkpoints=reliability.keep_checkpoints,
                             async_checkpointing=reliability.async_checkpointing,
                             skip_nonfinite=reliability.skip_nonfinite, pack=getattr(self, "pack", False),
                             show_progress=run.show_progress, trackers=run.trackers,
                             logging_steps=run.logging_steps, run_name=run.name, wandb_project=run.wandb_project)


@dataclasses.dataclass
class Sft(Train):
    enabled: bool = True  # false: the model is already instruction-tuned (the 7B recipes)
    pack: bool = False  # several documents per row (segment-masked attention)

    def step(self) -> StepConfig:
        return StepConfig("sft", accum_steps=self.accum_steps)


@dataclasses.dataclass
class Reward(Train):
    margin: float = 0.0  # Bradley-Terry margin: the loss is -log sigmoid(r_chosen - r_rejected - margin)
    center_coef: float = 0.0  # + center_coef x mean((r_chosen + r_rejected)^2) (TRL center_rewards_coefficient)
    loss: str = "bradley_terry"  # bradley_terry (pairs) | afd_discriminator (AfD: pointwise, positives vs negatives)
    reinit_each_round: bool = True  # the IRL authors re-initialise the RM from the SFT backbone every round
    accumulate_pairs: bool = True  # train round k's RM on the (demo, sample) pairs of rounds 1..k

    def step(self) -> StepConfig:
        return StepConfig("reward", accum_steps=self.accum_steps, margin=self.margin, center_coef=self.center_coef,
                          reward_loss=self.loss)


@dataclasses.dataclass
class Policy(Train):
    objective: str = "dil_lsif"  # the policy's loss (docs/losses.md; TRL loss_type=sigmoid is dpo)
    beta: float = -1.0  # the objective's beta, the strength of the pull to the reference (TRL beta); -1 = its default
    reduce: str = ""  # "" = the objective's default (sum for dpo, mean for dil / simpo / ipo)
    # dpo / cdpo / robust: the assumed rate eps of flipped labels (TRL label_smoothing); -1 = the objective's default
    # (0 for dpo, 0.1 for cdpo / robust)
    label_smoothing: float = -1.0
    simpo_gamma: float = -1.0  # simpo: the target reward margin gamma (TRL simpo_gamma); -1 = the default, 0.5
    reference: str = "sft"  # sft | previous (SPIN: the previous round's policy)
    # compute the reference's log-probs once before the phase (cached on disk) instead of holding the reference
    # weights and running their forward in every step: less HBM, fewer FLOPs per step (TRL: precompute_ref_log_probs)
    precompute_reference: bool = False
    # pairs: today's offline pair objectives on the sample phase's responses | rloo | grpo | ppo: on-policy RL
    # against the round's reward model, sampling inside the phase | online_dil: DIL's losses on (demonstration, fresh
    # own sample) pairs, no reward model (jaxalign.pipeline.onpolicy)
    kind: str = "pairs"
    # best_of_n (RM-scored samples) | demo_vs_sample | dataset (given preference data) | ditto (demonstration >
    # this round's samples > earlier rounds' samples, every pair of that order: Shaikh et al. 2024)
    pairs: str = "best_of_n"
    pair_rule: str = "max_min"  # the pair from N scored samples: max_min (best vs worst) | max_random (best vs another)
    reward: str = "rm"  # scores best-of-N samples and rollouts: rm (the round's) | gold (data.gold_metric: an oracle)
    num_samples: int = 4  # N for best_of_n / ditto; samples per prompt for rloo / grpo (TRL rloo_k, num_generations)
    # ---- on-policy kinds (rloo / grpo / ppo / online_dil); TRL's names where it has them ----

    # sequences per rollout batch (prompts x num_samples), a multiple of batch_size (the optimizer step's mini-batch);
    # 0 = batch_size. IRL authors' TL;DR PPO: 512 rollouts. Each rollout batch is one logged step.
    rollout_batch_size: int = 0
    inner_epochs: int = 1  # passes over a rollout batch (TRL num_ppo_epochs=4 for PPO / RLOO; GRPO num_iterations=1)
    clip: float = 0.2  # ratio clip of the policy loss and value clip of PPO (TRL cliprange / cliprange_value 0.2)
    clip_high: float = 0.0  # upper ratio clip 1 + clip_high: DAPO's clip-higher (TRL epsilon_high); 0 = policy.clip
    kl_coef: float = 0.05  # KL to the reference: in the reward (rloo k1, ppo per-token k1) or the loss (grpo k3)
    vf_coef: float = 0.1  # PPO value-loss weight (TRL vf_coef 0.1)
    gamma: float = 1.0  # PPO discount (TRL 1.0)
    lam: float = 0.95  # PPO GAE lambda (TRL 0.95)
    grpo_scale: bool = True  # GRPO divides by the group std; false = Dr. GRPO (Liu et al. 2025)
    length_norm: str = "sequence"  # GRPO token-loss normaliser: sequence (GRPO) | token (DAPO) | constant (Dr. GRPO)
    whiten_advantages: bool = True  # PPO: whiten GAE advantages (TRL always); RLOO: TRL normalize_advantage
    missing_eos_penalty: float = 0.0  # subtracted from the score of a response that does not end (TRL; 0 = off)
    kl_bias_correction: bool = True  # GRPO: k3 x pi / pi_old, unbiased off-policy (TRL use_bias_correction_kl)

    def build_objective(self) -> Objective:
        """The objective with the recipe's overrides (beta, label_smoothing, simpo_gamma, reduce) bound in;
        ValueError for a bad combination."""
        overrides: dict[str, Any] = {}
        for key, hparam in (("beta", "beta"), ("label_smoothing", "label_smoothing"), ("simpo_gamma", "gamma")):
            if getattr(self, key) != -1:
                overrides[hparam] = getattr(self, key)
        if self.reduce:
            overrides["reduce"] = self.reduce
        return get_objective(self.objective, **overrides)[1]

    def reference_logps(self, objective: Objective) -> str:
        """How the reference model's log-probs reach the step: "none" (a reference-free objective), "precomputed"
        (once before the phase, carried in the batches) or "in_step" (the frozen weights' forward in every step)."""
        if not objective.uses_reference:
            return "none"
        return "precomputed" if self.precompute_reference else "in_step"

    def step(self, *, reference_logps: str | None = None) -> StepConfig:
        objective = self.build_objective()
        return StepConfig("policy", accum_steps=self.accum_steps, objective=objective,
                          reference_logps=reference_logps or self.reference_logps(objective))


@dataclasses.dataclass
class Sample:
    max_new_tokens: int = 256  # tokens per sampled response at most
    temperature: float = 0.7  # sampling temperature of the policy's samples (0 = greedy)
    top_p: float = 1.0  # nucleus sampling: keep the smallest set of tokens with this much probability (1 = off)
    top_k: int = 0  # keep the k most likely tokens (0 = off)
    batch_size: int = 0  # prompts decoded at once (0 = planned from memory)
    limit: int = 0  # prompts per round (0 = all training prompts)
    # The IRL reward model's rejected responses: one extra sample per prompt at this temperature (the IRL authors
    # sample near-greedily, 0.01); -1 = reuse the first of the policy samples (sample.temperature)
    negative_temperature: float = -1.0
    # with sample.limit: each round takes the next sample.limit prompts (wrapping); false keeps round 1's (SPIN)
    rotate: bool = True


@dataclasses.dataclass
class Eval:
    num_prompts: int = 64  # prompts each eval phase answers (data.eval_prompts, else data.train)
    max_new_tokens: int = 256  # tokens per answer at most
    temperature: float = 0.0  # 0 = greedy answers
    table_rows: int = 4  # example answers shown side by side in report.md
    best_of_n: int = 0  # >0: also answer with the best of N samples (sample.temperature) ranked by the round's RM
    # held-out metrics while training (TRL's eval_loss, eval_rewards/accuracies, ...): pair phases on data.eval_prefs,
    # SFT on the demonstrations of data.eval_prompts, every eval_steps steps and at the end (0 = at the end only)
    eval_steps: int = 0
    heldout_limit: int = 256  # held-out examples per evaluation (full batches of the phase's batch_size)


@dataclasses.dataclass
class Export:
    """What each phase's model folder (phases/<phase>/model) holds besides the weights, and where else it goes."""

    dtype: str = ""  # "" = model.param_dtype; else a cast copy in phases/<phase>/export (float32 | bfloat16 | float16)
    push_to_hub: bool = False  # upload each phase's model to the Hugging Face hub
    hub_id: str = "{user}/{run}-{phase}"  # repository name template
    hub_private: bool = True  # create the hub repositories as private


@dataclasses.dataclass
class Reliability:
    skip_nonfinite: bool = False  # skip (and count) a step whose loss or gradient norm is not finite, else stop
    keep_checkpoints: int = 2  # orbax checkpoints a running phase keeps
    async_checkpointing: bool = True  # write checkpoints in the background while training goes on
    # a finished phase deletes its training checkpoints (later phases read its exported model): a 7B phase's
    # checkpoint is ~81 GiB; true keeps them
    keep_finished_checkpoints: bool = False


@dataclasses.dataclass
class Config:
    run: Run = dataclasses.field(default_factory=Run)
    model: Model = dataclasses.field(default_factory=Model)
    mesh: Mesh = dataclasses.field(default_factory=Mesh)
    data: Data = dataclasses.field(default_factory=Data)
    sft: Sft = dataclasses.field(default_factory=Sft)
    sample: Sample = dataclasses.field(default_factory=Sample)
    reward: Reward = dataclasses.field(default_factory=Reward)
    policy: Policy = dataclasses.field(default_factory=Policy)
    eval: Eval = dataclasses.field(default_factory=Eval)
    export: Export = dataclasses.field(default_factory=Export)
    reliability: Reliability = dataclasses.field(default_factory=Reliability)
