"""Fixtures for the processor tests: a tiny BERT WordPiece tokenizer built offline with ``tokenizers``."""

from pathlib import Path

import pytest

# Lower-cased BERT-style vocabulary: specials first, then whole words and "##" continuation pieces.
TINY_VOCAB = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
    "what", "color", "is", "the", "circle", "square", "triangle", "red", "blue", "green",
    "left", "right", "of", "a", "dog", "cat", "play", "##ing", "##s", "un", "##believ", "##able",
    "?", ".", ",", "two", "there", "are", "on", "in", "image", "big", "small", "how", "many",
    "shapes", "to", "and", "with", "yellow", "purple", "top", "bottom", "side", "picture",
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9",
]  # fmt: skip


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A Hugging Face tokenizer directory (tokenizer.json, tokenizer_config.json, vocab.txt) for a
    60-token uncased WordPiece vocabulary; loadable with ``AutoTokenizer.from_pretrained``."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny_tokenizer")
    vocab = {token: i for i, token in enumerate(TINY_VOCAB)}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    )
    fast.save_pretrained(str(out))
    (out / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n", encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def tiny_vocab() -> dict:
    return {token: i for i, token in enumerate(TINY_VOCAB)}
