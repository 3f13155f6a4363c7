"""Tiny local models, tokenizers and data for tests and the examples' embedded defaults; nothing is downloaded.

One module per job (none imports another ``liger_align`` layer; ``import liger_align`` does not load this
package, and ``tokenizers`` / ``pillow``, in the ``dev`` extra, are imported only when a tokenizer or an
image is made):

- ``preferences``: the shipped preference data (``data/preferences.jsonl``) and its unpaired (KTO) view;
- ``tokenizer``: the word-level tokenizer with Llama-3-like special tokens and a chat template;
- ``tiny_llama``: a tiny Llama-3.2-shaped model whose weights depend only on a seed, and the embedded triple;
- ``tiny_qwen2_vl``: the tiny Qwen2-VL, its tokenizer and image-only processor, generated image rows;
- ``conversations``: generated ring-walking conversations and assistant-only chat tokenization (Medusa).

The text pieces are re-exported here::

    from liger_align.testing import build_tiny_llama, build_tokenizer, load_preference_dataset
    tokenizer = build_tokenizer()
    model = build_tiny_llama(len(tokenizer), pad_token_id=tokenizer.pad_token_id, seed=0)
"""

from .preferences import DATA_PATH, load_preference_dataset, load_unpaired_dataset, read_jsonl, to_unpaired
from .tiny_llama import build_embedded, build_tiny_llama
from .tokenizer import build_tokenizer

__all__ = [
    "DATA_PATH", "build_embedded", "build_tiny_llama", "build_tokenizer", "load_preference_dataset",
    "load_unpaired_dataset", "read_jsonl", "to_unpaired",
]
