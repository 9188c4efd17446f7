"""bert_tokenizer / masked_token / caption / tags: layout, truncation, MLM statistics, decoding."""

import json

import pytest
import torch

import mmf_plugins.processors.text_processors  # noqa: F401  (registers the processors under test)
from mmf_plugins.processors.base_processor import build_processor
from mmf_plugins.processors.text_processors import truncate_seq_pair


def _bert(tokenizer_dir, **params):
    spec = {"type": "bert_tokenizer", "params": {"tokenizer_config": {"type": str(tokenizer_dir)}, **params}}
    return build_processor(spec)


def _ids(vocab, tokens):
    return [vocab[t] for t in tokens]


def test_pair_layout_segments_and_padding(tiny_tokenizer_dir, tiny_vocab):
    proc = _bert(tiny_tokenizer_dir, max_seq_length=16)
    out = proc({"text": "What color is the circle?", "text_b": "red square"})
    tokens = ["[CLS]", "what", "color", "is", "the", "circle", "?", "[SEP]", "red", "square", "[SEP]"]
    assert out["tokens"] == tokens
    assert out["input_ids"].tolist() == _ids(tiny_vocab, tokens) + [0] * 5
    assert out["segment_ids"].tolist() == [0] * 8 + [1] * 3 + [0] * 5
    assert out["input_mask"].tolist() == [1] * 11 + [0] * 5
    assert out["lm_label_ids"].tolist() == [-1] * 16
    assert out["text"] == "What color is the circle?"
    assert proc.pad_id == 0 and proc.cls_id == 2 and proc.sep_id == 3 and proc.mask_id == 4
    assert proc.vocab_size == len(tiny_vocab)


def test_single_text_and_truncation(tiny_tokenizer_dir, tiny_vocab):
    proc = _bert(tiny_tokenizer_dir, max_seq_length=6)
    out = proc({"text": "the red circle is left of the blue square"})
    assert out["tokens"] == ["[CLS]", "the", "red", "circle", "is", "[SEP]"]
    assert out["segment_ids"].tolist() == [0] * 6
    assert out["input_mask"].tolist() == [1] * 6
    # empty text_b behaves as no text_b
    assert proc({"text": "red dog", "text_b": ""})["tokens"] == ["[CLS]", "red", "dog", "[SEP]"]


def test_truncate_seq_pair_pops_the_longer_side():
    a, b = list("abcdef"), list("xyz")
    truncate_seq_pair(a, b, 6)
    assert (a, b) == (list("abc"), list("xyz"))
    a, b = list("ab"), list("stuvwxyz")
    truncate_seq_pair(a, b, 6)
    assert (a, b) == (list("ab"), list("stuv"))
    a, b = list("abcd"), list("wxyz")  # tie pops b first, then a is longer
    truncate_seq_pair(a, b, 6)
    assert (a, b) == (list("abc"), list("wxy"))
    a, b = list("abc"), list("xyz")  # tie: b loses the token
    truncate_seq_pair(a, b, 5)
    assert (a, b) == (list("abc"), list("xy"))


def test_pair_truncation_in_processor(tiny_tokenizer_dir):
    proc = _bert(tiny_tokenizer_dir, max_seq_length=9)
    out = proc({"text": "the red circle is left of", "text_b": "big dog cat"})
    # budget 9 - 3 = 6 -> a loses 3 tokens, b keeps 3
    assert out["tokens"] == ["[CLS]", "the", "red", "circle", "[SEP]", "big", "dog", "cat", "[SEP]"]
    assert out["segment_ids"].tolist() == [0] * 5 + [1] * 4


