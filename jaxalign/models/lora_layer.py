"""The LoRA term a decoder layer adds to an adapted projection: ``scale * B (A drop(x))``, x first.

Adapter arrays are named ``<param>_lora_a`` / ``<param>_lora_b`` and stacked over layers like their base matrix (see
:mod:`jaxalign.models.lora`); the decoder's scanned layer loop hands this module one layer's slice of them.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

# For each adaptable projection, the einsums of its two factors: A maps the projection's input dims to the rank r,
# B maps r to its output dims (b batch, t length, h embed, n heads, d head_dim, f mlp).
LORA_SPECS: dict[str, tuple[str, str]] = {
    "wq": ("bth,hr->btr", "btr,rnd->btnd"),
    "wk": ("bth,hr->btr", "btr,rnd->btnd"),
    "wv": ("bth,hr->btr", "btr,rnd->btnd"),
    "wo": ("btnd,ndr->btr", "btr,rh->bth"),
    "w_gate": ("bth,hr->btr", "btr,rf->btf"),
    "w_up": ("bth,hr->btr", "btr,rf->btf"),
    "w_down": ("btf,fr->btr", "btr,rh->bth"),
}


class LoraApply(NamedTuple):
    """How the decoder applies adapters: ``W x + scale * B (A drop(x))``; ``dropout`` is the rate on the adapter
    input when a dropout key is given (training), never at eval."""

    scale: float
    dropout: float = 0.0


def lora_delta(name: str, x, p, lora: LoraApply, key, dt, proj: Callable = jnp.einsum):
    """``scale * B (A x)`` for base projection ``name`` of layer slice ``p``; ``B A`` is never formed. ``proj`` is the
    decoder's projection (its XLA:CPU path has a cheaper weight gradient than plain einsum)."""
    spec_a, spec_b = LORA_SPECS[name]
    if key is not None and lora.dropout > 0.0:
        # one mask per adapted projection, as PEFT gives each LoRA module its own Dropout
        keep = jax.random.bernoulli(jax.random.fold_in(key, list(LORA_SPECS).index(name)), 1.0 - lora.dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - lora.dropout), 0).astype(x.dtype)
    u = proj(spec_a, x, p[name + "_lora_a"].astype(dt)) * jnp.asarray(lora.scale, dt)
    return proj(spec_b, u, p[name + "_lora_b"].astype(dt))
