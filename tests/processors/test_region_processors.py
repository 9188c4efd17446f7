"""region_mask: masking rate, labels only on masked regions, replacement and the whole-image box."""

import pytest
import torch

import mmf_plugins.processors.region_processors  # noqa: F401  (registers the processors under test)
from mmf_plugins.processors.base_processor import build_processor


def _item(rows=20, count=16, dim=8, classes=6, image_box=True):
    torch.manual_seed(123)
    features = torch.rand(rows, dim) + 0.5
    features[count:] = 0
    return {
        "image_feature_0": features,
        "image_info_0": {
            "cls_prob": torch.softmax(torch.rand(rows, classes), -1),
            "objects": torch.randint(0, classes, (rows,)),
            "num_boxes": count,
            "has_image_box": image_box,
        },
    }


def test_rates_and_labels_only_on_masked_regions():
    proc = build_processor({"type": "region_mask", "params": {}})
    item = _item(rows=110, count=101)
    torch.manual_seed(0)
    chosen = replaced = 0
    draws = 200
    for _ in range(draws):
        out = proc(item)
        mask, rep, labels = out["region_mask"], out["region_replaced"], out["region_labels"]
        assert not bool(mask[0]) and not bool(mask[101:].any())  # image box and padding never masked
        assert bool((rep <= mask).all())
        assert torch.equal(labels[mask], item["image_info_0"]["cls_prob"][mask])
        assert bool((labels[~mask] == -1).all())
        chosen += int(mask.sum())
        replaced += int(rep.sum())
    assert abs(chosen / (draws * 100) - 0.15) < 0.01
    assert abs(replaced / chosen - 0.9) < 0.03


def test_replacement_and_image_box_mean():
    proc = build_processor({"type": "region_mask", "params": {"mask_probability": 0.5}})
    item = _item()
    torch.manual_seed(1)
    out = proc(item)
    feats, rep = out["image_feature_0"], out["region_replaced"]
    original = item["image_feature_0"]
    assert rep.any()
    assert feats[rep].abs().sum() == 0
    untouched = ~rep
    untouched[0] = False
    assert torch.equal(feats[untouched], original[untouched])
    visible = torch.zeros(20, dtype=torch.bool)
    visible[1:16] = True
    visible &= ~rep
    assert torch.allclose(feats[0], original[visible].mean(0))
    assert torch.equal(item["image_feature_0"], original)  # input not modified in place


def test_options():
    item = _item(image_box=False)
    keep = build_processor({"type": "region_mask", "params": {"mask_probability": 1.0, "replace_with": "keep"}})
    out = keep(item)
    assert out["region_mask"][:16].all() and not out["region_mask"][16:].any()
    assert torch.equal(out["image_feature_0"], item["image_feature_0"])
    partial = build_processor({"type": "region_mask", "params": {
        "mask_probability": 1.0, "replace_probability": 1.0, "replace_with": -1.0, "feature_dims": 5}})
    out = partial(item)
    assert bool((out["image_feature_0"][:16, :5] == -1).all())
    assert torch.equal(out["image_feature_0"][:16, 5:], item["image_feature_0"][:16, 5:])
    onehot = build_processor({"type": "region_mask", "params": {
        "mask_probability": 1.0, "labels_from": "objects", "num_classes": 6}})
    labels = onehot(item)["region_labels"]
    assert torch.equal(labels[:16].argmax(1), item["image_info_0"]["objects"][:16])
    assert labels[:16].sum(1).eq(1).all()
    with pytest.raises(KeyError, match="cls_prob"):
        build_processor({"type": "region_mask", "params": {}})(
            {"image_feature_0": torch.rand(3, 4), "image_info_0": {"num_boxes": 3}})
    with pytest.raises(ValueError, match="num_classes"):
        build_processor({"type": "region_mask", "params": {"labels_from": "objects"}})