def test_mlm_rates_specials_and_labels(tiny_tokenizer_dir, tiny_vocab):
    text = "the red circle is left of the blue square and the green triangle is on top of the yellow dog " * 2
    tags = "circle square triangle dog cat"
    plain = _bert(tiny_tokenizer_dir, max_seq_length=64)({"text": text, "text_b": tags})
    original = plain["input_ids"]
    length = int(plain["input_mask"].sum())
    special = torch.zeros(64, dtype=torch.bool)
    special[[0, length - 1, plain["segment_ids"].tolist().index(1) - 1]] = True
    special[length:] = True
    maskable = ~special
    proc = _bert(tiny_tokenizer_dir, max_seq_length=64, mask_probability=0.15)
    torch.manual_seed(0)
    chosen = masked = randomized = kept = 0
    draws = 400
    for _ in range(draws):
        out = proc({"text": text, "text_b": tags})
        ids, labels = out["input_ids"], out["lm_label_ids"]
        sel = labels != -1
        assert not bool(sel[special].any()), "special tokens or padding were masked"
        assert torch.equal(ids[special], original[special])
        assert torch.equal(labels[sel], original[sel])  # labels = original ids
        assert torch.equal(ids[~sel], original[~sel])  # unchosen tokens untouched
        chosen += int(sel.sum())
        masked += int((ids[sel] == tiny_vocab["[MASK]"]).sum())
        kept += int((ids[sel] == original[sel]).sum())
        randomized += int(((ids[sel] != original[sel]) & (ids[sel] != tiny_vocab["[MASK]"])).sum())
        swapped = ids[sel & (ids != original) & (ids != tiny_vocab["[MASK]"])]
        assert bool((swapped >= 5).all())  # random replacements are never special tokens
    total = draws * int(maskable.sum())
    assert abs(chosen / total - 0.15) < 0.01
    assert abs(masked / chosen - 0.8) < 0.03
    assert abs(randomized / chosen - 0.1) < 0.025
    assert abs(kept / chosen - 0.1) < 0.025


def test_random_replacement_never_inserts_specials(tiny_tokenizer_dir):
    proc = _bert(tiny_tokenizer_dir, max_seq_length=32, mask_probability=1.0,
                 mask_token_probability=0.0, random_token_probability=1.0)
    torch.manual_seed(1)
    for _ in range(50):
        out = proc({"text": "red dog on the left of the big square picture"})
        body = out["input_ids"][1:int(out["input_mask"].sum()) - 1]
        assert bool((body >= 5).all())  # ids 0..4 are the specials


def test_whole_word_mask_masks_all_pieces(tiny_tokenizer_dir, tiny_vocab):
    proc = _bert(tiny_tokenizer_dir, max_seq_length=40, mask_probability=0.15, whole_word_mask=True)
    text = "unbelievable playing cats dog " * 4
    plain = _bert(tiny_tokenizer_dir, max_seq_length=40)({"text": text})
    tokens = plain["tokens"]
    assert tokens[1:9] == ["un", "##believ", "##able", "play", "##ing", "cat", "##s", "dog"]
    # word groups: position lists
    groups, current = [], []
    for pos, tok in enumerate(tokens[1:-1], start=1):
        if not tok.startswith("##") and current:
            groups.append(current)
            current = []
        current.append(pos)
    groups.append(current)
    assert len(groups) == 16
    torch.manual_seed(2)
    words_chosen = 0
    draws = 400
    for _ in range(draws):
        out = proc({"text": text})
        sel = out["lm_label_ids"] != -1
        ids = out["input_ids"]
        for group in groups:
            g = torch.tensor(group)
            assert bool(sel[g].all()) or not bool(sel[g].any()), "a word was partly masked"
            if bool(sel[g].all()):
                words_chosen += 1
                is_mask = ids[g] == tiny_vocab["[MASK]"]
                assert bool(is_mask.all()) or not bool(is_mask.any()), "pieces of one word got different treatment"
    assert abs(words_chosen / (draws * len(groups)) - 0.15) < 0.015


