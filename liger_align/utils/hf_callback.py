"""``StepMeterCallback``: a :class:`StepMeter` driven by the Hugging Face ``Trainer``.

One measured step is one optimizer step: the clock starts in ``on_step_begin`` and stops in
``on_step_end`` (after the optimizer and scheduler steps). Tokens are counted by a forward pre-hook
on the training model: every training-mode forward inside the step adds its batch's non-padding
tokens (``attention_mask.sum()``, or ``input_ids.numel()`` without a mask), so every micro-batch of
gradient accumulation counts. ``TrainingArguments.include_num_input_tokens_seen`` is not used (it
changed from a bool to a string in transformers 5).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainerCallback

from .meter import StepMeter, count_tokens


class StepMeterCallback(TrainerCallback):
    """Measure the ``Trainer``'s steps with ``meter`` (default: ``StepMeter(warmup_steps, jsonl_path=...)``).

    ``callback.meter`` holds the records; ``callback.summary()`` is ``meter.summary()``.
    """

    def __init__(
        self, meter: StepMeter | None = None, warmup_steps: int = 2, jsonl_path: str | Path | None = None
    ) -> None:
        self.meter = meter if meter is not None else StepMeter(warmup_steps=warmup_steps, jsonl_path=jsonl_path)
        self._hook: Any = None

    def _count(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not (module.training and self.meter.in_step):
            return
        n = count_tokens(kwargs)
        if n is None and args and hasattr(args[0], "numel"):
            n = args[0].numel()  # input_ids passed positionally
        if n is not None:
            self.meter.add_tokens(n)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any):
        if self.meter.device is None:
            self.meter.device = args.device
        if self._hook is not None:
            self._hook.remove()
        if model is not None:
            self._hook = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any):
        self.meter.start_step()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any):
        self.meter.end_step()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def summary(self) -> dict[str, Any]:
        """The meter's summary over the measured steps (see :meth:`StepMeter.summary`)."""
        return self.meter.summary()
