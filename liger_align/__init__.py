"""liger-align: memory-efficient preference alignment with fused Triton kernels.

Layers (each imports only the ones below it): ``trainers`` -> ``models`` -> ``losses`` -> ``kernels``;
``utils`` (measurement) imports none of them. The layers, the cost model, the conventions and why the head
call runs inside the head module's forward are described in docs/ARCHITECTURE.md.
"""

__version__ = "0.1.0"
