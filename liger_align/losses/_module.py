"""The base of the ``LigerFusedLinear*Loss`` modules: settings checked once, at construction."""

from __future__ import annotations

from typing import Any

from torch import nn
from typing_extensions import Unpack

from ._paired import LogitKwargs, logit_options, options_kwargs


class FusedLossModule(nn.Module):
    """Holds an objective's settings (``self.config``), the logit options (``self.logit_options``) and the
    gradient path (``self.strategy``).

    Subclasses check their own settings, pass them here with the logit keywords (:class:`LogitKwargs`),
    and call their functional twin with ``**self.config, **self.logit_kwargs``.
    """

    def __init__(self, config: dict[str, Any], **logit_kwargs: Unpack[LogitKwargs]) -> None:
        super().__init__()
        self.config = config
        self.logit_options, self.strategy = logit_options(**logit_kwargs)

    @property
    def logit_kwargs(self) -> dict[str, Any]:
        """The logit keywords of :attr:`logit_options` and the strategy, to pass to the functional twin."""
        return options_kwargs(self.logit_options, self.strategy)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in {**self.config, **self.logit_kwargs}.items())
