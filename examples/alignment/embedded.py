"""The embedded default of the examples: a local tokenizer, a tiny Llama-3.2-shaped model, shipped data.

The builders live in the library (``liger_align.testing``, which the tests use too); this module keeps the
names the examples use. Nothing here reaches the network::

    from embedded import build_tokenizer, build_tiny_llama, load_preference_dataset
    tokenizer = build_tokenizer()
    model = build_tiny_llama(len(tokenizer), bos_token_id=tokenizer.bos_token_id, ...)
"""

from __future__ import annotations

import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[2]
if (_REPO / "liger_align").is_dir() and str(_REPO) not in sys.path:  # a checkout that is not pip-installed
    sys.path.insert(0, str(_REPO))

from liger_align.testing.preferences import (  # noqa: E402
    DATA_PATH,
    load_preference_dataset,
    load_unpaired_dataset,
    read_jsonl,
    to_unpaired,
)
from liger_align.testing.tiny_llama import ROPE_FACTOR, build_embedded, build_tiny_llama  # noqa: E402
from liger_align.testing.tokenizer import (  # noqa: E402
    BOS,
    CHAT_TEMPLATE,
    EOS,
    PAD,
    ROLE_TOKENS,
    SPECIAL_TOKENS,
    UNK,
    build_tokenizer,
)

__all__ = [
    "BOS", "CHAT_TEMPLATE", "DATA_PATH", "EOS", "PAD", "ROLE_TOKENS", "ROPE_FACTOR", "SPECIAL_TOKENS", "UNK",
    "build_embedded", "build_tiny_llama", "build_tokenizer", "load_preference_dataset", "load_unpaired_dataset",
    "read_jsonl", "to_unpaired",
]
