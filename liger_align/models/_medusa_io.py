"""Saving and loading Medusa heads in Medusa's own file layout (see :mod:`.medusa`), gathered from shards."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ._medusa_heads import MedusaHeads, add_medusa_heads, medusa_heads
from .head_call import causal_lm

MEDUSA_HEADS_FILE = "medusa_lm_head.safetensors"
MEDUSA_CONFIG_FILE = "config.json"
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _clean(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


@contextlib.contextmanager
def _gathered(heads: MedusaHeads, wrapped: nn.Module | None) -> Iterator[None]:
    """Full head parameters inside: ZeRO-3 gathered, FSDP1 ``summon_full_params`` on ``wrapped``; else as is."""
    params = list(heads.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
        return
    if wrapped is not None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(m, FullyShardedDataParallel) for m in wrapped.modules()):
            with FullyShardedDataParallel.summon_full_params(wrapped, writeback=False, recurse=True):
                yield
            return
    yield


def medusa_heads_state_dict(model: nn.Module, *, wrapped: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The heads' full tensors on CPU, in Medusa's key layout (module docstring).

    Under FSDP2 (DTensor parameters), ZeRO-3, or FSDP1 (pass the FSDP-wrapped root as ``wrapped``) the
    shards are gathered: a collective, so every rank must call it.
    """
    heads = medusa_heads(model)
    state: dict[str, torch.Tensor] = {}
    with _gathered(heads, wrapped):
        for name, param in heads.named_parameters():
            tensor = param.detach()
            if type(tensor).__name__ == "DTensor":
                tensor = tensor.full_tensor()
            state[_clean(name)] = tensor.to("cpu", copy=True).contiguous()
    expected = heads.num_heads * (2 * heads.num_layers + 1)
    if len(state) != expected or any(t.numel() == 0 for t in state.values()):
        raise RuntimeError(
            f"the Medusa heads' parameters are still sharded ({len(state)} tensors, expected {expected} non-empty): "
            "pass the FSDP-wrapped model as wrapped= (FSDP1), or call this on every rank"
        )
    return state


def _is_main_process() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def save_medusa_heads(
    model: nn.Module, output_dir: str | Path, *, base_model_name_or_path: str | None = None,
    wrapped: nn.Module | None = None, is_main_process: bool | None = None,
) -> Path | None:
    """Write ``medusa_lm_head.safetensors`` and Medusa's fields of ``config.json`` into ``output_dir``.

    Every rank must call it (see :func:`medusa_heads_state_dict`); the main process writes (returns the
    file's path; None elsewhere). An existing ``config.json`` (the model's, in Medusa-2) keeps its keys.
    """
    state = medusa_heads_state_dict(model, wrapped=wrapped)
    if not (_is_main_process() if is_main_process is None else is_main_process):
        return None
    from safetensors.torch import save_file

    heads = medusa_heads(model)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / MEDUSA_HEADS_FILE
    save_file(state, str(path), metadata={"format": "pt"})
    config_path = out / MEDUSA_CONFIG_FILE
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    lm_config = getattr(causal_lm(model), "config", None)
    base = base_model_name_or_path or config.get("base_model_name_or_path") or getattr(lm_config, "_name_or_path", "")
    config.update(medusa_num_heads=heads.num_heads, medusa_num_layers=heads.num_layers,
                  base_model_name_or_path=base, hidden_size=heads.hidden_size, vocab_size=heads.vocab_size)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


def read_medusa_heads(path: str | Path) -> tuple[dict[str, torch.Tensor], int, int]:
    """``(state, num_heads, num_layers)`` of a ``medusa_lm_head.safetensors`` file (or the folder holding it)."""
    from safetensors.torch import load_file

    file = Path(path)
    if file.is_dir():
        file = file / MEDUSA_HEADS_FILE
    if not file.is_file():
        raise FileNotFoundError(f"path: no {MEDUSA_HEADS_FILE} at {file}")
    state = load_file(str(file))
    heads, layers = set(), -1
    for key in state:
        parts = key.split(".")
        if len(parts) == 3 and parts[2] == "weight" and parts[0].isdigit() and parts[1].isdigit():
            heads.add(int(parts[0]))
            layers = max(layers, int(parts[1]))
    if not heads or sorted(heads) != list(range(len(heads))):
        raise ValueError(f"path: {file} does not hold Medusa heads in the '{{k}}.{{layer}}...' key layout")
    return state, len(heads), layers


def load_medusa_heads(model: nn.Module, path: str | Path) -> MedusaHeads:
    """Load heads saved by :func:`save_medusa_heads` (or by Medusa) into ``model``, adding them if it has none.

    Raises ``ValueError`` when the file's head count or depth differs from the model's heads.
    """
    state, num_heads, num_layers = read_medusa_heads(path)
    lm = causal_lm(model)
    heads = lm.medusa_head if isinstance(getattr(lm, "medusa_head", None), MedusaHeads) else add_medusa_heads(
        lm, num_heads, num_layers)
    if (heads.num_heads, heads.num_layers) != (num_heads, num_layers):
        raise ValueError(f"path: the file holds {num_heads} heads of {num_layers} layers; the model has "
                         f"{heads.num_heads} of {heads.num_layers}")
    heads.load_state_dict(state, strict=True)
    return heads
