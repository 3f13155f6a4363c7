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

Writes ``bench_sft.json`` (``{"meta", "rows"}``, the runs per arm in ``meta["arm_runs"]``; ratios
``tokens_per_s_x_unpatched`` etc. per row), ``bench_sft_throughput.png`` and ``bench_sft_memory.png`` (one bar per arm
at each shape and batch) under ``--results-dir`` and prints a table with the ratios of the same run.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import _runner  # noqa: E402
from _models import SHAPES as MODEL_SHAPES  # noqa: E402
from _models import model_config  # noqa: E402
from _workers import is_oom, run_worker  # noqa: E402

ARMS = ("unpatched", "liger_kernel", "ours", "ours_ce_only", "ours_layers_only")
# The ablation arms attribute ours' time and memory: the fused loss alone, or the layer kernels alone.
ABLATIONS = {
    "ours_ce_only": dict(rope=False, rms_norm=False, swiglu=False, geglu=False),
    "ours_layers_only": dict(fused_linear_cross_entropy=False),
}
# The public configs' sizes (random weights), from ``_models``; ``model_type`` is transformers' family.
SHAPES: dict[str, dict[str, Any]] = {name: MODEL_SHAPES[name] for name in ("llama-3.2-1b", "qwen2-1.5b", "gemma-2b")}


def shape_config(name: str, smoke: bool) -> Any:
    """The transformers config of shape ``name``; ``smoke``: 2 layers of hidden 64 and a vocabulary of ~1000."""
    extra = {"vocab_size": SHAPES[name]["vocab_size"] // 128 + 7} if smoke else {}
    return model_config(name, smoke=smoke, bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra)


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
    # the weights only, if the last run was freed
    before = torch.cuda.memory_allocated() / _runner.GIB if cuda else None
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
                row.update(status="OOM" if is_oom(error) else "error", error=f"{type(error).__name__}: {error}"[:2000])
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
            args = ["--shape", shape, "--arm", arm, "--batches", *map(str, opts.batches), "--warmup",
                    str(opts.warmup), "--steps", str(opts.steps), "--seq-len", str(opts.seq_len),
                    "--simulate-oom-batch", str(opts.simulate_oom_batch)] + (["--smoke"] if opts.smoke else [])
            done, failure, wall = run_worker(__file__, args, tmp / f"{shape}-{arm}.json",
                                             timeout=min(opts.timeout, left))
            done = done or {"arm": dict(base), "rows": []}
            measured = {r["batch"] for r in done["rows"]}
            done["rows"] += [{**base, "batch": b, "status": "crashed" if failure else "missing"}
                             for b in opts.batches if b not in measured]
            if failure:
                done["arm"]["crash"] = failure
                print(f"[{shape}/{arm}] FAILED:\n{failure}", file=sys.stderr)
            done["arm"]["wall_s"] = wall
            print(f"[{shape}/{arm}] {wall:.0f} s: " + ", ".join(
                f"{r['batch']}={r['status']}" for r in done["rows"]), flush=True)
            arms.append(done["arm"])
            rows += done["rows"]
    return arms, rows


def _get(rows: list[dict[str, Any]], shape: str, arm: str, batch: int) -> dict[str, Any]:
    return next((r for r in rows if (r["shape"], r["arm"], r["batch"]) == (shape, arm, batch)), {})


def largest_fit(rows: list[dict[str, Any]], shape: str, arm: str) -> int | None:
    fits = [r["batch"] for r in rows if (r["shape"], r["arm"], r["status"]) == (shape, arm, "ok")]
    return max(fits, default=None)


def table(arms: list[dict[str, Any]], rows: list[dict[str, Any]], batches: list[int]) -> None:
    """Print per (shape, batch, arm): s/step, tokens/s, peak GiB and the ratios to unpatched and Liger-Kernel."""
    _runner.print_table(rows, ["shape", "batch", "arm", "status", "median_step_s", "tokens_per_s", "peak_allocated_gib",
                               *RATIOS])
    present = {r["arm"] for r in rows}
    ran = [arm for arm in ARMS if arm in present]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        fits = {arm: largest_fit(rows, shape, arm) for arm in ran}
        top = max(batches)
        text = ", ".join(f"{arm} {'none' if b is None else (f'>={b}' if b == top else b)}" for arm, b in fits.items())
        ratio = f"{fits['ours'] / fits['unpatched']:.2f}" if fits.get("ours") and fits.get("unpatched") else "-"
        print(f"{shape:13} largest batch that fits: {text}; ours/unpatched {ratio}"
              + (" (lower bound: the largest batch tried fits)" if fits.get("ours") == top else ""))
        diffs = [abs(a - b) / abs(b) for batch in batches
                 for a, b in zip(_get(rows, shape, "ours", batch).get("losses", []),
                                 _get(rows, shape, "unpatched", batch).get("losses", []))]
        if diffs:
            print(f"{shape:13} training loss, ours vs unpatched: max relative difference {max(diffs):.2e}")
    unsupported = sorted({a["model_type"] for a in arms if a.get("unsupported")})
    if unsupported:
        print(f"Liger-Kernel has no patch for model types {unsupported}: that arm is skipped there")
    for arm in arms:
        if arm.get("error") or arm.get("crash"):
            print(f"note {arm['shape']}/{arm['arm']}: {arm.get('error') or arm.get('crash')[-300:]}")


RATIOS = {f"{key}_x_{arm}": (arm, key) for arm in ("unpatched", "liger_kernel")
          for key in ("tokens_per_s", "peak_allocated_gib")}


def plot(rows: list[dict[str, Any]], results_dir: Path, batches: list[int], meta: dict[str, Any]) -> list[Path]:
    """Throughput and peak-memory bar charts: one group per (shape, batch), one bar per arm; OOM marked."""
    shown = [r if r.get("status") == "ok" else
             dict(r, tokens_per_s=r.get("status"), peak_allocated_gib=r.get("status")) for r in rows
             if r["batch"] in batches]
    paths = []
    for key, label, name in (("tokens_per_s", "non-padding tokens/s", "throughput"),
                             ("peak_allocated_gib", "peak allocated GiB", "memory")):
        path = _runner.plot(results_dir / f"bench_sft_{name}.png", shown, group=["shape", "batch"], method="arm",
                            values=[(key, label)], annotate={key: f"{key}_x_unpatched"}, ref_line=None,
                            title=f"HF Trainer SFT, T={meta['seq_len']}, bf16, AdamW, grad. checkpointing, "
                                  f"{meta.get('gpu', '')}; x = per-device batch")
        paths += [path] if path else []
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
    meta = _runner.run_meta(**{k: getattr(opts, k) for k in ("shapes", "arms", "batches", "warmup", "steps",
                                                              "seq_len", "smoke")})
    meta.update(device=next((a["device"] for a in arms if a.get("device")), ""), wall_s=time.time() - began,
                shapes_config=SHAPES, arm_runs=arms)
    _runner.add_ratios(rows, keys=["shape", "batch"], ratios=RATIOS, method="arm")
    path = _runner.save("bench_sft", rows, meta, results_dir=results_dir)
    print(f"wrote {path}")
    for png in plot(rows, results_dir, opts.batches, meta):
        print(f"wrote {png}")
    table(arms, rows, opts.batches)
    print(f"total wall time {meta['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
