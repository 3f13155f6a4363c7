"""Train LigerORPOTrainer on CPU, single-process or under ``torchrun --nproc_per_node 2`` (gloo), and
write the per-step losses as JSON. Used by tests/test_trainers_distributed.py.

Modes (every one sees the same 4 pairs per optimizer step):

- ``single`` / ``ddp`` / ``zero3``: ``trainer.train()``; single-process runs 2 micro-batches of 2 with
  gradient accumulation, DDP (accelerate's MULTI_CPU) and DeepSpeed ZeRO-3 (DeepSpeed's CPU
  accelerator, gloo) 2 pairs on each of 2 ranks.
- ``manual-single`` / ``fsdp2`` / ``fsdp1``: accelerate enables FSDP only on accelerators (not for
  MULTI_CPU), so on CPU the policy is sharded with torch's own ``fully_shard`` (FSDP2) or
  ``FullyShardedDataParallel`` (FSDP1, ``use_orig_params``), decoder layers and root, and trained
  with plain SGD by calling the trainer's ``get_batch_loss_metrics`` on the sharded module: the
  fused loss runs inside the root's forward, where the (tied, sharded) head weight is gathered.
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
from trl.experimental.orpo import ORPOConfig  # noqa: E402

from liger_align.testing import build_tiny_llama, build_tokenizer, load_preference_dataset  # noqa: E402
from liger_align.trainers import LigerORPOTrainer  # noqa: E402

STEPS, PAIRS_PER_STEP, LR = 3, 4, 0.5


def make_trainer(mode: str, out: Path) -> LigerORPOTrainer:
    tokenizer = build_tokenizer()
    model = build_tiny_llama(
        len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    args = ORPOConfig(
        output_dir=str(out.parent / f"run-{mode}"), per_device_train_batch_size=2, max_steps=STEPS, logging_steps=1,
        learning_rate=1e-3, report_to=[], save_strategy="no", max_length=48, use_cpu=True, bf16=False, seed=0,
        gradient_accumulation_steps=2 if mode == "single" else 1, gradient_checkpointing=True,
        deepspeed=ZERO3 if mode == "zero3" else None,
    )
    return LigerORPOTrainer(
        model=model, args=args, train_dataset=load_preference_dataset().select(range(32)), processing_class=tokenizer,
    )


def manual_losses(trainer: LigerORPOTrainer, mode: str) -> list[float]:
    """SGD steps on fixed rows: rank r (or micro-batch r when single) takes pairs [4k + 2r, 4k + 2r + 2)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    model = trainer.model if mode == "manual-single" else shard(trainer.model, mode)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        parts = range(2) if world == 1 else [rank]
        step_loss = torch.zeros(())
        for part in parts:
            start = step * PAIRS_PER_STEP + 2 * part
            batch = trainer.data_collator([trainer.train_dataset[i] for i in range(start, start + 2)])
            loss, _ = trainer.get_batch_loss_metrics(model, batch)
            (loss / len(parts)).backward()
            step_loss += loss.detach() / len(parts)
        if world > 1:
            dist.all_reduce(step_loss)
            step_loss /= world
        optimizer.step()
        optimizer.zero_grad()
        losses.append(step_loss.item())
    head = trainer.model.get_output_embeddings().weight  # outside the forward: sharded under FSDP
    local = head.to_local() if hasattr(head, "to_local") else head
    return losses, {"head_type": type(head).__name__, "head_local_numel": local.numel(),
                    "head_full_numel": trainer.model.config.vocab_size * trainer.model.config.hidden_size}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--mode", choices=["single", "ddp", "zero3", "manual-single", "fsdp2", "fsdp1"], required=True
    )
    parser.add_argument("--out", required=True)
    opts = parser.parse_args()
    out = Path(opts.out)
    trainer = make_trainer(opts.mode, out)
    if opts.mode in ("single", "ddp", "zero3"):
        trainer.train()
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        wrapper, info = type(trainer.model_wrapped).__name__, {}
        if opts.mode == "zero3":  # outside a forward, a ZeRO-3 parameter holds no data (only its ds_numel)
            head = trainer.model.get_output_embeddings().weight
            info = {"head_local_numel": head.numel(), "head_full_numel": getattr(head, "ds_numel", head.numel())}
    else:
        if opts.mode != "manual-single" and not dist.is_initialized():
            dist.init_process_group("gloo")
        losses, info = manual_losses(trainer, opts.mode)
        wrapper = opts.mode
    if int(os.environ.get("RANK", "0")) == 0:
        world = dist.get_world_size() if dist.is_initialized() else 1
        out.write_text(json.dumps({"mode": opts.mode, "world": world, "wrapper": wrapper, "losses": losses, **info}))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
