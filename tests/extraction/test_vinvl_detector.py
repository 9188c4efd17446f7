"""VinVL X152-C4 detector: full-size build and forward on CPU, official-key converter, labelmap, record
invariants, and extractor -> writer -> reader round trips."""

import json
import math

import numpy as np
import pytest
import torch

import mmf_plugins.extraction.writers  # noqa: F401  (registers the writers)
from mmf_plugins.common.registry import registry
from mmf_plugins.datasets.databases.feature_database import open_feature_database
from mmf_plugins.extraction.detectors.convert_vinvl_detector import (
    convert_vinvl_x152c4,
    load_vinvl_detector,
    load_vinvl_labelmap,
    official_vinvl_key_shapes,
    official_vinvl_state_dict,
)
from mmf_plugins.extraction.detectors.vinvl import (
    VinVLDetectorConfig,
    decode_boxes,
    legacy_cell_anchors,
    oscar_features,
    resize_size,
)
from mmf_plugins.extraction.extractors import VinVLX152C4Extractor


@pytest.fixture(scope="module")
def extractor():
    """The full-depth X152-C4 (random weights) with a small input size so CPU tests stay fast."""
    torch.manual_seed(0)
    # few proposals: res5 costs 1.7 GMAC per RoI whatever the image size
    return VinVLX152C4Extractor(
        random_weights=True, device="cpu", min_size=64, max_size=96, min_boxes=3, detector_options={"post_nms_top_n": 6}
    )


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return [
        torch.randint(0, 256, (3, 48, 80), dtype=torch.uint8, generator=g),
        torch.randint(0, 256, (3, 1, 1), dtype=torch.uint8, generator=g),  # tiny: padded, must not crash
    ]


@pytest.fixture(scope="module")
def records(extractor, images):
    return extractor(images)


def test_full_size_architecture(extractor):
    model = extractor.model
    body = model.backbone.body
    assert [len(body.layer1), len(body.layer2), len(body.layer3)] == [3, 8, 36]
    layer4 = model.roi_heads["box"].feature_extractor.head.layer4
    assert len(layer4) == 3 and layer4[0].conv2.stride == (2, 2) and layer4[0].conv2.groups == 32
    assert layer4[0].conv2.out_channels == 2048 and body.layer3[0].conv2.out_channels == 1024
    assert model.rpn.head.cls_logits.out_channels == 15
    assert model.attribute.feature_extractor is model.roi_heads["box"].feature_extractor
    n_params = sum(p.numel() for p in model.parameters())
    assert 140e6 < n_params < 160e6, n_params  # X152-C4 trunk + res5 + RPN + predictors


def test_forward_records(records, images):
    assert len(records) == 2
    for rec, img in zip(records, images):
        n = rec["num_boxes"]
        assert 3 <= n <= 6
        assert rec["features"].shape == (n, 2048) and rec["features"].dtype == torch.float32
        assert (rec["image_height"], rec["image_width"]) == tuple(img.shape[1:])
        assert rec["cls_prob"].shape == (n, 1595)
        assert torch.allclose(rec["cls_prob"].sum(1), torch.ones(n), atol=1e-4)
        # mode 2: label = best foreground class, score = its probability
        assert torch.equal(rec["objects"], rec["cls_prob"][:, 1:].argmax(1) + 1)
        assert torch.allclose(rec["scores"], rec["cls_prob"].gather(1, rec["objects"][:, None])[:, 0])
        assert (rec["scores"][:-1] >= rec["scores"][1:]).all()
        b = rec["bbox"]
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= rec["image_width"]).all() and (b[:, 3] <= rec["image_height"]).all()
        assert rec["object_names"] == [f"class_{c}" for c in rec["objects"].tolist()]
        assert rec["attributes"].shape == rec["attr_scores"].shape == (n, 16)
        assert (rec["attr_scores"][:, :-1] >= rec["attr_scores"][:, 1:]).all()