def test_masked_token_processor(tiny_tokenizer_dir, tiny_vocab):
    base = _bert(tiny_tokenizer_dir, max_seq_length=24)({"text": "the red circle is left of the blue square",
                                                          "text_b": "circle square"})
    proc = build_processor({"type": "masked_token", "params": {
        "tokenizer_config": {"type": str(tiny_tokenizer_dir)}, "mask_probability": 0.5}})
    torch.manual_seed(3)
    valid = base["input_mask"].bool()
    specials = torch.isin(base["input_ids"], torch.tensor([0, 2, 3]))
    chosen = 0
    for _ in range(200):
        out = proc({"input_ids": base["input_ids"], "input_mask": base["input_mask"]})
        sel = out["lm_label_ids"] != -1
        assert not bool(sel[~valid | specials].any())
        assert torch.equal(out["lm_label_ids"][sel], base["input_ids"][sel])
        chosen += int(sel.sum())
    assert abs(chosen / (200 * int((valid & ~specials).sum())) - 0.5) < 0.03
    with pytest.raises(ValueError, match="1-D"):
        proc({"input_ids": [1, 2, 3]})


def test_caption_ids_and_decode(tiny_tokenizer_dir, tiny_vocab):
    proc = build_processor({"type": "caption", "params": {
        "tokenizer_config": {"type": str(tiny_tokenizer_dir)}, "max_length": 10}})
    out = proc({"text": "Unbelievable cats playing"})
    expected = _ids(tiny_vocab, ["[CLS]", "un", "##believ", "##able", "cat", "##s", "play", "##ing", "[SEP]"])
    assert out["caption_ids"].tolist() == expected + [0]
    assert out["caption_len"] == 9
    assert proc.decode(out["caption_ids"]) == "unbelievable cats playing"
    # stops at the first [SEP]; ignores what follows
    assert proc.decode([2, tiny_vocab["red"], tiny_vocab["dog"], 3, tiny_vocab["cat"]]) == "red dog"
    assert proc.batch_decode(torch.stack([out["caption_ids"], out["caption_ids"]])) == ["unbelievable cats playing"] * 2
    long = proc({"text": "red dog " * 10})
    assert long["caption_len"] == 10 and long["caption_ids"][-1].item() == 3


def test_tags_processor(tmp_path):
    proc = build_processor({"type": "tags", "params": {}})
    assert proc({"objects": ["circle", "square", "circle"]})["tags"] == "circle square circle"
    dedup = build_processor({"type": "tags", "params": {"deduplicate": True, "max_tags": 2}})
    assert dedup({"objects": ["circle", "circle", "square", "dog"]})["tags"] == "circle square"
    label_map = tmp_path / "labels.json"
    label_map.write_text(json.dumps({"idx_to_label": {"0": "__background__", "1": "circle", "2": "square"}}))
    by_id = build_processor({"type": "tags", "params": {"label_map": "labels.json"}}, data_dir=str(tmp_path))
    assert by_id({"objects": torch.tensor([2, 1, 0, 2]), "num_boxes": 3})["tags"] == "square circle"
    with pytest.raises(ValueError, match="label map"):
        proc({"objects": [1, 2]})
    with pytest.raises(KeyError, match="not in the label map"):
        by_id({"objects": [7]})


def test_tokenizer_loading_errors_and_options(tiny_tokenizer_dir, tmp_path):
    # relative path resolved against data_dir
    proc = build_processor({"type": "bert_tokenizer", "params": {
        "tokenizer_config": {"type": tiny_tokenizer_dir.name}}}, data_dir=str(tiny_tokenizer_dir.parent))
    assert proc({"text": "Red dog"})["tokens"] == ["[CLS]", "red", "dog", "[SEP]"]
    cased = _bert(tiny_tokenizer_dir, tokenizer_config={"type": str(tiny_tokenizer_dir),
                                                       "params": {"do_lower_case": False}})
    assert cased({"text": "Red dog"})["tokens"] == ["[CLS]", "[UNK]", "dog", "[SEP]"]
    with pytest.raises(FileNotFoundError) as err:
        build_processor({"type": "bert_tokenizer", "params": {"tokenizer_config": {"type": "no/such/tokenizer"}}},
                        data_dir=str(tmp_path))
    assert str(tmp_path / "no/such/tokenizer") in str(err.value)
    assert "local Hugging Face tokenizer" in str(err.value) and "shapes" in str(err.value)
    with pytest.raises(ValueError, match="mask_probabilty"):
        _bert(tiny_tokenizer_dir, mask_probabilty=0.15)
    with pytest.raises(ValueError, match="string"):
        proc({"text": 3})
