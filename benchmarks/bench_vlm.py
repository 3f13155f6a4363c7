"""Vision-language benchmark: Qwen2-VL-2B shape (random weights), SFT and DPO on images, one GPU.

Model: Qwen2-VL-2B's shape (text 1536 x 28 layers, 12 heads / 2 kv heads, SwiGLU 8960, tied head,
V = 151936; vision 32 blocks x 1280, 16 heads, patch 14, 2x2 merge), bf16 weights, bf16 autocast,
AdamW (``--optim``, default torch's fused AdamW: the multi-tensor one allocates a parameter-sized temporary
in its step, 4 GiB here, which would set every arm's peak), gradient checkpointing (non-reentrant).
Data: one 448 x 448 image per row (a 32 x 32 patch grid: 256 visual tokens), rows of exactly 514 tokens
(chat markers, 10 prompt words, the image, 240 answer tokens plus EOS; the loss covers the answer).
Arms, each in a fresh subprocess so its peak memory is its own:

- ``sft/hf``: the unpatched model with the Hugging Face ``Trainer`` (the collator of ``examples/vlm``);
- ``sft/liger_kernel``: Liger-Kernel's ``apply_liger_kernel_to_qwen2_vl(model=...)`` (skipped when
  ``liger_kernel`` is not installed);
- ``sft/liger_align``: ``liger_align.models.apply_liger_kernel_to_qwen2_vl(model=...)``;
- ``dpo/trl``: TRL's ``DPOTrainer``; ``dpo/liger_align``: ``LigerDPOTrainer`` (same pairs: the chosen and the
  rejected answer after the same image and prompt; ``--batch`` pairs = 2 x ``--batch`` sequences per step);
- ``--big-batch N`` adds ``sft/hf`` and ``sft/liger_align`` at batch N; from the two batch sizes the peak of
  each is fitted as ``a + b * batch`` and the largest batch the unpatched run fits on this GPU is reported
  with both peaks extrapolated there (marked as extrapolated, not measured).

After ``--warmup`` steps (Triton compilation, allocator growth, optimizer state) the ``StepMeter``
(``liger_align.utils``) measures ``--steps`` optimizer steps: synchronised median step time, non-padding
tokens/s of the trained model's forwards, and the peak allocated memory (reset after the warm-up). The
static part of the peak (weights + gradients + AdamW state, and the reference model's weights for DPO) is
reported beside it. Ratios are against ``sft/hf`` and ``dpo/trl`` of the same run.

    python benchmarks/bench_vlm.py                   # all arms, ~4 minutes on one H200
    python benchmarks/bench_vlm.py --only sft        # or: --only dpo
    python benchmarks/bench_vlm.py --smoke           # tiny shapes on the CPU, seconds: checks the script only

Writes ``bench_vlm.json`` (``{"meta", "rows"}``, the extrapolated fit in ``meta["largest_fit"]``) and
``bench_vlm.png`` under ``--results-dir`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import _runner  # noqa: E402
from _workers import is_oom, run_worker  # noqa: E402

VLM_EXAMPLES = ROOT / "examples" / "vlm"
ARMS = (("sft", "hf"), ("sft", "liger_kernel"), ("sft", "liger_align"), ("dpo", "trl"), ("dpo", "liger_align"))
BASELINE = {"sft": "hf", "dpo": "trl"}
GIB = _runner.GIB


# ------------------------------------------------------------------------------------------- worker


def qwen2_vl_2b_config(tokenizer: Any, *, smoke: bool) -> Any:
    """Qwen2-VL-2B's configuration (random weights; the tokenizer gives the special-token ids).

    ``smoke``: 2 text layers of 64 and 2 vision blocks of 32, same vocabulary.
    """
    from transformers import Qwen2VLConfig

    sys.path.insert(0, str(VLM_EXAMPLES))
    import vlm_embedded as embedded

    if smoke:
        text = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                            "mrope_section": [2, 3, 3]})
        vision = dict(depth=2, embed_dim=32, num_heads=4, hidden_size=64)
    else:
        text = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                    num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                            "mrope_section": [16, 24, 24]})
        vision = dict(depth=32, embed_dim=1280, num_heads=16, hidden_size=1536)
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", embedded.IMAGE_PAD), ("video_token_id", embedded.VIDEO_PAD),
        ("vision_start_token_id", embedded.VISION_START), ("vision_end_token_id", embedded.VISION_END))}
    return Qwen2VLConfig(
        text_config=dict(vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6, hidden_act="silu",
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None, **text),
        vision_config=dict(mlp_ratio=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                           hidden_act="quick_gelu", **vision),
        tie_word_embeddings=True, **ids,
    )


def synthetic_rows(n: int, *, image_side: int, prompt_words: int, answer_words: int, seed: int = 0) -> list[dict]:
    """``n`` rows of one ``image_side``-square picture, a prompt of ``prompt_words`` and two answers."""
    sys.path.insert(0, str(VLM_EXAMPLES))
    import vlm_embedded as embedded

    rng = random.Random(seed)
    words = [*embedded.COLOURS, *embedded.SHAPES, "a", "what", "is", "in", "the", "picture"]
    text = lambda k: " ".join(rng.choice(words) for _ in range(k))  # noqa: E731
    rows = []
    for i in range(n):
        colour, shape = rng.choice(list(embedded.COLOURS)), rng.choice(embedded.SHAPES)
        rows.append({"image": embedded.draw(colour, shape, (image_side, image_side), rng),
                     "prompt": text(prompt_words), "completion": text(answer_words),
                     "rejected": text(answer_words)})
    return rows


def build_trainer(opts: argparse.Namespace, out_dir: Path, device: str) -> tuple[Any, Any, int]:
    """(trainer, StepMeterCallback, static bytes) for ``opts.task`` / ``opts.impl`` at ``opts.batch``."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    sys.path[:0] = [str(ROOT), str(VLM_EXAMPLES)]
    import vlm_embedded as embedded
    from vlm_collator import VisionSFTCollator

    from liger_align.utils import StepMeterCallback

    smoke = device == "cpu"
    processor = embedded.build_processor()
    tokenizer = processor.tokenizer
    config = qwen2_vl_2b_config(tokenizer, smoke=smoke)
    side, prompt_words, answer_words = (56, 4, 20) if smoke else (448, 10, 240)
    steps = opts.warmup + opts.steps
    rows = synthetic_rows(opts.batch * (steps + 1), image_side=side, prompt_words=prompt_words,
                          answer_words=answer_words)
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration(config)
        ref = Qwen2VLForConditionalGeneration(config) if opts.task == "dpo" else None
    torch.set_default_dtype(default_dtype)
    if ref is not None:
        ref.load_state_dict(model.state_dict())
        ref.eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    # weights + gradients + AdamW's two moments, all bf16; the reference's weights for DPO
    static_bytes = 2 * n_params * 4 + (2 * n_params if ref is not None else 0)

    if opts.impl == "liger_kernel":
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2_vl as peer_patch

        peer_patch(model=model)
    elif opts.impl == "liger_align" and opts.task == "sft":
        from liger_align.models import apply_liger_kernel_to_qwen2_vl

        handle = apply_liger_kernel_to_qwen2_vl(model=model)
        print(f"liger_align: {handle.states}", flush=True)

    common = dict(
        output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=opts.batch, learning_rate=1e-6,
        logging_steps=1, report_to=[], save_strategy="no", bf16=True, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, optim="adamw_torch" if smoke else opts.optim,
        dataloader_num_workers=0 if smoke else 2, disable_tqdm=True, seed=0, use_cpu=smoke, remove_unused_columns=False,
    )
    meter = StepMeterCallback(warmup_steps=opts.warmup)
    if opts.task == "sft":
        from transformers import Trainer, TrainingArguments

        collator = VisionSFTCollator(tokenizer, processor.image_processor, max_length=None)
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=rows, data_collator=collator,
                          processing_class=tokenizer, callbacks=[meter])
        return trainer, meter, static_bytes
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from liger_align.trainers import LigerDPOTrainer

    pairs = Dataset.from_list([{
        "images": [r["image"]], "prompt": [{"role": "user", "content": r["prompt"]}],
        "chosen": [{"role": "assistant", "content": r["completion"]}],
        "rejected": [{"role": "assistant", "content": r["rejected"]}],
    } for r in rows])
    cls = LigerDPOTrainer if opts.impl == "liger_align" else DPOTrainer
    args = DPOConfig(max_length=None, **common)
    trainer = cls(model=model, ref_model=ref, args=args, train_dataset=pairs, processing_class=processor,
                  callbacks=[meter])
    if opts.impl == "liger_align":
        print(f"liger_align: {trainer.liger_patch_handles[0].states}", flush=True)
    return trainer, meter, static_bytes