def test_given_boxes_reproduce_region_features(extractor, records, images):
    # proposals are kept as boxes (IGNORE_BOX_REGRESSION), so pooling the written boxes again (same batch, same
    # padding) gives the features back
    again = extractor(images, [r["bbox"] for r in records])
    for a, r in zip(again, records):
        assert torch.allclose(a["features"], r["features"], rtol=1e-4, atol=1e-4 * r["features"].abs().max())
        assert torch.allclose(a["bbox"], r["bbox"], atol=1e-3)
        assert torch.equal(a["objects"], a["cls_prob"][:, 1:].argmax(1) + 1)


def test_channels_last_gives_the_records_of_the_plain_layout(extractor, records, images):
    import dataclasses

    from mmf_plugins.extraction.detectors.vinvl import VinVLX152C4

    det = extractor.model
    assert det.config.channels_last
    conv = next(m for m in det.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    plain = VinVLX152C4(dataclasses.replace(det.config, channels_last=False))
    plain.load_state_dict(det.state_dict())
    plain.set_labelmap(det.object_names, det.attribute_names)
    assert next(m for m in plain.modules() if isinstance(m, torch.nn.Conv2d)).weight.is_contiguous()
    with torch.no_grad():
        again = plain(images)
    for a, r in zip(again, records):
        assert torch.equal(a["objects"], r["objects"]) and torch.allclose(a["bbox"], r["bbox"], atol=1e-3)
        assert torch.allclose(a["features"], r["features"], rtol=1e-4, atol=1e-4 * r["features"].abs().max())


def test_converter_covers_every_model_key(extractor):
    model = extractor.model
    own = model.state_dict()
    for wrap, prefix in ((False, False), (True, True)):
        official = official_vinvl_state_dict(model.config, module_prefix=prefix, wrap=wrap)
        converted, report = convert_vinvl_x152c4(official, config=model.config)
        assert not report.missing and not report.unused and not report.mismatched, report.summary()
        assert set(converted) == set(own)
        assert all(tuple(converted[k].shape) == tuple(own[k].shape) for k in own)
    assert len(official_vinvl_key_shapes()) == len(own)


def test_converter_variants_and_errors():
    cfg = VinVLDetectorConfig()
    official = official_vinvl_state_dict(cfg)
    # older exports: attribute head under roi_heads., saved once (shared extractor filled from the box head)
    renamed = {("roi_heads." + k if k.startswith("attribute.predictor") else k): v for k, v in official.items()
               if not k.startswith("attribute.feature_extractor")}
    _, report = convert_vinvl_x152c4(renamed)
    assert not report.missing and not report.unused
    assert any("filled from the shared" in n for n in report.notes)
    bad = dict(official)
    bad["roi_heads.box.predictor.cls_score.weight"] = torch.empty(1601, 2048, device="meta")
    bad["extra.key"] = torch.empty(3, device="meta")
    _, report = convert_vinvl_x152c4(bad)
    assert report.mismatched[0][0] == "roi_heads.box.predictor.cls_score.weight"
    assert report.missing == ["roi_heads.box.predictor.cls_score.weight"] and report.unused == ["extra.key"]
    assert registry.get_converter("vinvl_x152c4") is convert_vinvl_x152c4


def _labelmap(path, num_objects, num_attrs):
    data = {
        "label_to_idx": {f"obj{i}": i for i in range(1, num_objects + 1)},
        "idx_to_label": {str(i): f"obj{i}" for i in range(1, num_objects + 1)},
        "attribute_to_idx": {f"attr{i}": i for i in range(1, num_attrs + 1)},
        "idx_to_attribute": {str(i): f"attr{i}" for i in range(1, num_attrs + 1)},
        "predicate_to_idx": {"on": 1},
    }
    path.write_text(json.dumps(data))
    return path


def test_load_checkpoint_file_and_labelmap(tmp_path):
    # a reduced config keeps this fast; the full-size key layout is checked above
    cfg = VinVLDetectorConfig(stage_blocks=(1, 1, 1, 1), num_groups=2, width_per_group=4, num_classes=11,
                              num_attributes=6, min_size=64, max_size=96, post_nms_top_n=20, min_boxes=4)
    official = official_vinvl_state_dict(cfg, device="cpu", generator=torch.Generator().manual_seed(0),
                                         module_prefix=True, wrap=True)
    torch.save(official, tmp_path / "vinvl_vg_x152c4.pth")
    _labelmap(tmp_path / "VG-SGG-dicts-vgoi6-clipped.json", 10, 5)  # found next to the checkpoint
    model = load_vinvl_detector(tmp_path / "vinvl_vg_x152c4.pth", config=cfg)
    sd = official["model"]
    for key in ("backbone.body.layer3.0.conv2.weight", "rpn.head.bbox_pred.bias", "attribute.predictor.attr_score.weight"):
        assert torch.equal(model.state_dict()[key], sd["module." + key])
    assert torch.equal(model.rpn.anchor_generator.cell_anchors, sd["module.rpn.anchor_generator.cell_anchors.0"])
    rec = model([torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)])[0]
    assert rec["object_names"] == [f"obj{c}" for c in rec["objects"].tolist()]
    names = [[f"attr{a}" for a, s in zip(la, sc) if s > 0] for la, sc in zip(rec["attributes"].tolist(), rec["attr_scores"].tolist())]
    assert rec["attribute_names"] == names
    with pytest.raises(ValueError, match="labelmap has 11 object names"):
        load_vinvl_detector(None, labelmap=_labelmap(tmp_path / "lm.json", 10, 5))  # full-size detector has 1595


