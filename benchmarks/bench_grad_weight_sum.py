"""GPU benchmark of the lm_head grad-weight summed over token chunks: ``sum_c grad_logits_c^T @ h_c`` (V, H).

Run on a CUDA machine: ``python benchmarks/bench_grad_weight_sum.py``. bf16, V=128256, H in {2048, 4096},
C=2048 tokens a chunk, 4 chunks, realistic cross-entropy gradients ((softmax - onehot) / N). Methods:

- ``fp32_buffer``: zeroed fp32 (V, H) buffer, cuBLAS ``addmm(out_dtype=fp32)`` per chunk, final bf16 copy
  (what the fused losses did before GradWeightSum; the reference of ``x_fp32_buffer``);
- ``hilo_triton``: :class:`GradWeightSum` (bf16 hi/lo pair, one Triton GEMM per chunk with the update in
  its epilogue);
- ``hilo_torch``: GradWeightSum's torch path (cuBLAS per vocabulary slice + elementwise update);
- ``bf16_addmm``: bf16 ``addmm`` per chunk (rounds the running sum every chunk: biased; a speed reference);
- ``floor``: 4 plain bf16 ``mm`` of one chunk (``x_floor`` = time / this).

Per chunk, the kernel against cuBLAS' fp32 accumulation (the <= 1.1x target): ``chunk:cublas_fp32_addmm``
(``torch.addmm(acc_fp32, a.t(), b, out_dtype=fp32)``) vs ``chunk:hilo_triton`` (a middle chunk: reads and
writes hi/lo), each against ``chunk:bf16_mm``; ``chunk:cfg ...`` rows force each autotuning config.
``extra_gib`` = peak memory beyond the inputs and the (V, H) bf16 result; ``rel_err`` = Frobenius error
against a float64 sum. Medians of ``triton.testing.do_bench`` after warm-up. JSON and PNG under
``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _runner  # noqa: E402

from liger_align.kernels.head import grad_weight_sum as gws  # noqa: E402

NAME = "grad_weight_sum"


def make_chunks(vocab: int, hidden: int, rows: int, n_chunks: int, seed: int = 1234):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    grads, hiddens = [], []
    for _ in range(n_chunks):
        g = torch.softmax(2.0 * torch.randn(rows, vocab, device="cuda", generator=gen), dim=-1)
        target = torch.randint(0, vocab, (rows,), device="cuda", generator=gen)
        g[torch.arange(rows, device="cuda"), target] -= 1.0
        grads.append((g / (rows * n_chunks)).bfloat16())
        hiddens.append(torch.randn(rows, hidden, device="cuda", generator=gen).bfloat16())
        del g
    return grads, hiddens


def methods(grads, hiddens):
    vocab, hidden, n = grads[0].shape[1], hiddens[0].shape[1], len(grads)
    shape = (vocab, hidden)

    def fp32_buffer():
        acc = torch.zeros(shape, device="cuda", dtype=torch.float32)
        for g, h in zip(grads, hiddens):
            torch.addmm(acc, g.t(), h, out_dtype=torch.float32, out=acc)
        return acc.to(torch.bfloat16)

    def hilo(triton_path):
        def run():
            acc = gws.GradWeightSum(vocab, hidden, dtype=torch.bfloat16, device="cuda", n_chunks=n,
                                    triton_path=triton_path)
            for g, h in zip(grads, hiddens):
                acc.add_(g, h)
            return acc.result()
        return run

    def bf16_addmm():
        acc = torch.mm(grads[0].t(), hiddens[0])
        for g, h in zip(grads[1:], hiddens[1:]):
            acc.addmm_(g.t(), h)
        return acc

    def floor():
        out = torch.empty(shape, device="cuda", dtype=torch.bfloat16)
        for _ in range(n):
            torch.mm(grads[0].t(), hiddens[0], out=out)
        return out

    return {"fp32_buffer": fp32_buffer, "hilo_triton": hilo(True), "hilo_torch": hilo(False),
            "bf16_addmm": bf16_addmm, "floor": floor}


def chunk_methods(grads, hiddens):
    g, h = grads[1], hiddens[1]
    shape = (g.shape[1], h.shape[1])
    acc = torch.zeros(shape, device="cuda", dtype=torch.float32)
    hi = torch.zeros(shape, device="cuda", dtype=torch.bfloat16)
    lo = torch.zeros_like(hi)
    out = torch.empty_like(hi)
    return {
        "chunk:cublas_fp32_addmm": lambda: torch.addmm(acc, g.t(), h, out_dtype=torch.float32, out=acc),
        "chunk:hilo_triton": lambda: gws.compensated_addmm_(hi, lo, g, h, first=False, last=False, triton_path=True),
        "chunk:bf16_mm": lambda: torch.mm(g.t(), h, out=out),
    }


def config_sweep(grads, hiddens, rep: int) -> list[dict]:
    """A middle chunk with each of the kernel's autotuning configs, forced (to see what the tuner chose from)."""
    g, h = grads[1], hiddens[1]
    vocab, hidden = g.shape[1], h.shape[1]
    hi = torch.zeros((vocab, hidden), device="cuda", dtype=torch.bfloat16)
    lo = torch.zeros_like(hi)
    args = (g, h, hi, lo, vocab, hidden, g.shape[0], g.stride(0), g.stride(1), h.stride(0), h.stride(1))
    rows = []
    for cfg in gws._TUNED_CONFIGS:
        meta = cfg.kwargs
        grid = (-(-vocab // meta["BLOCK_V"]) * -(-hidden // (meta["BLOCK_H"] * meta["H_SUB"])),)

        def run(meta=meta, grid=grid, cfg=cfg):
            gws._compensated_gemm_kernel[grid](*args, FIRST=False, LAST=False, INTERPRETED=False, **meta,
                                               num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        run()
        name = (f"chunk:cfg {meta['BLOCK_V']}x{meta['H_SUB']}x{meta['BLOCK_H']} "
                f"w{cfg.num_warps} s{cfg.num_stages}")
        rows.append({"method": name, "ms": _runner.measure(run, warmup_ms=50, rep_ms=rep)})
    return rows


def run_shape(vocab: int, hidden: int, rows: int, n_chunks: int, rep: int) -> list[dict]:
    grads, hiddens = make_chunks(vocab, hidden, rows, n_chunks)
    ref = sum(g.double().t() @ h.double() for g, h in zip(grads, hiddens))
    base = {"shape": f"V={vocab} H={hidden} C={rows}x{n_chunks}", "vocab": vocab, "hidden": hidden,
            "rows": rows, "chunks": n_chunks}
    rows_out = []
    for name, fn in methods(grads, hiddens).items():
        out = fn()  # warm-up; the first GradWeightSum call autotunes the kernel (on a first chunk)
        err = None if name == "floor" else ((out.double() - ref).norm() / ref.norm()).item()
        del out
        ms = _runner.measure(fn, warmup_ms=100, rep_ms=rep)
        rows_out.append({**base, "method": name, "ms": ms, "rel_err": err,
                         "extra_gib": _runner.peak_memory(fn)[0]})  # beyond the returned (V, H) sum
    del ref
    for name, fn in chunk_methods(grads, hiddens).items():
        fn()
        rows_out.append({**base, "method": name, "ms": _runner.measure(fn, warmup_ms=100, rep_ms=rep)})
    rows_out += [{**base, **r} for r in config_sweep(grads, hiddens, rep // 2)]
    by = {r["method"]: r["ms"] for r in rows_out}
    for r in rows_out:
        if r["method"].startswith("chunk:"):
            r["x_cublas_fp32"] = r["ms"] / by["chunk:cublas_fp32_addmm"]
            r["x_floor"] = r["ms"] / by["chunk:bf16_mm"]
        else:
            r["x_fp32_buffer"] = r["ms"] / by["fp32_buffer"]
            r["x_floor"] = r["ms"] / by["floor"]
    best = str(getattr(gws._compensated_gemm_tuned, "best_config", None))
    print(f"# {base['shape']}: Triton config {best}")
    for r in rows_out:
        r["triton_config"] = best
    return rows_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--rows", type=int, default=2048, help="tokens per chunk (C)")
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--rep", type=int, default=300, help="do_bench milliseconds per method")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_grad_weight_sum needs a CUDA device (the Triton kernel's speed is the point); none found")
    import triton

    rows = []
    for hidden in args.hidden:
        rows += run_shape(args.vocab, hidden, args.rows, args.chunks, args.rep)
        torch.cuda.empty_cache()
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "dtype": "bf16", "command": " ".join([Path(sys.executable).name, *sys.argv])}
    print(f"# {meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}")
    columns = ["shape", "method", "ms", "x_fp32_buffer", "x_cublas_fp32", "x_floor", "extra_gib", "rel_err"]
    _runner.print_table(rows, columns)
    print(f"wrote {_runner.save(NAME, rows, meta)}")
    whole = [r for r in rows if not r["method"].startswith("chunk:")]
    _runner.plot(NAME, whole, group=["shape"], values=[("x_fp32_buffer", "time / fp32-buffer cuBLAS")],
                 title="grad-weight sum over 4 token chunks")


if __name__ == "__main__":
    main()
