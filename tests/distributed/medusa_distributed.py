"""Train Medusa heads (stage 2: everything trains) on CPU, single-process or under ``torchrun
--nproc_per_node 2`` (gloo) with FSDP2, then save the heads with ``save_medusa_heads``. Used by
tests/test_medusa_distributed.py.

Every mode sees the same 4 rows per SGD step. ``single`` takes them at once; ``fsdp2`` shards every
decoder layer, every Medusa head (one unit per head) and the root with ``fully_shard`` and gives each
rank 2 rows. Each head's loss is divided by its valid-target count over the 4 rows
(``medusa_num_items``) and the sharded loss is multiplied by the world size (FSDP averages gradients),
so both modes take the same steps. The heads are saved from the DTensor shards (a collective).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT)]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from liger_align.models.medusa import add_medusa_heads, save_medusa_heads  # noqa: E402
from liger_align.testing import build_tiny_llama  # noqa: E402

STEPS, ROWS, LR, VOCAB, LENGTH, HEADS = 2, 4, 0.5, 61, 23, 3


def batches() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (STEPS * ROWS, LENGTH), generator=gen)
    labels = ids.masked_fill(torch.rand(ids.shape, generator=gen) < 0.25, -100)
    labels[:, :5] = -100
    return ids, labels


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["single", "fsdp2"], required=True)
    parser.add_argument("--out", required=True)
    opts = parser.parse_args()
    out = Path(opts.out)
    if opts.mode == "fsdp2":
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    model = build_tiny_llama(VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, seed=0)
    heads = add_medusa_heads(model, HEADS, 1)
    if opts.mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        for head in heads:
            fully_shard(head)
        fully_shard(model)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    ids, labels = batches()
    weights = [1.0, 0.8, 0.64, 0.512]
    losses = []
    for step in range(STEPS):
        rows = slice(step * ROWS, (step + 1) * ROWS)
        counts = torch.stack([(labels[rows, 1 + k:] != -100).sum() for k in range(HEADS + 1)])
        mine = rows if world == 1 else slice(step * ROWS + 2 * rank, step * ROWS + 2 * rank + 2)
        result = model(input_ids=ids[mine], attention_mask=torch.ones_like(ids[mine]), medusa_labels=labels[mine],
                       medusa_weights=weights, medusa_num_items=counts)
        (result.loss * world).backward()
        step_loss = result.loss.detach().clone()
        if world > 1:
            dist.all_reduce(step_loss)
        losses.append(step_loss.item())
        optimizer.step()
        optimizer.zero_grad()
    head_weight = heads[0].proj.weight
    local = head_weight.to_local() if hasattr(head_weight, "to_local") else head_weight
    path = save_medusa_heads(model, out.parent / f"heads-{opts.mode}", base_model_name_or_path="tiny")
    if rank == 0:
        out.write_text(json.dumps({
            "mode": opts.mode, "world": world, "losses": losses, "heads": str(path),
            "head_type": type(head_weight).__name__, "head_local_numel": local.numel(),
            "head_full_numel": VOCAB * 32,
        }))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
