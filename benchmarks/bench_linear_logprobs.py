"""GPU benchmark of the shared base: linear_logprobs and the fused cross-entropy, against peers.

Run on a CUDA machine: ``python benchmarks/bench_linear_logprobs.py``. bf16, V=128256; rows of
``seq`` tokens whose first 25% are masked. Each method runs a fwd+bwd (log-probs: the summed
log-probs as loss; cross-entropy: the mean loss). Peers are optional: skipped when not installed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import bench_ms, floor_valid_ms, peak_extra_gib, plot_ratios, print_table, save_results  # noqa: E402
from liger_align.kernels import fused_linear_cross_entropy, linear_logprobs  # noqa: E402

VOCAB = 128256
SHAPES = [(8, 1024, 2048), (8, 1024, 4096), (16, 2048, 4096)]


def make_inputs(rows: int, seq: int, hidden_size: int, dtype=torch.bfloat16):
    torch.manual_seed(0)
    hidden = torch.randn(rows * seq, hidden_size, device="cuda", dtype=dtype).requires_grad_()
    weight = (torch.randn(VOCAB, hidden_size, device="cuda") / hidden_size**0.5).to(dtype).requires_grad_()
    target = torch.randint(0, VOCAB, (rows, seq), device="cuda")
    target[:, : seq // 4] = -100
    return hidden, weight, target.reshape(-1)


def logprob_methods(hidden, weight, target, chunk_mib=()):
    """fwd+bwd closures with the summed per-token log-probs as the loss."""
    valid = target != -100
    methods = {"liger_align": lambda: linear_logprobs(hidden, weight, target).logps.sum().backward()}
    for mib in chunk_mib:
        methods[f"liger_align[{mib}MiB]"] = (
            lambda mib=mib: linear_logprobs(hidden, weight, target, chunk_bytes=mib * 2**20).logps.sum().backward()
        )

    def naive():
        logp = torch.log_softmax((hidden @ weight.t()).float(), -1)
        (logp.gather(1, target.clamp(min=0)[:, None]).squeeze(1) * valid).sum().backward()

    methods["naive_torch"] = naive
    try:
        from trl.kernels import ChunkedLogProbFunction

        def trl_op():  # TRL's trainer passes only the valid tokens, as here
            logps = ChunkedLogProbFunction.apply(hidden[valid], weight, None, target[valid], 1.0, 32768, None, 1.0, ())[0]
            logps.sum().backward()

        methods["trl_chunked_logprob"] = trl_op
    except ImportError:
        pass
    return methods


def cross_entropy_methods(hidden, weight, target, chunk_mib=()):
    """fwd+bwd closures with the mean cross-entropy over valid tokens as the loss."""
    methods = {"liger_align": lambda: fused_linear_cross_entropy(hidden, weight, target).backward()}
    methods["liger_align_recompute"] = (
        lambda: fused_linear_cross_entropy(hidden, weight, target, strategy="recompute").backward()
    )
    for mib in chunk_mib:
        for strategy in ("grad_in_forward", "recompute"):
            methods[f"liger_align_{strategy}[{mib}MiB]"] = lambda mib=mib, strategy=strategy: fused_linear_cross_entropy(
                hidden, weight, target, strategy=strategy, chunk_bytes=mib * 2**20
            ).backward()
    methods["naive_torch"] = lambda: F.cross_entropy((hidden @ weight.t()).float(), target).backward()
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        methods["liger_kernel_flce"] = lambda: liger(weight, hidden, target).backward()
    except ImportError:
        pass
    try:
        from cut_cross_entropy import linear_cross_entropy

        methods["cce_filtered"] = lambda: linear_cross_entropy(hidden, weight, target).backward()
        methods["cce_no_filter"] = lambda: linear_cross_entropy(hidden, weight, target, filter_eps=None).backward()
    except ImportError:
        pass
    return methods


def run(shapes, skip_naive_over_tokens: int, chunk_mib=()) -> list[dict]:
    rows_out = []
    for rows, seq, hidden_size in shapes:
        hidden, weight, target = make_inputs(rows, seq, hidden_size)
        n_valid = int((target != -100).sum())
        floor = floor_valid_ms(n_valid, hidden_size, VOCAB, hidden.dtype)
        shape = f"{rows}x{seq} H={hidden_size}"
        rows_out.append(dict(op="floor_valid", shape=shape, method="3 GEMMs", ms=floor, extra_gib=0.0, x_floor=1.0))
        for op, methods in (("logprobs", logprob_methods), ("cross_entropy", cross_entropy_methods)):
            for name, fn in methods(hidden, weight, target, chunk_mib).items():
                if name == "naive_torch" and rows * seq > skip_naive_over_tokens:
                    continue
                row = dict(op=op, shape=shape, method=name)
                try:
                    row["extra_gib"] = peak_extra_gib(fn, [hidden, weight])
                    row["ms"] = bench_ms(fn, [hidden, weight])
                    row["x_floor"] = row["ms"] / floor
                except torch.OutOfMemoryError:
                    row["ms"] = "OOM"
                except Exception as exc:  # a peer failing is recorded, not fatal
                    row["ms"] = f"failed: {type(exc).__name__}"
                torch.cuda.empty_cache()
                rows_out.append(row)
        del hidden, weight, target
        torch.cuda.empty_cache()
    return rows_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="first shape only")
    parser.add_argument("--skip-naive-over-tokens", type=int, default=16384)
    parser.add_argument("--chunk-mib", type=int, nargs="*", default=[], help="also run ours with these chunk budgets")
    parser.add_argument("--no-peers", action="store_true", help="only liger_align and the floor")
    args = parser.parse_args()
    shapes = SHAPES[:1] if args.quick else SHAPES
    rows = run(shapes, args.skip_naive_over_tokens, args.chunk_mib)
    if args.no_peers:
        rows = [r for r in rows if r["method"].startswith(("liger_align", "3 GEMMs"))]
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, vocab=VOCAB, dtype="bf16", masked="first 25%")
    save_results("linear_logprobs", rows, meta)
    plot_ratios("linear_logprobs", [r for r in rows if r["op"] != "floor_valid"], group="shape", method="method",
                value="x_floor", title="fwd+bwd time / floor_valid (lower is better)")
    print(f"# {meta['gpu']}, torch {meta['torch']}; extra = peak beyond inputs and returned grads")
    print_table(rows, ["op", "shape", "method", "ms", "x_floor", "extra_gib"])


if __name__ == "__main__":
    main()
