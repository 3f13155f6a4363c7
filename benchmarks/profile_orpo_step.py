"""Where the time of one ORPO training step goes: backbone forward, head loss, backward, optimizer (CUDA).

``python benchmarks/profile_orpo_step.py [--pairs 8 --seq-len 1024]``: Llama-3.2-1B shape (random weights,
bf16, the liger-align model patch), AdamW; per phase the median over ``--steps`` of CUDA-event times, for the
fused ORPO loss on its 3-product path and on the recomputing path, in the same run. The head-loss phase of
the 3-product path holds its gradient products (they run in the forward); its backward phase is the
backbone's backward and the scaling of the stored gradients.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _models import model_config  # noqa: E402

from liger_align.losses import LigerFusedLinearORPOLoss  # noqa: E402
from liger_align.models import apply_liger_kernel  # noqa: E402

PHASES = ("backbone_forward", "head_loss", "backward", "optimizer")


def step_phases(model, loss_fn, optimizer, ids, target) -> dict[str, float]:
    events = [torch.cuda.Event(enable_timing=True) for _ in range(len(PHASES) + 1)]
    events[0].record()
    hidden = model.model(input_ids=ids).last_hidden_state
    events[1].record()
    loss, _ = loss_fn(model.lm_head.weight, hidden[:, :-1], target)
    events[2].record()
    loss.backward()
    events[3].record()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    events[4].record()
    torch.cuda.synchronize()
    return {name: events[i].elapsed_time(events[i + 1]) for i, name in enumerate(PHASES)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config("llama-3.2-1b"), dtype=torch.bfloat16).cuda()
    apply_liger_kernel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    rows, length = 2 * args.pairs, args.seq_len
    ids = torch.randint(0, model.config.vocab_size, (rows, length), device="cuda")
    target = ids[:, 1:].clone()
    target[:, : length // 4] = -100  # the prompt
    print(f"# Llama-3.2-1B shape, {args.pairs} pairs x {length} tokens, bf16, AdamW; ms per phase (median)")
    print(f"{'strategy':18s}" + "".join(f"{p:>18s}" for p in PHASES) + f"{'step':>10s}")
    for strategy in ("grad_in_forward", "recompute"):
        loss_fn = LigerFusedLinearORPOLoss(strategy=strategy)
        runs = [step_phases(model, loss_fn, optimizer, ids, target) for _ in range(args.steps + 2)][2:]
        medians = {p: statistics.median(r[p] for r in runs) for p in PHASES}
        total = statistics.median(sum(r.values()) for r in runs)
        print(f"{strategy:18s}" + "".join(f"{medians[p]:18.2f}" for p in PHASES) + f"{total:10.2f}")
    print(f"# peak allocated {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
