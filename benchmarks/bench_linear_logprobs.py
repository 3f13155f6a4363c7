"""GPU benchmark of the shared base: linear_logprobs and the fused cross-entropy, against peers.

Run on a CUDA machine: ``python benchmarks/bench_linear_logprobs.py``. bf16, V=128256; rows of
``seq`` tokens whose first 25% are masked. Each method runs a fwd+bwd (log-probs: the summed
log-probs as loss; cross-entropy: the mean loss). Peers are optional: skipped (with the reason) when not
installed. Timing, memory, JSON and plot: ``benchmarks/_runner.py``; ``x_floor`` = time / the ``3 GEMMs``
floor_valid row of the same shape.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _runner  # noqa: E402

from liger_align.kernels import fused_linear_cross_entropy, linear_logprobs  # noqa: E402

VOCAB = 128256
SHAPES = [(8, 1024, 2048), (8, 1024, 4096), (16, 2048, 4096)]
FLOOR = "3 GEMMs"


def make_inputs(rows: int, seq: int, hidden_size: int, dtype: torch.dtype = torch.bfloat16):
    """``(hidden (N, H), weight (V, H), target (N,))`` of the runner's input builder (first 25% masked)."""
    x = _runner.token_inputs(rows, seq, hidden_size, VOCAB, dtype=dtype)
    hidden, target = x.flat()
    return hidden, x.weight, target


def logprob_methods(hidden, weight, target, chunk_mib=()) -> dict[str, Callable[[], Any] | str]:
    """fwd+bwd closures with the summed per-token log-probs as the loss."""
    valid = target != -100
    methods: dict[str, Callable[[], Any] | str] = {
        "liger_align": lambda: linear_logprobs(hidden, weight, target).logps.sum().backward()}
    for mib in chunk_mib:
        methods[f"liger_align[{mib}MiB]"] = (
            lambda mib=mib: linear_logprobs(hidden, weight, target, chunk_bytes=mib * 2**20).logps.sum().backward()
        )

    def naive():
        logp = torch.log_softmax((hidden @ weight.t()).float(), -1)
        (logp.gather(1, target.clamp(min=0)[:, None]).squeeze(1) * valid).sum().backward()

    methods["naive_torch"] = naive
    trl = _runner.optional("trl.kernels", "ChunkedLogProbFunction")
    if isinstance(trl, str):
        methods["trl_chunked_logprob"] = trl
    else:
        def trl_op():  # TRL's trainer passes only the valid tokens, as here
            logps = trl.apply(hidden[valid], weight, None, target[valid], 1.0, 32768, None, 1.0, ())[0]
            logps.sum().backward()

        methods["trl_chunked_logprob"] = trl_op
    return methods


def _loss_of(out: Any) -> torch.Tensor:
    """The loss of the fused CE's return value (a tensor, or a ``CrossEntropyOutput`` when extras are asked)."""
    return out if isinstance(out, torch.Tensor) else out.loss


def cross_entropy_methods(hidden, weight, target, chunk_mib=()) -> dict[str, Callable[[], Any] | str]:
    """fwd+bwd closures with the mean cross-entropy over valid tokens as the loss."""
    methods: dict[str, Callable[[], Any] | str] = {
        "liger_align": lambda: fused_linear_cross_entropy(hidden, weight, target).backward(),
        "liger_align_recompute": lambda: fused_linear_cross_entropy(
            hidden, weight, target, strategy="recompute").backward(),
    }
    # Liger-Kernel's options switched on, one at a time (issue 13: each within 5% of the plain op)
    class_weight = torch.rand(weight.shape[0], device=weight.device) + 0.5
    options = {
        "ce_weight": dict(ce_weight=class_weight), "z_loss": dict(lse_square_scale=1e-4, return_z_loss=True),
        "token_accuracy": dict(return_token_accuracy=True), "label_smoothing": dict(label_smoothing=0.1),
        "softcap": dict(softcap=30.0),
    }
    for name, kwargs in options.items():
        methods[f"liger_align+{name}"] = lambda kwargs=kwargs: _loss_of(
            fused_linear_cross_entropy(hidden, weight, target, **kwargs)).backward()
    for mib in chunk_mib:
        for strategy in ("grad_in_forward", "recompute"):
            methods[f"liger_align_{strategy}[{mib}MiB]"] = lambda mib=mib, s=strategy: fused_linear_cross_entropy(
                hidden, weight, target, strategy=s, chunk_bytes=mib * 2**20
            ).backward()
    methods["naive_torch"] = lambda: F.cross_entropy((hidden @ weight.t()).float(), target).backward()
    flce = _runner.optional("liger_kernel.transformers", "LigerFusedLinearCrossEntropyLoss")
    if isinstance(flce, str):
        methods["liger_kernel_flce"] = flce
    else:
        liger = flce()
        methods["liger_kernel_flce"] = lambda: liger(weight, hidden, target).backward()
    cce = _runner.optional("cut_cross_entropy", "linear_cross_entropy")
    if isinstance(cce, str):
        methods["cce_filtered"] = methods["cce_no_filter"] = cce
    else:
        methods["cce_filtered"] = lambda: cce(hidden, weight, target).backward()
        methods["cce_no_filter"] = lambda: cce(hidden, weight, target, filter_eps=None).backward()
    return methods


