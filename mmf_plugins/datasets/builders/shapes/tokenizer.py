"""A small uncased BERT WordPiece tokenizer for the ``shapes`` corpus, saved as a Hugging Face folder.

The folder (``vocab.txt``, ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``)
loads offline with ``transformers.BertTokenizerFast.from_pretrained(dir)`` and
``AutoTokenizer.from_pretrained(dir)``, exactly like ``bert-base-uncased``: same normalizer
(``BertNormalizer`` lower-casing), pre-tokenizer, ``[CLS] A [SEP] B [SEP]`` post-processor and
special tokens, with ``[PAD]`` = 0 so padding with zeros stays right.

Deliberate difference from ``tokenizers``' ``WordPieceTrainer``: that trainer breaks ties between
equally frequent pairs by hash-map order, so two runs on the same text give different vocabularies
(checked with tokenizers 0.23), and the corpus must be byte-identical for a given seed. The
vocabulary is therefore chosen deterministically here, with the ``tokenizers`` normalizer and
pre-tokenizer doing the splitting: the specials, every character and its ``##`` continuation (so no
word is ever ``[UNK]``), then whole words by frequency, then the most frequent word-final
``##`` pieces (plural and inflection endings, so unseen words split sensibly), up to ``vocab_size``.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import WordPiece
from tokenizers.processors import BertProcessing

from mmf_plugins.datasets.builders.shapes.atomic import write_text

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _normalizer() -> normalizers.BertNormalizer:
    return normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)


def build_vocab(texts: Iterable[str], vocab_size: int = 1000, min_frequency: int = 1) -> list[str]:
    """Token list (index = id) for ``texts``; see the module docstring for the order."""
    norm, pre = _normalizer(), pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    for text in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(text)))
    chars = sorted({c for w in words for c in w})
    vocab = list(SPECIAL_TOKENS) + chars + ["##" + c for c in chars]
    if len(vocab) > vocab_size:
        raise ValueError(
            f"vocab_size={vocab_size} is smaller than the {len(vocab)} special and character tokens the corpus "
            "needs; pass a larger vocab_size"
        )
    have = set(vocab)
    for word, freq in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
        if freq < min_frequency or len(vocab) >= vocab_size:
            break
        if word not in have:
            vocab.append(word)
            have.add(word)
    suffixes: Counter[str] = Counter()
    for word, freq in words.items():
        for k in range(2, min(5, len(word))):
            suffixes["##" + word[-k:]] += freq
    for piece, _ in sorted(suffixes.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= vocab_size:
            break
        if piece not in have:
            vocab.append(piece)
            have.add(piece)
    return vocab


def make_tokenizer(vocab: list[str]) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` configured exactly like ``bert-base-uncased``'s ``tokenizer.json``."""
    tok = Tokenizer(WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = _normalizer()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = BertProcessing(("[SEP]", vocab.index("[SEP]")), ("[CLS]", vocab.index("[CLS]")))
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def save_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 1000) -> Path:
    """Build the vocabulary from ``texts`` and write the four tokenizer files into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = build_vocab(texts, vocab_size=vocab_size)
    tok = make_tokenizer(vocab)
    specials = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"}
    config = {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": True,
        "tokenize_chinese_chars": True,
        "strip_accents": None,
        "model_max_length": 512,
        "clean_up_tokenization_spaces": True,
        **specials,
    }
    write_text(out / "vocab.txt", "\n".join(vocab) + "\n")
    write_text(out / "tokenizer.json", tok.to_str(pretty=True))
    write_text(out / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    write_text(out / "special_tokens_map.json", json.dumps(specials, indent=2) + "\n")
    return out
