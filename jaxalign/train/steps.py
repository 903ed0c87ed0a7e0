"""Jitted, sharded train steps: SFT, reward (Bradley-Terry / AfD discriminator), policy (any pair objective) and
on-policy (RLOO / GRPO / PPO mini-batches of a rollout: :mod:`jaxalign.train.onpolicy_steps`).

Each step is a pure function ``(state, batch[, ref_params]) -> (state, metrics)`` compiled once with explicit in/out
shardings over the mesh. Gradient accumulation runs the micro-batches in a ``lax.scan`` inside the step (one optimizer
update per step, summed gradients), so ``k`` micro-batches equal one batch ``k`` times larger. A step whose loss or
gradient norm is not finite leaves params and optimizer state unchanged and reports ``nonfinite = 1``; the loop decides
whether to stop or to skip (and count) it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxalign import sharding
from jaxalign.losses import (Objective, afd_discriminator_loss, bradley_terry_loss, sequence_logprobs, sft_loss,
                             token_logprobs)
from jaxalign.models.config import ModelConfig
from jaxalign.models.decoder import forward
from jaxalign.models.lora import LoraConfig, join_trainable
from jaxalign.models.reward import reward_forward
from jaxalign.train.onpolicy_steps import OnPolicySettings, onpolicy_loss_fn
from jaxalign.train.state import TrainState, param_shardings


@dataclasses.dataclass(frozen=True)
class StepConfig:
    kind: str  # "sft" | "reward" | "policy" | "onpolicy"
    accum_steps: int = 1
    objective: Objective | None = None  # policy: the resolved pair objective (hyper-parameters bound in)
    # policy: how the reference model's log-probs arrive — "in_step" (its frozen params are a step argument),
    # "precomputed" (``ref_chosen_logps`` / ``ref_rejected_logps`` in the batch), "none" (reference-free objective) or
    # "base" (LoRA: the frozen base with the adapters off is the reference, no second copy of the weights)
    reference_logps: str = "in_step"
    margin: float = 0.0  # reward
    center_coef: float = 0.0  # reward
    reward_loss: str = "bradley_terry"  # reward: bradley_terry on (chosen, rejected) | afd_discriminator (pointwise)
    onpolicy: OnPolicySettings | None = None  # onpolicy: the RL settings (kind, clip, KL, value coefficient ...)
    # LoRA: the state's params are the trainable tree (adapters, + the reward head) and the frozen base is a step
    # argument (never donated, no gradient); ``seed`` draws the adapter-dropout masks (per step, so resumes repeat them)
    lora: LoraConfig | None = None
    seed: int = 0

    @property
    def takes_reference_params(self) -> bool:
        return self.kind == "policy" and self.reference_logps == "in_step"

    def extra_args(self, frozen=None, ref_params=None) -> tuple:
        """The step's arguments after ``(state, batch)``: the frozen base (LoRA), then the reference's params."""
        return ((frozen,) if self.lora else ()) + ((ref_params,) if self.takes_reference_params else ())

    def split_extra(self, extra: tuple) -> tuple[Any, Any]:
        """``(frozen, ref_params)`` from :meth:`extra_args`'s tuple (None for what the step does not take)."""
        frozen = extra[0] if self.lora else None
        return frozen, (extra[-1] if self.takes_reference_params else None)

    def weights(self, params, frozen, key=None) -> tuple[dict, dict]:
        """``(params, forward kwargs)`` of the model the loss runs: with LoRA the base joined with the trainable
        tree (the base under stop_gradient) and ``lora=(adapters, cfg)``; without, the params as they are."""
        if self.lora is None:
            return params, {}
        full, adapters = join_trainable(params, jax.lax.stop_gradient(frozen))
        return full, {"lora": (adapters, self.lora), "dropout_rng": key}


# ---- losses on a batch ------------------------------------------------------------------------------------------

def _seq_logps(params, cfg: ModelConfig, ids, attn, loss_mask, reduce, **fwd):
    logits = forward(params, cfg, ids[:, :-1], attention_mask=attn[:, :-1], **fwd)
    tok = token_logprobs(logits, ids[:, 1:])
    return sequence_logprobs(tok, loss_mask[:, 1:], reduce=reduce)


def _concat_pairs(batch):
    cat = lambda k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], axis=0)  # noqa: E731
    return cat("input_ids"), cat("attention_mask"), cat("loss_mask")