OPS = {"logprobs": logprob_methods, "cross_entropy": cross_entropy_methods}


def make_setup(chunk_mib=(), vocab: int = VOCAB, dtype: torch.dtype = torch.bfloat16):
    """``setup({"op", "shape", "rows", "seq", "hidden"}) -> Case``; a shape's inputs and floor serve both ops."""
    cache: dict[str, Any] = {}

    def setup(shape: dict) -> _runner.Case:
        if cache.get("key") != shape["shape"]:
            cache.clear()
            x = _runner.token_inputs(shape["rows"], shape["seq"], shape["hidden"], vocab, dtype=dtype)
            floor = _runner.floor_valid_ms(x.n_valid, shape["hidden"], vocab, dtype)
            cache.update(key=shape["shape"], x=x, floor=floor)
        x = cache["x"]
        hidden, target = x.flat()
        arms = OPS[shape["op"]](hidden, x.weight, target, chunk_mib)
        return _runner.Case(arms, grads=[x.hidden, x.weight], floor_ms=cache["floor"], floor_name=FLOOR)

    return setup


def shape_list(shapes) -> list[dict]:
    return [{"op": op, "shape": f"{r}x{t} H={h}", "rows": r, "seq": t, "hidden": h}
            for r, t, h in shapes for op in OPS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="first shape only")
    parser.add_argument("--skip-naive-over-tokens", type=int, default=16384)
    parser.add_argument("--chunk-mib", type=int, nargs="*", default=[], help="also run ours with these chunk budgets")
    parser.add_argument("--no-peers", action="store_true", help="only liger_align and the floor")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    shapes = shape_list(SHAPES[:1] if args.quick else SHAPES)

    def skip(shape: dict, arm: str) -> str | None:
        if args.no_peers and not arm.startswith("liger_align"):
            return "--no-peers"
        if arm == "naive_torch" and shape["rows"] * shape["seq"] > args.skip_naive_over_tokens:
            return "too large"
        return None

    rows = _runner.run(shapes, make_setup(args.chunk_mib), skip=skip, ratios={"x_floor": (FLOOR, "time")})
    if args.no_peers:
        rows = [r for r in rows if r["method"].startswith(("liger_align", FLOOR))]
    for r in rows:
        for key in ("rows", "seq", "hidden"):
            r.pop(key, None)
    meta = _runner.run_meta(vocab=VOCAB, dtype="bf16", masked="first 25%",
                            extra_memory="peak during one fwd+bwd beyond inputs and returned grads")
    _runner.save("linear_logprobs", rows, meta)
    _runner.plot("linear_logprobs", [r for r in rows if r["method"] != FLOOR], group=["op", "shape"],
                 values=[("x_floor", "time / floor_valid")], title="fwd+bwd time / floor_valid (lower is better)")
    print(f"# {meta['gpu']}, torch {meta['torch']}; extra = peak beyond inputs and returned grads")
    _runner.print_table(rows, ["op", "shape", "method", "ms", "x_floor", "extra_gib"])


if __name__ == "__main__":
    main()
