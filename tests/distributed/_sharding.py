"""What the 2-process CPU runs share: the ZeRO-3 config and sharding a tiny causal LM with FSDP2 or FSDP1."""

from __future__ import annotations

import torch

# ZeRO-3: every parameter, the tied head included, is partitioned across the ranks.
ZERO3 = {
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "zero_allow_untested_optimizer": True,
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
}


def shard(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """``fully_shard`` (``mode="fsdp2"``) or FSDP1 (``use_orig_params``) over the decoder layers and the root."""
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        return fully_shard(model)
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({type(model.model.layers[0])}),
                                    use_orig_params=True, device_id=torch.device("cpu"))