def sft_loss_fn(params, cfg, batch, normalizer, **fwd):
    """``jaxalign.losses.sft_loss`` on the micro-batch; with accumulation (``normalizer`` = the whole batch's token
    count) the micro-batch mean is reweighted by its share of the tokens, so the summed micro losses are the token mean
    of the whole batch."""
    seg = batch["segment_ids"][:, :-1] if "segment_ids" in batch else None  # packed rows
    pos = batch["positions"][:, :-1] if "positions" in batch else None
    logits = forward(params, cfg, batch["input_ids"][:, :-1], attention_mask=batch["attention_mask"][:, :-1],
                     segment_ids=seg, positions=pos, **fwd)
    loss, metrics = sft_loss(logits, batch["input_ids"][:, 1:], batch["loss_mask"][:, 1:])
    if normalizer is not None:
        share = metrics["num_tokens"] / normalizer
        loss = loss * share
        metrics = {**metrics, "mean_token_accuracy": metrics["mean_token_accuracy"] * share}
    return loss, {"loss": loss, **metrics}


def reward_loss_fn(params, cfg, batch, step_cfg: StepConfig, **fwd):
    ids, attn, _ = _concat_pairs(batch)
    rewards = reward_forward(params, cfg, ids, attention_mask=attn, **fwd)
    b = batch["chosen_input_ids"].shape[0]
    if step_cfg.reward_loss == "afd_discriminator":  # chosen = positives, rejected = negatives, scored one by one
        loss, metrics = afd_discriminator_loss(rewards[:b], rewards[b:])
        metrics["rewards/accuracies"] = metrics["accuracy"]
    elif step_cfg.reward_loss == "bradley_terry":
        loss, metrics = bradley_terry_loss(rewards[:b], rewards[b:], margin=step_cfg.margin,
                                           center_coef=step_cfg.center_coef)
        # TRL RewardTrainer's names beside TRL DPOTrainer's
        metrics.update(accuracy=metrics["rewards/accuracies"], margin=metrics["rewards/margins"])
    else:
        raise ValueError(f"reward_loss={step_cfg.reward_loss!r}; choose bradley_terry or afd_discriminator")
    return loss, {"loss": loss, **metrics}


def policy_loss_fn(params, cfg, batch, step_cfg: StepConfig, ref_params=None, **fwd):
    """With ``reference_logps="base"`` (LoRA) the reference is ``params`` themselves without the adapters of
    ``fwd["lora"]``: the frozen base the policy's adapters sit on."""
    objective = step_cfg.objective
    ids, attn, mask = _concat_pairs(batch)
    b = batch["chosen_input_ids"].shape[0]
    logps = _seq_logps(params, cfg, ids, attn, mask, objective.reduce, **fwd)
    if step_cfg.reference_logps == "none":
        ref_c = ref_r = jnp.zeros((b,), jnp.float32)
    elif step_cfg.reference_logps == "precomputed":
        ref_c, ref_r = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    else:
        ref_model = params if step_cfg.reference_logps == "base" else ref_params
        ref = jax.lax.stop_gradient(_seq_logps(ref_model, cfg, ids, attn, mask, objective.reduce))
        ref_c, ref_r = ref[:b], ref[b:]
    loss, metrics = objective.fn(logps[:b], logps[b:], ref_c, ref_r, **objective.defaults)
    return loss, {"loss": loss, **metrics}


# ---- the step ---------------------------------------------------------------------------------------------------

