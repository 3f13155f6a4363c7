"""GPU benchmark of the preference losses (ORPO, DPO, SimPO, CPO, KTO), fwd+bwd, against peers.

Run on a CUDA machine: ``python benchmarks/bench_preference_losses.py`` (``--quick``: first shape only).
bf16, V=128256, rows of ``seq`` tokens whose first 25% are masked; paired losses take the rows as
B = rows/2 pairs, KTO labels half of them desirable. DPO and KTO read a reference model's hidden
states (its own head, no gradient). Methods:

- ``floor_valid``: the 3 lm_head GEMMs (logits, grad-input, grad-weight) over the valid tokens only,
  plus, for DPO and KTO, one forward GEMM for the reference;
- ``liger_align``: our ``LigerFusedLinear<X>Loss``;
- ``naive_torch``: materialised fp32 logits, log-softmax, gather, then the same objective;
- ``liger_kernel``: Liger-Kernel's ``liger_kernel.chunked_loss`` module (skipped when absent);
- ``trl_chunked_logprob``: TRL's ``trl.kernels.ChunkedLogProbFunction`` on the valid tokens, then
  the same objective (skipped when TRL is absent).

Extra memory = ``max_memory_allocated`` during one fwd+bwd minus what was allocated before it, minus
the bytes of the gradients it returns. Times: median of ``triton.testing.do_bench`` after warm-up.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import bench_ms, floor_valid_ms, peak_extra_gib, plot_ratios, print_table, save_results  # noqa: E402
from liger_align.losses import (  # noqa: E402
    LigerFusedLinearCPOLoss, LigerFusedLinearDPOLoss, LigerFusedLinearKTOLoss, LigerFusedLinearORPOLoss,
    LigerFusedLinearSimPOLoss, cpo_objective, dpo_objective, kto_objective, orpo_objective,
)

VOCAB = 128256
SHAPES = [(8, 1024, 2048), (8, 1024, 4096), (16, 2048, 4096)]
LOSSES = ("orpo", "dpo", "simpo", "cpo", "kto")
WITH_REFERENCE = ("dpo", "kto")


class Inputs:
    """One shape's tensors: policy ``hidden (R, T, H)``, ``weight (V, H)`` leaves; reference; targets."""

    def __init__(self, rows: int, seq: int, hidden_size: int, dtype=torch.bfloat16) -> None:
        torch.manual_seed(0)
        scale = hidden_size**-0.5
        self.hidden = torch.randn(rows, seq, hidden_size, device="cuda", dtype=dtype).requires_grad_()
        self.weight = (torch.randn(VOCAB, hidden_size, device="cuda") * scale).to(dtype).requires_grad_()
        self.ref_hidden = torch.randn(rows, seq, hidden_size, device="cuda", dtype=dtype)
        self.ref_weight = (torch.randn(VOCAB, hidden_size, device="cuda") * scale).to(dtype)
        self.target = torch.randint(0, VOCAB, (rows, seq), device="cuda")
        self.target[:, : seq // 4] = -100
        self.labels = torch.arange(rows, device="cuda") % 2 == 0  # KTO: half desirable
        self.n_valid = int((self.target != -100).sum())


def ours(loss: str, x: Inputs) -> Callable[[], None]:
    if loss == "orpo":
        fn = LigerFusedLinearORPOLoss()
        return lambda: fn(x.weight, x.hidden, x.target)[0].backward()
    if loss == "dpo":
        fn = LigerFusedLinearDPOLoss()
        return lambda: fn(x.weight, x.hidden, x.target, ref_hidden=x.ref_hidden, ref_weight=x.ref_weight)[0].backward()
    if loss == "simpo":
        fn = LigerFusedLinearSimPOLoss()
        return lambda: fn(x.weight, x.hidden, x.target)[0].backward()
    if loss == "cpo":
        fn = LigerFusedLinearCPOLoss()
        return lambda: fn(x.weight, x.hidden, x.target)[0].backward()
    fn = LigerFusedLinearKTOLoss()
    return lambda: fn(
        x.weight, x.hidden, x.target, x.labels, ref_hidden=x.ref_hidden, ref_weight=x.ref_weight
    )[0].backward()


def objective(loss: str, sums: torch.Tensor, counts: torch.Tensor, ref_sums: torch.Tensor | None, x: Inputs):
    """The same objective as ours (default hyper-parameters) on per-row summed log-probs ``(R,)``."""
    half = sums.shape[0] // 2
    avg = sums / counts.clamp(min=1)
    nll = -sums[:half].sum() / counts[:half].sum()
    if loss == "orpo":
        return orpo_objective(avg[:half], avg[half:], nll, beta=0.1)[0]
    if loss == "dpo":
        return dpo_objective(sums[:half], sums[half:], ref_sums[:half], ref_sums[half:])[0]
    if loss == "simpo":
        return cpo_objective(avg[:half], avg[half:], nll, beta=2.0, loss_type="simpo", cpo_alpha=0.0)[0]
    if loss == "cpo":
        return cpo_objective(sums[:half], sums[half:], nll)[0]
    return kto_objective(sums, ref_sums, x.labels)[0]


def naive(loss: str, x: Inputs) -> Callable[[], None]:
    def row_sums(hidden, weight):
        logp = torch.log_softmax((hidden @ weight.t()).float(), -1)
        valid = x.target != -100
        per_token = logp.gather(-1, x.target.clamp(min=0)[..., None]).squeeze(-1) * valid
        return per_token.sum(1), valid.sum(1).float()

    def run():
        ref_sums = None
        if loss in WITH_REFERENCE:
            with torch.no_grad():
                ref_sums = row_sums(x.ref_hidden, x.ref_weight)[0]
        sums, counts = row_sums(x.hidden, x.weight)
        objective(loss, sums, counts, ref_sums, x).backward()

    return run


def trl_op(loss: str, x: Inputs) -> Callable[[], None]:
    from trl.kernels import ChunkedLogProbFunction

    valid = x.target != -100
    row_of_token = torch.arange(x.target.shape[0], device=x.target.device)[:, None].expand_as(x.target)[valid]
    counts = valid.sum(1).float()

    def row_sums(hidden, weight):
        flat = hidden.reshape(-1, hidden.shape[-1])[valid.reshape(-1)]
        logps = ChunkedLogProbFunction.apply(flat, weight, None, x.target[valid], 1.0, 32768, None, 1.0, ())[0]
        return torch.zeros(x.target.shape[0], device=x.target.device).index_add(0, row_of_token, logps.float())

    def run():
        ref_sums = None
        if loss in WITH_REFERENCE:
            with torch.no_grad():
                ref_sums = row_sums(x.ref_hidden, x.ref_weight)
        objective(loss, row_sums(x.hidden, x.weight), counts, ref_sums, x).backward()

    return run


def liger_kernel(loss: str, x: Inputs) -> Callable[[], None]:
    from liger_kernel import chunked_loss as lk

    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
    if loss == "orpo":
        fn = lk.LigerFusedLinearORPOLoss()
        return lambda: first(fn(x.weight, x.hidden, x.target)).backward()
    if loss == "dpo":
        fn = lk.LigerFusedLinearDPOLoss(use_ref_model=True)
        return lambda: first(
            fn(x.weight, x.hidden, x.target, ref_input=x.ref_hidden, ref_weight=x.ref_weight)
        ).backward()
    if loss == "simpo":
        fn = lk.LigerFusedLinearSimPOLoss(beta=2.0, gamma=0.5, compute_nll_loss=False)
        return lambda: first(fn(x.weight, x.hidden, x.target)).backward()
    if loss == "cpo":
        fn = lk.LigerFusedLinearCPOLoss()
        return lambda: first(fn(x.weight, x.hidden, x.target)).backward()
    fn = lk.LigerFusedLinearKTOLoss(use_ref_model=True)
    return lambda: first(
        fn(x.hidden, x.weight, x.target, preference_labels=x.labels, ref_input=x.ref_hidden, ref_weight=x.ref_weight)
    ).backward()


PEERS = {"liger_align": ours, "naive_torch": naive, "liger_kernel": liger_kernel, "trl_chunked_logprob": trl_op}


def measure(row: dict, make: Callable[[], Callable[[], None]], x: Inputs, floor: float) -> dict:
    """Fill ``row`` with ms, x_floor and extra_gib; a peer that is missing, OOMs or fails is recorded."""
    try:
        fn = make()
    except ImportError as exc:
        row["ms"] = f"skipped: {exc.name or exc}"
        return row
    grads = [x.hidden, x.weight]
    try:
        fn()  # warm-up (compilation, autotuning) before measuring memory
        row["extra_gib"] = peak_extra_gib(fn, grads)
        row["ms"] = bench_ms(fn, grads)
        row["x_floor"] = row["ms"] / floor
    except torch.OutOfMemoryError:
        row["ms"] = "OOM"
    except Exception as exc:  # noqa: BLE001 - a failing peer is recorded, not fatal
        row["ms"] = f"failed: {type(exc).__name__}: {str(exc)[:80]}"
    for t in grads:
        t.grad = None
    torch.cuda.empty_cache()
    return row


def run(shapes, losses, methods, skip_naive_over_tokens: int) -> list[dict]:
    out = []
    for rows, seq, hidden_size in shapes:
        x = Inputs(rows, seq, hidden_size)
        shape = f"{rows}x{seq} H={hidden_size}"
        floor = floor_valid_ms(x.n_valid, hidden_size, VOCAB, x.hidden.dtype)
        ref_fwd = floor_valid_ms(x.n_valid, hidden_size, VOCAB, x.hidden.dtype, forward_only=True)
        for loss in losses:
            loss_floor = floor + (ref_fwd if loss in WITH_REFERENCE else 0.0)
            out.append(dict(loss=loss, shape=shape, method="floor_valid", ms=loss_floor, x_floor=1.0, extra_gib=0.0))
            for name in methods:
                row = dict(loss=loss, shape=shape, method=name)
                if name == "naive_torch" and rows * seq > skip_naive_over_tokens:
                    row["ms"] = "skipped: too large"
                else:
                    measure(row, lambda: PEERS[name](loss, x), x, loss_floor)
                out.append(row)
                print(f"  {loss:6s} {shape:16s} {name:20s} {row.get('ms')}", flush=True)
        del x
        torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="first shape only")
    parser.add_argument("--losses", nargs="*", default=list(LOSSES), choices=LOSSES)
    parser.add_argument("--methods", nargs="*", default=list(PEERS), choices=list(PEERS))
    parser.add_argument("--skip-naive-over-tokens", type=int, default=16384)
    args = parser.parse_args()
    shapes = SHAPES[:1] if args.quick else SHAPES
    rows = run(shapes, args.losses, args.methods, args.skip_naive_over_tokens)
    meta = dict(
        gpu=torch.cuda.get_device_name(), torch=torch.__version__, vocab=VOCAB, dtype="bf16", masked="first 25%",
        extra_memory="peak max_memory_allocated during one fwd+bwd - allocated before - bytes of returned grads",
        floor_valid="3 GEMMs over valid tokens (+1 forward GEMM for the reference in dpo and kto)",
    )
    save_results("preference_losses", rows, meta)
    plot_ratios("preference_losses", [dict(r, group=f"{r['loss']} {r['shape']}") for r in rows
                                      if r["method"] != "floor_valid"],
                group="group", method="method", value="x_floor", title="fwd+bwd time / floor_valid (lower is better)")
    print(f"# {meta['gpu']}, torch {meta['torch']}; extra_gib = {meta['extra_memory']}")
    print(f"# floor_valid = {meta['floor_valid']}")
    print_table(rows, ["loss", "shape", "method", "ms", "x_floor", "extra_gib"])


if __name__ == "__main__":
    main()
