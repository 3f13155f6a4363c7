"""Medusa benchmark (GPU): the fused multi-head loss alone, and a Medusa training step, against the naive path.

1. **Loss alone** (fwd+bwd, bf16): N = 8 x 1024 tokens (first 25% of each row masked), H = 4096,
   V = 128256, K = 5 Medusa heads of 1 ResBlock + the model's head, weights 1, 1, 0.8, 0.64, ...
   Methods: ``liger_align`` (:func:`fused_linear_medusa_loss`), ``liger_align_recompute`` (its low-memory
   strategy), ``fused_ce_per_head`` (the fused cross-entropy called per head on every position, ResBlocks
   in torch), ``naive_torch`` (Medusa's way: stacked ``(K+1, B, T, V)`` logits, fp32 log-softmax),
   ``liger_kernel_per_head`` (Liger-Kernel's fused linear cross-entropy per head, ResBlocks in torch;
   skipped when ``liger_kernel`` is not installed). **floor** = time of the 3 lm_head GEMMs of every
   head over its valid tokens plus the 3 GEMMs of every ResBlock over them, measured in the same run.
   Extra memory = peak beyond the inputs and the returned gradients.
2. **Training step**: Llama-3.2-1B shape (random weights, bf16, AdamW, gradient checkpointing in
   stage 2), K in {3, 5} heads, stage 1 (heads only, backbone under no_grad) and stage 2 (everything),
   T in {1024, 2048, 4096, 8192} at a fixed batch of ``--batch`` rows; ours (the model's Medusa forward)
   vs naive (backbone, then the naive loss above); tokens/s and peak allocated memory from
   :class:`liger_align.utils.StepMeter` (``--warmup`` + ``--steps`` steps); out-of-memory is recorded.

    python benchmarks/bench_medusa.py              # both parts, about 2-3 minutes on an H200
    python benchmarks/bench_medusa.py --part loss  # loss alone
    python benchmarks/bench_medusa.py --smoke      # tiny shapes on CPU, results in a temp folder

Writes ``medusa.json``, ``medusa_loss.png`` and ``medusa_training.png`` (4 x 2 panels: stage x K rows,
peak memory and throughput columns) under ``benchmarks/results`` (``--results-dir``); prints the tables.
"""

from __future__ import annotations

import argparse
import functools
import gc
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import _runner  # noqa: E402
from _models import model_config  # noqa: E402

from liger_align.kernels import fused_linear_cross_entropy  # noqa: E402
from liger_align.losses.medusa import fused_linear_medusa_loss, tensor_head  # noqa: E402
from liger_align.models.medusa import MedusaHeads, add_medusa_heads, medusa_heads  # noqa: E402
from liger_align.utils import StepMeter  # noqa: E402

VOCAB = 128256


def head_weights(num_heads: int, model_head: float = 1.0) -> list[float]:
    return [model_head] + [0.8 ** (k - 1) for k in range(1, num_heads + 1)]


# ------------------------------------------------------------------------------------------- the losses


def naive_medusa_loss(hidden: torch.Tensor, labels: torch.Tensor, model_head: torch.Tensor, heads: MedusaHeads,
                      weights: list[float]) -> torch.Tensor:
    """Medusa's own loss: every computed head's logits stacked ``(K', B, T, V)``, fp32 log-softmax per head."""
    active = [k for k, w in enumerate(weights) if w]
    logits = torch.stack([hidden @ model_head.t() if k == 0 else heads[k - 1](hidden) for k in active])
    total = hidden.new_zeros((), dtype=torch.float32)
    for i, k in enumerate(active):
        span = hidden.shape[1] - 1 - k
        ce = F.cross_entropy(logits[i, :, :span].float().reshape(-1, logits.shape[-1]), labels[:, 1 + k:].reshape(-1))
        total = total + weights[k] * ce
    return total


def resblocks(head, x: torch.Tensor) -> torch.Tensor:
    for index in range(head.num_layers):
        x = head[index](x)
    return x


