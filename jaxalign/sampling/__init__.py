"""The in-process KV-cache sampler: ``generate(model, prompts, *, max_new_tokens, ...)`` and its memory planner.

- `sampler`: the host driver (`generate`, `generate_from_params`, `bucket_length`, the compile cache)
- `kernels`: the jitted programs (`prefill`, `decode`), the shared-prefix cache `SharedKV`, `DecodeMode`,
  `filter_logits`, `sample_next`
- `memory`: KV-cache and per-batch memory arithmetic, `plan_batch_size`; `compiled_peak_bytes` / `shrunk_batch`, the
  check of a planned batch against what XLA compiled
- `results`: `GenerationResult`, `SamplingStats`
"""
from jaxalign.sampling.kernels import (CACHE_AXES, CAST_ONCE, DecodeMode, SharedKV, decode, filter_logits, prefill,
                                       sample_next, uses_shared_prefix)
from jaxalign.sampling.memory import (compiled_peak_bytes, default_budget_bytes, kv_cache_bytes, plan_batch_size,
                                      sampling_bytes_per_device, shrunk_batch)
from jaxalign.sampling.results import GenerationResult, SamplingStats
from jaxalign.sampling.sampler import (bucket_length, clear_compile_cache, compile_cache_size, compiled_functions,
                                       generate, generate_from_params, stop_id_buffer)

__all__ = [
    "generate", "generate_from_params", "GenerationResult", "SamplingStats", "kv_cache_bytes",
    "sampling_bytes_per_device", "plan_batch_size", "default_budget_bytes", "compiled_peak_bytes", "shrunk_batch",
    "filter_logits", "clear_compile_cache", "compile_cache_size", "compiled_functions", "bucket_length",
    "stop_id_buffer", "DecodeMode", "prefill", "decode", "sample_next", "CACHE_AXES", "CAST_ONCE", "SharedKV",
    "uses_shared_prefix",
]
