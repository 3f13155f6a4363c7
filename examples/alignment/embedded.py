"""The embedded default of the examples: a local tokenizer, a tiny Llama-3.2-shaped model, shipped data.

Nothing here reaches the network and importing this module has no side effects. The trainer tests
reuse these builders::

    from embedded import build_tokenizer, build_tiny_llama, load_preference_dataset
    tokenizer = build_tokenizer()
    model = build_tiny_llama(len(tokenizer), bos_token_id=tokenizer.bos_token_id, ...)
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

DATA_PATH = Path(__file__).resolve().parent / "data" / "preferences.jsonl"

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

# Llama 3.2's rope scaling (the "llama3" rule: factor 32 over the original context), at a tiny scale.
ROPE_FACTOR = 32.0


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSON-lines file into a list of dicts (blank lines are skipped)."""
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_preference_dataset(path: str | Path = DATA_PATH) -> Dataset:
    """The shipped preference data as a ``Dataset`` with string columns ``prompt``, ``chosen``, ``rejected``.

    Rows are in file order; split them with ``Dataset.train_test_split`` for a held-out set.
    """
    rows = read_jsonl(path)
    return Dataset.from_dict({key: [row[key] for row in rows] for key in ("prompt", "chosen", "rejected")})


def to_unpaired(dataset: Dataset) -> Dataset:
    """The unpaired (KTO) view of a paired data set: columns ``prompt``, ``completion``, ``label``.

    Each pair gives two rows, ``(prompt, chosen, True)`` then ``(prompt, rejected, False)``.
    """

    def unpair(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"prompt": [], "completion": [], "label": []}
        for prompt, chosen, rejected in zip(batch["prompt"], batch["chosen"], batch["rejected"], strict=True):
            out["prompt"] += [prompt, prompt]
            out["completion"] += [chosen, rejected]
            out["label"] += [True, False]
        return out

    return dataset.map(unpair, batched=True, remove_columns=dataset.column_names)


def load_unpaired_dataset(path: str | Path = DATA_PATH) -> Dataset:
    """The shipped data in the unpaired KTO format (``prompt``, ``completion``, ``label``)."""
    return to_unpaired(load_preference_dataset(path))


def _corpus(path: str | Path) -> Iterable[str]:
    for row in read_jsonl(path):
        yield from (row["prompt"], row["chosen"], row["rejected"])


def build_tokenizer(texts: Iterable[str] | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained on ``texts`` (default: the shipped data), ready for TRL's trainers.

    Words and punctuation marks are tokens; every sequence starts with ``<bos>`` (added by the
    post-processor, as Llama 3's tokenizer does); ``<eos>`` ends a turn; ``<pad>`` pads; unknown
    words map to ``<unk>``. It carries a small chat template (``<|user|> text<eos><|assistant|>``),
    so conversational data sets work too. Deterministic: the same texts give the same vocabulary.
    """
    backend = Tokenizer(models.WordLevel(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS), min_frequency=1)
    backend.train_from_iterator(texts if texts is not None else _corpus(DATA_PATH), trainer=trainer)
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


def build_tiny_llama(
    vocab_size: int,
    *,
    hidden_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 4096,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A randomly initialised causal LM with Llama 3.2's architecture at a tiny size, in float32.

    Llama 3.2's shape choices are kept: grouped-query attention (``num_key_value_heads`` <
    ``num_attention_heads``), RMSNorm, SwiGLU MLP, RoPE with the ``llama3`` frequency scaling, and
    the output head tied to the input embeddings; the rope scaling's original context is
    ``max_position_embeddings / 32``, as in Llama 3.2 (8192 of 131072). ``intermediate_size``
    defaults to ``4 * hidden_size``.
    The weights depend only on ``seed``; the global RNG state is left as it was.
    """
    if hidden_size % num_attention_heads:
        raise ValueError(
            f"hidden_size ({hidden_size}) must be a multiple of num_attention_heads ({num_attention_heads})"
        )
    if num_attention_heads % num_key_value_heads:
        raise ValueError(
            f"num_attention_heads ({num_attention_heads}) must be a multiple of "
            f"num_key_value_heads ({num_key_value_heads})"
        )
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=hidden_size // num_attention_heads,
        hidden_act="silu",
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": ROPE_FACTOR,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": int(max_position_embeddings // ROPE_FACTOR),
        },
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def build_embedded(seed: int = 0, **model_kwargs) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, Dataset]:
    """The tokenizer, a tiny Llama sized for it (``model_kwargs`` go to ``build_tiny_llama``) and the data."""
    tokenizer = build_tokenizer()
    model = build_tiny_llama(
        len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        seed=seed,
        **model_kwargs,
    )
    return model, tokenizer, load_preference_dataset()
