"""Objective registry: a config string names a preference objective, its default hyper-parameters and the log-prob
reduction its reference implementation uses, so a recipe chooses its loss in one line::

    loss_fn, objective = get_objective("dil_lsif")           # or get_objective("dpo", beta=0.05)
    pc, pr = sequence_logprobs(..., reduce=objective.reduce), ...
    loss, metrics = loss_fn(pc, pr, rc, rr)

Every ``fn`` has the same signature ``fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, **hparams)``;
reference-free objectives (``uses_reference=False``) accept and ignore the reference arguments, so the engine can skip
the reference forward pass for them.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator

import jax
from jax.typing import ArrayLike

from jaxalign.losses.dil import dil_loss
from jaxalign.losses.preference import dpo_loss, simpo_loss


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    fn: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]  # fn(pc, pr, rc, rr, **defaults) -> (loss, metrics)
    # hyper-parameters fn takes as keywords; kept out of the hash so an Objective can be a jit static arg
    defaults: dict[str, Any] = dataclasses.field(hash=False)
    reduce: str  # "sum" | "mean": how the sequence log-probs fed to fn are reduced over tokens
    uses_reference: bool
    description: str


def _dpo(variant: str) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
    def fn(policy_chosen: ArrayLike, policy_rejected: ArrayLike, ref_chosen: ArrayLike, ref_rejected: ArrayLike,
           **hparams: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        return dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, variant=variant, **hparams)

    return fn


def _dil(variant: str) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
    def fn(policy_chosen: ArrayLike, policy_rejected: ArrayLike, ref_chosen: ArrayLike, ref_rejected: ArrayLike,
           **hparams: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        return dil_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, variant=variant, **hparams)

    return fn


def _simpo(policy_chosen: ArrayLike, policy_rejected: ArrayLike, ref_chosen: ArrayLike | None = None,
           ref_rejected: ArrayLike | None = None, **hparams: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    return simpo_loss(policy_chosen, policy_rejected, **hparams)


def _entries() -> Iterator[Objective]:
    # Reductions follow the reference code: TRL DPOTrainer sums (sigmoid, hinge, robust) but averages for IPO; SimPO
    # and the DIL authors average (their trainer averages for every loss, DPO included: use dpo with reduce="mean").
    yield Objective("dpo", _dpo("sigmoid"), {"beta": 0.1, "label_smoothing": 0.0}, "sum", True,
                    "DPO: -logsig(beta d), d = log-ratio margin (Rafailov et al. 2023; TRL sigmoid)")
    yield Objective("cdpo", _dpo("sigmoid"), {"beta": 0.1, "label_smoothing": 0.1}, "sum", True,
                    "conservative DPO: DPO with label smoothing eps (Mitchell 2023; TRL sigmoid + label_smoothing)")
    yield Objective("ipo", _dpo("ipo"), {"beta": 0.1}, "mean", True,
                    "IPO: (d - 1/(2 beta))^2 on mean log-probs (Azar et al. 2023; TRL ipo)")
    yield Objective("hinge", _dpo("hinge"), {"beta": 0.1}, "sum", True,
                    "SLiC hinge: relu(1 - beta d) (Zhao et al. 2023; TRL hinge)")
    yield Objective("robust", _dpo("robust"), {"beta": 0.1, "label_smoothing": 0.1}, "sum", True,
                    "robust DPO, unbiased under label noise eps (Chowdhury et al. 2024; TRL robust)")
    yield Objective("simpo", _simpo, {"beta": 2.0, "gamma": 0.5}, "mean", False,
                    "SimPO: -logsig(beta (mlp_w - mlp_l) - gamma), reference-free (Meng et al. 2024)")
    for variant, what in (
        ("lsif", "least-squares importance fitting: -exp(u_w) + exp(2 u_l)/2 (the authors' recipe)"),
        ("ukl", "unnormalised KL (KLIEP): -u_w + exp(u_l)"),
        ("bce", "logistic ratio estimation: -logsig(u_w) - logsig(-u_l)"),
        ("lsif_ref_free", "LSIF on policy log-probs, no reference (authors' development branch)"),
    ):
        yield Objective(f"dil_{variant}", _dil(variant), {"beta": 1.0}, "mean", variant != "lsif_ref_free",
                        f"DIL {what} (Xiao et al. 2025; tengxiao1/DIL)")


OBJECTIVES: dict[str, Objective] = {o.name: o for o in _entries()}


def get_objective(name: str,
                  **overrides: Any) -> tuple[Callable[..., tuple[jax.Array, dict[str, jax.Array]]], Objective]:
    """Resolve ``name`` to ``(bound_fn, objective)``.

    ``bound_fn(pc, pr, rc, rr)`` has the objective's defaults merged with ``overrides`` bound in; the returned
    ``objective`` carries the merged ``defaults`` (log them). ``reduce="sum"|"mean"`` may also be overridden (e.g. the
    DIL authors' DPO: ``get_objective("dpo", reduce="mean")``). Unknown names or hyper-parameters raise ValueError
    listing the valid ones.
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; valid: {', '.join(sorted(OBJECTIVES))}")
    objective = OBJECTIVES[name]
    reduce = overrides.pop("reduce", objective.reduce)
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
    unknown = sorted(set(overrides) - set(objective.defaults))
    if unknown:
        valid = ", ".join(sorted(objective.defaults)) + ", reduce"
        raise ValueError(f"objective {name!r} has no hyper-parameter {', '.join(unknown)}; valid: {valid}")
    hparams = {**objective.defaults, **overrides}
    objective = dataclasses.replace(objective, defaults=hparams, reduce=reduce)
    return functools.partial(objective.fn, **hparams), objective
