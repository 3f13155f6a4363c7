"""SFT of a patched tiny Llama (``apply_liger_kernel``) with the Hugging Face ``Trainer`` on CPU, single-process
or under ``torchrun --nproc_per_node 2`` (gloo); writes per-step losses, grad norms and what a logits spy saw
as JSON. Used by tests/test_sft_distributed.py.

Every mode sees the same 8 rows per optimizer step, and every loss is Hugging Face's
``sum(token CE) / num_items_in_batch`` over the whole global batch:

- ``single`` / ``zero3``: ``trainer.train()``. Single-process: 2 micro-batches of 4 with gradient
  accumulation; ZeRO-3 (DeepSpeed's CPU accelerator, every parameter partitioned, the tied head
  included): 4 rows on each of 2 ranks.
- ``manual-single`` / ``fsdp2`` / ``fsdp1``: accelerate enables FSDP only on accelerators, so on CPU the
  model is sharded with torch's ``fully_shard`` (FSDP2: decoder layers, the head alone, the root) or
  ``FullyShardedDataParallel`` (FSDP1, ``use_orig_params``), and each step calls the trainer's own
  ``compute_loss`` on the sharded module, then SGD.

The spy is a ``TorchDispatchMode`` around the training steps that records the largest tensor any op
produced whose last dimension is the vocabulary: the patched forward builds at most a chunk of the
*valid* tokens' logits, never the ``(N, V)`` logits of every token of a micro-batch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _sharding import ZERO3, shard  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments  # noqa: E402

from liger_align.models import apply_liger_kernel  # noqa: E402
from liger_align.testing import build_tiny_llama, build_tokenizer, load_preference_dataset  # noqa: E402

STEPS, ROWS_PER_STEP, LR = 3, 8, 0.5


class LogitsSpy(TorchDispatchMode):
    """Records the element count of the largest op output whose last dimension equals ``vocab`` (views of the
    ``(V, H)`` weight, e.g. its transpose, hold no new data and are not counted)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.largest, self.largest_shape, self.max_dims = vocab, 0, None, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab and not _aliases(t, args):
                self.max_dims = max(self.max_dims, t.dim())
                if t.numel() > self.largest:
                    self.largest, self.largest_shape = t.numel(), tuple(t.shape)
        return out


def _storage(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except RuntimeError:  # a wrapper or freed storage (FSDP's unsharded views)
        return None


def _aliases(out: torch.Tensor, args: tuple) -> bool:
    """Whether ``out`` shares its storage with one of the op's tensor arguments (a view, not new data)."""
    ptr = _storage(out)
    return ptr is not None and any(isinstance(a, torch.Tensor) and _storage(a) == ptr for a in args)


def sft_rows(tokenizer, n: int) -> list[dict[str, list[int]]]:
    """Prompt + chosen answer + EOS; labels -100 on the prompt (so the valid tokens are fewer than all)."""
    rows = []
    for row in load_preference_dataset().select(range(n)):
        prompt = tokenizer(row["prompt"])["input_ids"]
        answer = tokenizer(row["chosen"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt + answer)[:40]
        labels = ([-100] * len(prompt) + answer)[:40]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return rows


def make_trainer(mode: str, out: Path) -> tuple[Trainer, int]:
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = build_tiny_llama(
        len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    handle = apply_liger_kernel(model)
    assert any("ForCausalLM" in p for p in handle.patched), handle.patched
    distributed = mode == "zero3"
    args = TrainingArguments(
        output_dir=str(out.parent / f"run-{mode}"), per_device_train_batch_size=4,
        gradient_accumulation_steps=1 if distributed else 2, max_steps=STEPS, logging_steps=1, learning_rate=LR,
        lr_scheduler_type="constant", optim="sgd", max_grad_norm=1e9, weight_decay=0.0, report_to=[],
        save_strategy="no", use_cpu=True, seed=0, data_seed=0, deepspeed=ZERO3 if mode == "zero3" else None,
        dataloader_drop_last=True,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=sft_rows(tokenizer, STEPS * ROWS_PER_STEP),
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100),
    )
    return trainer, len(tokenizer)


def grad_norm(model: torch.nn.Module) -> float:
    if hasattr(model, "clip_grad_norm_"):  # FSDP1 gathers the norm over the shards itself
        return float(model.clip_grad_norm_(1e9))
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def manual_steps(trainer: Trainer, mode: str) -> tuple[list[float], list[float]]:
    """SGD on fixed rows: step k uses rows [8k, 8k + 8); rank r (or micro-batch r when single) takes half."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    model = trainer.model if mode == "manual-single" else shard(trainer.model, mode)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses, norms = [], []
    half = ROWS_PER_STEP // 2
    for step in range(STEPS):
        rows = [trainer.train_dataset[i] for i in range(step * ROWS_PER_STEP, (step + 1) * ROWS_PER_STEP)]
        parts = [rows[:half], rows[half:]]
        batches = [trainer.data_collator(p) for p in parts]
        n_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        mine = batches if world == 1 else [batches[rank]]
        step_loss = torch.zeros(())
        for batch in mine:
            # compute_loss scales by the world size (average_tokens_across_devices): FSDP averages the gradients.
            loss = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(n_items))
            loss.backward()
            step_loss += loss.detach() / world
        if world > 1:
            dist.all_reduce(step_loss)
        norms.append(grad_norm(model))
        optimizer.step()
        optimizer.zero_grad()
        losses.append(step_loss.item())
    return losses, norms


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["single", "zero3", "manual-single", "fsdp2", "fsdp1"], required=True)
    parser.add_argument("--out", required=True)
    opts = parser.parse_args()
    out = Path(opts.out)
    if opts.mode in ("fsdp2", "fsdp1") and not dist.is_initialized():
        dist.init_process_group("gloo")
    trainer, vocab = make_trainer(opts.mode, out)
    spy = LogitsSpy(vocab)
    with spy:
        if opts.mode in ("single", "zero3"):
            trainer.train()
            logs = [e for e in trainer.state.log_history if "loss" in e]
            losses, norms = [e["loss"] for e in logs], [e["grad_norm"] for e in logs]
        else:
            losses, norms = manual_steps(trainer, opts.mode)
    head = trainer.model.get_output_embeddings().weight  # outside a forward: partitioned / sharded
    local = head.to_local() if hasattr(head, "to_local") else head
    info = {"head_local_numel": local.numel(), "head_full_numel": vocab * trainer.model.config.hidden_size}
    valid = sorted(sum(1 for x in r["labels"][1:] if x != -100) for r in trainer.train_dataset)
    result = {
        "mode": opts.mode, "world": dist.get_world_size() if dist.is_initialized() else 1, "losses": losses,
        "grad_norms": norms, "largest_vocab_tensor": spy.largest, "largest_vocab_shape": spy.largest_shape,
        "vocab_tensor_max_dims": spy.max_dims, "max_micro_batch_valid_tokens": sum(valid[-4:]), "vocab": vocab,
        "wrapper": type(trainer.model_wrapped).__name__, **info,
    }
    gathered = [None] * result["world"]
    if dist.is_initialized():
        dist.all_gather_object(gathered, result)
    else:
        gathered = [result]
    if int(os.environ.get("RANK", "0")) == 0:
        out.write_text(json.dumps({**result, "ranks": gathered}))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
