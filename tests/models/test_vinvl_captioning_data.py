"""VinVL captioning data path: the ``vinvl_caption`` processor's layout, masking and decoding, the
``coco`` builder's caption decoder, and processor -> model -> decoded strings -> caption metric."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mmf_plugins.common.registry import registry
from mmf_plugins.common.sample import SampleList, collate
from mmf_plugins.datasets.builders.coco.builder import CaptionDataset, COCOCaptionBuilder
from mmf_plugins.metrics.metrics import CaptionBleu4, CaptionCider
from mmf_plugins.models.base_model import build_model
from mmf_plugins.models.vinvl.modeling_vinvl import VinVLModel  # noqa: F401  (registers "vinvl")
from mmf_plugins.models.vinvl.pretraining_data import num_caption_masks
from mmf_plugins.processors.caption_processors import VinVLCaptionProcessor

VOCAB = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
    "a", "the", "there", "is", "red", "blue", "green", "circle", "square", "star", "small", "big", "left",
    "right", "of", "and", "on", "in", "image", "un", "##believ", "##able", "cat", "##s", ".",
]  # fmt: skip
PAD, UNK, CLS, SEP, MASK = range(5)
W = {t: i for i, t in enumerate(VOCAB)}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("caption_tokenizer")
    tok = Tokenizer(WordPiece(dict(W), unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    ).save_pretrained(str(out))
    (out / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return out


def processor(tokenizer_dir, dataset_type="train", **params) -> VinVLCaptionProcessor:
    cfg = {"tokenizer_config": {"type": str(tokenizer_dir)}, "max_seq_length": 16, "max_seq_a_length": 8, **params}
    return VinVLCaptionProcessor(cfg, dataset_type=dataset_type)


# ------------------------------------------------------------------------------- layout
def test_train_layout_caption_padded_then_tags(tokenizer_dir):
    p = processor(tokenizer_dir)
    torch.manual_seed(0)
    out = p({"text": "The red circle.", "text_b": "circle star"})
    caption = [CLS, W["the"], W["red"], W["circle"], W["."], SEP]
    expected = caption + [PAD, PAD] + [W["circle"], W["star"], SEP] + [PAD] * 5
    labels = out["lm_label_ids"]
    masked = labels != -1
    # unmasked positions keep the layout; masked ones carry the original id as their label
    assert torch.equal(torch.where(masked, labels, out["input_ids"]), torch.tensor(expected))
    assert out["segment_ids"].tolist() == [0] * 8 + [1] * 3 + [0] * 5
    assert out["input_mask"].tolist() == [1] * 6 + [0, 0] + [1] * 3 + [0] * 5
    assert out["caption_len"] == 6
    # only caption tokens after [CLS] ([SEP] included) are masked, as many as the upstream rule says
    assert int(masked.sum()) == num_caption_masks(6) == 1
    assert not masked[0] and not masked[6:].any()


@pytest.mark.parametrize("words, expected_masks", [(3, 1), (12, 2), (20, 3)])
def test_masking_count_positions_and_replacements(tokenizer_dir, words, expected_masks):
    p = processor(tokenizer_dir, max_seq_length=40, max_seq_a_length=24)
    text = " ".join(["red circle"] * (words // 2) + ["star"] * (words % 2))
    length = words + 2
    assert num_caption_masks(length) == expected_masks
    replaced_by_mask = total = 0
    for seed in range(200):
        torch.manual_seed(seed)
        out = p({"text": text, "text_b": "square"})
        masked = out["lm_label_ids"] != -1
        positions = masked.nonzero().flatten()
        assert len(positions) == expected_masks
        assert positions.min() >= 1 and positions.max() <= length - 1  # never [CLS], never padding or tags
        replaced_by_mask += int((out["input_ids"][masked] == MASK).sum())
        total += len(positions)
    assert 0.7 < replaced_by_mask / total < 0.9  # 80% [MASK] (the rest random or kept)


def test_masking_is_reproducible_under_the_trainers_per_item_seed(tokenizer_dir):
    p = processor(tokenizer_dir)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(p({"text": "a big blue square and a small red star", "text_b": "star"}))
    assert torch.equal(runs[0]["input_ids"], runs[1]["input_ids"])
    assert torch.equal(runs[0]["lm_label_ids"], runs[1]["lm_label_ids"])


def test_truncation_keeps_both_sep_tokens(tokenizer_dir):
    p = processor(tokenizer_dir, mask_probability=0.0)
    out = p({"text": "red " * 20, "text_b": "star " * 20})
    ids = out["input_ids"].tolist()
    assert ids[:8] == [CLS] + [W["red"]] * 6 + [SEP]  # caption cut to max_seq_a_length - 2 words
    assert ids[8:] == [W["star"]] * 7 + [SEP]  # tags fill the rest, [SEP] last
    assert out["input_mask"].tolist() == [1] * 16


def test_eval_layout_has_only_cls_prefix_and_tags(tokenizer_dir):
    p = processor(tokenizer_dir, dataset_type="val")
    out = p({"text": "the red circle", "text_b": "circle"})
    assert out["input_ids"].tolist() == [CLS] + [PAD] * 7 + [W["circle"], SEP] + [PAD] * 6
    assert out["input_mask"].tolist() == [1] + [0] * 7 + [1, 1] + [0] * 6
    assert out["segment_ids"].tolist() == [0] * 8 + [1, 1] + [0] * 6
    assert (out["lm_label_ids"] == -1).all() and out["caption_len"] == 1
    # an image without tags still gets the tags' [SEP]; mode=train forces masking on any split
    assert processor(tokenizer_dir, dataset_type="val")({"text": ""})["input_ids"][8].item() == SEP
    forced = processor(tokenizer_dir, dataset_type="val", mode="train")({"text": "the red circle"})
    assert forced["caption_len"] == 5 and (forced["lm_label_ids"] != -1).sum() == 1


def test_decode_stops_at_sep_and_joins_word_pieces(tokenizer_dir):
    p = processor(tokenizer_dir)
    ids = torch.tensor([[W["un"], W["##believ"], W["##able"], W["cat"], W["##s"], SEP, W["red"], PAD],
                        [W["a"], W["red"], W["star"], PAD, PAD, PAD, PAD, PAD]])
    assert p.batch_decode(ids) == ["unbelievable cats", "a red star"]
    assert p.batch_decode(ids[:, None]) == ["unbelievable cats", "a red star"]  # (B, K, L): the best of K
    assert p.decode([CLS, W["big"], SEP]) == "big"


def test_bad_params_are_reported(tokenizer_dir):
    with pytest.raises(ValueError, match="mask_probabilty"):
        processor(tokenizer_dir, mask_probabilty=0.1)
    with pytest.raises(ValueError, match="mode"):
        processor(tokenizer_dir, mode="training")
    with pytest.raises(ValueError, match="max_seq_a_length"):
        processor(tokenizer_dir, max_seq_length=8, max_seq_a_length=8)


# ------------------------------------------------------------------- dataset-side decoding
def test_coco_builder_registers_decoder_and_formats_predictions(tokenizer_dir, tmp_path):
    spec = {"type": "vinvl_caption", "params": {"tokenizer_config": {"type": str(tokenizer_dir)}}}
    from omegaconf import OmegaConf

    config = OmegaConf.create({"data_dir": str(tmp_path), "processors": {"text_processor": spec}})
    COCOCaptionBuilder("coco_decode_test").update_registry_for_model(config)
    decoder = registry.get("coco_decode_test_caption_decoder")
    ids = torch.tensor([[W["a"], W["red"], W["star"], SEP, PAD]])
    assert decoder(ids) == ["a red star"]
    fake = SimpleNamespace(text_processor=processor(tokenizer_dir), dataset_name="coco")
    batch = SampleList({"image_id": torch.tensor([42])})
    rows = CaptionDataset.format_for_prediction(fake, batch, {"caption_ids": ids, "caption_scores": torch.zeros(1)})
    assert rows == [{"image_id": 42, "caption": "a red star"}]
    assert CaptionDataset.format_for_prediction(fake, batch, {"captions": ["x y"]}) == [{"image_id": 42, "caption": "x y"}]
    registry.unregister("coco_decode_test_caption_decoder")


# -------------------------------------------------------------------------- end to end
CAPTIONS = {"circle": "there is a red circle", "square": "there is a blue square", "star": "a small green star"}


def _batch(p, dataset_type: str, features: torch.Tensor, repeat: int = 1) -> SampleList:
    samples = []
    for _ in range(repeat):
        for i, (tag, caption) in enumerate(CAPTIONS.items()):
            s = p({"text": caption, "text_b": tag})
            s.update(image_id=i, references=[caption], image_feature_0=features[i])
            samples.append(s)
    return collate(samples, "coco_e2e", dataset_type)


def test_processor_model_generate_decode_metric_end_to_end(tokenizer_dir):
    torch.manual_seed(0)
    model = build_model("vinvl", {
        "vocab_size": len(VOCAB), "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 64, "img_feature_dim": 8, "max_img_seq_length": 2,
        "training_head_type": "captioning", "max_caption_length": 8, "max_gen_length": 7, "num_beams": 2,
        "freeze_embedding": False, "label_smoothing": 0.0, "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0, "bos_token_id": CLS, "eos_token_id": SEP, "mask_token_id": MASK,
        "pad_token_id": PAD,
    })
    features = torch.randn(3, 2, 8)
    train_p, eval_p = processor(tokenizer_dir), processor(tokenizer_dir, dataset_type="val")
    optimizer = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(60):  # fresh masks every step: the model learns each caption from its tag
        loss = model(_batch(train_p, "train", features, repeat=8))["losses"]["train/coco_e2e/caption_loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.2 * sum(losses[:5])

    registry.register("coco_e2e_caption_decoder", eval_p.batch_decode)
    try:
        model.eval()
        batch = _batch(eval_p, "val", features)
        assert (batch.lm_label_ids == -1).all() and (batch.input_ids[:, 1:8] == PAD).all()  # no caption given
        output = model(batch)
    finally:
        registry.unregister("coco_e2e_caption_decoder")
    assert output["caption_ids"].shape == (3, 6)
    assert output["captions"] == eval_p.batch_decode(output["caption_ids"])
    assert output["captions"] == list(CAPTIONS.values())
    bleu, cider = CaptionBleu4(), CaptionCider()
    for metric in (bleu, cider):
        metric.update(batch, output)
    assert bleu.compute()["caption_bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert cider.compute()["caption_cider"] > 1.0
