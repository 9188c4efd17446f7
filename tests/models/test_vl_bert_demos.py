"""The VL-BERT pretraining demo config end to end: ``mmf_run`` with projects/vl_bert/configs/pretrain/demo.yaml on
a tiny generated shapes corpus and a tiny region-feature LMDB that carries ``cls_prob`` (what MVRC needs).
Image-caption and text-only batches alternate, so ``train.log`` must show all three VL-BERT pretraining losses."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from mmf_plugins.common.registry import registry

ROOT = Path(__file__).resolve().parents[2]
NUM_CLASSES = 7  # shapes detector cls_prob: background + 6 shapes
VOCAB = 548  # shapes tokenizer
LOSSES = ("train/vl_pretrain/mlm", "train/vl_pretrain/mvrc", "train/text_corpus/mlm_aux")


@pytest.fixture(scope="module")
def shapes_with_cls_prob(tmp_path_factory):
    """A 12-image shapes corpus plus region stores the demos read: ``detector.lmdb`` (pretraining, RefCOCO+) and
    ``vcr_boxes.lmdb`` (VCR: one region per annotated box, in annotation order), with random 256-d features and a
    random ``cls_prob`` over background + 6 shapes on the ground-truth boxes."""
    import mmf_plugins
    from mmf_plugins.datasets.builders.shapes.generator import generate_shapes

    mmf_plugins.setup_imports()
    root = tmp_path_factory.mktemp("vlbert_demo")
    shapes = generate_shapes(root / "shapes", seed=0, num_images=12, progress=False)
    rng = np.random.default_rng(0)
    writers = [registry.get_feature_writer_class("lmdb")(str(shapes / "features" / name))
               for name in ("detector.lmdb", "vcr_boxes.lmdb")]
    for split in ("train", "val", "test"):
        coco = json.loads((shapes / "annotations" / f"instances_{split}.json").read_text())
        for image in coco["images"]:
            anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
            n = len(anns)
            xywh = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(n, 4)
            logits = rng.standard_normal((n, NUM_CLASSES)).astype(np.float32) * 3
            cls_prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
            record = {"features": rng.standard_normal((n, 256)).astype(np.float32),
                      "bbox": np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1), "num_boxes": n,
                      "image_width": image["width"], "image_height": image["height"],
                      "objects": np.array([a["category_id"] for a in anns], dtype=np.int64),
                      "object_names": [f"shape{a['category_id']}" for a in anns], "cls_prob": cls_prob}
            for writer in writers:
                writer.write(Path(image["file_name"]).stem, record)
    for writer in writers:
        writer.close()
    return root


def _run_demo(data_dir, save, log_interval):
    from mmf_plugins.cli.run import run

    run([f"config={ROOT / 'projects/vl_bert/configs/pretrain/demo.yaml'}", "model=vl_bert",
         "datasets=vl_pretrain,text_corpus", "run_type=train", f"env.data_dir={data_dir}",
         f"env.save_dir={save}", "training.max_updates=4", f"training.log_interval={log_interval}",
         "training.batch_size=8", "training.num_workers=0", "training.progress_bar=False",
         "training.checkpoint_interval=4"])
    lines = [json.loads(x) for x in (save / "train.log").read_text().splitlines() if x.strip()]
    return [r for r in lines if "progress" in r]


def test_pretrain_demo_logs_mlm_mlm_aux_and_mvrc(shapes_with_cls_prob, tmp_path):
    save = tmp_path / "save"
    train = _run_demo(shapes_with_cls_prob, save, log_interval=1)
    assert [r["num_updates"] for r in train] == [1, 2, 3, 4]
    seen = {k: [r[k] for r in train if k in r] for k in LOSSES}
    for key, values in seen.items():
        assert values, f"{key} never logged: {train}"
        assert all(math.isfinite(v) for v in values), (key, values)
    # the samplers' uniform dataset choice mixes both kinds of batch within 4 updates (seed 1: 1:1)
    caption = sum("train/vl_pretrain/mlm" in r for r in train)
    assert caption == 2 and sum("train/text_corpus/mlm_aux" in r for r in train) == 2
    # freshly initialised heads predict ~uniformly: MLM ~ log(vocab), MVRC (soft CE vs cls_prob) ~ log(classes)
    assert abs(seen["train/vl_pretrain/mlm"][0] - math.log(VOCAB)) < 0.3
    assert abs(seen["train/text_corpus/mlm_aux"][0] - math.log(VOCAB)) < 0.3
    assert abs(seen["train/vl_pretrain/mvrc"][0] - math.log(NUM_CLASSES)) < 0.15
    assert (save / "vl_bert_final.safetensors").exists()


def test_pretrain_demo_log_lines_average_every_loss_over_the_interval(shapes_with_cls_prob, tmp_path):
    """With log_interval 2 each line covers one caption and one text-only batch (seed 1): all three losses
    appear in every line, each the mean over the interval's batches that produced it."""
    per_update = _run_demo(shapes_with_cls_prob, tmp_path / "every", log_interval=1)
    averaged = _run_demo(shapes_with_cls_prob, tmp_path / "pairs", log_interval=2)
    assert [r["num_updates"] for r in averaged] == [2, 4]
    for line, window in zip(averaged, (per_update[:2], per_update[2:])):
        for key in LOSSES + ("train/total_loss",):
            values = [r[key] for r in window if key in r]
            assert line[key] == pytest.approx(sum(values) / len(values), rel=1e-5), key


@pytest.mark.parametrize("dataset, metric", [("vcr", "val/vcr/accuracy"), ("refcoco", "val/refcoco/refcoco_accuracy")])
def test_finetuning_demos_train_and_report_their_accuracy(shapes_with_cls_prob, tmp_path, dataset, metric):
    from mmf_plugins.cli.run import run

    save = tmp_path / dataset
    run([f"config={ROOT / f'projects/vl_bert/configs/{dataset}/demo.yaml'}", "model=vl_bert", f"datasets={dataset}",
         "run_type=train_val", f"env.data_dir={shapes_with_cls_prob}", f"env.save_dir={save}",
         "training.max_updates=3", "training.log_interval=1", "training.evaluation_interval=3",
         "training.checkpoint_interval=3", "training.batch_size=4", "training.num_workers=0",
         "training.progress_bar=False"])
    lines = [json.loads(x) for x in (save / "train.log").read_text().splitlines() if x.strip()]
    losses = [r["train/total_loss"] for r in lines if "progress" in r]
    assert len(losses) == 3 and all(math.isfinite(v) and v > 0 for v in losses)
    (val,) = [r for r in lines if metric in r]
    assert 0.0 <= val[metric] <= 1.0
    summary = json.loads((save / "summary.json").read_text())
    assert metric in summary["results"]
