"""Decoders for the Llama family and GPT-NeoX, with Hugging Face safetensors in and out."""
from jaxalign.models.config import ModelConfig, ModelConfigError, config_from_hf, load_config
from jaxalign.models.decoder import LOGICAL_AXES, Decoder, KVCache, forward, init_params, logical_axes, param_shapes
from jaxalign.models.hf_io import from_pretrained, read_params, save_pretrained
from jaxalign.models.reward import RewardModel, reward_forward

__all__ = [
    "ModelConfig", "ModelConfigError", "config_from_hf", "load_config", "LOGICAL_AXES", "Decoder", "KVCache",
    "forward", "init_params", "logical_axes", "param_shapes", "from_pretrained", "read_params", "save_pretrained",
    "RewardModel", "reward_forward",
]
