"""Lightning benchmark: the example's ``MMLUModule`` under ``auto``, ``fsdp`` and ``deepspeed`` (ZeRO-3) on one
GPU, with and without ``apply_liger_kernel``.

Shapes: Llama-3.2-1B (vocab 128256) and Qwen2-0.5B (vocab 151936), random weights, bf16-mixed, Hugging Face
(``auto``, ``deepspeed``) or FSDP (``fsdp``) activation checkpointing of the decoder layers. A step is
``--batch`` rows of exactly ``--seq-len`` tokens in the example's layout: random prompt tokens, then an
answer letter and EOS, which are the only targets (the example's collator). Every (shape, strategy, arm)
runs in its own subprocess (its peak memory is its own); the weights are drawn from a fixed seed per
parameter on the GPU, so every strategy starts from the same model. The StepMeter's Lightning callback
measures the steps after ``--warmup`` (Triton compilation, allocator growth): median step time, tokens/s
and ``max_memory_allocated``.

Checks printed with the table: each strategy's first loss within 1e-2 (relative) of ``auto``'s (same
arm); with the patch, peak <= 0.6x and tokens/s >= 1.15x of the unpatched model's, per strategy.
DeepSpeed is imported inside its subprocess: when it is missing the arm is reported as skipped, with the
reason. Runs that would start after ``--budget-s`` seconds are skipped too (reported).

    python benchmarks/bench_lightning.py            # 12 runs, about 4-5 minutes on an H200
    python benchmarks/bench_lightning.py --smoke    # CPU, tiny layers with the real vocabularies, auto and ddp

Writes ``bench_lightning.json`` and ``bench_lightning.png`` under ``--results-dir`` (default
``benchmarks/results``; a temporary folder for ``--smoke``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import socket
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import _runner  # noqa: E402
from _models import model_config as shape_config  # noqa: E402
from _workers import run_worker, worker_env  # noqa: E402

EXAMPLE = ROOT / "examples" / "lightning" / "training.py"
SHAPES = ("llama-3.2-1b", "qwen2-0.5b")
ARMS = ("none", "liger")
# Token ids standing for " A".." D" and EOS (any fixed ids do: the weights are random).
SPECIAL = {"llama-3.2-1b": {"letters": [362, 426, 356, 423], "eos": 128001},
           "qwen2-0.5b": {"letters": [362, 425, 356, 422], "eos": 151643}}


# ------------------------------------------------------------------------------------------- worker


def model_config(shape: str, smoke: bool) -> Any:
    """The shape's config (``_models``, real vocabulary, the real special-token ids); ``smoke``: 2 layers of 64."""
    eos = SPECIAL[shape]["eos"]
    return shape_config(shape, smoke=smoke, bos_token_id=128000 if shape == "llama-3.2-1b" else eos,
                        eos_token_id=eos, pad_token_id=eos)


def init_weights(model: Any, seed: int, std: float) -> Any:
    """Overwrite every parameter from a per-parameter seed, on its own device: N(0, std) for matrices, 1 for
    norm weights, 0 for biases; ZeRO-3-partitioned parameters are gathered for the write."""
    import torch

    zero3 = any(hasattr(p, "ds_id") for p in model.parameters())
    if zero3:
        import deepspeed
    for i, (name, p) in enumerate(sorted(model.named_parameters())):
        gathered = deepspeed.zero.GatheredParameters([p], modifier_rank=0) if zero3 else nullcontext()
        with gathered, torch.no_grad():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                g = torch.Generator(device=p.device).manual_seed(seed * 100003 + i)
                p.copy_(torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32).mul_(std))
    return model