def test_labelmap_loader(tmp_path):
    lm = load_vinvl_labelmap(_labelmap(tmp_path / "lm.json", 4, 2))
    assert lm.object_names == ["__background__", "obj1", "obj2", "obj3", "obj4"]
    assert lm.attribute_names == ["__no_attribute__", "attr1", "attr2"]
    (tmp_path / "gap.json").write_text(json.dumps({"label_to_idx": {"a": 1, "b": 3}}))
    with pytest.raises(ValueError, match="without gaps"):
        load_vinvl_labelmap(tmp_path / "gap.json")
    with pytest.raises(FileNotFoundError, match="VG-SGG-dicts"):
        load_vinvl_labelmap(tmp_path / "nope.json")


def test_box_math():
    anchors = legacy_cell_anchors(16, (32, 64, 128, 256, 512), (0.5, 1.0, 2.0))
    assert anchors.shape == (15, 4)
    # py-faster-rcnn's classic anchor for size 128, ratio 0.5, and the ratio-major order
    assert anchors[2].tolist() == [-84.0, -40.0, 99.0, 55.0]
    assert anchors[5].tolist() == [-8.0, -8.0, 23.0, 23.0]
    ref = torch.tensor([[10.0, 20.0, 49.0, 99.0]])
    assert torch.allclose(decode_boxes(torch.zeros(1, 4), ref, (10, 10, 5, 5)), ref)
    # dx = 1 (weight 10 -> deltas 10) shifts by one width (40 px); dw = log 2 (weight 5) doubles the width
    out = decode_boxes(torch.tensor([[10.0, 0, 5 * math.log(2), 0]]), ref, (10, 10, 5, 5))
    assert torch.allclose(out, torch.tensor([[30.0, 20.0, 109.0, 99.0]]), atol=1e-4)


def test_resize_rule():
    assert resize_size(480, 640, 600, 1000) == (600, 800)
    assert resize_size(600, 2000, 600, 1000) == (300, 1000)
    assert resize_size(1, 1, 600, 1000) == (600, 600)
    oh, ow = resize_size(1, 5000, 600, 1000)
    assert ow <= 1000 and oh >= 1


def test_oscar_form(records):
    rec = records[0]
    full = oscar_features(rec)
    w, h = rec["image_width"], rec["image_height"]
    assert full.shape == (rec["num_boxes"], 2054)
    assert torch.equal(full[:, :2048], rec["features"])
    x1, y1, x2, y2 = rec["bbox"].unbind(1)
    assert torch.allclose(full[:, 2048:], torch.stack([x1 / w, y1 / h, x2 / w, y2 / h, (x2 - x1) / w, (y2 - y1) / h], 1))


