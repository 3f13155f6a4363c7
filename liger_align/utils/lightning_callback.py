"""``LightningStepMeter``: a :class:`StepMeter` driven by a Lightning ``Trainer``.

One measured step is one training batch: the clock starts in ``on_train_batch_start`` and stops in
``on_train_batch_end``; the batch's non-padding tokens (``attention_mask.sum()``, else
``input_ids.numel()``; the first element of a tuple batch) are counted. This module imports lightning;
``liger_align.utils`` imports it only when ``LightningStepMeter`` is asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

try:
    from lightning.pytorch import Callback
except ImportError:  # the older package name
    from pytorch_lightning import Callback

from .meter import StepMeter, count_tokens


class LightningStepMeter(Callback):
    """Measure a Lightning run's training batches with ``meter`` (default: ``StepMeter(warmup_steps, ...)``).

    ``callback.meter`` holds the records; ``callback.summary()`` is ``meter.summary()``.
    """

    def __init__(
        self, meter: StepMeter | None = None, warmup_steps: int = 2, jsonl_path: str | Path | None = None
    ) -> None:
        super().__init__()
        self.meter = meter if meter is not None else StepMeter(warmup_steps=warmup_steps, jsonl_path=jsonl_path)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.meter.device is None:
            self.meter.device = pl_module.device

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.meter.start_step()
        n = count_tokens(batch[0] if isinstance(batch, (list, tuple)) and batch else batch)
        if n is not None:
            self.meter.add_tokens(n)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.meter.end_step()

    def summary(self) -> dict[str, Any]:
        """The meter's summary over the measured steps (see :meth:`StepMeter.summary`)."""
        return self.meter.summary()
