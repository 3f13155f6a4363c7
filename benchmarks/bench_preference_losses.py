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

Extra memory = peak allocated during one fwd+bwd beyond what was allocated before it and the gradients it
returns; times: median after warm-up (``benchmarks/_runner.py``, the runner of every benchmark here).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _runner  # noqa: E402

from liger_align.losses import (  # noqa: E402
    LigerFusedLinearCPOLoss,
    LigerFusedLinearDPOLoss,
    LigerFusedLinearKTOLoss,
    LigerFusedLinearORPOLoss,
    LigerFusedLinearSimPOLoss,
    cpo_objective,
    dpo_objective,
    kto_objective,
    orpo_objective,
)

VOCAB = 128256
SHAPES = [(8, 1024, 2048), (8, 1024, 4096), (16, 2048, 4096)]
LOSSES = ("orpo", "dpo", "simpo", "cpo", "kto")
WITH_REFERENCE = ("dpo", "kto")


Inputs = _runner.TokenInputs  # hidden (R, T, H) and weight (V, H) leaves, reference twin, targets, KTO labels


def ours(loss: str, x: Inputs, strategy: str = "auto") -> Callable[[], None]:
    """liger-align's loss module; ``strategy="auto"`` takes the 3-product path where it fits."""
    if loss == "orpo":
        fn = LigerFusedLinearORPOLoss(strategy=strategy)
        return lambda: fn(x.weight, x.hidden, x.target)[0].backward()
    if loss == "dpo":
        fn = LigerFusedLinearDPOLoss(strategy=strategy)
        return lambda: fn(x.weight, x.hidden, x.target, ref_hidden=x.ref_hidden, ref_weight=x.ref_weight)[0].backward()
    if loss == "simpo":
        fn = LigerFusedLinearSimPOLoss(strategy=strategy)
        return lambda: fn(x.weight, x.hidden, x.target)[0].backward()
    if loss == "cpo":
        fn = LigerFusedLinearCPOLoss(strategy=strategy)
        return lambda: fn(x.weight, x.hidden, x.target)[0].backward()
    fn = LigerFusedLinearKTOLoss(strategy=strategy)
    return lambda: fn(
        x.weight, x.hidden, x.target, preference_labels=x.labels, ref_hidden=x.ref_hidden, ref_weight=x.ref_weight
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


def ours_recompute(loss: str, x: Inputs) -> Callable[[], None]:
    """liger-align's loss module forced onto the recomputing (4-product) path."""
    return ours(loss, x, strategy="recompute")


PEERS = {"liger_align": ours, "liger_align_recompute": ours_recompute, "naive_torch": naive,
         "liger_kernel": liger_kernel, "trl_chunked_logprob": trl_op}


def make_setup(methods, skip_naive_over_tokens: int, vocab: int = VOCAB, dtype: torch.dtype = torch.bfloat16):
    """``setup({"loss", "shape", "rows", "seq", "hidden"}) -> Case``; one shape's inputs and floors serve every loss."""
    cache: dict[str, Any] = {}

    def setup(shape: dict) -> _runner.Case:
        if cache.get("key") != shape["shape"]:
            cache.clear()
            x = _runner.token_inputs(shape["rows"], shape["seq"], shape["hidden"], vocab, dtype=dtype, reference=True)
            floor = _runner.floor_valid_ms(x.n_valid, shape["hidden"], vocab, dtype)
            ref_fwd = _runner.floor_valid_ms(x.n_valid, shape["hidden"], vocab, dtype, forward_only=True)
            cache.update(key=shape["shape"], x=x, floor=floor, ref_fwd=ref_fwd)
        x, loss = cache["x"], shape["loss"]
        arms: dict[str, Callable[[], None] | str] = {}
        for name in methods:
            if name == "naive_torch" and shape["rows"] * shape["seq"] > skip_naive_over_tokens:
                arms[name] = "too large"
                continue
            try:
                arms[name] = PEERS[name](loss, x)
            except ImportError as exc:
                arms[name] = f"{exc.name or exc} not installed"
        floor = cache["floor"] + (cache["ref_fwd"] if loss in WITH_REFERENCE else 0.0)
        return _runner.Case(arms, grads=[x.hidden, x.weight], floor_ms=floor)

    return setup


def run(shapes, losses, methods, skip_naive_over_tokens: int) -> list[dict]:
    shape_rows = [{"loss": loss, "shape": f"{r}x{t} H={h}", "rows": r, "seq": t, "hidden": h}
                  for r, t, h in shapes for loss in losses]
    rows = _runner.run(shape_rows, make_setup(methods, skip_naive_over_tokens))
    for r in rows:
        for key in ("rows", "seq", "hidden"):
            r.pop(key, None)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="first shape only")
    parser.add_argument("--losses", nargs="*", default=list(LOSSES), choices=LOSSES)
    parser.add_argument("--methods", nargs="*", default=list(PEERS), choices=list(PEERS))
    parser.add_argument("--skip-naive-over-tokens", type=int, default=16384)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    shapes = SHAPES[:1] if args.quick else SHAPES
    rows = run(shapes, args.losses, args.methods, args.skip_naive_over_tokens)
    meta = _runner.run_meta(
        vocab=VOCAB, dtype="bf16", masked="first 25%",
        extra_memory="peak max_memory_allocated during one fwd+bwd - allocated before - bytes of returned grads",
        floor_valid="3 GEMMs over valid tokens (+1 forward GEMM for the reference in dpo and kto)",
    )
    _runner.save("preference_losses", rows, meta)
    _runner.plot("preference_losses", [r for r in rows if r["method"] != "floor_valid"], group=["loss", "shape"],
                 values=[("x_floor", "time / floor_valid")], title="fwd+bwd time / floor_valid (lower is better)")
    print(f"# {meta['gpu']}, torch {meta['torch']}; extra_gib = {meta['extra_memory']}")
    print(f"# floor_valid = {meta['floor_valid']}")
    _runner.print_table(rows, ["loss", "shape", "method", "ms", "x_floor", "extra_gib"])


if __name__ == "__main__":
    main()
