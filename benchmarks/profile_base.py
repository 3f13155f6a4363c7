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
from liger_align.losses import LigerFusedLinearORPOLoss  # noqa: E402


def print_gaps(fn, min_us: float = 80.0) -> None:
    """One run under a CPU+CUDA trace: each GPU idle gap over ``min_us`` and the host ops that ran during it."""
    import json
    import tempfile

    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        trace = json.load(open(f.name))["traceEvents"]
    kernels = sorted((e for e in trace if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    ops = [e for e in trace if e.get("cat") == "cpu_op" and e.get("dur", 0) > 0]
    total = 0.0
    for before, after in zip(kernels, kernels[1:]):
        start, stop = before["ts"] + before["dur"], after["ts"]
        if stop - start < min_us:
            continue
        total += stop - start
        during = sorted((e for e in ops if e["ts"] < stop and e["ts"] + e["dur"] > start), key=lambda e: -e["dur"])
        names = ", ".join(f"{e['name'][:40]}({e['dur']:.0f})" for e in during[:6])
        print(f"  gap {stop - start:7.0f} us before {after['name'][:40]}: {names}")
    print(f"  gaps over {min_us:.0f} us: {total / 1e3:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--gaps", action="store_true", help="list the GPU idle gaps and the host ops during them")
    parser.add_argument("--cases", nargs="*", help="logprobs cross_entropy orpo_3_products orpo_recompute")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    hidden, weight, target = make_inputs(8, 1024, args.hidden)
    orpo_3 = LigerFusedLinearORPOLoss(strategy="grad_in_forward")
    orpo_4 = LigerFusedLinearORPOLoss(strategy="recompute")
    rows_target = target.view(8, 1024)
    rows_hidden = hidden.view(8, 1024, -1)
    cases = {
        "logprobs": lambda: linear_logprobs(hidden, weight, target).logps.sum().backward(),
        "cross_entropy": lambda: fused_linear_cross_entropy(hidden, weight, target).backward(),
        "orpo_3_products": lambda: orpo_3(weight, rows_hidden, rows_target)[0].backward(),
        "orpo_recompute": lambda: orpo_4(weight, rows_hidden, rows_target)[0].backward(),
    }
    names = args.cases or list(cases)
    for name in names:
        fn = cases[name]
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            fn()
        stop.record()
        torch.cuda.synchronize()
        wall = start.elapsed_time(stop) / 5
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        events = prof.key_averages()
        busy = sum(e.self_device_time_total for e in events) / 1e3 / 5
        print(f"== {name}, H={args.hidden}: {wall:.2f} ms per run (CUDA events), GPU busy {busy:.2f} ms "
              f"({busy / wall:.0%}); kernels over 5 runs:")
        print(events.table(sort_by="self_device_time_total", row_limit=14, max_name_column_width=70))
        if args.gaps:
            print_gaps(fn)


if __name__ == "__main__":
    main()
