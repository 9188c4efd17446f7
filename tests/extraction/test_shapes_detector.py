"""Shapes detector: training on a tiny generated corpus (loss falls), weights round trip, feature records
(well-formed, consistent with the label map, min/max box rules, given boxes, batching), COCO evaluation of the
result conversion, and the train -> mmf_extract_features -> LMDB -> feature database path."""

import json
import math

import pytest
import torch

import mmf_plugins.extraction.writers  # noqa: F401  (registers the writers)
from mmf_plugins.cli.extract import main as extract_main
from mmf_plugins.common.registry import registry
from mmf_plugins.datasets.builders.shapes.generator import generate_shapes
from mmf_plugins.datasets.databases.feature_database import open_feature_database
from mmf_plugins.extraction.detectors.shapes_detector import (
    ShapesDetector,
    ShapesDetectorConfig,
    ShapesDetectorExtractor,
    ShapesLabelmap,
    load_shapes_detector,
    save_shapes_detector,
    sidecar_path,
)
from mmf_plugins.extraction.detectors.shapes_detector_training import (
    attribute_accuracy,
    decode_rgb,
    evaluate_shapes_detector,
    load_detector_settings,
    read_instances,
    train_shapes_detector,
)
from mmf_plugins.zoo.conversion import CheckpointError

# A narrow, low-resolution variant so the tests train in seconds; anchors follow the smaller input.
TINY_MODEL = {
    "min_size": 128, "max_size": 320, "stem_channels": [8, 16], "stage_channels": [32, 48], "fpn_channels": 32,
    "anchor_sizes": [[11, 16], [22, 32]], "roi_canonical_scale": 22, "feature_dim": 48,
    "rpn_pre_nms_top_n_train": 200, "rpn_post_nms_top_n_train": 64, "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 40, "box_batch_size_per_image": 32, "attr_hidden_dim": 32, "cls_embedding_dim": 8,
}
TINY = {
    "model": TINY_MODEL,
    "training": {"epochs": 25, "batch_size": 4, "lr": 0.004, "warmup_iters": 3, "max_minutes": 2.0, "log_every": 0},
    "evaluation": {"score_thresh": 0.05, "max_boxes": 50, "batch_size": 4},
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("data") / "shapes", seed=0, num_images=16, progress=False)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("detector") / "shapes_detector.safetensors"
    torch.manual_seed(0)
    summary = train_shapes_detector(corpus, out, config=TINY, seed=0)
    return out, summary


@pytest.fixture(scope="module")
def labelmap(corpus):
    return ShapesLabelmap.from_coco(read_instances(corpus, "train")[1])


def _images(corpus, split="val", n=2):
    files = sorted((corpus / "images" / split).glob("*.jpg"))[:n]
    return files, [decode_rgb(f) for f in files]


# ------------------------------------------------------------------------------------- training
def test_training_loss_falls_and_sidecar_describes_the_weights(trained, labelmap):
    out, summary = trained
    totals = [row["total"] for row in summary["losses"]]
    assert len(totals) >= 20
    first, last = sum(totals[:3]) / 3, sum(totals[-3:]) / 3
    assert last < 0.8 * first, (first, last)  # 25 tiny epochs: ~0.7x typical
    meta = json.loads(sidecar_path(out).read_text())
    assert meta["labelmap"]["object_names"] == labelmap.object_names
    assert meta["labelmap"]["attribute_names"][1:] == ["small", "large", "red", "green", "blue", "yellow", "purple",
                                                       "orange", "cyan", "brown", "solid", "striped", "dotted", "checkered"]
    assert meta["feature_dim"] == TINY_MODEL["feature_dim"]
    assert meta["input_size"] == {"min_size": 128, "max_size": 320}
    assert meta["training"]["iterations"] == len(totals)
    assert 0.0 <= meta["val"]["AP50"] <= 1.0 and meta["val"]["num_images"] == 2


def test_default_yaml_matches_the_dataclass_defaults():
    """The yaml documents the defaults: every key it sets equals the code default (no silent drift)."""
    settings = load_detector_settings()
    defaults = ShapesDetectorConfig().to_dict()
    for key, value in settings["model"].items():
        assert json.loads(json.dumps(value)) == defaults[key], key
    assert settings["training"]["max_minutes"] == 4.0


def test_bad_config_keys_are_rejected(corpus, tmp_path):
    with pytest.raises(ValueError, match="unknown key.*anchor_size"):
        train_shapes_detector(corpus, tmp_path / "x.safetensors", config={"model": {"anchor_size": [1]}})
    with pytest.raises(ValueError, match="num_classes.*label map"):
        load_detector_settings({"model": {"num_classes": 3}})
    with pytest.raises(ValueError, match=r"must end in \.safetensors"):
        train_shapes_detector(corpus, tmp_path / "x.pth", config=TINY)


