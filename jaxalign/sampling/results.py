"""What :func:`jaxalign.sampling.generate` returns: the samples per prompt and the call's statistics."""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class SamplingStats:
    """Counts and timings of one :func:`jaxalign.sampling.generate` call."""

    num_prompts: int = 0
    num_samples: int = 1
    num_batches: int = 0
    prompts_per_batch: int = 0
    rows_per_batch: int = 0
    prompt_tokens: int = 0          # real (unpadded) prompt tokens prefilled, once per prompt
    generated_tokens: int = 0       # tokens returned (stop ids included)
    decode_steps: int = 0           # token positions decoded per batch (1 + loop iterations), summed
    compile_s: float = 0.0          # lowering + compiling new functions during this call
    compiles: int = 0
    wall_s: float = 0.0             # the whole call, compile included
    buckets: list = dataclasses.field(default_factory=list)  # (prompt bucket, cache length) per batch
    shrunk_from: int = 0            # prompts per batch the shape-based plan chose, when XLA's compiled bytes shrank it

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of wall time, compile time excluded."""
        run = self.wall_s - self.compile_s
        return self.generated_tokens / run if run > 0 else float("nan")


@dataclasses.dataclass
class GenerationResult:
    """Samples of :func:`jaxalign.sampling.generate`, sample-major within each prompt.

    ``tokens[i * num_samples + j]`` is sample ``j`` of prompt ``i`` (prompt excluded, cut after the first stop id with
    the stop id included); ``logprobs`` matches it token for token; ``stopped[k]`` says whether row ``k`` ended on a
    stop id (else it reached ``max_new_tokens``).
    """

    tokens: list[list[int]]
    logprobs: list[list[float]]
    stopped: list[bool]
    num_samples: int
    stats: SamplingStats

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_prompts(self) -> int:
        return len(self.tokens) // self.num_samples if self.num_samples else 0

    def index(self, prompt: int, sample: int = 0) -> int:
        return prompt * self.num_samples + sample

    def samples(self, prompt: int) -> list[list[int]]:
        """The ``num_samples`` token lists of prompt ``prompt``."""
        return self.tokens[prompt * self.num_samples:(prompt + 1) * self.num_samples]

    def sample_logprobs(self, prompt: int) -> list[list[float]]:
        return self.logprobs[prompt * self.num_samples:(prompt + 1) * self.num_samples]

    @property
    def grouped_tokens(self) -> list[list[list[int]]]:
        """``[prompt][sample] -> token ids``."""
        return [self.samples(i) for i in range(self.num_prompts)]

    @property
    def grouped_logprobs(self) -> list[list[list[float]]]:
        return [self.sample_logprobs(i) for i in range(self.num_prompts)]

    def sequence_logprobs(self) -> list[float]:
        """Sum of each row's token log-probs (under the model distribution, see :func:`jaxalign.sampling.generate`)."""
        return [float(np.sum(lp)) for lp in self.logprobs]
