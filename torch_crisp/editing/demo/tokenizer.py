"""A word-level tokenizer for the demo world, built locally with Hugging Face ``tokenizers``."""

from __future__ import annotations

from typing import Any

__all__ = ["SPECIAL_TOKENS", "build_tokenizer"]

SPECIAL_TOKENS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>"}


def build_tokenizer(vocabulary: list[str]) -> Any:
    """A ``PreTrainedTokenizerFast`` over ``vocabulary`` (one token per word, ``<bos>`` prepended).

    Words are split on whitespace and punctuation, so ``"lives in arvel ."`` is four tokens and
    the period that ends every sentence is a token of its own (the demo's natural stop).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values())
    vocab = {token: index for index, token in enumerate(specials + [w for w in vocabulary if w not in specials])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Decoding joins words with single spaces (WordPiece's decoder without "##" merging).
    core.decoder = decoders.WordPiece(prefix="\u0000", cleanup=False)
    bos = SPECIAL_TOKENS["bos_token"]
    core.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, **SPECIAL_TOKENS)
    tokenizer.padding_side = "right"
    return tokenizer
