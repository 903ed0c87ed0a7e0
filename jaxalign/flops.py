"""Model FLOPs and MFU: the one formula the planner, the training metrics and the benchmarks share.

Per token, a decoder with N non-embedding matmul parameters does ``2 N`` FLOPs forward (a multiply and an add per weight)
plus the attention score and value matmuls, ``4 * L * T_ctx * (n_heads * head_dim)`` forward for a context of T_ctx
keys (causal training averages to T/2 keys per query; we count the full T as PaLM's appendix B and MaxText do, so
figures compare with theirs). The LM head (``2 * H * V``) counts as a matmul. Backward is twice the forward.

    train FLOPs / token = 6 * (N_matmul + H * V) + 12 * L * T * n_heads * head_dim
    MFU = achieved model FLOPs per second / peak FLOPs per second of the devices used

Rematerialisation is not counted (it is hardware FLOPs, not model FLOPs), which is why MFU is the honest figure.
"""
from __future__ import annotations

# Peak dense bf16 FLOP/s per chip, from the vendors' spec sheets.
PEAK_FLOPS = {
    "tpu v2": 45e12 / 2,  # per core (a v2 chip has 2 cores, 45 TFLOP/s per chip)
    "tpu v3": 123e12 / 2,
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,  # v5e
    "tpu v5e": 197e12,
    "tpu v5": 459e12,  # v5p
    "tpu v5p": 459e12,
    "tpu v6 lite": 918e12,  # v6e
    "tpu v6e": 918e12,
    "nvidia h100": 989e12,
    "nvidia h200": 989e12,
    "nvidia a100": 312e12,
}


def matmul_params(cfg) -> int:
    """Parameters that take part in a matmul per token: every layer weight plus the LM head (not the embedding lookup)."""
    h, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    attn = h * d * (cfg.num_heads + 2 * cfg.num_kv_heads) + cfg.num_heads * d * h
    mlp = (2 if cfg.family == "neox" else 3) * h * f
    return cfg.num_layers * (attn + mlp) + h * cfg.vocab_size


def flops_per_token(cfg, seq_len: int, *, backward: bool = True) -> float:
    """Model FLOPs per token for sequences of ``seq_len`` (see the module docstring)."""
    fwd = 2 * matmul_params(cfg) + 4 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim
    return 3 * fwd if backward else fwd


def device_peak_flops(device=None) -> float | None:
    """Peak bf16 FLOP/s of one device, or None where unknown (CPU: measure it, see benchmarks/)."""
    import jax

    kind = (device or jax.devices()[0]).device_kind.lower()
    for name, peak in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if kind.startswith(name) or name in kind:
            return peak
    return None


def mfu(tokens_per_second: float, cfg, seq_len: int, peak_flops: float, *, backward: bool = True) -> float:
    return tokens_per_second * flops_per_token(cfg, seq_len, backward=backward) / peak_flops