# --------------------------------------------------------------------------------------- weights
def test_weights_round_trip_through_safetensors(corpus, labelmap, tmp_path):
    torch.manual_seed(3)
    cfg = ShapesDetectorConfig(**TINY_MODEL, num_classes=labelmap.num_classes, num_attributes=labelmap.num_attributes)
    model = ShapesDetector(cfg, labelmap).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics must survive too
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = save_shapes_detector(model, tmp_path / "det.safetensors", {"note": "test"})
    loaded = load_shapes_detector(path)
    own, back = model.state_dict(), loaded.state_dict()
    assert own.keys() == back.keys()
    assert all(torch.equal(own[k], back[k]) for k in own)
    _, images = _images(corpus)
    a, b = model.detect(images), loaded.detect(images)
    for ra, rb in zip(a, b):
        assert torch.equal(ra["bbox"], rb["bbox"]) and torch.allclose(ra["features"], rb["features"])
    assert not list(tmp_path.glob(".*tmp*")), "atomic writes leave no temp files"

    # a file that does not fit the sidecar's architecture is refused with both paths named
    sidecar_path(path).write_text(sidecar_path(path).read_text().replace('"feature_dim": 48', '"feature_dim": 40', 1))
    with pytest.raises(CheckpointError, match="does not fit the shapes detector"):
        load_shapes_detector(path)
    sidecar_path(path).unlink()
    with pytest.raises(FileNotFoundError, match=r"det\.json"):
        load_shapes_detector(path)


# --------------------------------------------------------------------------------------- records
def test_extractor_records_are_well_formed(trained, corpus, labelmap):
    out, _ = trained
    ext = registry.get_extractor_class("shapes_detector")(model_file=out, device="cpu", score_thresh=0.0, max_boxes=8,
                                                          min_boxes=0)
    assert isinstance(ext, ShapesDetectorExtractor) and ext.feature_dim == TINY_MODEL["feature_dim"]
    _, images = _images(corpus, "val")
    records = ext(images)
    assert len(records) == len(images)
    for img, rec in zip(images, records):
        h, w = img.shape[1:]
        n = rec["num_boxes"]
        assert 1 <= n <= 8 and (rec["image_width"], rec["image_height"]) == (w, h)
        assert rec["features"].shape == (n, TINY_MODEL["feature_dim"]) and rec["features"].dtype == torch.float32
        assert torch.isfinite(rec["features"]).all()
        box = rec["bbox"]
        assert box.shape == (n, 4)
        assert (box[:, 0] >= 0).all() and (box[:, 1] >= 0).all() and (box[:, 2] <= w).all() and (box[:, 3] <= h).all()
        assert (box[:, 2] >= box[:, 0]).all() and (box[:, 3] >= box[:, 1]).all()
        assert rec["objects"].dtype == torch.int64 and ((rec["objects"] >= 1) & (rec["objects"] < 7)).all()
        assert rec["object_names"] == [labelmap.object_names[c] for c in rec["objects"].tolist()]
        assert torch.allclose(rec["cls_prob"].sum(1), torch.ones(n), atol=1e-5)
        # the score is the class probability of the reported class, and scores come sorted
        assert torch.allclose(rec["scores"], rec["cls_prob"].gather(1, rec["objects"][:, None])[:, 0])
        assert (rec["scores"][:-1] >= rec["scores"][1:]).all()
        attrs, attr_scores = rec["attributes"], rec["attr_scores"]
        assert attrs.shape == attr_scores.shape == (n, 3)
        assert ((attrs == -1) | ((attrs >= 1) & (attrs <= 14))).all()
        assert ((attrs == -1) == (attr_scores == 0)).all() and (attr_scores[attrs >= 0] >= 0.5).all()
        assert rec["attribute_names"] == [[labelmap.attribute_names[a] for a in row if a > 0] for row in attrs.tolist()]


