"""The base of the ``LigerFusedLinear*Loss`` modules: settings checked once, at construction."""

from __future__ import annotations

from typing import Any

from torch import nn

from ._paired import logit_options, options_kwargs


class FusedLossModule(nn.Module):
    """Holds an objective's settings (``self.config``) and the logit options (``self.logit_kwargs``).

    Subclasses check their own settings, pass them here, and call their functional twin with
    ``**self.config, **self.logit_kwargs``.
    """

    def __init__(
        self,
        config: dict[str, Any],
        *,
        ignore_index: int = -100,
        temperature: float = 1.0,
        softcap: float | None = None,
        logit_scale: float = 1.0,
        chunk_bytes: int | None = None,
        impl: str | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.logit_kwargs = options_kwargs(
            logit_options(
                ignore_index=ignore_index, temperature=temperature, softcap=softcap, logit_scale=logit_scale,
                chunk_bytes=chunk_bytes, impl=impl,
            )
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in {**self.config, **self.logit_kwargs}.items())