@pytest.mark.parametrize("fmt", ["npy", "lmdb", "tsv"])
def test_extractor_writer_reader_round_trip(records, fmt, tmp_path):
    writer = registry.get_feature_writer_class(fmt)(tmp_path / "out")
    for i, rec in enumerate(records):
        assert not writer.exists(f"img{i}")
        writer.write(f"img{i}", rec)
        assert writer.exists(f"img{i}")
    writer.close()
    db = open_feature_database(tmp_path / "out")
    assert sorted(db.keys()) == ["img0", "img1"]
    for i, rec in enumerate(records):
        got = db.get(f"img{i}")
        np.testing.assert_allclose(got["features"], rec["features"].numpy(), rtol=1e-6)
        np.testing.assert_allclose(got["bbox"], rec["bbox"].numpy(), rtol=1e-5, atol=1e-3)
        assert (got["image_width"], got["image_height"]) == (rec["image_width"], rec["image_height"])
        if fmt != "tsv":  # the VinVL TSV form stores no class distribution
            np.testing.assert_array_equal(got["objects"], rec["objects"].numpy())
            np.testing.assert_allclose(got["cls_prob"], rec["cls_prob"].numpy())
            np.testing.assert_array_equal(got["attributes"], rec["attributes"].numpy())


def test_zoo_entry_loads_checkpoint_and_labelmap(tmp_path, monkeypatch):
    small = {"stage_blocks": (1, 1, 1, 1), "num_groups": 2, "width_per_group": 4, "num_classes": 11,
             "num_attributes": 6, "post_nms_top_n": 20}
    cfg = VinVLDetectorConfig(**small)
    src = tmp_path / "src"
    src.mkdir()
    torch.save(official_vinvl_state_dict(cfg, device="cpu", generator=torch.Generator().manual_seed(1), wrap=True),
               src / "vinvl_vg_x152c4.pth")
    _labelmap(src / "VG-SGG-dicts-vgoi6-clipped.json", 10, 5)
    resources = "\n".join(
        f"        - {{url: 'file://{src / name}', file_name: {name}}}"
        for name in ("vinvl_vg_x152c4.pth", "VG-SGG-dicts-vgoi6-clipped.json")
    )
    (tmp_path / "zoo.yaml").write_text(
        "mine:\n  x152c4:\n    version: '1'\n    converter: vinvl_x152c4\n    weights_file: vinvl_vg_x152c4.pth\n"
        f"    resources:\n{resources}\n"
        "  captioner:\n    version: '1'\n    converter: vinvl\n    resources:\n"
        f"        - {{url: 'file://{src / 'vinvl_vg_x152c4.pth'}', file_name: pytorch_model.bin}}\n"
    )
    monkeypatch.setenv("MMF_MODEL_ZOO", str(tmp_path / "zoo.yaml"))
    monkeypatch.setenv("MMF_DATA_DIR", str(tmp_path / "data"))
    ex = VinVLX152C4Extractor(zoo="mine.x152c4", device="cpu", min_size=64, max_size=96, min_boxes=2, detector_options=small)
    weights = torch.load(src / "vinvl_vg_x152c4.pth", weights_only=True)["model"]
    assert torch.equal(ex.model.roi_heads["box"].predictor.cls_score.weight, weights["roi_heads.box.predictor.cls_score.weight"])
    rec = ex([torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8)])[0]
    assert all(name.startswith("obj") for name in rec["object_names"])
    with pytest.raises(ValueError, match="either --model_file or --zoo"):
        VinVLX152C4Extractor(zoo="mine.x152c4", model_file=src / "vinvl_vg_x152c4.pth")
    with pytest.raises(ValueError, match="repeat arguments"):
        VinVLX152C4Extractor(zoo="mine.x152c4", detector_options={"nms_filter": 1})
    with pytest.raises(ValueError, match="not by the VinVL detector converter"):
        VinVLX152C4Extractor(zoo="mine.captioner")
