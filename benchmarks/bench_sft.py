"""SFT benchmark: the Hugging Face ``Trainer`` on three model shapes, unpatched vs Liger-Kernel vs liger_align.

Random weights at the Llama-3.2-1B, Qwen2-1.5B and Gemma-2B shapes (real vocabularies 128256, 151936,
256000), bf16 weights, AdamW (torch fused), gradient checkpointing, T=512 tokens per row (random ids,
each row 3/4 to all real tokens, the rest padding with ``attention_mask`` 0 and label -100), per-device
batch 8, 16, 32, 64. Arms:

- ``unpatched``: transformers as is;
- ``liger_kernel``: ``liger_kernel.transformers.apply_liger_kernel_to_<family>(model=model)`` (skipped when
  Liger-Kernel is not installed or has no function for the family; an error is recorded, not raised);
- ``ours``: ``liger_align.models.apply_liger_kernel(model)``.

Each (shape, arm) runs in its own subprocess (fresh CUDA memory) and loops over the batches in
ascending order; an out-of-memory is recorded as ``"OOM"`` and the larger batches of that arm are skipped.
Per batch a new ``Trainer`` runs ``--warmup`` + ``--steps`` optimizer steps measured by
``liger_align.utils.StepMeter`` (synchronised step time, non-padding tokens/s, peak allocated memory
reset after warm-up); the figures are the measured steps' median step time, tokens/s and peak.

    python benchmarks/bench_sft.py                                   # all, ~5 minutes on an H200
    python benchmarks/bench_sft.py --shapes llama-3.2-1b --batches 16 --arms unpatched ours
    python benchmarks/bench_sft.py --smoke                           # tiny shapes on the CPU, seconds

Writes ``bench_sft.json``, ``bench_sft_throughput.png`` and ``bench_sft_memory.png`` (one panel per shape,
three bars per batch) under ``--results-dir`` and prints a table with the ratios of the same run.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("unpatched", "liger_kernel", "ours", "ours_ce_only", "ours_layers_only")
# The ablation arms attribute ours' time and memory: the fused loss alone, or the layer kernels alone.
ABLATIONS = {
    "ours_ce_only": dict(rope=False, rms_norm=False, swiglu=False, geglu=False),
    "ours_layers_only": dict(fused_linear_cross_entropy=False),
}
GIB = 2**30

# The public configs' sizes (random weights). ``family`` is transformers' model_type.
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
        "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "tie_word_embeddings": True,
    },
    "qwen2-1.5b": {
        "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
        "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2, "head_dim": 128,
        "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": True, "use_sliding_window": False,
    },
    "gemma-2b": {
        "model_type": "gemma", "vocab_size": 256000, "hidden_size": 2048, "intermediate_size": 16384,
        "num_hidden_layers": 18, "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 256,
        "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "tie_word_embeddings": True,
    },
}
SMOKE_SIZES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "head_dim": 16}


def shape_config(name: str, smoke: bool) -> Any:
    """The transformers config of shape ``name``; ``smoke``: 2 layers of hidden 64 and a vocabulary of ~1000."""
    from transformers import AutoConfig

    settings = dict(SHAPES[name])
    model_type = settings.pop("model_type")
    if smoke:
        settings.update(SMOKE_SIZES, vocab_size=settings["vocab_size"] // 128 + 7)
    return AutoConfig.for_model(model_type, bos_token_id=1, eos_token_id=2, pad_token_id=0, **settings)


# ------------------------------------------------------------------------------------------- worker


class RandomRows:
    """Row ``i``: ``T`` random token ids of which the first ``3T/4 .. T`` are real (same rows in every arm)."""

    def __init__(self, rows: int, seq_len: int, vocab: int) -> None:
        self.rows, self.seq_len, self.vocab = rows, seq_len, vocab

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        gen = torch.Generator().manual_seed(1000 + i)
        ids = torch.randint(3, self.vocab, (self.seq_len,), generator=gen)
        n = int(torch.randint(3 * self.seq_len // 4, self.seq_len + 1, (), generator=gen))
        mask = torch.arange(self.seq_len) < n
        return {"input_ids": ids.masked_fill(~mask, 0), "attention_mask": mask.long(),
                "labels": ids.masked_fill(~mask, -100)}


def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    return {key: torch.stack([r[key] for r in rows]) for key in rows[0]}


def patch(model: Any, arm: str, model_type: str) -> dict[str, Any]:
    """Apply ``arm``'s patch to ``model``; what was done, or ``{"error": ...}`` (the arm is then skipped)."""
    if arm == "unpatched":
        return {"patched": "nothing"}
    if arm == "ours" or arm in ABLATIONS:
        sys.path.insert(0, str(ROOT))
        from liger_align.models import apply_liger_kernel

        handle = apply_liger_kernel(model, **ABLATIONS.get(arm, {}))
        return {"patched": handle.summary(), "family": getattr(handle, "family", None)}
    import importlib.metadata

    try:
        import liger_kernel.transformers as lk
    except Exception as error:  # ImportError, or a broken install
        return {"error": f"liger_kernel not importable: {type(error).__name__}: {error}"}
    try:
        version = importlib.metadata.version("liger-kernel")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown version"
    fn = getattr(lk, f"apply_liger_kernel_to_{model_type}", None)
    if fn is None:
        return {"error": f"Liger-Kernel {version} has no apply_liger_kernel_to_{model_type}: unsupported model type",
                "unsupported": True, "liger_kernel": version}
    try:
        fn(model=model)  # 0.8.x: (rope, cross_entropy, fused_linear_cross_entropy, rms_norm, swiglu|geglu, model)
    except Exception as error:
        return {"error": f"apply_liger_kernel_to_{model_type}(model=...) failed: {type(error).__name__}: {error}",
                "liger_kernel": version}
    return {"patched": f"apply_liger_kernel_to_{model_type}(model=model)", "liger_kernel": version}


