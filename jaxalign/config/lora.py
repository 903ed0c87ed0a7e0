"""The ``model.lora`` config section: the adapters' settings, and the PEFT adapter a run may start from."""
from __future__ import annotations

import dataclasses

from jaxalign.models.lora import TARGETS as LORA_TARGETS, LoraConfig


@dataclasses.dataclass
class Lora:
    """LoRA adapters on a frozen base (docs/lora.md); rank 0 = full fine-tuning."""

    rank: int = 0  # adapter rank r; 0 = off
    alpha: float = 16.0  # the update is (alpha / r) B A
    dropout: float = 0.0  # on each adapter's input, training only
    targets: list = dataclasses.field(default_factory=lambda: list(LORA_TARGETS))  # q, k, v, o, gate, up, down
    base_dtype: str = ""  # the frozen base's dtype on the devices ("" = model.param_dtype; bfloat16 halves it)
    # a PEFT LoRA folder (adapter_config.json + safetensors) every LoRA phase starts its adapters from, e.g. the one a
    # TRL / PEFT run starts from; its r, lora_alpha and target modules must be rank, alpha and targets ("" = fresh)
    init_adapter: str = ""

    def build(self) -> LoraConfig | None:
        """The adapters' LoraConfig, or None when LoRA is off."""
        if not self.rank:
            return None
        return LoraConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout, targets=tuple(self.targets))
