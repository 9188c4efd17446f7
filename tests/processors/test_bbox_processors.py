"""bbox processors: OSCAR 6-d box features, VL-BERT boxes + geometry embedding, padding, 2048 vs 2054."""

import math

import pytest
import torch

from mmf_plugins.common.sample import SampleList
from mmf_plugins.processors.base_processor import build_processor
from mmf_plugins.processors.bbox_processors import (
    geometry_embedding,
    oscar_box_features,
    vl_bert_boxes,
)

W, H = 200, 100
BOXES = torch.tensor([[10.0, 20.0, 110.0, 70.0], [0.0, 0.0, 200.0, 100.0]])


def test_oscar_box_features_hand_computed():
    out = oscar_box_features(BOXES, W, H)
    expected = torch.tensor([[0.05, 0.2, 0.55, 0.7, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]])
    assert torch.allclose(out, expected, atol=1e-7)
    # per-box image sizes broadcast
    per_box = oscar_box_features(BOXES, torch.tensor([W, 2 * W]), torch.tensor([H, H]))
    assert torch.allclose(per_box[1], torch.tensor([0.0, 0.0, 0.5, 1.0, 0.5, 1.0]))


def test_vl_bert_boxes_image_box_first_and_clamped():
    out = vl_bert_boxes(BOXES, W, H)
    assert out.tolist() == [[0, 0, W - 1, H - 1], [10, 20, 110, 70], [0, 0, W - 1, H - 1]]
    assert vl_bert_boxes(BOXES, W, H, add_image_box=False).shape == (2, 4)


def test_geometry_embedding_hand_computed():
    dim, wave = 8, 1000.0
    out = geometry_embedding(BOXES, W, H, dim=dim, wave_length=wave)
    assert out.shape == (2, 4 * 2 * dim)
    for b, (x1, y1, x2, y2) in enumerate(BOXES.tolist()):
        position = [(x1 + x2) / 2 / W * 100, (y1 + y2) / 2 / H * 100, (x2 - x1) / W * 100, (y2 - y1) / H * 100]
        for k, p in enumerate(position):
            for j in range(dim):
                angle = p / wave ** (j / dim)
                assert out[b, k * 2 * dim + j].item() == pytest.approx(math.sin(angle), abs=1e-5)
                assert out[b, k * 2 * dim + dim + j].item() == pytest.approx(math.cos(angle), abs=1e-5)
    assert geometry_embedding(BOXES, W, H).shape == (2, 2048)  # VL-BERT default dim 256


def _record(n=3, dim=2048, classes=5):
    torch.manual_seed(0)
    bbox = torch.tensor([[10.0, 20.0, 110.0, 70.0], [0.0, 0.0, 50.0, 50.0], [100.0, 40.0, 190.0, 95.0],
                         [5.0, 5.0, 15.0, 15.0]])[:n]
    return {
        "features": torch.rand(n, dim),
        "bbox": bbox,
        "image_width": W,
        "image_height": H,
        "num_boxes": n,
        "objects": torch.arange(1, n + 1),
        "cls_prob": torch.softmax(torch.rand(n, classes), -1),
        "object_names": [f"obj{i}" for i in range(n)],
    }


def test_oscar_padding_and_box_dims():
    proc = build_processor({"type": "bbox", "params": {"format": "oscar", "max_features": 5}})
    rec = _record()
    out = proc(rec)
    feat, info = out["image_feature_0"], out["image_info_0"]
    assert feat.shape == (5, 2054)
    assert torch.equal(feat[:3, :2048], rec["features"])
    assert torch.allclose(feat[:3, 2048:], oscar_box_features(rec["bbox"], W, H))
    assert feat[3:].abs().sum() == 0
    assert info["num_boxes"] == 3 and info["max_features"] == 3
    assert info["bbox"].shape == (5, 4) and torch.equal(info["bbox"][:3], rec["bbox"])
    assert info["cls_prob"].shape == (5, 5) and info["objects"].tolist() == [1, 2, 3, 0, 0]
    assert info["image_width"] == W and info["image_height"] == H and info["has_image_box"] is False
    # truncation keeps the first max_features regions
    two = build_processor({"type": "bbox", "params": {"format": "oscar", "max_features": 2}})(_record(4))
    assert two["image_feature_0"].shape == (2, 2054) and two["image_info_0"]["num_boxes"] == 2
    assert two["image_info_0"]["object_names"] == ["obj0", "obj1"]
    # the region mask is derivable and batches collate
    batch = SampleList([out, proc(_record(2))])
    mask = torch.arange(5)[None] < batch["image_info_0"]["max_features"][:, None]
    assert mask.sum(1).tolist() == [3, 2] and batch["image_feature_0"].shape == (2, 5, 2054)


def test_2048_vs_2054_handling():
    rec = _record()
    already = dict(rec, features=torch.cat([rec["features"], oscar_box_features(rec["bbox"], W, H)], 1))
    keep = build_processor({"type": "bbox", "params": {"format": "oscar", "max_features": 3}})
    assert torch.equal(keep(already)["image_feature_0"], already["features"])
    passthrough = build_processor({"type": "bbox", "params": {"format": "oscar", "append_box_dims": False}})
    assert passthrough(rec)["image_feature_0"].shape == (3, 2048)
    strict = build_processor({"type": "bbox", "params": {"format": "oscar", "append_box_dims": "error"}})
    assert strict(already)["image_feature_0"].shape == (3, 2054)
    with pytest.raises(ValueError, match="2048-d"):
        strict(rec)
    with pytest.raises(ValueError, match="1000-d"):
        keep(dict(rec, features=torch.rand(3, 1000)))
    small = build_processor({"type": "bbox", "params": {"format": "oscar", "feature_dim": 16}})
    assert small(_record(dim=16))["image_feature_0"].shape == (3, 22)
    vl = build_processor({"type": "bbox", "params": {"format": "vl_bert"}})
    with pytest.raises(ValueError, match="2054-d"):
        vl(already)
    with pytest.raises(ValueError, match="append_box_dims"):
        build_processor({"type": "bbox", "params": {"append_box_dims": "yes"}})


def test_vl_bert_format_adds_image_box():
    proc = build_processor({"type": "bbox", "params": {"format": "vl_bert", "max_features": 6}})
    rec = _record()
    out = proc(rec)
    feat, info = out["image_feature_0"], out["image_info_0"]
    assert feat.shape == (6, 2048)
    assert torch.allclose(feat[0], rec["features"].mean(0)) and torch.equal(feat[1:4], rec["features"])
    assert info["bbox"][0].tolist() == [0, 0, W - 1, H - 1] and torch.equal(info["bbox"][1:4], rec["bbox"])
    assert info["num_boxes"] == 4 and info["has_image_box"] is True
    assert info["cls_prob"][0].abs().sum() == 0 and torch.equal(info["cls_prob"][1:4], rec["cls_prob"])
    assert info["object_names"] == ["", "obj0", "obj1", "obj2"]
    with pytest.raises(KeyError, match="image_width"):
        proc({"features": rec["features"], "bbox": rec["bbox"]})
