"""Tiny random-init Hugging Face checkpoints, made and saved by transformers itself (torch CPU), for parity tests."""
from __future__ import annotations

from pathlib import Path

VOCAB = 256

VARIANTS = {
    # GQA ratio 2, untied
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),
    # tied embeddings + llama3 RoPE scaling
    "llama3_tied": dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
                        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                             high_freq_factor=4.0, original_max_position_embeddings=16)),
    # sliding window shorter than the test sequences
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, sliding_window=5),
    # q/k/v bias
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    # q/k norm with an explicit head_dim != hidden / heads
    "qwen3": dict(model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False),
    # Pythia layout: parallel residual, partial rotary, LayerNorm with bias
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False),
    "gpt_neox_serial": dict(model_type="gpt_neox", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, rotary_pct=0.5, use_parallel_residual=False),
}


def make_hf_model(variant: str, folder: Path, *, seed: int = 0, init_std: float = 0.02, seq_cls: bool = False):
    """Create a random-init transformers model for ``variant`` and ``save_pretrained`` it into ``folder``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    kw = dict(VARIANTS[variant])
    model_type = kw.pop("model_type")
    cfg = AutoConfig.for_model(model_type, vocab_size=VOCAB, max_position_embeddings=128, initializer_range=init_std,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2, **kw)
    if seq_cls:
        cfg.num_labels = 1
    torch.manual_seed(seed)
    cls = AutoModelForSequenceClassification if seq_cls else AutoModelForCausalLM
    model = cls.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # norms/biases init to 1/0; perturb them so the parity test sees their use
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model