def worker(opts: argparse.Namespace) -> None:
    """Run one arm and write its measurement as JSON to ``opts.worker_out``."""
    import torch

    device = "cpu" if opts.smoke or not torch.cuda.is_available() else "cuda"
    trainer, meter, static_bytes = build_trainer(opts, Path(opts.worker_out).parent / "run", device)
    batch = next(iter(trainer.get_train_dataloader()))
    shapes = {k: list(v.shape) for k, v in batch.items() if hasattr(v, "shape")}
    trainer.train()
    summary = meter.summary()
    cuda = device == "cuda"
    result = {
        "task": opts.task, "impl": opts.impl, "batch": opts.batch, "input_shapes": shapes,
        "step_s": summary["median_step_s"], "step_s_all": [r["step_s"] for r in meter.meter.records],
        "tokens_per_s": summary["tokens_per_s"],
        "peak_gib": summary["peak_allocated_mib"] / 1024 if cuda else 0.0,
        "static_gib": static_bytes / GIB,
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "device": torch.cuda.get_device_name() if cuda else "cpu (smoke)",
        "gpu_total_gib": torch.cuda.get_device_properties(0).total_memory / GIB if cuda else None,
        "torch": torch.__version__,
    }
    import transformers

    result["transformers"] = transformers.__version__
    Path(opts.worker_out).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------- driver


