"""Corpora, tokenizers and token datasets.

corpus        'shakespeare' (built in) or the user's UTF-8 files -> one text, split train/val
tokenization  char | bpe:N | gpt2 tokenizers, saved and loaded as JSON
prepare       text -> DATA_DIR/{train.bin, val.bin, tokenizer.json, meta.json}
dataset       DATA_DIR -> memory-mapped splits and the batches training and evaluation use
"""

from truthgpt.data.corpus import (
    Corpus,
    Source,
    clean_play,
    load_corpus,
    shakespeare_text,
    split_text,
)
from truthgpt.data.dataset import (
    PreparedData,
    RandomBatches,
    TokenSplit,
    bits_per_char,
    load_prepared,
    sequential_batches,
    tokens_per_char,
)
from truthgpt.data.prepare import prepare_data, token_dtype
from truthgpt.data.tokenization import (
    BPETokenizer,
    CharTokenizer,
    GPT2Tokenizer,
    Tokenizer,
    build_tokenizer,
    load_tokenizer,
)

__all__ = [
    "BPETokenizer",
    "CharTokenizer",
    "Corpus",
    "GPT2Tokenizer",
    "PreparedData",
    "RandomBatches",
    "Source",
    "TokenSplit",
    "Tokenizer",
    "bits_per_char",
    "build_tokenizer",
    "clean_play",
    "load_corpus",
    "load_prepared",
    "load_tokenizer",
    "prepare_data",
    "sequential_batches",
    "shakespeare_text",
    "split_text",
    "token_dtype",
    "tokens_per_char",
]
