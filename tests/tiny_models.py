"""Tiny random-weight causal LMs, one per supported architecture, built from configs (no hub)."""
from __future__ import annotations

from pathlib import Path

import torch

# Small but real shapes: head_dim 16, GQA where the family uses it, every family-specific switch on.
TINY_CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                    num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-5, sliding_window=None,
                    tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                  use_sliding_window=False),
    "qwen3": dict(model_type="qwen3", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-6,
                  tie_word_embeddings=True),
    "gemma2": dict(model_type="gemma2", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-6,
                   sliding_window=16, query_pre_attn_scalar=16, final_logit_softcapping=30.0,
                   attn_logit_softcapping=50.0),
    "gemma3": dict(model_type="gemma3_text", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, rope_theta=10000.0, rope_local_base_freq=10000.0,
                   rms_norm_eps=1e-6, sliding_window=16, query_pre_attn_scalar=16, sliding_window_pattern=2),
    "phi3": dict(model_type="phi3", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=4, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
}
ARCHITECTURES = tuple(TINY_CONFIGS)


def tiny_config(arch: str, num_layers: int = 6, vocab_size: int = 49152, **overrides):
    from transformers import AutoConfig

    kwargs = dict(TINY_CONFIGS[arch])
    model_type = kwargs.pop("model_type")
    kwargs.update(num_hidden_layers=num_layers, vocab_size=vocab_size, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2)
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(arch: str, num_layers: int = 6, seed: int = 0, **overrides):
    """A random-weight causal LM of ``arch`` in eval mode (float32)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch, num_layers, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init leaves norms at 1/0; perturb every parameter so no layer is an identity.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def save_tiny_model(arch: str, out_dir: Path, tokenizer=None, num_layers: int = 6, seed: int = 0) -> Path:
    """Write a tiny model (and a tokenizer, when given) as an HF directory with safetensors."""
    model = tiny_model(arch, num_layers, seed)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def save_scaled_tiny_model(arch: str, out_dir: Path, tokenizer, embed_scale: float, matrix_scale: float,
                           num_layers: int = 6, seed: int = 0) -> Path:
    """A tiny model whose embeddings and layer matrices are scaled, so its outputs are far from
    uniform and a quantization or a cut costs it a measurable KL."""
    model = tiny_model(arch, num_layers, seed)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(embed_scale)
        for layer in model.model.layers:
            for p in layer.parameters():
                if p.dim() == 2:
                    p.mul_(matrix_scale)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
