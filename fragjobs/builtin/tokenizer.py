"""A byte-level CLIP-style tokenizer built in memory (no vocabulary files, no download).

Every UTF-8 byte is one token (ids 0–255), followed by ``<|startoftext|>`` (256),
``<|endoftext|>`` (257) and ``<|pad|>`` (258). Any text can be tokenized, so a prompt with
unseen words still generates. It is a ``PreTrainedTokenizerFast``, so diffusers pipelines use
it exactly like ``CLIPTokenizer`` (``padding="max_length"``, ``truncation``, ``attention_mask``).
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
BOS_ID, EOS_ID, PAD_ID = 256, 257, 258
VOCAB_SIZE = 259


def build_byte_tokenizer(model_max_length: int = 77) -> PreTrainedTokenizerFast:
    """A deterministic byte-level tokenizer with CLIP's special-token layout."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_char = sorted(alphabet, key=lambda ch: _byte_of(ch))
    vocab = {ch: i for i, ch in enumerate(byte_to_char)}
    vocab.update({BOS_TOKEN: BOS_ID, EOS_TOKEN: EOS_ID, PAD_TOKEN: PAD_ID})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
        special_tokens=[(BOS_TOKEN, BOS_ID), (EOS_TOKEN, EOS_ID)],
    )
    core.add_special_tokens([BOS_TOKEN, EOS_TOKEN, PAD_TOKEN])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
    )


def _byte_of(char: str) -> int:
    """Inverse of GPT-2's bytes→unicode table used by the ByteLevel pre-tokenizer."""
    code = ord(char)
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]
