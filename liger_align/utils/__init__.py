"""Measurement utilities (imports no other liger_align layer): step time, tokens/s, peak memory.

``StepMeter`` is the core (torch only); ``StepMeterCallback`` drives it from the Hugging Face
``Trainer`` and ``LightningStepMeter`` from Lightning. The adapters are imported on first access, so
``import liger_align.utils`` needs neither transformers nor lightning.
"""

from typing import Any

from .meter import StepMeter, count_tokens

__all__ = ["LightningStepMeter", "StepMeter", "StepMeterCallback", "count_tokens"]


def __getattr__(name: str) -> Any:
    if name == "StepMeterCallback":
        from .hf_callback import StepMeterCallback

        return StepMeterCallback
    if name == "LightningStepMeter":
        from .lightning_callback import LightningStepMeter

        return LightningStepMeter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
