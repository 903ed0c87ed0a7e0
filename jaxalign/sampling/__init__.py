"""The in-process KV-cache sampler: ``generate(model, prompts, *, max_new_tokens, ...)`` and its memory planner."""
from jaxalign.sampling.memory import (default_budget_bytes, kv_cache_bytes, plan_batch_size,
                                      sampling_bytes_per_device)
from jaxalign.sampling.sampler import (GenerationResult, SamplingStats, clear_compile_cache, compile_cache_size,
                                       filter_logits, generate, generate_from_params)

__all__ = [
    "generate", "generate_from_params", "GenerationResult", "SamplingStats", "kv_cache_bytes",
    "sampling_bytes_per_device", "plan_batch_size", "default_budget_bytes", "filter_logits", "clear_compile_cache",
    "compile_cache_size",
]
