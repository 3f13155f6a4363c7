"""Trainer benchmark: liger-align's trainers against TRL's, same model, data and settings, one GPU.

Llama-3.2-1B shape (LlamaConfig, random weights, vocab 128256, tied head), bf16 weights and bf16
training, gradient checkpointing, sequences of exactly 1024 tokens (256 prompt, 768 completion),
8 pairs per device (KTO: the same 16 sequences, unpaired). For each trainer pair (ORPO,
CPO with loss_type="simpo", DPO, KTO) each implementation runs in a fresh subprocess so its peak
memory is its own; after ``--warmup`` steps (Triton compilation, allocator growth) it times
``--steps`` optimizer steps (synchronised) and reads ``torch.cuda.max_memory_allocated``.

    python benchmarks/bench_trainers.py                      # all 8 runs, ~5 minutes on an H200
    python benchmarks/bench_trainers.py --only orpo simpo    # a subset
    python benchmarks/bench_trainers.py --plot-only a/bench_trainers.json b/bench_trainers.json  # merge, redraw

Writes ``bench_trainers.json`` (``{"meta", "rows"}``, ``benchmarks/_runner.py``) and the PNG bar charts
``bench_trainers_throughput.png`` and ``bench_trainers_memory.png`` under ``--results-dir`` (default
``benchmarks/results``); prints the table last. Every figure in the table is also given as a ratio to TRL's
in the same run (``throughput_x_trl``, ``memory_x_trl``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import _runner  # noqa: E402
from _models import model_config  # noqa: E402
from _workers import run_worker  # noqa: E402

ALGOS = ("orpo", "simpo", "dpo", "kto")
# Per sequence: BOS + a quarter of max_length of prompt words, then completion words truncated at max_length.


# ------------------------------------------------------------------------------------------- worker


def llama_1b_config(vocab_size: int = 128256, smoke: bool = False) -> Any:
    """Llama-3.2-1B's shape (``_models``: 16 layers, hidden 2048, 32 / 8 heads, SwiGLU 8192, tied head).

    ``smoke``: 2 layers of hidden 64 (same vocabulary), to check the script on a CPU.
    """
    return model_config("llama-3.2-1b", smoke=smoke, vocab_size=vocab_size, bos_token_id=1, eos_token_id=2,
                        pad_token_id=0)


def synthetic_pairs(tokenizer: Any, rows: int, seq_len: int, seed: int = 0) -> dict[str, list[str]]:
    """``rows`` preference pairs of random one-token words: a prompt of ``seq_len / 4`` tokens (with BOS)
    and completions long enough that every sequence is cut at exactly ``seq_len`` tokens."""
    import random

    rng = random.Random(seed)
    specials = set(tokenizer.all_special_tokens)
    words = sorted(w for w in tokenizer.get_vocab() if w.isalnum() and w not in specials)

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    return {
        "prompt": [text(seq_len // 4 - 1) for _ in range(rows)],
        "chosen": [" " + text(seq_len) for _ in range(rows)],
        "rejected": [" " + text(seq_len) for _ in range(rows)],
    }


def build_trainer(
    algo: str, impl: str, steps: int, pairs: int, seq_len: int, out_dir: Path, device: str
) -> tuple[Any, int]:
    """The trainer for ``algo`` and ``impl`` ('trl' or 'liger'); returns it and the sequences per step."""
    import torch
    from datasets import Dataset
    from transformers import LlamaForCausalLM

    sys.path[:0] = [str(ROOT), str(ROOT / "examples" / "alignment")]
    from embedded import build_tokenizer

    tokenizer = build_tokenizer()
    total = pairs * (steps + 2)
    data = Dataset.from_dict(synthetic_pairs(tokenizer, total, seq_len))
    config = llama_1b_config(smoke=device == "cpu")
    config.bos_token_id, config.eos_token_id, config.pad_token_id = (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(config)
        ref = LlamaForCausalLM(config) if algo in ("dpo", "kto") else None
    torch.set_default_dtype(default_dtype)
    if ref is not None:
        ref.load_state_dict(model.state_dict())
    common = dict(
        output_dir=str(out_dir), max_steps=steps, logging_steps=1, learning_rate=1e-6, report_to=[], save_strategy="no",
        bf16=True, gradient_checkpointing=True, max_length=seq_len, dataloader_num_workers=0, seed=0,
        disable_tqdm=True, use_cpu=device == "cpu",
    )
    rows = pairs
    if algo == "orpo":
        from trl.experimental.orpo import ORPOConfig as Config
        from trl.experimental.orpo import ORPOTrainer as Trainer

        from liger_align.trainers import LigerORPOTrainer as Liger
        args = Config(per_device_train_batch_size=pairs, **common)
    elif algo == "simpo":
        from trl.experimental.cpo import CPOConfig as Config
        from trl.experimental.cpo import CPOTrainer as Trainer

        from liger_align.trainers import LigerCPOTrainer as Liger
        args = Config(per_device_train_batch_size=pairs, loss_type="simpo", cpo_alpha=0.0,
                      **common)
    elif algo == "dpo":
        from trl import DPOConfig as Config
        from trl import DPOTrainer as Trainer

        from liger_align.trainers import LigerDPOTrainer as Liger
        args = Config(per_device_train_batch_size=pairs, **common)
    else:
        from trl import KTOConfig as Config
        from trl import KTOTrainer as Trainer

        from liger_align.trainers import LigerKTOTrainer as Liger
        sys.path.insert(0, str(ROOT / "examples" / "alignment"))
        from embedded import to_unpaired

        data = to_unpaired(data)
        rows = 2 * pairs
        args = Config(per_device_train_batch_size=rows, **common)
    cls = Liger if impl == "liger" else Trainer
    kwargs = {"ref_model": ref} if ref is not None else {}
    trainer = cls(model=model, args=args, train_dataset=data, processing_class=tokenizer, **kwargs)
    return trainer, 2 * pairs


def worker(opts: argparse.Namespace) -> None:
    """Run one (algo, impl) and write its measurement as JSON to ``opts.worker_out``."""
    import torch
    from transformers import TrainerCallback

    warmup, steps = opts.warmup, opts.steps
    device = "cpu" if opts.smoke or not torch.cuda.is_available() else "cuda"
    cuda = device == "cuda"
    trainer, rows = build_trainer(opts.algo, opts.impl, warmup + steps, opts.pairs, opts.seq_len,
                                  Path(opts.worker_out).parent / "run", device)

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.tokens: list[int] = []
            self.start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            if cuda:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.start)
            if state.global_step == warmup and cuda:
                torch.cuda.reset_peak_memory_stats()

    batch = next(iter(trainer.get_train_dataloader()))
    shapes = {k: list(v.shape) for k, v in batch.items() if k.endswith("input_ids") and hasattr(v, "shape")}
    timer = Timer()
    trainer.add_callback(timer)
    trainer.train()
    measured = sorted(timer.times[warmup:])
    step_s = measured[len(measured) // 2]
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    result = {
        "algo": opts.algo, "impl": opts.impl, "step_s": step_s, "step_s_all": timer.times,
        "tokens_per_step": rows * opts.seq_len, "input_shapes": shapes, "tokens_per_s": rows * opts.seq_len / step_s,
        "peak_gib": _runner.peak_allocated_gib() or 0.0, "losses": losses,
        "device": torch.cuda.get_device_name() if cuda else "cpu (smoke)", "torch": torch.__version__,
    }
    Path(opts.worker_out).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------- driver


def run_all(opts: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_trainers_"))  # per-run JSON and trainer output, not results
    for algo in opts.only:
        for impl in ("trl", "liger"):
            args = ["--algo", algo, "--impl", impl, "--warmup", str(opts.warmup), "--steps", str(opts.steps),
                    "--pairs", str(opts.pairs), "--seq-len", str(opts.seq_len)] + (["--smoke"] if opts.smoke else [])
            res, failure, wall = run_worker(__file__, args, tmp / f"{algo}-{impl}.json", timeout=opts.timeout)
            if failure:
                res = {"algo": algo, "impl": impl, "error": failure}
                print(f"[{algo}/{impl}] FAILED:\n{failure}", file=sys.stderr)
            res["wall_s"] = wall
            print(f"[{algo}/{impl}] {json.dumps({k: v for k, v in res.items() if k not in ('error', 'step_s_all')})}",
                  flush=True)
            results.append(res)
    return results


def table(results: list[dict[str, Any]]) -> str:
    by = {(r["algo"], r["impl"]): r for r in results}
    header = f"{'trainer':8} {'impl':6} {'s/step':>8} {'tokens/s':>10} {'peak GiB':>9}"
    lines = [header + f" {'thr x TRL':>10} {'mem / TRL':>10}"]
    nan = float("nan")
    for algo in dict.fromkeys(r["algo"] for r in results):
        for impl in ("trl", "liger"):
            r = by.get((algo, impl))
            if r is None:
                continue
            if "error" in r:
                lines.append(f"{algo:8} {impl:6} {'failed':>8}")
                continue
            thr, mem = r.get("throughput_x_trl") or nan, r.get("memory_x_trl") or nan
            lines.append(f"{algo:8} {impl:6} {r['step_s']:8.3f} {r['tokens_per_s']:10.0f} {r['peak_gib']:9.2f} "
                         f"{thr:9.2f}x {mem:9.2f}x")
    return "\n".join(lines)


RATIOS = {"throughput_x_trl": ("trl", "tokens_per_s"), "memory_x_trl": ("trl", "peak_gib")}


def plot(results: list[dict[str, Any]], results_dir: Path, meta: dict[str, Any]) -> list[Path]:
    """Two grouped bar charts (tokens/s, peak GiB), TRL vs liger-align per trainer, ratios (``RATIOS``) on the bars."""
    ok = [r for r in results if "error" not in r]
    device = ok[0].get("device", "GPU") if ok else "GPU"
    title = (f"Llama-3.2-1B shape, bf16, grad. checkpointing, {meta.get('pairs')} pairs x {meta.get('seq_len')} "
             f"tokens, {device}")
    paths = []
    for key, label, fname, ratio in (("tokens_per_s", "throughput (tokens/s)", "throughput", "throughput_x_trl"),
                                     ("peak_gib", "peak memory (GiB)", "memory", "memory_x_trl")):
        path = _runner.plot(results_dir / f"bench_trainers_{fname}.png", ok, group=["algo"], method="impl",
                            values=[(key, label)], annotate={key: ratio}, ref_line=None, title=title)
        paths += [path] if path else []
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=ALGOS, default=list(ALGOS))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--timeout", type=int, default=240, help="seconds per subprocess")
    parser.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--plot-only", metavar="JSON", nargs="+", help="redraw from saved JSON files (merged)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny model on the CPU: checks the script, measures nothing")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--algo", choices=ALGOS, help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=("trl", "liger"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        worker(opts)
        return
    results_dir = Path(opts.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    if opts.plot_only:
        saved = [_runner.load_rows(Path(path)) for path in opts.plot_only]  # also the older {config, results}
        results, meta = [r for _, rows in saved for r in rows], saved[0][0]
    else:
        results = run_all(opts)
        meta = _runner.run_meta(**{k: getattr(opts, k) for k in ("warmup", "steps", "pairs", "seq_len", "smoke")})
    _runner.add_ratios([r for r in results if "error" not in r], keys=["algo"], ratios=RATIOS, method="impl")
    _runner.save("bench_trainers", results, meta, results_dir=results_dir)
    for path in plot(results, results_dir, meta):
        print(f"wrote {path}")
    print(table(results))


if __name__ == "__main__":
    main()
