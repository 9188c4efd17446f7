"""Training and COCO evaluation of the shapes detector (``shapes_detector.py``) on the generated corpus.

``train_shapes_detector(shapes_dir, out_path)`` trains on ``annotations/instances_train.json`` with a plain
torch loop and writes ``out_path`` (safetensors) + the JSON sidecar atomically; ``evaluate_shapes_detector``
gives COCO box AP with pycocotools ``COCOeval`` (what ``tools/train_shapes_detector.py`` reports on val).
Settings come from ``projects/vinvl/configs/detector/shapes.yaml`` (sections ``model``, ``training``,
``evaluation``).

Follows the torchvision detection reference recipe (``references/detection/train.py``: warm-up, grouped
aspect ratios, horizontal flips, summed Faster R-CNN losses) with deliberate differences for a CPU budget:

* the training images are decoded and resized once and kept in memory as uint8 (1200 images ~ 0.2 GB);
* AdamW instead of SGD (converges from random init within a few epochs);
* the learning rate follows a cosine over *progress* = max(iteration / planned iterations, elapsed / time
  budget): training stops at ``epochs`` or at ``max_minutes`` (data loading included), whichever comes
  first, and in both cases ends with a decayed learning rate. With the time budget binding, the number of
  iterations depends on the machine (recorded in the sidecar).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torchvision.io import ImageReadMode, decode_image, read_file

from mmf_plugins.common.config import REPO_ROOT
from mmf_plugins.extraction.detectors.shapes_detector import (
    ShapesDetector,
    ShapesDetectorConfig,
    ShapesLabelmap,
    load_shapes_detector,
    save_shapes_detector,
    write_sidecar,
)

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = REPO_ROOT / "projects" / "vinvl" / "configs" / "detector" / "shapes.yaml"


@dataclass
class ShapesTrainingConfig:
    epochs: int = 12
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_iters: int = 50
    grad_clip: float = 10.0
    hflip: bool = True
    max_minutes: float = 4.0
    seed: int = 0
    log_every: int = 25

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if self.lr <= 0 or self.max_minutes <= 0:
            raise ValueError(f"lr and max_minutes must be > 0, got {self.lr}, {self.max_minutes}")


@dataclass
class ShapesEvaluationConfig:
    """Post-processing for AP: a low threshold and many boxes, as COCO evaluation expects."""

    score_thresh: float = 0.05
    max_boxes: int = 100
    batch_size: int = 8


def _section(cls, options: Mapping[str, Any] | None, where: str):
    options = dict(options or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {', '.join(sorted(known))}")
    return options


def load_detector_settings(config: str | os.PathLike | Mapping | None = None) -> dict[str, dict]:
    """``{"model": {...}, "training": {...}, "evaluation": {...}}`` from the yaml (default: shapes.yaml) or a dict.

    Keys are checked against ``ShapesDetectorConfig`` (minus ``num_classes`` / ``num_attributes``, which come
    from the corpus label map), ``ShapesTrainingConfig`` and ``ShapesEvaluationConfig``.
    """
    from omegaconf import OmegaConf

    if config is None or isinstance(config, (str, os.PathLike)):
        path = Path(config) if config is not None else DEFAULT_CONFIG
        if not path.is_file():
            raise FileNotFoundError(f"shapes detector config {path} not found; expected a yaml with model/training/evaluation "
                                    f"sections such as {DEFAULT_CONFIG}")
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        where = str(path)
    else:
        data = OmegaConf.to_container(OmegaConf.create(dict(config)), resolve=True)
        where = "config"
    data = data or {}
    unknown = sorted(set(data) - {"model", "training", "evaluation"})
    if unknown:
        raise ValueError(f"{where}: unknown section(s) {unknown}; expected model, training, evaluation")
    model = _section(ShapesDetectorConfig, data.get("model"), f"{where} model")
    for key in ("num_classes", "num_attributes"):
        if key in model:
            raise ValueError(f"{where} model.{key}: set from the corpus label map (instances_train.json); remove it")
    return {
        "model": model,
        "training": _section(ShapesTrainingConfig, data.get("training"), f"{where} training"),
        "evaluation": _section(ShapesEvaluationConfig, data.get("evaluation"), f"{where} evaluation"),
    }


# -------------------------------------------------------------------------------------------- data
@dataclass
class DetectionSplit:
    """One split in memory: resized uint8 images and their targets in resized pixels."""

    image_ids: list[int]
    images: list[torch.Tensor]  # uint8 (3, h, w) at the detector input size
    boxes: list[torch.Tensor]  # float32 (N, 4) xyxy
    labels: list[torch.Tensor]  # int64 (N,) class ids
    attributes: list[torch.Tensor]  # float32 (N, A) multi-hot

    def __len__(self) -> int:
        return len(self.images)


def read_instances(shapes_dir: str | os.PathLike, split: str) -> tuple[Path, dict]:
    path = Path(shapes_dir) / "annotations" / f"instances_{split}.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; expected the shapes corpus at {shapes_dir} "
            "(generate it with mmf_plugins.datasets.builders.shapes.generator.generate_shapes)"
        )
    return path, json.loads(path.read_text(encoding="utf-8"))


def decode_rgb(path: str | os.PathLike) -> torch.Tensor:
    """uint8 (3, H, W) RGB of an image file."""
    return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)


def load_detection_split(shapes_dir: str | os.PathLike, split: str, labelmap: ShapesLabelmap,
                         model: ShapesDetector, max_images: int | None = None) -> DetectionSplit:
    """Decode and resize the images of ``split`` once; boxes and attributes follow the resize."""
    _, inst = read_instances(shapes_dir, split)
    image_dir = Path(shapes_dir) / "images" / split
    class_of = {cid: i + 1 for i, cid in enumerate(labelmap.category_ids)}
    attr_col = {aid: j for j, aid in enumerate(labelmap.attribute_ids)}
    by_image: dict[int, list[dict]] = {}
    for ann in inst["annotations"]:
        by_image.setdefault(int(ann["image_id"]), []).append(ann)
    entries = sorted(inst["images"], key=lambda e: int(e["id"]))[:max_images]
    out = DetectionSplit([], [], [], [], [])
    for entry in entries:
        path = image_dir / entry["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"image {path} listed in instances_{split}.json is missing; regenerate the corpus")
        image = decode_rgb(path)
        h, w = int(image.shape[1]), int(image.shape[2])
        resized = model.resize(image)
        sy, sx = resized.shape[1] / h, resized.shape[2] / w
        anns = by_image.get(int(entry["id"]), [])
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        boxes *= torch.tensor([sx, sy, sx, sy])
        try:
            labels = torch.tensor([class_of[int(a["category_id"])] for a in anns], dtype=torch.int64)
            attrs = torch.zeros((len(anns), labelmap.num_attributes))
            for r, a in enumerate(anns):  # loop over a handful of objects per image at load time
                attrs[r, [attr_col[int(i)] for i in a.get("attribute_ids", [])]] = 1.0
        except KeyError as e:
            raise ValueError(f"instances_{split}.json image {entry['id']}: id {e.args[0]} is not in the train label map "
                             f"(categories {labelmap.category_ids}, attributes {labelmap.attribute_ids})") from None
        out.image_ids.append(int(entry["id"]))
        out.images.append(resized)
        out.boxes.append(boxes)
        out.labels.append(labels)
        out.attributes.append(attrs)
    return out


def aspect_grouped_batches(sizes: Sequence[tuple[int, int]], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Shuffled batches of landscape-only or portrait-only images (little padding), in shuffled order."""
    groups = [[i for i, (h, w) in enumerate(sizes) if w >= h], [i for i, (h, w) in enumerate(sizes) if w < h]]
    batches = []
    for group in groups:
        order = torch.randperm(len(group), generator=generator).tolist()
        batches.extend([[group[j] for j in order[s : s + batch_size]] for s in range(0, len(group), batch_size)])
    return [batches[j] for j in torch.randperm(len(batches), generator=generator).tolist()]


