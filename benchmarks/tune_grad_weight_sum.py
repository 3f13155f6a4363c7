"""Time every tile configuration of the compensated grad-weight GEMM on one middle chunk (CUDA only).

``python benchmarks/tune_grad_weight_sum.py``: for V=128256, (H, C) in {(2048, 1536), (4096, 2048)}, the
median time of ``_compensated_gemm_kernel`` (FIRST=LAST=False) per configuration against cuBLAS' bf16 ``mm``
of the same chunk (the floor) and its fp32 ``addmm`` into an fp32 accumulator; prints the table, best first.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from liger_align.kernels.head import grad_weight_sum as gws  # noqa: E402


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    import triton
    from triton.testing import do_bench

    vocab = 128256
    for hidden, chunk in ((2048, 1536), (4096, 2048)):
        g = (torch.randn(chunk, vocab, device="cuda") * 1e-3).bfloat16()
        h = torch.randn(chunk, hidden, device="cuda").bfloat16()
        hi = torch.randn(vocab, hidden, device="cuda").bfloat16()
        lo = (torch.randn(vocab, hidden, device="cuda") * 1e-3).bfloat16()
        acc = torch.zeros(vocab, hidden, device="cuda")
        floor = do_bench(lambda: torch.mm(g.t(), h), warmup=50, rep=300)
        cublas = do_bench(lambda: torch.addmm(acc, g.t(), h, out_dtype=torch.float32, out=acc), warmup=50, rep=300)
        rows = []
        for block_v, block_h, h_sub, block_k, warps, stages, group in itertools.product(
            (128, 256), (64, 128), (1, 2), (64, 128), (4, 8), (3, 4), (8,)
        ):
            if block_v * block_h * h_sub > 128 * 256 or (block_v == 256 and warps == 4):
                continue
            meta = dict(BLOCK_V=block_v, BLOCK_H=block_h, BLOCK_K=block_k, GROUP_V=group, H_SUB=h_sub)
            grid = (triton.cdiv(vocab, block_v) * triton.cdiv(hidden, block_h * h_sub),)

            def run(meta=meta, grid=grid, warps=warps, stages=stages):
                gws._compensated_gemm_kernel[grid](
                    g, h, hi, lo, vocab, hidden, chunk, g.stride(0), g.stride(1), h.stride(0), h.stride(1),
                    FIRST=False, LAST=False, INTERPRETED=False, num_warps=warps, num_stages=stages, **meta,
                )

            try:
                ms = do_bench(run, warmup=25, rep=150)
            except Exception as exc:  # noqa: BLE001 - a config that does not fit is skipped
                rows.append((float("inf"), f"{meta} w{warps} s{stages}: {type(exc).__name__}"))
                continue
            rows.append((ms, f"{meta} w{warps} s{stages}"))
        rows.sort()
        print(f"# V={vocab} H={hidden} C={chunk}: bf16 mm {floor:.3f} ms, cuBLAS fp32 addmm {cublas / floor:.3f}x")
        for ms, name in rows[:12]:
            print(f"  {ms / floor:6.3f}x floor  {ms:.3f} ms  {name}")
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
