"""Decoders for the Llama family and GPT-NeoX, with Hugging Face safetensors in and out."""
from jaxalign.models.config import ModelConfig, ModelConfigError, config_from_hf, load_config
from jaxalign.models.decoder import LOGICAL_AXES, Decoder, KVCache, forward, init_params, param_shapes
from jaxalign.models.hf_io import from_pretrained, read_params, resolve_model_folder, save_params, save_pretrained
from jaxalign.models.reward import RewardModel, read_reward_params, reward_forward
from jaxalign.models.axes import PARAM_AXES, param_axes

__all__ = [
    "ModelConfig", "ModelConfigError", "config_from_hf", "load_config", "LOGICAL_AXES", "Decoder", "KVCache",
    "forward", "init_params", "param_shapes", "from_pretrained", "read_params", "save_pretrained",
    "RewardModel", "reward_forward", "read_reward_params", "resolve_model_folder", "save_params", "PARAM_AXES",
    "param_axes",
]
