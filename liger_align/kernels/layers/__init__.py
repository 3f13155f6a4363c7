"""The model-layer kernels the patches use: RMSNorm, LayerNorm (``_norm``), RoPE, SwiGLU and GeGLU (``_gated``)."""
