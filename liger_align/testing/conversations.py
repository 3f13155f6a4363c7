"""Generated ShareGPT conversations that walk a ring of words (a tiny model's Medusa heads learn them), and the
tokenization of chat rows with the assistant turns as the only targets.

The assistant turn of each conversation walks ``RING`` in order, so token t fixes tokens t+2..t+4: what
Medusa head k (predicting t+k+1) can learn. ``tokenize`` works for any tokenizer with a chat template
(``examples/medusa/train.py`` uses it for real data sets too).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
         "bing": "assistant", "chatgpt": "assistant"}
RING = ("amber basil cedar dune ember fjord grove heron iris jade kelp lotus maple nectar onyx pearl quartz "
        "raven sage tulip umber violet willow yarrow zinnia").split()
FILLER = "please the a now words next some then go on list with".split()


def make_conversations(count: int, seed: int = 0) -> list[dict]:
    """``count`` ShareGPT rows: a human asks to walk the word ring from a word, the assistant walks it.

    The assistant's words follow ``RING`` in order (wrapping around), 48 to 80 of them, so each word
    fixes the next four; the human turn is random filler and is not a target.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        start = rng.randrange(len(RING))
        filler = " ".join(rng.choice(FILLER) for _ in range(rng.randint(2, 6)))
        walk = " ".join(RING[(start + i) % len(RING)] for i in range(rng.randint(48, 80)))
        rows.append({"conversations": [
            {"from": "human", "value": f"{filler} ring from {RING[start]}"},
            {"from": "gpt", "value": walk},
        ]})
    return rows


def to_messages(row: dict) -> list[dict]:
    """A ShareGPT (``conversations``) or chat (``messages``) row as ``[{"role", "content"}]``."""
    if row.get("messages"):
        return [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    turns = row.get("conversations")
    if not turns:
        raise ValueError(f"a row needs 'conversations' (ShareGPT) or 'messages'; found keys {sorted(row)}")
    out = []
    for turn in turns:
        role = ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise ValueError(f"unknown ShareGPT speaker {turn.get('from')!r}; expected one of {sorted(ROLES)}")
        out.append({"role": role, "content": turn["value"]})
    return out


def tokenize(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Dataset:
    """``input_ids``/``attention_mask``/``labels`` with the assistant turns as the only targets.

    Each assistant turn's tokens are those its message adds to the rendered conversation after the
    generation prompt (so the role header is not a target).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat_template; Medusa training data is formatted with one")

    def ids_of(messages: list[dict], prompt: bool) -> list[int]:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(row: dict) -> dict[str, list[int]]:
        messages = to_messages(row)
        ids = ids_of(messages, prompt=False)
        labels = [-100] * len(ids)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = len(ids_of(messages[:i], prompt=True)) if i else 0
            end = len(ids_of(messages[: i + 1], prompt=False))
            if ids[:end] != ids_of(messages[: i + 1], prompt=False) or start > end:
                raise ValueError("the chat template does not render a conversation as growing prefixes")
            labels[start:end] = ids[start:end]
        ids, labels = ids[:max_length], labels[:max_length]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    return dataset.map(encode, remove_columns=dataset.column_names)
