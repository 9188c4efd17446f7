"""Every builder yields batches from `shapes`, with images (grid models) and with region features
written by the feature writers (region models); missing files are named with their source."""

import numpy as np
import pytest
import torch

from mmf_plugins.common.config import build_config
from mmf_plugins.common.registry import registry
from mmf_plugins.datasets.base_dataset_builder import DatasetFileMissing
from mmf_plugins.trainers.data_module import build_datasets

IMAGE_BUILDERS = ["vqa2", "shapes", "coco", "coco_retrieval", "flickr30k_retrieval", "nlvr2", "snli_ve", "vl_pretrain"]
SMALL = ["processors.image_processor.params.min_size=64", "processors.image_processor.params.max_size=96"]


def _cfg(name, data_dir, extra=()):
    opts = ["model=soho", f"datasets={name}", f"env.data_dir={data_dir}"]
    if name != "text_corpus":
        opts += [f"dataset_config.{name}.{o}" for o in SMALL]
    return build_config(opts + list(extra))


def _batch(ds, n=3):
    return ds.collate_fn([ds[i] for i in range(min(n, len(ds)))])


@pytest.mark.parametrize("name", IMAGE_BUILDERS)
def test_builder_yields_image_batches(name, tiny_data_dir):
    cfg = _cfg(name, tiny_data_dir, [f"dataset_config.{name}.max_eval_images=3"] if "retrieval" in name else [])
    for split in ("train", "val"):
        (ds,) = build_datasets(cfg, split)
        b = _batch(ds)
        assert b.dataset_name == name and b.dataset_type == split
        assert b.image.dim() == 4 and b.image.shape[1] == 3 and min(b.image.shape[-2:]) >= 64
        assert b.image_mask.shape == (b.image.shape[0], *b.image.shape[-2:])
        assert b.input_ids.shape == b.input_mask.shape == b.segment_ids.shape
        assert (b.input_ids[:, 0] == ds.text_processor.cls_id).all()
        if name == "nlvr2":
            assert b.image_1.shape[0] == b.image.shape[0] and "image_1_mask" in b
            assert set(b.targets.tolist()) <= {0, 1}
        if name in ("vqa2", "shapes"):
            assert b.targets.shape[1] == len(ds.answer_processor)
            # soft scores follow the 10 raw answers: the most common answer of a question scores 1.0
            assert torch.allclose(b.targets.max(dim=1).values, torch.ones(b.targets.shape[0]))


def test_retrieval_eval_scores_every_pair(tiny_data_dir):
    cfg = _cfg("coco_retrieval", tiny_data_dir, ["dataset_config.coco_retrieval.max_eval_images=3"])
    (ds,) = build_datasets(cfg, "val")
    n_txt = len(ds.captions)
    assert len(ds) == 3 * n_txt
    pos = [ds[i] for i in range(len(ds))]
    labels = torch.tensor([int(s["is_correct"]) for s in pos])
    assert labels.sum() == n_txt  # every caption is correct for exactly one image


def test_text_corpus_masks_tokens(tiny_data_dir):
    cfg = _cfg("text_corpus", tiny_data_dir)
    (ds,) = build_datasets(cfg, "train")
    b = _batch(ds, 16)
    assert (b.lm_label_ids != -1).any() and b.text_only.all()


def _write_features(tiny_data_dir, writer="lmdb"):
    """Region features written by the registered writer for every image of the corpus."""
    import mmf_plugins

    mmf_plugins.setup_imports()
    root = tiny_data_dir / "shapes"
    out = root / "features" / "detector.lmdb"
    if out.exists():
        return out
    rng = np.random.default_rng(0)
    w = registry.get_feature_writer_class(writer)(str(out))
    for img in sorted((root / "images").rglob("*.jpg")):
        n = int(rng.integers(2, 6))
        xy = rng.uniform(0, 100, size=(n, 2)).astype(np.float32)
        w.write(img.stem, {"features": rng.standard_normal((n, 32)).astype(np.float32),
                           "bbox": np.concatenate([xy, xy + 20], 1), "num_boxes": n, "image_width": 320,
                           "image_height": 240, "objects": np.arange(n, dtype=np.int64),
                           "object_names": [f"circle{i}" for i in range(n)],
                           "cls_prob": np.full((n, 4), 0.25, dtype=np.float32)})
    w.close()
    return out


@pytest.mark.parametrize("name", ["vqa2", "coco", "nlvr2", "snli_ve", "vl_pretrain"])
def test_builder_yields_feature_batches(name, tiny_data_dir):
    _write_features(tiny_data_dir)
    cfg = _cfg(name, tiny_data_dir, [f"dataset_config.{name}.use_images=False", f"dataset_config.{name}.use_features=True",
                                     f"dataset_config.{name}.text_b=tags", f"dataset_config.{name}.max_features=8",
                                     f"dataset_config.{name}.processors.bbox_processor.params.feature_dim=32"])
    (ds,) = build_datasets(cfg, "train")
    b = _batch(ds)
    assert "image" not in b
    assert b.image_feature_0.shape[1:] == (8, 32 + 6)  # OSCAR form: features ‖ 6-d normalized box
    n = b.image_info_0.max_features
    assert (n >= 2).all() and (n <= 5).all()
    assert (b.image_feature_0[0, n[0]:] == 0).all()  # padding past the real regions
    # detector tags become segment B
    assert (b.segment_ids == 1).any()
    if name == "nlvr2":
        assert b.image_feature_1.shape == b.image_feature_0.shape


def test_contrastive_pretraining_labels(tiny_data_dir):
    _write_features(tiny_data_dir)
    cfg = _cfg("vl_pretrain", tiny_data_dir, ["dataset_config.vl_pretrain.use_images=False",
                                              "dataset_config.vl_pretrain.use_features=True",
                                              "dataset_config.vl_pretrain.objective=contrastive",
                                              "dataset_config.vl_pretrain.processors.bbox_processor.params.feature_dim=32"])
    (ds,) = build_datasets(cfg, "train")
    torch.manual_seed(0)
    labels = torch.tensor([int(ds[i % len(ds)]["contrastive_labels"]) for i in range(400)])
    freq = torch.bincount(labels, minlength=3).float() / len(labels)
    assert abs(freq[0] - 0.5) < 0.08 and abs(freq[1] - 0.25) < 0.08 and abs(freq[2] - 0.25) < 0.08


def test_missing_real_dataset_names_file_and_source(tmp_path):
    cfg = build_config(["model=soho", "datasets=vqa2", f"env.data_dir={tmp_path}",
                        "dataset_config.vqa2.annotations.train.questions=vqa2/v2_OpenEnded_mscoco_train2014_questions.json"])
    builder = registry.get_builder_class("vqa2")("vqa2")
    with pytest.raises(DatasetFileMissing) as e:
        builder.build(cfg.dataset_config.vqa2)
    msg = str(e.value)
    assert "v2_OpenEnded_mscoco_train2014_questions.json" in msg and "mmf_zoo download vqa2" in msg
    assert "visualqa.org" in msg
