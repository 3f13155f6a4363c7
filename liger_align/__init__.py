"""liger-align: memory-efficient preference alignment with fused Triton kernels.

Layers (each imports only the ones below it): ``trainers`` -> ``models`` -> ``losses`` -> ``kernels``.
"""

__version__ = "0.1.0"