def loss_methods(hidden, labels, w0, heads, weights, *, cuda: bool) -> dict[str, Callable[[], Any] | str]:
    """fwd+bwd closures of the multi-head loss."""
    runners = [tensor_head(w0), *(functools.partial(lambda h, rows, fn: h(rows, fn), h) for h in heads)]
    length = hidden.shape[1]
    methods: dict[str, Callable[[], Any] | str] = {
        "liger_align": lambda: fused_linear_medusa_loss(hidden, labels, runners, weights).loss.backward(),
        "liger_align_recompute": lambda: fused_linear_medusa_loss(
            hidden, labels, runners, weights, strategy="recompute").loss.backward(),
    }

    def per_head(ce: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        total = 0.0
        for k, w in enumerate(weights):
            x = hidden[:, : length - 1 - k]
            weight = w0 if k == 0 else heads[k - 1].proj.weight
            x = x if k == 0 else resblocks(heads[k - 1], x)
            total = total + w * ce(x.reshape(-1, x.shape[-1]), weight, labels[:, 1 + k:].reshape(-1))
        total.backward()

    methods["fused_ce_per_head"] = lambda: per_head(lambda x, w, t: fused_linear_cross_entropy(x, w, t))
    methods["naive_torch"] = lambda: naive_medusa_loss(hidden, labels, w0, heads, weights).backward()
    flce = _runner.optional("liger_kernel.transformers", "LigerFusedLinearCrossEntropyLoss") if cuda else "needs CUDA"
    if isinstance(flce, str):
        methods["liger_kernel_per_head"] = flce
    else:
        liger = flce()
        methods["liger_kernel_per_head"] = lambda: per_head(lambda x, w, t: liger(w, x, t))
    return methods


def floor_ms(valid_rows: list[int], hidden_size: int, vocab: int, layers: int, dtype, device) -> float:
    """Median ms of 3 GEMMs per head over its valid rows (lm_head) plus 3 per ResBlock (heads k >= 1)."""
    rows = max(valid_rows)
    a = torch.randn(rows, hidden_size, device=device, dtype=dtype)
    w = torch.randn(vocab, hidden_size, device=device, dtype=dtype)
    g = torch.randn(rows, vocab, device=device, dtype=dtype)
    r = torch.randn(hidden_size, hidden_size, device=device, dtype=dtype)

    def gemms() -> None:
        for k, m in enumerate(valid_rows):
            torch.mm(a[:m], w.t())
            torch.mm(g[:m], w)
            torch.mm(g[:m].t(), a[:m])
            for _ in range(layers if k else 0):
                torch.mm(a[:m], r.t())
                torch.mm(a[:m], r)
                torch.mm(a[:m].t(), a[:m])

    return _runner.measure(gemms, warmup_ms=25, rep_ms=150)  # the buffers are freed on return


def run_loss(smoke: bool) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows, length, size, vocab, num_heads = (2, 64, 64, 1000, 3) if smoke else (8, 1024, 4096, VOCAB, 5)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    hidden = torch.randn(rows, length, size, device=device, dtype=dtype).requires_grad_()
    w0 = (torch.randn(vocab, size, device=device) / size**0.5).to(dtype).requires_grad_()
    heads = MedusaHeads(size, vocab, num_heads, 1, dtype=dtype, device=device)
    heads.init_from(w0.detach())
    with torch.no_grad():
        for head in heads:
            head[0].linear.weight.normal_(0.0, 0.02 / size**0.5 * 8)
    labels = torch.randint(0, vocab, (rows, length), device=device)
    labels[:, : length // 4] = -100
    weights = head_weights(num_heads)
    valid_rows = [int((labels[:, 1 + k:] != -100).sum()) for k in range(num_heads + 1)]
    shape = {"part": "loss", "shape": f"{rows}x{length} H={size} K={num_heads}"}
    floor = floor_ms(valid_rows, size, vocab, 1, dtype, device)
    case = _runner.Case(loss_methods(hidden, labels, w0, heads, weights, cuda=device == "cuda"),
                        grads=[hidden, w0, *heads.parameters()], floor_ms=floor, floor_name="floor")
    out = _runner.run([shape], lambda _: case, warmup_ms=25, rep_ms=150, ratios={
        "x_floor": ("floor", "time"), "x_naive_memory": ("naive_torch", "extra_gib"),
        "x_liger_kernel_time": ("liger_kernel_per_head", "time")})
    return out


# ------------------------------------------------------------------------------------------- the training step


def llama_1b(smoke: bool) -> Any:
    """Llama-3.2-1B's shape (``_models``); ``smoke``: 2 layers of hidden 64, vocabulary 1000."""
    return model_config("llama-3.2-1b", smoke=smoke, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                        **({"vocab_size": 1000} if smoke else {}))


def train_steps(model, impl: str, stage: int, batch: int, length: int, steps: int, warmup: int) -> dict:
    """``warmup + steps`` optimizer steps of ``impl`` ('liger_align' or 'naive_torch'); the StepMeter summary."""
    lm_heads = medusa_heads(model)
    for name, p in model.named_parameters():
        p.requires_grad_(stage == 2 or name.startswith("medusa_head."))
    # transformers 5.24 renames gradient checkpointing to activation checkpointing; 5.17 has the old name only
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    enable() if stage == 2 else disable()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, foreach=True)
    weights = head_weights(lm_heads.num_heads, 1.0 if stage == 2 else 0.0)
    vocab = model.config.vocab_size
    device = model.lm_head.weight.device
    gen = torch.Generator(device=device).manual_seed(0)
    meter = StepMeter(warmup_steps=warmup, device=device)
    try:
        for _ in range(warmup + steps):
            ids = torch.randint(3, vocab, (batch, length), device=device, generator=gen)
            mask = torch.ones_like(ids)
            labels = ids.clone()
            labels[:, : length // 4] = -100
            meter.start_step()
            meter.add_tokens(int(mask.sum()))
            if impl == "liger_align":
                loss = model(input_ids=ids, attention_mask=mask, medusa_labels=labels, medusa_weights=weights,
                             medusa_freeze_backbone=stage == 1).loss
            else:
                with torch.no_grad() if stage == 1 else torch.enable_grad():
                    hidden = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                loss = naive_medusa_loss(hidden, labels, model.lm_head.weight, lm_heads, weights)
            loss.backward()
            del loss
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            meter.end_step()
        return meter.summary()
    finally:
        optimizer.zero_grad(set_to_none=True)
        del optimizer, params
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_training(smoke: bool, heads_list: list[int], lengths: list[int], batch: int, steps: int,
                 warmup: int) -> list[dict]:
    from transformers import LlamaForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = []
    for num_heads in heads_list:
        torch.manual_seed(0)
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16 if device == "cuda" else torch.float32)
        with torch.device(device):
            model = LlamaForCausalLM(llama_1b(smoke))
        torch.set_default_dtype(default)
        add_medusa_heads(model, num_heads, 1)
        for stage in (1, 2):
            for length in lengths:
                for impl in ("liger_align", "naive_torch"):
                    row = dict(part="training", heads=num_heads, stage=stage, seq=length, batch=batch, method=impl)
                    began = time.perf_counter()
                    try:
                        summary = train_steps(model, impl, stage, batch, length, steps, warmup)
                        row.update(tokens_per_s=summary["tokens_per_s"],
                                   peak_gib=summary["peak_allocated_mib"] / 1024,
                                   step_ms=summary["median_step_s"] * 1e3, memory_kind=summary["memory_kind"])
                    except torch.OutOfMemoryError:
                        row.update(tokens_per_s="OOM", peak_gib="OOM")
                    row["wall_s"] = time.perf_counter() - began
                    model.zero_grad(set_to_none=True)
                    gc.collect()
                    if device == "cuda":
                        torch.cuda.empty_cache()
                    out.append(row)
                    print(f"  K={num_heads} stage {stage} T={length} {impl}: {row.get('tokens_per_s')} tokens/s, "
                          f"{row.get('peak_gib')} GiB ({row['wall_s']:.1f} s)", flush=True)
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    for row in out:  # ratios to the naive path of the same configuration
        naive = next((r for r in out if r["method"] == "naive_torch" and
                      all(r[k] == row[k] for k in ("heads", "stage", "seq"))), None)
        if naive and isinstance(naive.get("tokens_per_s"), float) and isinstance(row.get("tokens_per_s"), float):
            row["x_naive_throughput"] = row["tokens_per_s"] / naive["tokens_per_s"]
            row["x_naive_memory"] = row["peak_gib"] / naive["peak_gib"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["loss", "training", "both"], default="both")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (or GPU), results in a temp folder")
    parser.add_argument("--heads", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2, help="measured optimizer steps per configuration")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--results-dir", type=Path, default=None)
    opts = parser.parse_args()
    results_dir = opts.results_dir or (Path(tempfile.mkdtemp(prefix="bench_medusa_")) if opts.smoke
                                       else _runner.RESULTS)
    if opts.smoke:  # unless given: one K, two short lengths, one measured step
        defaults = {"heads": [3], "seq": [32, 64], "batch": 2, "steps": 1}
        for key, value in defaults.items():
            if getattr(opts, key) == parser.get_default(key):
                setattr(opts, key, value)
    seq, batch = opts.seq, opts.batch
    began = time.perf_counter()
    rows: list[dict] = []
    if opts.part in ("loss", "both"):
        rows += run_loss(opts.smoke)
        print_loss(rows)
    if opts.part in ("training", "both"):
        rows += run_training(opts.smoke, opts.heads, seq, batch, opts.steps, opts.warmup)
    meta = _runner.run_meta(smoke=opts.smoke, masked="first 25% of each row", seconds=time.perf_counter() - began)
    path = _runner.save("medusa", rows, meta, results_dir=results_dir)
    loss_rows = [r for r in rows if r["part"] == "loss" and r["method"] != "floor"]
    if loss_rows:
        _runner.plot(results_dir / "medusa_loss.png", loss_rows, group=["shape"],
                     values=[("x_floor", "time / floor")], title="Medusa loss fwd+bwd time / floor (lower is better)")
    train_rows = [r for r in rows if r["part"] == "training"]
    if train_rows:
        _runner.plot(results_dir / "medusa_training.png", [dict(r, stage=f"stage {r['stage']}", heads=f"K={r['heads']}",
                                                                 seq=f"T={r['seq']}") for r in train_rows],
                     group=["stage", "heads", "seq"], ref_line=None,
                     values=[("peak_gib", "peak memory (GiB)"), ("tokens_per_s", "tokens/s")],
                     annotate={"peak_gib": "x_naive_memory", "tokens_per_s": "x_naive_throughput"},
                     title=f"Medusa training step, batch {batch}, {meta['gpu']}")
    print(f"\n# {meta['gpu']}, torch {meta['torch']}, {meta['seconds']:.0f} s; results in {path.parent}")
    if loss_rows:
        print_loss(rows)
    if train_rows:
        _runner.print_table(train_rows, ["heads", "stage", "seq", "batch", "method", "tokens_per_s", "peak_gib",
                                         "step_ms", "x_naive_throughput", "x_naive_memory"])


def print_loss(rows: list[dict]) -> None:
    print("\n# loss alone: extra = peak beyond inputs and returned grads; x_floor = time / floor")
    _runner.print_table([r for r in rows if r["part"] == "loss"],
                        ["shape", "method", "ms", "x_floor", "extra_gib", "x_naive_memory", "x_liger_kernel_time"])


if __name__ == "__main__":
    main()