def _split_micro(batch, k, mesh):
    """[G, ...] -> [k, G/k, ...] taking rows strided so each micro-batch spreads over every batch shard."""
    def split(x):
        g = x.shape[0]
        y = x.reshape(g // k, k, *x.shape[1:]).swapaxes(0, 1)
        spec = sharding.batch_sharding(mesh, y.ndim - 1).spec
        return jax.lax.with_sharding_constraint(y, NamedSharding(mesh, P(None, *spec)))

    return jax.tree.map(split, batch)


def _token_count(batch, kind, accum_steps):
    """SFT with accumulation: the whole batch's token count (each micro-batch's mean is weighted by its tokens)."""
    if kind == "sft" and accum_steps > 1:
        return jnp.maximum(jnp.sum(batch["loss_mask"][:, 1:].astype(jnp.float32)), 1.0)
    return None


def make_train_step(cfg: ModelConfig, step_cfg: StepConfig, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, mesh, state_sharding: TrainState, batch_example: dict[str, Any],
                    ref_params_example: dict | None = None, frozen_example: dict | None = None) -> Callable:
    """Compile-once step for ``state_sharding`` / the batch structure of ``batch_example`` (shapes may vary by bucket).
    Called as ``step(state, batch, *step_cfg.extra_args(frozen, ref_params))``; only the state is donated."""
    kind = step_cfg.kind
    k = step_cfg.accum_steps

    def loss_on(params, micro, normalizer, frozen, ref_params, key):
        params, fwd = step_cfg.weights(params, frozen, key)
        if kind == "sft":
            return sft_loss_fn(params, cfg, micro, normalizer, **fwd)
        if kind == "reward":
            return reward_loss_fn(params, cfg, micro, step_cfg, **fwd)
        if kind == "policy":
            return policy_loss_fn(params, cfg, micro, step_cfg, ref_params, **fwd)
        if kind == "onpolicy":
            return onpolicy_loss_fn(params, cfg, micro, step_cfg.onpolicy, **fwd)
        raise ValueError(f"step kind {kind!r}; choose sft, reward, policy or onpolicy")

    grad_fn = jax.value_and_grad(loss_on, has_aux=True)
    dropout = step_cfg.lora is not None and step_cfg.lora.dropout > 0.0

    def step(state: TrainState, batch, *extra):
        frozen, ref_params = step_cfg.split_extra(extra)
        # adapter dropout: masks drawn from (seed, step), so a resumed run draws the same ones
        key = jax.random.fold_in(jax.random.PRNGKey(step_cfg.seed), state.step) if dropout else None
        with sharding.activate(mesh):
            normalizer = _token_count(batch, kind, k)
            if k == 1:
                (loss, metrics), grads = grad_fn(state.params, batch, normalizer, frozen, ref_params, key)
            else:
                micro = _split_micro(batch, k, mesh)
                keys = jax.random.split(key, k) if dropout else None

                def body(acc, xs):
                    mb, mkey = xs
                    (l, m), g = grad_fn(state.params, mb, normalizer, frozen, ref_params, mkey)
                    return jax.tree.map(jnp.add, acc, (g, m)), None

                zeros = jax.tree.map(jnp.zeros_like, state.params)
                m_shape = jax.eval_shape(lambda: grad_fn(state.params, jax.tree.map(lambda x: x[0], micro),
                                                         normalizer, frozen, ref_params,
                                                         None if keys is None else keys[0])[0][1])
                m_zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape)
                (grads, msum), _ = jax.lax.scan(body, (zeros, m_zeros), (micro, keys))
                if kind != "sft":  # sequence losses are batch means: average the micro means
                    grads = jax.tree.map(lambda g: g / k, grads)
                    metrics = jax.tree.map(lambda m: m / k, msum)
                else:  # token-normalised by the whole batch already: sums are the full-batch values
                    metrics = msum
                loss = metrics["loss"]
            grad_norm = optax.global_norm(grads)
            updates, new_opt = optimizer.update(grads, state.opt_state, state.params)
            new_params = optax.apply_updates(state.params, updates)
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
            new_state = TrainState(state.step + finite.astype(jnp.int32), keep(new_params, state.params),
                                   keep(new_opt, state.opt_state))
            metrics = {name: jnp.asarray(v, jnp.float32) for name, v in metrics.items()}
            metrics.update(grad_norm=grad_norm, learning_rate=schedule(state.step),
                           nonfinite=1.0 - finite.astype(jnp.float32))
            return new_state, metrics

    batch_shardings = {key: sharding.batch_sharding(mesh, v.ndim) for key, v in batch_example.items()}
    replicated = NamedSharding(mesh, P())
    extra = step_cfg.extra_args(frozen_example, ref_params_example)
    in_shardings = (state_sharding, batch_shardings, *(param_shardings(x, mesh) for x in extra))
    return jax.jit(step, in_shardings=in_shardings, out_shardings=(state_sharding, replicated),
                   donate_argnums=(0,))


def make_eval_step(cfg: ModelConfig, step_cfg: StepConfig, mesh) -> Callable:
    """Jitted ``(params, batch, *step_cfg.extra_args(frozen, ref_params)) -> metrics``: the train step's loss and
    metrics on a held-out batch, no gradient, no dropout (the metrics TRL logs as ``eval_loss``, ...)."""
    def fn(params, batch, *extra):
        frozen, ref_params = step_cfg.split_extra(extra)
        params, fwd = step_cfg.weights(params, frozen)
        with sharding.activate(mesh):
            if step_cfg.kind == "sft":
                _, metrics = sft_loss_fn(params, cfg, batch, None, **fwd)
            elif step_cfg.kind == "reward":
                _, metrics = reward_loss_fn(params, cfg, batch, step_cfg, **fwd)
            else:
                _, metrics = policy_loss_fn(params, cfg, batch, step_cfg, ref_params, **fwd)
            return {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

    return jax.jit(fn)


def make_eval_logps(cfg: ModelConfig, reduce: str, mesh) -> Callable:
    """Jitted ``(params, batch) -> (chosen_logps, rejected_logps)`` for reference precomputation and evaluation."""
    def fn(params, batch):
        with sharding.activate(mesh):
            ids, attn, mask = _concat_pairs(batch)
            lp = _seq_logps(params, cfg, ids, attn, mask, reduce)
            b = batch["chosen_input_ids"].shape[0]
            return lp[:b], lp[b:]

    return jax.jit(fn)


def make_eval_rewards(cfg: ModelConfig, mesh) -> Callable:
    """Jitted ``(rm_params, input_ids, attention_mask) -> rewards [B]``."""
    def fn(params, ids, attn):
        with sharding.activate(mesh):
            return reward_forward(params, cfg, ids, attention_mask=attn)

    return jax.jit(fn)
