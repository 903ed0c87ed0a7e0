"""Numeric conventions every loss shares."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


def as_float32(*xs: ArrayLike) -> tuple[jax.Array, ...]:
    """``xs`` as float32 arrays, as a tuple (one per input): the losses take log-probs / rewards in any dtype (bf16
    from the model, Python floats from a caller) and do their math in float32."""
    return tuple(jnp.asarray(x).astype(jnp.float32) for x in xs)
