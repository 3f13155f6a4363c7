"""Per-kernel CUDA time of one fwd+bwd of linear_logprobs and the fused cross-entropy (torch.profiler).

``python benchmarks/profile_base.py [--hidden 2048]``: prints the kernels that take the time, to see
how much goes to the products, the row passes and the accumulations. Inputs: the runner's builder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_linear_logprobs import make_inputs  # noqa: E402

from liger_align.kernels import fused_linear_cross_entropy, linear_logprobs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=2048)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    hidden, weight, target = make_inputs(8, 1024, args.hidden)
    cases = {
        "logprobs": lambda: linear_logprobs(hidden, weight, target).logps.sum().backward(),
        "cross_entropy": lambda: fused_linear_cross_entropy(hidden, weight, target).backward(),
    }
    for name, fn in cases.items():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        print(f"== {name}, H={args.hidden} (5 runs)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70))


if __name__ == "__main__":
    main()