def test_min_and_max_boxes_rules(trained, corpus):
    out, _ = trained
    _, images = _images(corpus, "val", 1)
    everything = ShapesDetectorExtractor(model_file=out, score_thresh=0.0, min_boxes=0, max_boxes=30)(images)[0]
    assert everything["num_boxes"] >= 4
    # no box reaches a threshold of 1.0: min_boxes keeps the best-scoring ones, in the same order
    forced = ShapesDetectorExtractor(model_file=out, score_thresh=1.0, min_boxes=3, max_boxes=30)(images)[0]
    assert forced["num_boxes"] == 3
    assert torch.allclose(forced["scores"], everything["scores"][:3])
    assert torch.allclose(forced["bbox"], everything["bbox"][:3])
    assert ShapesDetectorExtractor(model_file=out, score_thresh=1.0, min_boxes=0, max_boxes=30)(images)[0]["num_boxes"] == 0
    capped = ShapesDetectorExtractor(model_file=out, score_thresh=0.0, min_boxes=0, max_boxes=2)(images)[0]
    assert capped["num_boxes"] == 2 and torch.allclose(capped["scores"], everything["scores"][:2])
    # the threshold itself: exactly the boxes at or above it
    t = float(everything["scores"][1])
    above = ShapesDetectorExtractor(model_file=out, score_thresh=t, min_boxes=0, max_boxes=30)(images)[0]
    assert above["num_boxes"] == int((everything["scores"] >= t).sum())
    with pytest.raises(ValueError, match="min_boxes <= max_boxes"):
        ShapesDetectorExtractor(model_file=out, min_boxes=5, max_boxes=2)
    with pytest.raises(ValueError, match="nms_filter"):
        ShapesDetectorExtractor(model_file=out, nms_filter=3)


def test_given_boxes_batching_and_nms_modes(trained, corpus):
    out, _ = trained
    model = load_shapes_detector(out)
    _, (img,) = _images(corpus, "val", 1)
    h, w = img.shape[1:]
    given = torch.tensor([[0.0, 0.0, w - 1.0, h - 1.0], [10.0, 20.0, 60.0, 90.0]])
    rec = model.detect([img], [given])[0]
    assert rec["num_boxes"] == 2 and torch.allclose(rec["bbox"], given, atol=1e-3)
    assert torch.allclose(rec["scores"], rec["cls_prob"][:, 1:].max(1).values)
    # two images of one size in one batch give what each gives alone (no cross-talk between images)
    flipped = img.flip(-1)
    together = model.detect([img, flipped])
    alone = [model.detect([img])[0], model.detect([flipped])[0]]
    for a, b in zip(together, alone):
        assert a["num_boxes"] == b["num_boxes"]
        assert torch.allclose(a["bbox"], b["bbox"], atol=1e-3) and torch.allclose(a["features"], b["features"], atol=1e-4)
    # per-class modes run and respect the same caps
    for mode in (0, 1):
        recs = ShapesDetectorExtractor(model_file=out, nms_filter=mode, score_thresh=0.0, min_boxes=0, max_boxes=5)([img])
        assert 1 <= recs[0]["num_boxes"] <= 5


# ------------------------------------------------------------------------------------ evaluation
def test_evaluation_scores_ground_truth_as_perfect(trained, corpus):
    """AP of a detector that returns the ground truth is 1: checks xyxy->xywh, class->category and image ids."""
    out, _ = trained
    model = load_shapes_detector(out)
    _, inst = read_instances(corpus, "val")
    by_size = {}
    for e in inst["images"]:
        anns = [a for a in inst["annotations"] if a["image_id"] == e["id"]]
        xyxy = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                             for a in anns])
        by_size[(e["height"], e["width"])] = (xyxy, torch.tensor([a["category_id"] for a in anns]))

    def oracle(images, boxes=None, postprocess=None):
        out = []
        for img in images:
            xyxy, cats = by_size[tuple(img.shape[1:])]
            out.append({"bbox": xyxy, "objects": cats, "scores": torch.ones(len(cats))})
        return out

    model.detect = oracle
    res = evaluate_shapes_detector(model, corpus, "val")
    assert res["AP"] == pytest.approx(1.0) and res["AP50"] == pytest.approx(1.0)
    assert res["num_images"] == 2 and res["num_detections"] == len(inst["annotations"])


def test_attribute_accuracy_compares_the_best_attribute_of_each_kind(trained, corpus):
    """A head that always scores the same attribute of each kind highest scores the frequency of that value."""
    out, _ = trained
    model = load_shapes_detector(out)
    _, inst = read_instances(corpus, "val")
    kinds = {a["id"]: a["supercategory"] for a in inst["attribute_categories"]}
    favourite = {}
    for a in sorted(inst["attribute_categories"], key=lambda a: a["id"]):
        favourite.setdefault(a["supercategory"], a["id"])
    columns = model.labelmap.attribute_ids
    bias = torch.tensor([1.0 if aid in favourite.values() else 0.0 for aid in columns])

    class Constant(torch.nn.Module):
        def forward(self, feats, labels):
            return bias.expand(feats.shape[0], -1)

    model.roi_heads.attribute_predictor = Constant()
    res = attribute_accuracy(model, corpus, "val")
    for kind, aid in favourite.items():
        truth = [[i for i in a["attribute_ids"] if kinds[i] == kind][0] for a in inst["annotations"]]
        assert res[f"attr_acc_{kind}"] == pytest.approx(sum(t == aid for t in truth) / len(truth), abs=1e-4)
    assert set(res) == {f"attr_acc_{k}" for k in favourite}



