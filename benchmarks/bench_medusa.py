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
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import _common  # noqa: E402

from liger_align.kernels import fused_linear_cross_entropy  # noqa: E402
from liger_align.losses.medusa import fused_linear_medusa_loss, tensor_head  # noqa: E402
from liger_align.models.medusa import MedusaHeads, add_medusa_heads, medusa_heads  # noqa: E402
from liger_align.utils import StepMeter  # noqa: E402

VOCAB = 128256
GIB = 2**30


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


def loss_methods(hidden, labels, w0, heads, weights, *, cuda: bool) -> dict[str, Callable[[], Any]]:
    """fwd+bwd closures of the multi-head loss."""
    runners = [tensor_head(w0), *(functools.partial(lambda h, rows, fn: h(rows, fn), h) for h in heads)]
    length = hidden.shape[1]
    methods = {
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
    if cuda:
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            liger = LigerFusedLinearCrossEntropyLoss()
            methods["liger_kernel_per_head"] = lambda: per_head(lambda x, w, t: liger(w, x, t))
        except ImportError:
            print("liger_kernel is not installed: liger_kernel_per_head skipped", file=sys.stderr)
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

    return time_ms(gemms, [])  # the buffers are freed on return


def time_ms(fn: Callable[[], Any], grads: list[torch.Tensor]) -> float:
    """Median ms: ``triton.testing.do_bench`` on CUDA; on CPU (smoke) the median of 3 timed runs."""
    if torch.cuda.is_available():
        return _common.bench_ms(fn, grads, warmup=25, rep=150)
    times = []
    for _ in range(3):
        for t in grads:
            t.grad = None
        began = time.perf_counter()
        fn()
        times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def extra_gib(fn: Callable[[], Any], grads: list[torch.Tensor]) -> float:
    return _common.peak_extra_gib(fn, grads) if torch.cuda.is_available() else math.nan


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
    grads = [hidden, w0, *heads.parameters()]
    shape = f"{rows}x{length} H={size} K={num_heads}"
    floor = floor_ms(valid_rows, size, vocab, 1, dtype, device)
    out = [dict(part="loss", shape=shape, method="floor", ms=floor, x_floor=1.0, extra_gib=0.0)]
    for name, fn in loss_methods(hidden, labels, w0, heads, weights, cuda=device == "cuda").items():
        row = dict(part="loss", shape=shape, method=name)
        try:
            row["extra_gib"] = extra_gib(fn, grads)
            row["ms"] = time_ms(fn, grads)
            row["x_floor"] = row["ms"] / floor
        except torch.OutOfMemoryError:
            row["ms"] = "OOM"
        except Exception as exc:  # a peer failing is recorded, not fatal
            row["ms"] = f"failed: {type(exc).__name__}: {exc}"[:120]
        for t in grads:
            t.grad = None
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        out.append(row)
    by = {r["method"]: r for r in out}
    naive, ours = by.get("naive_torch", {}), by["liger_align"]
    if isinstance(naive.get("extra_gib"), float) and naive["extra_gib"] > 0:
        for r in out:
            if isinstance(r.get("extra_gib"), float):
                r["x_naive_memory"] = r["extra_gib"] / naive["extra_gib"]
    liger = by.get("liger_kernel_per_head", {})
    if isinstance(liger.get("ms"), float) and isinstance(ours.get("ms"), float):
        ours["x_liger_kernel_time"] = ours["ms"] / liger["ms"]
    return out


# ------------------------------------------------------------------------------------------- the training step


def llama_1b(smoke: bool) -> Any:
    from transformers import LlamaConfig

    hidden, inter, layers, heads, kv, vocab = (64, 128, 2, 4, 2, 1000) if smoke else (2048, 8192, 16, 32, 8, VOCAB)
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads, hidden_act="silu",
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


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


def plot_training(rows: list[dict], name: str) -> Path | None:
    """4 x 2 panels: rows (stage, K), columns peak memory and tokens/s; x = T, OOM marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    combos = sorted({(r["stage"], r["heads"]) for r in rows})
    lengths = sorted({r["seq"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(len(combos), 2, figsize=(10, 2.6 * len(combos)), squeeze=False)
    width = 0.8 / len(methods)
    for i, (stage, heads) in enumerate(combos):
        for j, (key, label) in enumerate((("peak_gib", "peak memory (GiB)"), ("tokens_per_s", "tokens/s"))):
            ax = axes[i][j]
            for m, method in enumerate(methods):
                for x, length in enumerate(lengths):
                    match = [r for r in rows if (r["stage"], r["heads"], r["seq"], r["method"]) ==
                             (stage, heads, length, method)]
                    if not match:
                        continue
                    value = match[0].get(key)
                    pos = x + (m - (len(methods) - 1) / 2) * width
                    if isinstance(value, float):
                        ax.bar(pos, value, width, color=f"C{m}", label=method if x == 0 else None)
                    else:
                        ax.text(pos, 0, "OOM", ha="center", va="bottom", fontsize=7, color=f"C{m}", rotation=90)
            ax.set_xticks(range(len(lengths)), [str(t) for t in lengths], fontsize=8)
            ax.set_title(f"stage {stage}, K={heads}: {label}", fontsize=9)
            ax.set_xlabel("sequence length T", fontsize=8)
            ax.legend(fontsize=7)
    fig.tight_layout()
    _common.RESULTS.mkdir(parents=True, exist_ok=True)
    path = _common.RESULTS / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    if opts.results_dir is not None:
        _common.RESULTS = opts.results_dir
    elif opts.smoke:
        _common.RESULTS = Path(tempfile.mkdtemp(prefix="bench_medusa_"))
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
    meta = dict(gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", torch=torch.__version__,
                smoke=opts.smoke, masked="first 25% of each row", seconds=time.perf_counter() - began)
    path = _common.save_results("medusa", rows, meta)
    loss_rows = [r for r in rows if r["part"] == "loss" and r["method"] != "floor"]
    if loss_rows:
        _common.plot_ratios("medusa_loss", loss_rows, group="shape", method="method", value="x_floor",
                            title="Medusa loss fwd+bwd time / floor (lower is better)")
    train_rows = [r for r in rows if r["part"] == "training"]
    if train_rows:
        plot_training(train_rows, "medusa_training")
    print(f"\n# {meta['gpu']}, torch {meta['torch']}, {meta['seconds']:.0f} s; results in {path.parent}")
    if loss_rows:
        print_loss(rows)
    if train_rows:
        _common.print_table(train_rows, ["heads", "stage", "seq", "batch", "method", "tokens_per_s", "peak_gib",
                                         "step_ms", "x_naive_throughput", "x_naive_memory"])


def print_loss(rows: list[dict]) -> None:
    print("\n# loss alone: extra = peak beyond inputs and returned grads; x_floor = time / floor")
    _common.print_table([r for r in rows if r["part"] == "loss"],
                        ["shape", "method", "ms", "x_floor", "extra_gib", "x_naive_memory", "x_liger_kernel_time"])


if __name__ == "__main__":
    main()
