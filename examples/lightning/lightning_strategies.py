"""``strategy_for(name, model)``: the Lightning strategy of the example, for any transformers causal LM.

- ``auto``, ``ddp``: Lightning's own (returned as the name).
- ``fsdp``: ``FSDPStrategy`` (FSDP1, full sharding) that wraps *and* activation-checkpoints every module
  whose class the model names in ``_no_split_modules`` (its decoder layer: ``LlamaDecoderLayer``,
  ``Qwen2DecoderLayer``, ``GemmaDecoderLayer``, ...), read from the model, not from a list of families.
- ``deepspeed``: ``DeepSpeedStrategy`` with ZeRO stage 3 (parameters, gradients and optimizer state
  partitioned) and bf16.

Lightning 2.6 runs ``fsdp`` and ``deepspeed`` on CUDA GPUs only; on CPU use ``auto`` or ``ddp``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

STRATEGIES = ("auto", "ddp", "fsdp", "deepspeed")
DEEPSPEED_FIX = "pip install 'deepspeed>=0.16' (Linux with CUDA), or use --strategy fsdp"


def no_split_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The module classes ``model`` (and its sub-models) name in ``_no_split_modules``, as found in ``model``.

    ``model`` may live on the meta device (only its structure is read). Raises ``ValueError`` when the
    model names none, or none of the named classes occurs in it.
    """
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes:
        raise ValueError(
            f"model: {type(model).__name__} names no module class to wrap (its _no_split_modules is "
            f"{sorted(names) or 'empty'}, found in the model: none); FSDP needs the decoder-layer class. "
            "Use --strategy deepspeed or ddp, or set _no_split_modules on the model class"
        )
    return classes


def require_deepspeed() -> None:
    """Raise ``ValueError`` with the fix when DeepSpeed cannot be imported."""
    try:
        import deepspeed  # noqa: F401
    except Exception as err:  # ImportError, or a broken install failing at import
        raise ValueError(
            f"--strategy deepspeed needs DeepSpeed, which is not installed or fails to import ({type(err).__name__}: "
            f"{err}); {DEEPSPEED_FIX}"
        ) from None


def strategy_for(name: str, model: nn.Module | None = None) -> Any:
    """The Lightning strategy called ``name`` (one of :data:`STRATEGIES`) for ``model``.

    Args:
        name: ``auto``, ``ddp``, ``fsdp`` or ``deepspeed``.
        model: the causal LM (e.g. built on the meta device); needed by ``fsdp`` for its wrap classes.

    Returns:
        The name for ``auto``/``ddp``, else a ``FSDPStrategy`` or ``DeepSpeedStrategy``.
    """
    if name not in STRATEGIES:
        raise ValueError(f"--strategy {name!r}: unknown strategy; choose one of {list(STRATEGIES)}")
    if name in ("auto", "ddp"):
        return name
    if name == "fsdp":
        if model is None:
            raise ValueError("strategy_for('fsdp', model): the model is needed to find the classes to wrap")
        from lightning.pytorch.strategies import FSDPStrategy

        classes = no_split_classes(model)
        return FSDPStrategy(
            auto_wrap_policy=set(classes), activation_checkpointing_policy=set(classes),
            sharding_strategy="FULL_SHARD", state_dict_type="full",
        )
    require_deepspeed()
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = DeepSpeedStrategy(stage=3)
    strategy.config["bf16"] = {"enabled": True}
    return strategy


def fsdp_policy_classes(strategy: Any) -> tuple[set[type], set[type]]:
    """The classes a ``FSDPStrategy`` wraps and activation-checkpoints (for checks and the summary)."""
    wrap = strategy.kwargs.get("auto_wrap_policy")
    ckpt = strategy._activation_checkpointing_kwargs.get("auto_wrap_policy")
    return set(getattr(wrap, "_module_classes", ())), set(getattr(ckpt, "_module_classes", ()))