def test_attribute_head_init_decides_how_much_attribute_gradient_reaches_the_region_feature():
    """VinVL's N(0, 0.01) attribute layers pass almost no gradient back to the shared box feature at the start;
    ``attr_init_std: 0`` (PyTorch's default init, the demo detector's setting) passes it through, which is what
    puts colour into the region features within a 4-minute training."""
    grads = {}
    for std in (0.01, 0.0):
        torch.manual_seed(0)
        cfg = ShapesDetectorConfig(**TINY_MODEL, attr_init_std=std)
        head = ShapesDetector(cfg).roi_heads.attribute_predictor
        x = torch.rand(16, cfg.feature_dim, requires_grad=True)
        target = (torch.rand(16, cfg.num_attributes) < 0.3).float()
        torch.nn.functional.binary_cross_entropy_with_logits(head(x, torch.ones(16, dtype=torch.long)), target).backward()
        grads[std] = x.grad.norm().item()
        w = head.fc_attr.weight
        if std:
            assert w.std().item() == pytest.approx(std, rel=0.1) and head.fc_attr.bias.abs().max() == 0
        else:  # kaiming-uniform: std = 1 / sqrt(3 * fan_in)
            assert w.std().item() == pytest.approx(1 / math.sqrt(3 * w.shape[1]), rel=0.1)
    assert grads[0.0] > 50 * grads[0.01], grads


def test_linear_attribute_head_scores_are_affine_in_feature_and_class_embedding():
    """``attr_hidden_dim: 0`` (the demo default): no hidden layer, so the scores are one affine map of
    [feature || class embedding] and every attribute is linearly readable from the region feature."""
    torch.manual_seed(0)
    cfg = ShapesDetectorConfig(**{**TINY_MODEL, "attr_hidden_dim": 0})
    head = ShapesDetector(cfg).roi_heads.attribute_predictor
    assert head.fc_attr is None
    assert head.attr_score.in_features == cfg.feature_dim + cfg.cls_embedding_dim
    x, labels = torch.randn(5, cfg.feature_dim), torch.tensor([1, 2, 1, 0, 2])
    expected = torch.cat([x, head.cls_embedding.weight[labels]], 1) @ head.attr_score.weight.T + head.attr_score.bias
    torch.testing.assert_close(head(x, labels), expected)
    # affine in the feature: the score difference of two features is the same for any class
    d1 = head(x[:1], labels[:1]) - head(x[1:2], labels[:1])
    d2 = head(x[:1], labels[3:4]) - head(x[1:2], labels[3:4])
    torch.testing.assert_close(d1, d2)


# ------------------------------------------------------------------------------ extraction path
def test_cli_extracts_all_splits_into_one_lmdb(trained, corpus, capsys):
    out, _ = trained
    lmdb_dir = corpus / "features" / "detector.lmdb"
    for split in ("train", "val", "test"):
        rc = extract_main([
            "--extractor", "shapes_detector", "--model_file", str(out), "--image_dir", str(corpus / "images" / split),
            "--output_folder", str(lmdb_dir), "--writer", "lmdb", "--num_workers", "0", "--batch_size", "4",
            "--no-progress", "--min_boxes", "2", "--max_boxes", "10",
        ])
        assert rc == 0, capsys.readouterr()
    db = open_feature_database(str(lmdb_dir))
    files = sorted((corpus / "images").rglob("*.jpg"))
    assert sorted(db.keys()) == sorted(f.stem for f in files) and len(files) == 16
    for key in db:  # every record reads back with the declared feature size
        assert db.get(key)["features"].shape[1] == TINY_MODEL["feature_dim"]
    rec = db.get("shapes_train_000000100001")
    n = rec["num_boxes"]
    assert 2 <= n <= 10 and rec["features"].shape == (n, TINY_MODEL["feature_dim"])
    assert rec["bbox"].shape == (n, 4) and rec["attributes"].shape == (n, 3)
    # the stored record equals a direct extraction of the same image
    img = decode_rgb(corpus / "images" / "train" / "shapes_train_000000100001.jpg")
    direct = ShapesDetectorExtractor(model_file=out, min_boxes=2, max_boxes=10)([img])[0]
    assert (rec["image_width"], rec["image_height"]) == (img.shape[2], img.shape[1])
    assert rec["num_boxes"] == direct["num_boxes"]
    assert math.isclose(float(abs(torch.as_tensor(rec["features"]) - direct["features"]).max()), 0.0, abs_tol=1e-4)
    assert rec["object_names"] == direct["object_names"]
