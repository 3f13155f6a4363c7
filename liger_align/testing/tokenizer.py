"""A word-level tokenizer built locally (no download), with Llama-3-like special tokens and a chat template.

Needs the ``tokenizers`` package (the ``dev`` extra); it is imported when a tokenizer is built.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from .preferences import DATA_PATH, corpus

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD, UNK = "<bos>", "<eos>", "<pad>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, *ROLE_TOKENS)

# One turn per message, "<|role|> content<eos>"; the generation prompt opens the assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }} {{ message['content'] }}{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_tokenizer(texts: Iterable[str] | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained on ``texts`` (default: the shipped preference data), ready for TRL's trainers.

    Words and punctuation marks are tokens; every sequence starts with ``<bos>`` (added by the
    post-processor, as Llama 3's tokenizer does); ``<eos>`` ends a turn; ``<pad>`` pads; unknown
    words map to ``<unk>``. It carries a small chat template (``<|user|> text<eos><|assistant|>``),
    so conversational data sets work too. Deterministic: the same texts give the same vocabulary.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS), min_frequency=1)
    backend.train_from_iterator(texts if texts is not None else corpus(DATA_PATH), trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, backend.token_to_id(BOS))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=512,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