def synthetic_examples(shape: str, rows: int, seq_len: int, vocab: int, seed: int) -> list[dict[str, Any]]:
    """``rows`` encoded examples of exactly ``seq_len`` tokens: random prompt, answer letter, EOS (the targets)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    special = SPECIAL[shape]
    prompts = torch.randint(0, vocab, (rows, seq_len - 2), generator=g).tolist()
    answers = torch.randint(0, 4, (rows,), generator=g).tolist()
    out = []
    for prompt, answer in zip(prompts, answers):
        target = [special["letters"][answer], special["eos"]]
        out.append({"input_ids": prompt + target, "labels": [-100] * len(prompt) + target,
                    "answer_pos": len(prompt) - 1, "answer": answer, "num_choices": 4})
    return out


def load_example() -> Any:
    spec = importlib.util.spec_from_file_location("lightning_training_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def worker(opts: argparse.Namespace) -> dict[str, Any]:
    """One (shape, strategy, arm); returns its measurement (or ``status: skipped`` with the reason)."""
    base = {"shape": opts.shape, "strategy": opts.strategy, "arm": opts.arm}
    if opts.strategy == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except Exception as err:  # missing, or a broken install
            return {**base, "status": "skipped", "reason": f"deepspeed not importable ({type(err).__name__}: {err})"}
    import lightning.pytorch as pl
    import torch
    from transformers import AutoModelForCausalLM

    example = load_example()
    from liger_align.utils import LightningStepMeter

    cuda = torch.cuda.is_available() and not opts.smoke
    config = model_config(opts.shape, opts.smoke)
    seed = 1234

    def build() -> Any:
        return init_weights(AutoModelForCausalLM.from_config(config), seed, config.initializer_range)

    skeleton = None
    if opts.strategy == "fsdp":
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    strategy = example.strategy_for(opts.strategy, skeleton)
    if opts.strategy == "deepspeed":
        example.set_single_process_env()
    steps = opts.warmup + opts.steps
    examples = synthetic_examples(opts.shape, opts.batch * steps, opts.seq_len, config.vocab_size, seed)
    data = example.mmlu_data.make_datamodule(examples, [], batch_size=opts.batch, eval_batch_size=opts.batch,
                                             pad_token_id=config.pad_token_id, seed=seed)
    module = example.MMLUModule(
        build, use_liger=opts.arm == "liger", letter_ids=SPECIAL[opts.shape]["letters"], lr=opts.lr,
        weight_decay=0.01, warmup_ratio=0.1, gradient_checkpointing=opts.grad_ckpt and opts.strategy != "fsdp",
    )
    meter = LightningStepMeter(warmup_steps=opts.warmup)
    trainer = pl.Trainer(
        accelerator="cuda" if cuda else "cpu", devices=1, strategy=strategy,
        precision="bf16-mixed" if cuda else "32-true", max_steps=steps, max_epochs=-1, limit_val_batches=0,
        num_sanity_val_steps=0, use_distributed_sampler=False, callbacks=[meter], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tempfile.mkdtemp(prefix="bench_lightning_"),
    )
    trainer.fit(module, datamodule=data)
    losses = [float(x) for x in torch.stack(module.train_losses).cpu()]
    s = meter.summary()
    return {
        **base, "status": "ok", "steps": trainer.global_step, "measured_steps": s["steps_measured"],
        "batch": opts.batch, "seq_len": opts.seq_len, "first_loss": losses[0], "last_loss": losses[-1],
        "losses": losses, "median_step_s": s["median_step_s"], "tokens_per_s": s["global_tokens_per_s"],
        "peak_allocated_gib": s["peak_allocated_mib"] / 1024, "peak_reserved_gib": s["peak_reserved_mib"] / 1024,
        "memory_kind": s["memory_kind"],
        "liger_patched": len(module.liger_handle.patched) if module.liger_handle else 0,
        "device": torch.cuda.get_device_name() if cuda else "cpu (smoke)", "precision": trainer.precision,
        "versions": {"torch": torch.__version__, "lightning": pl.__version__},
    }


# ------------------------------------------------------------------------------------------- driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_all(opts: argparse.Namespace) -> list[dict[str, Any]]:
    tmp = Path(tempfile.mkdtemp(prefix="bench_lightning_runs_"))
    began = time.time()
    results = []
    for shape in opts.shapes:
        for strategy in opts.strategies:
            for arm in opts.arms:
                base = {"shape": shape, "strategy": strategy, "arm": arm}
                left = opts.budget_s - (time.time() - began)
                if left < opts.min_run_s:
                    results.append({**base, "status": "skipped", "reason": f"time budget ({opts.budget_s} s) spent"})
                    print(f"[{shape}/{strategy}/{arm}] skipped: time budget", flush=True)
                    continue
                args = ["--shape", shape, "--strategy", strategy, "--arm", arm, "--steps", str(opts.steps),
                        "--warmup", str(opts.warmup), "--batch", str(opts.batch), "--seq-len", str(opts.seq_len),
                        "--lr", str(opts.lr)]
                args += (["--smoke"] if opts.smoke else []) + ([] if opts.grad_ckpt else ["--no-grad-ckpt"])
                # DeepSpeed on one process and one device still reads the distributed environment
                dist = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                            LOCAL_RANK="0") if strategy == "deepspeed" else {}
                res, failure, wall = run_worker(__file__, args, tmp / f"{shape}-{strategy}-{arm}.json",
                                                timeout=min(opts.timeout, left),
                                                env=worker_env(drop=("TRITON_INTERPRET",), **dist))
                if failure:
                    res = {**base, "status": "failed", "reason": failure.splitlines()[-1]}
                    print(f"[{shape}/{strategy}/{arm}] FAILED:\n{failure}", file=sys.stderr)
                res["wall_s"] = wall
                results.append(res)
                brief = {k: v for k, v in res.items() if k not in ("losses", "versions")}
                print(f"[{shape}/{strategy}/{arm}] {json.dumps(brief)}", flush=True)
    add_ratios(results)
    return results


def add_ratios(results: list[dict[str, Any]]) -> None:
    """Per row: tokens/s and peak vs the same strategy's unpatched run; first loss vs ``auto`` of the same arm."""
    by = {(r["shape"], r["strategy"], r["arm"]): r for r in results if r.get("status") == "ok"}
    for r in by.values():
        none = by.get((r["shape"], r["strategy"], "none"))
        if none is not None and r["arm"] != "none":
            r["tokens_per_s_x_none"] = r["tokens_per_s"] / none["tokens_per_s"]
            r["peak_x_none"] = r["peak_allocated_gib"] / none["peak_allocated_gib"]
            r["meets_targets"] = r["tokens_per_s_x_none"] >= 1.15 and r["peak_x_none"] <= 0.6
        auto = by.get((r["shape"], "auto", r["arm"]))
        if auto is not None:
            r["first_loss_rel_diff_vs_auto"] = abs(r["first_loss"] - auto["first_loss"]) / abs(auto["first_loss"])
            r["last_loss_rel_diff_vs_auto"] = abs(r["last_loss"] - auto["last_loss"]) / abs(auto["last_loss"])
            r["first_loss_ok"] = r["first_loss_rel_diff_vs_auto"] <= 1e-2