def peer_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def run_all(opts: argparse.Namespace) -> list[dict[str, Any]]:
    tmp = Path(tempfile.mkdtemp(prefix="bench_vlm_"))
    plan = [(task, impl, opts.batch) for task, impl in ARMS if task in opts.only]
    if opts.big_batch and "sft" in opts.only:
        plan += [("sft", "hf", opts.big_batch), ("sft", "liger_align", opts.big_batch)]
    results = []
    for task, impl, batch in plan:
        if impl == "liger_kernel" and not peer_available():
            results.append({"task": task, "impl": impl, "batch": batch, "skipped": "liger_kernel is not installed"})
            print(f"[{task}/{impl}] skipped: liger_kernel is not installed", flush=True)
            continue
        args = ["--task", task, "--impl", impl, "--batch", str(batch), "--warmup", str(opts.warmup), "--steps",
                str(opts.steps), "--optim", opts.optim] + (["--smoke"] if opts.smoke else [])
        res, failure, wall = run_worker(__file__, args, tmp / f"{task}-{impl}-{batch}.json", timeout=opts.timeout)
        if failure:
            res = {"task": task, "impl": impl, "batch": batch, "error": "out of memory" if is_oom(failure) else failure}
            print(f"[{task}/{impl}/b{batch}] FAILED:\n{failure}", file=sys.stderr, flush=True)
        res["wall_s"] = wall
        print(f"[{task}/{impl}/b{batch}] " + json.dumps({k: v for k, v in res.items() if k not in (
            "error", "step_s_all", "losses", "input_shapes")}), flush=True)
        results.append(res)
    return results


def add_ratios(results: list[dict[str, Any]]) -> None:
    """``throughput_x`` and ``memory_x`` against the task's baseline at the same batch (same run)."""
    for task, base in BASELINE.items():
        _runner.add_ratios([r for r in results if r["task"] == task and "step_s" in r], keys=["batch"], method="impl",
                           ratios={"throughput_x": (base, "tokens_per_s"), "memory_x": (base, "peak_gib")})