def _training_batch(data: DetectionSplit, index: Sequence[int], hflip: bool, generator: torch.Generator):
    images, targets = [], []
    flips = (torch.rand(len(index), generator=generator) < 0.5).tolist() if hflip else [False] * len(index)
    for i, flip in zip(index, flips):  # loop over the images of a batch
        img, boxes = data.images[i], data.boxes[i]
        if flip:
            w = img.shape[2]
            img = img.flip(-1)
            boxes = torch.stack((w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]), dim=1)
        images.append(img)
        targets.append({"boxes": boxes, "labels": data.labels[i], "attributes": data.attributes[i]})
    return images, targets


# ---------------------------------------------------------------------------------------- training
def _lr_factor(progress: float, iteration: int, warmup_iters: int) -> float:
    warm = min(1.0, 0.1 + 0.9 * iteration / warmup_iters) if warmup_iters > 0 else 1.0
    return warm * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_shapes_detector(
    shapes_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    config: str | os.PathLike | Mapping | None = None,
    max_minutes: float | None = None,
    seed: int | None = None,
    epochs: int | None = None,
    max_images: int | None = None,
    evaluate: bool = True,
) -> dict:
    """Train the shapes detector on ``<shapes_dir>/annotations/instances_train.json`` and save it to ``out_path``.

    ``config``: yaml path or dict with ``model`` / ``training`` / ``evaluation`` sections (default
    projects/vinvl/configs/detector/shapes.yaml); ``max_minutes``, ``seed``, ``epochs`` override the training
    section; ``max_images`` limits the train images (tests). With ``evaluate`` and a val split present, box AP on
    val is computed and stored in the sidecar. Returns the summary written to the sidecar (``training``: time,
    iterations, epochs, losses per iteration; ``val``: AP, AP50, ...).
    """
    start = time.perf_counter()
    settings = load_detector_settings(config)
    overrides = {k: v for k, v in {"max_minutes": max_minutes, "seed": seed, "epochs": epochs}.items() if v is not None}
    tcfg = ShapesTrainingConfig(**{**settings["training"], **overrides})
    ecfg = ShapesEvaluationConfig(**settings["evaluation"])
    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        raise ValueError(f"--out {out_path} must end in .safetensors")

    _, train_inst = read_instances(shapes_dir, "train")
    labelmap = ShapesLabelmap.from_coco(train_inst, "instances_train.json")
    torch.manual_seed(tcfg.seed)
    mcfg = ShapesDetectorConfig(**settings["model"], num_classes=labelmap.num_classes, num_attributes=labelmap.num_attributes)
    model = ShapesDetector(mcfg, labelmap)
    data = load_detection_split(shapes_dir, "train", labelmap, model, max_images=max_images)
    if len(data) == 0:
        raise ValueError(f"{shapes_dir}: instances_train.json lists no images")
    load_seconds = time.perf_counter() - start
    logger.info("shapes detector: %d train images loaded in %.1f s", len(data), load_seconds)

    generator = torch.Generator().manual_seed(tcfg.seed)
    sizes = [(int(x.shape[1]), int(x.shape[2])) for x in data.images]
    batches_per_epoch = len(aspect_grouped_batches(sizes, tcfg.batch_size, torch.Generator().manual_seed(0)))
    planned = tcfg.epochs * batches_per_epoch
    budget = tcfg.max_minutes * 60.0 - min(3.0, 0.1 * tcfg.max_minutes * 60.0)  # keep a few seconds for saving
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() > 1]
    no_decay = [p for p in params if p.dim() <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=tcfg.lr
    )
    model.train()
    losses_log: list[dict[str, float]] = []
    iteration, epoch, stop_reason = 0, 0, "epochs"
    while epoch < tcfg.epochs and stop_reason == "epochs":
        for index in aspect_grouped_batches(sizes, tcfg.batch_size, generator):
            progress = max(iteration / planned, (time.perf_counter() - start) / budget)
            if progress >= 1.0:
                stop_reason = "time" if iteration < planned else "epochs"
                break
            for group in optimizer.param_groups:
                group["lr"] = tcfg.lr * _lr_factor(progress, iteration, tcfg.warmup_iters)
            images, targets = _training_batch(data, index, tcfg.hflip, generator)
            batch, image_sizes = model.batch(images)
            losses = model(batch, image_sizes, targets)
            total = sum(losses.values())
            if not torch.isfinite(total):
                raise FloatingPointError(
                    f"shapes detector loss became {total.item()} at iteration {iteration} "
                    f"({ {k: round(v.item(), 4) for k, v in losses.items()} }); lower training.lr (now {tcfg.lr})"
                )
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
            optimizer.step()
            losses_log.append({"total": total.item(), **{k: v.item() for k, v in losses.items()}})
            iteration += 1
            if tcfg.log_every and iteration % tcfg.log_every == 0:
                recent = losses_log[-tcfg.log_every :]
                logger.info("iter %d (epoch %d) loss %.3f lr %.2e %.1f s", iteration, epoch,
                            sum(r["total"] for r in recent) / len(recent), optimizer.param_groups[0]["lr"],
                            time.perf_counter() - start)
        else:
            epoch += 1
    model.eval()
    train_seconds = time.perf_counter() - start
    if stop_reason == "time":
        logger.info("shapes detector: time budget (%.1f min) reached after %d iterations (%.2f epochs)",
                    tcfg.max_minutes, iteration, iteration / batches_per_epoch)
    summary: dict[str, Any] = {
        "training": {
            "seconds": round(train_seconds, 1),
            "load_seconds": round(load_seconds, 1),
            "iterations": iteration,
            "epochs": round(iteration / batches_per_epoch, 2),
            "planned_iterations": planned,
            "stopped_by": stop_reason,
            "num_images": len(data),
            "torch_threads": torch.get_num_threads(),
            "config": dataclasses.asdict(tcfg),
            "loss_first": losses_log[0] if losses_log else None,
            "loss_last": _mean_losses(losses_log[-max(1, batches_per_epoch // 4) :]),
        },
    }
    save_shapes_detector(model, out_path, summary)
    if evaluate and (Path(shapes_dir) / "annotations" / "instances_val.json").is_file():
        summary["val"] = evaluate_shapes_detector(model, shapes_dir, "val", **dataclasses.asdict(ecfg))
        write_sidecar(model, out_path, summary)
    summary["losses"] = losses_log
    return summary


def _mean_losses(rows: list[dict[str, float]]) -> dict[str, float] | None:
    if not rows:
        return None
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


# -------------------------------------------------------------------------------------- evaluation
def evaluate_shapes_detector(
    model: ShapesDetector | str | os.PathLike,
    shapes_dir: str | os.PathLike,
    split: str = "val",
    *,
    score_thresh: float = 0.05,
    max_boxes: int = 100,
    batch_size: int = 8,
    max_images: int | None = None,
    device: str | torch.device = "cpu",
) -> dict:
    """COCO box AP of ``model`` (a detector or a weights path) on ``<shapes_dir>/annotations/instances_{split}.json``.

    Runs the extraction path (``detect`` on the original images, class-agnostic NMS) with a low score threshold.
    Returns ``{"AP", "AP50", "AP75", "AP_small", "AP_medium", "num_images", "num_detections",
    "images_per_second"}`` (AP in [0, 1]) plus :func:`attribute_accuracy` (``attr_acc_<kind>``).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not isinstance(model, ShapesDetector):
        model = load_shapes_detector(model, device=device)
    if model.labelmap is None:
        raise ValueError("the detector has no label map; load it with load_shapes_detector(model_file)")
    ann_path, inst = read_instances(shapes_dir, split)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(ann_path))
    post = model.postprocess.replace(score_thresh=score_thresh, min_boxes=0, max_boxes=max_boxes)
    entries = sorted(inst["images"], key=lambda e: int(e["id"]))[:max_images]
    image_dir = Path(shapes_dir) / "images" / split
    was_training = model.training
    model.eval()
    results: list[dict] = []
    seconds = 0.0
    for s in range(0, len(entries), batch_size):
        chunk = entries[s : s + batch_size]
        images = [decode_rgb(image_dir / e["file_name"]) for e in chunk]
        t0 = time.perf_counter()
        records = model.detect(images, postprocess=post)
        seconds += time.perf_counter() - t0
        for e, rec in zip(chunk, records):  # loop over images; boxes go out as one list per image
            xyxy = rec["bbox"].cpu()
            xywh = torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], dim=1).tolist()
            cats = [model.labelmap.category_ids[c - 1] for c in rec["objects"].tolist()]
            results.extend({"image_id": int(e["id"]), "category_id": c, "bbox": [round(v, 2) for v in b], "score": sc}
                           for c, b, sc in zip(cats, xywh, rec["scores"].tolist()))
    model.train(was_training)
    out = {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "AP_small": 0.0, "AP_medium": 0.0, "num_images": len(entries),
           "num_detections": len(results), "images_per_second": round(len(entries) / max(seconds, 1e-9), 2)}
    if results:
        with contextlib.redirect_stdout(io.StringIO()):
            dets = coco.loadRes(results)
            ev = COCOeval(coco, dets, "bbox")
            ev.params.imgIds = [int(e["id"]) for e in entries]
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        stats = [max(0.0, float(x)) for x in ev.stats]  # -1 means "no such objects"
        out.update(AP=round(stats[0], 4), AP50=round(stats[1], 4), AP75=round(stats[2], 4),
                   AP_small=round(stats[3], 4), AP_medium=round(stats[4], 4))
    out.update(attribute_accuracy(model, shapes_dir, split, inst=inst, batch_size=batch_size, max_images=max_images))
    return out


def attribute_accuracy(model: ShapesDetector, shapes_dir: str | os.PathLike, split: str = "val", *,
                       inst: dict | None = None, batch_size: int = 8, max_images: int | None = None) -> dict:
    """Top-1 attribute accuracy per attribute kind on the ground-truth boxes: ``{"attr_acc_<kind>": float}``.

    Kinds are the ``supercategory`` of ``attribute_categories`` (shapes: size, color, texture); within each
    kind the detector's best-scoring attribute is compared with the annotated one. This is what the region
    baselines can read from the features: a region feature whose colour the attribute head cannot tell
    apart is one a VQA model cannot read a colour from either.
    """
    if model.labelmap is None:
        raise ValueError("the detector has no label map; load it with load_shapes_detector(model_file)")
    if inst is None:
        _, inst = read_instances(shapes_dir, split)
    kind_of = {int(a["id"]): str(a.get("supercategory") or a["name"]) for a in inst.get("attribute_categories", [])}
    column = {aid: j for j, aid in enumerate(model.labelmap.attribute_ids)}
    kinds = sorted(set(kind_of.values()))
    members = {k: torch.tensor([column[a] for a, kk in kind_of.items() if kk == k and a in column]) for k in kinds}
    by_image: dict[int, list] = {}
    for a in inst["annotations"]:
        by_image.setdefault(int(a["image_id"]), []).append(a)
    entries = [e for e in sorted(inst["images"], key=lambda e: int(e["id"])) if by_image.get(int(e["id"]))][:max_images]
    image_dir = Path(shapes_dir) / "images" / split
    heads = model.roi_heads
    correct = dict.fromkeys(kinds, 0)
    total = dict.fromkeys(kinds, 0)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for s in range(0, len(entries), batch_size):
            chunk = entries[s : s + batch_size]
            images = [decode_rgb(image_dir / e["file_name"]) for e in chunk]
            anns = [by_image[int(e["id"])] for e in chunk]
            batch, sizes = model.preprocess(images)
            features = model.backbone(batch)
            features["image"] = batch
            boxes = []
            for im, a, (h, w) in zip(images, anns, sizes):
                xywh = torch.tensor([x["bbox"] for x in a], dtype=torch.float32)
                xyxy = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
                boxes.append(xyxy * xyxy.new_tensor([w / im.shape[2], h / im.shape[1]] * 2))
            pooled = heads.region_features(features, boxes, sizes).float()
            labels = heads.box_predictor(pooled)[0][:, 1:].argmax(dim=1) + 1
            probs = heads.attribute_predictor(pooled, labels).float()
            truth = [aid for a in anns for x in a for aid in [x.get("attribute_ids", [])]]
            for row, ids in zip(probs, truth):
                for k in kinds:
                    want = [column[i] for i in ids if kind_of.get(int(i)) == k and int(i) in column]
                    if not want or members[k].numel() == 0:
                        continue
                    total[k] += 1
                    correct[k] += int(members[k][row[members[k]].argmax()]) == want[0]
    model.train(was_training)
    return {f"attr_acc_{k}": round(correct[k] / total[k], 4) for k in kinds if total[k]}
