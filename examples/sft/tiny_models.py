"""Tiny randomly initialised causal LMs of each family the SFT example trains (``--embedded_family``).

Every builder keeps its family's architectural choices at a tiny size (hidden 128, 2 layers, 4 query
heads over 2 key/value heads, float32): Llama 3.2 (``embedded.build_tiny_llama``: llama3 rope scaling,
tied head), Qwen2 (biased q/k/v projections, tied head), Mistral (untied head), Gemma (tanh-GELU
GeGLU, ``(1 + weight)`` RMSNorm, scaled embeddings, tied head) and Gemma 2 (Gemma plus pre/post
feed-forward norms, attention and final-logit soft-capping). Weights depend only on ``seed``.
"""

from __future__ import annotations

from typing import Any

import embedded
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

_COMMON: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 4096,
}

# model_type -> family-specific config settings (the rest is _COMMON); llama comes from embedded.py.
FAMILY_SETTINGS: dict[str, dict[str, Any]] = {
    "llama": {},
    "qwen2": {"hidden_act": "silu", "tie_word_embeddings": True, "rope_theta": 1e6, "rms_norm_eps": 1e-6},
    "mistral": {"hidden_act": "silu", "tie_word_embeddings": False, "sliding_window": None, "rope_theta": 1e6},
    "gemma": {"hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6},
    "gemma2": {
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": 32,
        "final_logit_softcapping": 30.0,
        "attn_logit_softcapping": 50.0,
        "sliding_window": 4096,
        "rms_norm_eps": 1e-6,
    },
}
FAMILIES = tuple(FAMILY_SETTINGS)


def build_tiny_model(
    family: str,
    vocab_size: int,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    seed: int = 0,
) -> PreTrainedModel:
    """A tiny ``<family>ForCausalLM`` with ``vocab_size`` rows in its head; ``family`` is one of :data:`FAMILIES`."""
    if family not in FAMILY_SETTINGS:
        raise ValueError(f"--embedded_family {family!r} is not one of {list(FAMILIES)}")
    ids = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
    if family == "llama":
        return embedded.build_tiny_llama(vocab_size, seed=seed, **ids)
    config = AutoConfig.for_model(family, vocab_size=vocab_size, **_COMMON, **FAMILY_SETTINGS[family], **ids)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model
