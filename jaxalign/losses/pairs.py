"""Pair selection from N scored samples per prompt, for online DPO / IRL rounds with best-of-N sampling.

Each rule maps ``rewards [P, N]`` (N samples for each of P prompts) and a PRNG key to ``(chosen_idx [P],
rejected_idx [P])``, indices into the N axis. Pure jnp: jit / vmap safe.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


def max_min(rewards: ArrayLike, key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Best vs worst sample by reward: the "Max-Min" strategy of the IRL paper's online DPO (N=32), after
    RLHFlow/Online-RLHF. ``key`` is unused. When all N rewards tie, chosen == rejected (index 0): a zero-margin pair
    that gives no DPO gradient; filter with ``rewards[chosen] > rewards[rejected]`` if it matters.
    """
    del key
    rewards = jnp.asarray(rewards)
    return jnp.argmax(rewards, axis=-1), jnp.argmin(rewards, axis=-1)


def max_random(rewards: ArrayLike, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Best sample vs one drawn uniformly from the other N-1 (needs N >= 2)."""
    rewards = jnp.asarray(rewards)
    n = rewards.shape[-1]
    if n < 2:
        raise ValueError(f"max_random needs at least 2 samples per prompt, got {n}")
    chosen = jnp.argmax(rewards, axis=-1)
    # Draw from N-1 slots and skip over the chosen one: uniform over the others without rejection sampling.
    draw = jax.random.randint(key, chosen.shape, 0, n - 1)
    return chosen, draw + (draw >= chosen)


# every rule is called as rule(rewards [P, N], key) -> (chosen_idx [P], rejected_idx [P])
PAIR_RULES: dict[str, Callable[[ArrayLike, jax.Array], tuple[jax.Array, jax.Array]]] = {
    "max_min": max_min, "max_random": max_random,
}