def _is_oom(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def run_batch(model: Any, batch: int, opts: argparse.Namespace, device: str, out_dir: Path) -> dict[str, Any]:
    """One Trainer run at ``batch`` rows per step; the StepMeter's figures (raises on OOM)."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from liger_align.utils import StepMeterCallback

    cuda = device == "cuda"
    fused = cuda and "fused" in inspect.signature(torch.optim.AdamW).parameters
    args = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=batch, max_steps=opts.warmup + opts.steps,
        learning_rate=1e-5, optim="adamw_torch_fused" if fused else "adamw_torch", bf16=cuda, use_cpu=not cuda,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False, seed=0, lr_scheduler_type="constant",
    )
    meter = StepMeterCallback(warmup_steps=opts.warmup)
    callbacks: list[Any] = [meter]
    if opts.simulate_oom_batch == batch:  # checks the OOM path on a CPU (--smoke)

        class RaiseOOM(TrainerCallback):
            def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated by --simulate-oom-batch)")

        callbacks.append(RaiseOOM())
    before = torch.cuda.memory_allocated() / GIB if cuda else None  # the weights only, if the last run was freed
    data = RandomRows(batch * (opts.warmup + opts.steps), opts.seq_len, model.config.vocab_size)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=callbacks)
    try:
        trainer.train()
        summary = meter.summary()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    finally:
        trainer.optimizer = trainer.lr_scheduler = None
        del trainer
        model.zero_grad(set_to_none=True)
    return {
        "status": "ok", "median_step_s": summary["median_step_s"], "tokens_per_s": summary["tokens_per_s"],
        "peak_allocated_gib": summary["peak_allocated_mib"] / 1024,
        "peak_reserved_gib": summary["peak_reserved_mib"] / 1024,
        "allocated_before_gib": before, "memory_kind": summary["memory_kind"],
        "tokens_per_step": [r["tokens"] for r in meter.meter.records],
        "step_s_all": [r["step_s"] for r in meter.meter.records], "losses": losses,
    }


def worker(opts: argparse.Namespace) -> None:
    """Run one (shape, arm) over ``opts.batches``; rewrite ``opts.worker_out`` after every batch."""
    import gc

    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(ROOT))
    device = "cpu" if opts.smoke or not torch.cuda.is_available() else "cuda"
    config = shape_config(opts.shape, opts.smoke)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    head = {"shape": opts.shape, "model_type": config.model_type, "arm": opts.arm, "seq_len": opts.seq_len,
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)",
            "params": sum(p.numel() for p in model.parameters()), **patch(model, opts.arm, config.model_type)}
    rows: list[dict[str, Any]] = []
    stop: str | None = head.get("error") and "skipped"
    for batch in opts.batches:
        row = {**{k: head[k] for k in ("shape", "model_type", "arm")}, "batch": batch}
        if stop:
            row["status"] = stop
        else:
            try:
                row.update(run_batch(model, batch, opts, device, Path(opts.worker_out).parent / "run"))
            except Exception as error:  # noqa: BLE001 - recorded; an OOM ends this arm's larger batches
                row.update(status="OOM" if _is_oom(error) else "error", error=f"{type(error).__name__}: {error}"[:2000])
                stop = "skipped after OOM" if row["status"] == "OOM" else "skipped after error"
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        Path(opts.worker_out).write_text(json.dumps({"arm": head, "rows": rows}))
        print(f"[{opts.shape}/{opts.arm}/{batch}] {row['status']} "
              f"{row.get('tokens_per_s') or ''} {row.get('peak_allocated_gib') or ''}", flush=True)


# ------------------------------------------------------------------------------------------- driver


def run_all(opts: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every (shape, arm) in a fresh subprocess; returns (arms, rows)."""
    import importlib.util

    tmp = Path(tempfile.mkdtemp(prefix="bench_sft_"))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")])}
    arms, rows = [], []
    began_all = time.time()
    for shape in opts.shapes:
        for arm in opts.arms:
            base = {"shape": shape, "model_type": SHAPES[shape]["model_type"], "arm": arm}
            left = opts.budget_s - (time.time() - began_all)
            if left < 20:
                arms.append({**base, "error": f"not run: --budget-s {opts.budget_s} spent"})
                rows += [{**base, "batch": b, "status": "not run"} for b in opts.batches]
                continue
            if arm == "liger_kernel" and importlib.util.find_spec("liger_kernel") is None:
                arms.append({**base, "error": "liger_kernel is not installed"})
                rows += [{**base, "batch": b, "status": "skipped"} for b in opts.batches]
                continue
            out = tmp / f"{shape}-{arm}.json"
            cmd = [sys.executable, __file__, "--worker", "--shape", shape, "--arm", arm, "--worker-out", str(out),
                   "--batches", *map(str, opts.batches), "--warmup", str(opts.warmup), "--steps", str(opts.steps),
                   "--seq-len", str(opts.seq_len), "--simulate-oom-batch", str(opts.simulate_oom_batch)]
            began = time.time()
            try:
                proc = subprocess.run(cmd + (["--smoke"] if opts.smoke else []), env=env, capture_output=True,
                                      text=True, timeout=min(opts.timeout, left))
                failure = None if proc.returncode == 0 else (proc.stdout[-1000:] + proc.stderr[-3000:]).strip()
            except subprocess.TimeoutExpired:
                failure = f"timed out after {min(opts.timeout, left):.0f} s"
            done = json.loads(out.read_text()) if out.exists() else {"arm": dict(base), "rows": []}
            measured = {r["batch"] for r in done["rows"]}
            done["rows"] += [{**base, "batch": b, "status": "crashed" if failure else "missing"}
                             for b in opts.batches if b not in measured]
            if failure:
                done["arm"]["crash"] = failure
                print(f"[{shape}/{arm}] FAILED:\n{failure}", file=sys.stderr)
            done["arm"]["wall_s"] = time.time() - began
            print(f"[{shape}/{arm}] {done['arm']['wall_s']:.0f} s: " + ", ".join(
                f"{r['batch']}={r['status']}" for r in done["rows"]), flush=True)
            arms.append(done["arm"])
            rows += done["rows"]
    return arms, rows


def _get(rows: list[dict[str, Any]], shape: str, arm: str, batch: int) -> dict[str, Any]:
    return next((r for r in rows if (r["shape"], r["arm"], r["batch"]) == (shape, arm, batch)), {})


def _ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> str:
    return f"{a[key] / b[key]:.2f}" if a.get("status") == b.get("status") == "ok" and b.get(key) else "-"


def largest_fit(rows: list[dict[str, Any]], shape: str, arm: str) -> int | None:
    fits = [r["batch"] for r in rows if (r["shape"], r["arm"], r["status"]) == (shape, arm, "ok")]
    return max(fits, default=None)


def _arms_in(rows: list[dict[str, Any]]) -> list[str]:
    """The arms that ran, in ``ARMS`` order."""
    present = {r["arm"] for r in rows}
    return [arm for arm in ARMS if arm in present]


def table(arms: list[dict[str, Any]], rows: list[dict[str, Any]], batches: list[int]) -> str:
    """Per shape and batch: each arm's s/step, tokens/s, GiB; ours/Liger and ours/unpatched ratios."""
    ran = _arms_in(rows)
    lines = [f"{'shape':13} {'batch':>5}  " + "  ".join(f"{a:>26}" for a in ran)
             + f"  {'tok/s ours/LK':>13} {'ours/unp':>8} {'mem ours/LK':>11} {'ours/unp':>8}"]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for batch in batches:
            cells = []
            for arm in ran:
                r = _get(rows, shape, arm, batch)
                cells.append(f"{r['median_step_s']:.3f}s {r['tokens_per_s']:7.0f}/s {r['peak_allocated_gib']:5.1f}G"
                             if r.get("status") == "ok" else r.get("status", "-"))
            ours, lk, unp = (_get(rows, shape, arm, batch) for arm in ("ours", "liger_kernel", "unpatched"))
            mem = "peak_allocated_gib"
            lines.append(f"{shape:13} {batch:>5}  " + "  ".join(f"{c:>26}" for c in cells)
                         + f"  {_ratio(ours, lk, 'tokens_per_s'):>13} {_ratio(ours, unp, 'tokens_per_s'):>8}"
                         + f" {_ratio(ours, lk, mem):>11} {_ratio(ours, unp, mem):>8}")
        fits = {arm: largest_fit(rows, shape, arm) for arm in ran}
        top = max(batches)
        text = ", ".join(f"{arm} {'none' if b is None else (f'>={b}' if b == top else b)}" for arm, b in fits.items())
        ratio = f"{fits['ours'] / fits['unpatched']:.2f}" if fits.get("ours") and fits.get("unpatched") else "-"
        lines.append(f"{shape:13} largest batch that fits: {text}; ours/unpatched {ratio}"
                     + (" (lower bound: the largest batch tried fits)" if fits.get("ours") == top else ""))
        diffs = [abs(a - b) / abs(b) for batch in batches
                 for a, b in zip(_get(rows, shape, "ours", batch).get("losses", []),
                                 _get(rows, shape, "unpatched", batch).get("losses", []))]
        if diffs:
            lines.append(f"{shape:13} training loss, ours vs unpatched: max relative difference {max(diffs):.2e}")
    unsupported = sorted({a["model_type"] for a in arms if a.get("unsupported")})
    if unsupported:
        lines.append(f"Liger-Kernel has no patch for model types {unsupported}: that arm is skipped there")
    for arm in arms:
        if arm.get("error") or arm.get("crash"):
            lines.append(f"note {arm['shape']}/{arm['arm']}: {arm.get('error') or arm.get('crash')[-300:]}")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], results_dir: Path, batches: list[int], meta: dict[str, Any]) -> list[Path]:
    """Throughput and peak-memory bar charts: one panel per shape, one bar per arm at each batch size."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG", file=sys.stderr)
        return []
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    colors = {"unpatched": "#9e9e9e", "liger_kernel": "#1565c0", "ours": "#2e7d32", "ours_ce_only": "#81c784",
              "ours_layers_only": "#c5e1a5"}
    ran = _arms_in(rows)
    paths = []
    for key, label, name in (("tokens_per_s", "non-padding tokens/s", "throughput"),
                             ("peak_allocated_gib", "peak allocated GiB", "memory")):
        fig, axes = plt.subplots(1, len(shapes), figsize=(4.6 * len(shapes), 3.8), squeeze=False)
        for ax, shape in zip(axes[0], shapes):
            width = 0.8 / len(ran)
            for i, arm in enumerate(ran):
                for j, batch in enumerate(batches):
                    r = _get(rows, shape, arm, batch)
                    x = j + (i - (len(ran) - 1) / 2) * width
                    if r.get("status") == "ok":
                        ax.bar(x, r[key], width, color=colors[arm], label=arm if j == 0 else None)
                    elif r.get("status") == "OOM":
                        ax.text(x, 0, "OOM", rotation=90, ha="center", va="bottom", fontsize=7, color=colors[arm])
            ax.set_xticks(range(len(batches)), [str(b) for b in batches])
            ax.set_xlabel("per-device batch (rows of %d tokens)" % meta["seq_len"])
            ax.set_title(shape, fontsize=10)
            ax.set_ylabel(label)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"HF Trainer SFT, bf16, AdamW, grad. checkpointing, {meta.get('device', '')}", fontsize=10)
        fig.tight_layout()
        path = results_dir / f"bench_sft_{name}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS[:3]))
    parser.add_argument("--batches", nargs="+", type=int, default=[8, 16, 32, 64])
    parser.add_argument("--warmup", type=int, default=2, help="warm-up optimizer steps per batch size")
    parser.add_argument("--steps", type=int, default=5, help="measured optimizer steps per batch size")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--timeout", type=int, default=150, help="seconds per (shape, arm) subprocess")
    parser.add_argument("--budget-s", type=int, default=540, help="no new subprocess after this many seconds")
    parser.add_argument("--results-dir", default=None, help="default benchmarks/results (--smoke: a temp dir)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script only")
    parser.add_argument("--simulate-oom-batch", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shape", choices=list(SHAPES), help=argparse.SUPPRESS)
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.smoke and opts.seq_len == 512:
        opts.seq_len = 64
    if opts.worker:
        worker(opts)
        return
    bad = [b for b in opts.batches if b <= 0]
    if bad or opts.warmup < 0 or opts.steps <= 0 or opts.seq_len <= 0:
        parser.error(f"--batches, --steps, --seq-len must be positive and --warmup >= 0 (got batches {opts.batches}, "
                     f"warmup {opts.warmup}, steps {opts.steps}, seq-len {opts.seq_len})")
    opts.batches = sorted(set(opts.batches))
    results_dir = Path(opts.results_dir or (tempfile.mkdtemp(prefix="bench_sft_smoke_") if opts.smoke
                                            else ROOT / "benchmarks" / "results"))
    results_dir.mkdir(parents=True, exist_ok=True)
    began = time.time()
    arms, rows = run_all(opts)
    device = next((a["device"] for a in arms if a.get("device")), "")
    meta = {k: getattr(opts, k) for k in ("shapes", "arms", "batches", "warmup", "steps", "seq_len", "smoke")}
    meta.update(device=device, wall_s=time.time() - began, shapes_config=SHAPES)
    path = results_dir / "bench_sft.json"
    path.write_text(json.dumps({"meta": meta, "arms": arms, "rows": rows}, indent=1))
    print(f"wrote {path}")
    for png in plot(rows, results_dir, opts.batches, meta):
        print(f"wrote {png}")
    print(table(arms, rows, opts.batches))
    print(f"total wall time {meta['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