def largest_fit(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Extrapolate ``peak = a + b * batch`` of sft/hf and sft/liger_align from two batch sizes to the largest
    batch the unpatched run fits in the GPU's memory; None without two measured sizes of each."""
    fits = {}
    for impl in ("hf", "liger_align"):
        pts = sorted((r["batch"], r["peak_gib"]) for r in results
                     if r["task"] == "sft" and r["impl"] == impl and r.get("peak_gib"))
        if len(pts) < 2 or pts[0][0] == pts[-1][0]:
            return None
        (b0, m0), (b1, m1) = pts[0], pts[-1]
        slope = (m1 - m0) / (b1 - b0)
        fits[impl] = (m0 - slope * b0, slope)
    total = next(r["gpu_total_gib"] for r in results if r.get("gpu_total_gib"))
    a, b = fits["hf"]
    batch = int((0.95 * total - a) / b) if b > 0 else None
    if not batch:
        return None
    peak = {impl: a_ + b_ * batch for impl, (a_, b_) in fits.items()}
    return {"batch": batch, "gpu_total_gib": total, "hf_peak_gib": peak["hf"], "liger_align_peak_gib":
            peak["liger_align"], "memory_x": peak["liger_align"] / peak["hf"], "extrapolated": True,
            "fit_gib_per_row": {k: v[1] for k, v in fits.items()}}


def table(results: list[dict[str, Any]], fit: dict[str, Any] | None) -> str:
    lines = [f"{'task':5} {'impl':13} {'batch':>5} {'s/step':>7} {'tokens/s':>9} {'peak GiB':>9} {'static':>7} "
             f"{'thr x':>6} {'mem x':>6}"]
    for r in results:
        head = f"{r['task']:5} {r['impl']:13} {r['batch']:5d}"
        if "skipped" in r or "error" in r:
            lines.append(f"{head} {'skipped: ' + r['skipped'] if 'skipped' in r else 'failed: ' + r['error'][:60]}")
            continue
        fmt = lambda v, w, p: f"{v:{w}.{p}f}" if isinstance(v, (int, float)) else f"{'-':>{w}}"  # noqa: E731
        lines.append(f"{head} {fmt(r['step_s'], 7, 3)} {fmt(r['tokens_per_s'], 9, 0)} {fmt(r['peak_gib'], 9, 2)} "
                     f"{fmt(r['static_gib'], 7, 2)} {fmt(r.get('throughput_x'), 5, 2)}x "
                     f"{fmt(r.get('memory_x'), 5, 2)}x")
    if fit:
        lines.append(f"largest batch the unpatched SFT fits (extrapolated from the two batch sizes): {fit['batch']}; "
                     f"peaks there {fit['hf_peak_gib']:.1f} vs {fit['liger_align_peak_gib']:.1f} GiB "
                     f"({fit['memory_x']:.2f}x)")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], results_dir: Path) -> Path | None:
    """Two panels (throughput and peak memory relative to the baseline), one bar per arm; None without matplotlib."""
    ok = [r for r in results if r.get("throughput_x") is not None]
    device = ok[0]["device"] if ok else "GPU"
    return _runner.plot(results_dir / "bench_vlm.png", ok, group=["task", "batch"], method="impl",
                        values=[("throughput_x", "tokens/s vs baseline"), ("memory_x", "peak memory vs baseline")],
                        annotate={"throughput_x": "throughput_x", "memory_x": "memory_x"},
                        title=f"Qwen2-VL-2B shape, bf16, grad. checkpointing, 514 tokens/row (256 visual), {device}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=("sft", "dpo"), default=["sft", "dpo"])
    parser.add_argument("--batch", type=int, default=8, help="rows per step (SFT) or pairs per step (DPO)")
    parser.add_argument("--big-batch", type=int, default=32, help="SFT batch of the second size (0: none)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--optim", default="adamw_torch_fused", help="TrainingArguments.optim of every arm")
    parser.add_argument("--timeout", type=int, default=240, help="seconds per subprocess")
    parser.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--smoke", action="store_true",
                        help="tiny model on the CPU: checks the script, measures nothing")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--task", choices=("sft", "dpo"), help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=("hf", "liger_kernel", "liger_align", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        worker(opts)
        return
    if opts.smoke:
        opts.batch, opts.big_batch = 2, (4 if opts.big_batch else 0)
    results_dir = Path(opts.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    results = run_all(opts)
    add_ratios(results)
    fit = largest_fit(results)
    meta = _runner.run_meta(**{k: getattr(opts, k) for k in ("batch", "big_batch", "warmup", "steps", "optim",
                                                              "smoke")}, largest_fit=fit)
    print(f"wrote {_runner.save('bench_vlm', results, meta, results_dir=results_dir)}")
    path = plot(results, results_dir)
    if path:
        print(f"wrote {path}")
    print(table(results, fit))


if __name__ == "__main__":
    main()
