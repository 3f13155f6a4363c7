"""A tiny Llama-3.2-shaped causal LM built from a config (random weights depending only on a seed), and the
examples' embedded triple: that model sized to the local tokenizer, the tokenizer and the shipped data."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .preferences import load_preference_dataset
from .tokenizer import build_tokenizer

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

# Llama 3.2's rope scaling (the "llama3" rule: factor 32 over the original context), at a tiny scale.
ROPE_FACTOR = 32.0


def build_tiny_llama(
    vocab_size: int,
    *,
    hidden_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 4096,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A randomly initialised causal LM with Llama 3.2's architecture at a tiny size, in float32.

    Llama 3.2's shape choices are kept: grouped-query attention (``num_key_value_heads`` <
    ``num_attention_heads``), RMSNorm, SwiGLU MLP, RoPE with the ``llama3`` frequency scaling, and
    the output head tied to the input embeddings; the rope scaling's original context is
    ``max_position_embeddings / 32``, as in Llama 3.2 (8192 of 131072). ``intermediate_size``
    defaults to ``4 * hidden_size``.
    The weights depend only on ``seed``; the global RNG state is left as it was.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden_size % num_attention_heads:
        raise ValueError(
            f"hidden_size ({hidden_size}) must be a multiple of num_attention_heads ({num_attention_heads})"
        )
    if num_attention_heads % num_key_value_heads:
        raise ValueError(
            f"num_attention_heads ({num_attention_heads}) must be a multiple of "
            f"num_key_value_heads ({num_key_value_heads})"
        )
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=hidden_size // num_attention_heads,
        hidden_act="silu",
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": ROPE_FACTOR,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": int(max_position_embeddings // ROPE_FACTOR),
        },
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def build_embedded(seed: int = 0, **model_kwargs: Any) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, Dataset]:
    """The tokenizer, a tiny Llama sized for it (``model_kwargs`` go to ``build_tiny_llama``) and the data."""
    tokenizer = build_tokenizer()
    model = build_tiny_llama(
        len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        seed=seed,
        **model_kwargs,
    )
    return model, tokenizer, load_preference_dataset()