def table(results: list[dict[str, Any]]) -> str:
    head = (f"{'shape':13} {'strategy':9} {'arm':5} {'s/step':>7} {'tokens/s':>9} {'peak GiB':>8} {'first loss':>10} "
            f"{'d1st/auto':>9} {'last loss':>9} {'thr x none':>10} {'mem x none':>10}")
    lines = [head]
    for r in results:
        key = f"{r['shape']:13} {r['strategy']:9} {r['arm']:5}"
        if r.get("status") != "ok":
            lines.append(f"{key} {r.get('status')}: {r.get('reason', '')}"[:200])
            continue
        ratio = (f"{r['tokens_per_s_x_none']:9.2f}x {r['peak_x_none']:9.2f}x" if "peak_x_none" in r else "")
        d = r.get("first_loss_rel_diff_vs_auto")
        lines.append(f"{key} {r['median_step_s']:7.3f} {r['tokens_per_s']:9.0f} {r['peak_allocated_gib']:8.2f} "
                     f"{r['first_loss']:10.4f} {'' if d is None else f'{d:9.1e}':>9} {r['last_loss']:9.4f} {ratio}")
    ok = [r for r in results if r.get("status") == "ok"]
    losses_ok = all(r.get("first_loss_ok", True) for r in ok)
    targets = [r["meets_targets"] for r in ok if "meets_targets" in r]
    lines.append(f"first loss within 1e-2 of auto: {'yes' if losses_ok else 'NO'}; patch targets (peak <= 0.6x, "
                 f"tokens/s >= 1.15x) met in {sum(targets)} of {len(targets)} strategy runs")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> Path | None:
    """Two panels (peak GiB, tokens/s), bars per arm for each (shape, strategy), liger/none ratios on top."""
    ok = [r for r in results if r.get("status") == "ok"]
    device = ok[0].get("device", "") if ok else ""
    b, t, precision = (ok[0]["batch"], ok[0]["seq_len"], ok[0]["precision"]) if ok else ("?", "?", "?")
    return _runner.plot(path, ok, group=["shape", "strategy"], method="arm", ref_line=None,
                        values=[("peak_allocated_gib", "peak memory (GiB)"), ("tokens_per_s", "tokens/s")],
                        annotate={"peak_allocated_gib": "peak_x_none", "tokens_per_s": "tokens_per_s_x_none"},
                        title=f"Lightning, one device ({device}), {b} x {t} tokens/step, answer+EOS targets, "
                              f"{precision}; liger = apply_liger_kernel")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", choices=SHAPES, default=list(SHAPES))
    p.add_argument("--strategies", nargs="+", choices=("auto", "ddp", "fsdp", "deepspeed"))
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--steps", type=int, default=17, help="measured steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--no-grad-ckpt", dest="grad_ckpt", action="store_false", help="no activation checkpointing")
    p.add_argument("--timeout", type=float, default=150, help="seconds per run")
    p.add_argument("--budget-s", type=float, default=280, help="no run starts after this many seconds")
    p.add_argument("--min-run-s", type=float, default=20, help="skip a run when less budget than this is left")
    p.add_argument("--results-dir", help="default: benchmarks/results (a temporary folder with --smoke)")
    p.add_argument("--smoke", action="store_true", help="CPU, 2 tiny layers, real vocabularies: checks the script")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    p.add_argument("--strategy", help=argparse.SUPPRESS)
    p.add_argument("--arm", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.worker:
        Path(opts.worker_out).write_text(json.dumps(worker(opts)))
        return
    if opts.smoke:
        opts.strategies = opts.strategies or ["auto", "ddp"]
        opts.steps, opts.warmup, opts.batch, opts.seq_len = min(opts.steps, 2), min(opts.warmup, 1), 2, 64
    opts.strategies = opts.strategies or ["auto", "fsdp", "deepspeed"]
    results_dir = Path(opts.results_dir or (tempfile.mkdtemp(prefix="bench_lightning_smoke_") if opts.smoke
                                            else ROOT / "benchmarks" / "results"))
    began = time.time()
    results = run_all(opts)
    meta = _runner.run_meta(
        what="examples/lightning MMLUModule, one device, with and without apply_liger_kernel", shapes=opts.shapes,
        strategies=opts.strategies, steps=opts.steps, warmup=opts.warmup, batch=opts.batch, seq_len=opts.seq_len,
        precision="32-true" if opts.smoke else "bf16-mixed", activation_checkpointing=opts.grad_ckpt,
        targets="answer letter + EOS per row", smoke=opts.smoke, wall_s=time.time() - began)
    json_path = _runner.save("bench_lightning", results, meta, results_dir=results_dir)
    png = plot(results, results_dir / "bench_lightning.png")
    print(table(results))
    print(f"wrote {json_path}" + (f" and {png}" if png else "") + f" in {meta['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
