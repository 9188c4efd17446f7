"""Registered feature extractors: images (uint8 RGB) -> one feature record per image.

Contract (ARCHITECTURE.md): ``extractor(images, boxes=None) -> list[record]`` with ``images`` a list of
uint8 tensors (3, H, W) in RGB and ``boxes`` an optional list of (N_i, 4) xyxy boxes in original pixels.
Records hold CPU tensors (float32 / int64) in the feature-record layout of
``mmf_plugins/datasets/databases/feature_record.py``; ``bbox`` is always in original-image pixels.

* ``vinvl_x152c4``: the VinVL X152-C4 object-attribute detector (``detectors/vinvl.py``; Zhang et al.,
  CVPR 2021, microsoft/scene_graph_benchmark). Given boxes replace the RPN proposals.
* ``grid``: C5 grid features of any torchvision ResNet/ResNeXt (Jiang et al., "In Defense of Grid Features
  for VQA", CVPR 2020): ``features`` (h*w, C) in row-major cell order and ``bbox`` = the cells' boxes.
* ``given_boxes``: RoI features of provided boxes on a torchvision ResNet C4 trunk + C5 head (VL-BERT's
  end-to-end visual path, jackroos/VL-BERT ``common/fast_rcnn.py``), optionally with the whole-image box
  first (VL-BERT ``ADD_IMAGE_AS_A_BOX``).

Deliberate differences: ``grid`` and ``given_boxes`` resize with the detector rule (short side 600, long side
<= 1000) and normalise with ImageNet statistics by default (``normalization="caffe"`` gives VL-BERT's BGR
pixel means); records of extractors without classes carry ``objects`` = 0 (the contract requires the field).
Weights are read from local files only (``model_file``) or through the model zoo (``zoo``).
"""

from __future__ import annotations

import abc
import contextlib
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torchvision.transforms.v2 import functional as TF

from mmf_plugins.common.registry import registry
from mmf_plugins.extraction.detectors.vinvl import resize_size
from mmf_plugins.zoo.conversion import (
    CheckpointError,
    load_state_dict_with_report,
    load_weights_file,
    strip_prefix,
)

logger = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
NORMALIZATIONS = {
    # name: (mean, std, scale of the input, channel order)
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1.0 / 255.0, "rgb"),
    "caffe": ((102.9801, 115.9465, 122.7717), (1.0, 1.0, 1.0), 1.0, "bgr"),  # VL-BERT / BUTD pixel means
}


def resolve_device(device: str | torch.device) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"`` -> ``torch.device``; CUDA requested without CUDA is an error."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"invalid device {device!r}; expected 'cpu', 'cuda' or 'cuda:<index>'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine; use --device cpu")
    return dev


def records_to_cpu(record: dict) -> dict:
    """Tensors to CPU: floating point as float32, integers as int64; other values untouched."""
    out = {}
    for key, value in record.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().to("cpu")
            value = value.float() if value.is_floating_point() else value.long()
        out[key] = value
    return out


class FeatureExtractor(abc.ABC):
    """Base class: device, precision (autocast) and argument checks around ``extract``.

    ``boxes``: ``"never"`` (boxes are an error), ``"optional"`` or ``"required"``.
    """

    boxes: str = "optional"

    def __init__(self, *, device: str | torch.device = "cpu", precision: str = "fp32"):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
        self.device = resolve_device(device)
        self.precision = precision

    def autocast(self):
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def __call__(self, images: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor] | None = None) -> list[dict]:
        images = list(images)
        name = type(self).__name__
        if boxes is None and self.boxes == "required":
            raise ValueError(f"{name} needs boxes (one (N, 4) xyxy tensor per image); pass --boxes FILE")
        if boxes is not None and self.boxes == "never":
            raise ValueError(f"{name} computes its own regions and takes no boxes; drop --boxes")
        if boxes is not None:
            if len(boxes) != len(images):
                raise ValueError(f"got {len(images)} images but {len(boxes)} box lists; pass one per image")
            boxes = [_as_boxes(b, i) for i, b in enumerate(boxes)]
        if not images:
            return []
        with torch.inference_mode(), self.autocast():
            records = self.extract(images, boxes)
        return [records_to_cpu(r) for r in records]

    @abc.abstractmethod
    def extract(self, images: list[torch.Tensor], boxes: list[torch.Tensor] | None) -> list[dict]:
        """Records for ``images`` (already validated); may return tensors on the device."""


def _as_boxes(boxes, index: int) -> torch.Tensor:
    b = torch.as_tensor(boxes, dtype=torch.float32)
    if b.numel() == 0:
        return b.reshape(0, 4)
    if b.dim() != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes of image {index} must be (N, 4) xyxy pixels, got shape {tuple(b.shape)}")
    if not torch.isfinite(b).all():
        raise ValueError(f"boxes of image {index} contain NaN or inf: {b[~torch.isfinite(b).all(1)][:2].tolist()}")
    return b


def prepare_batch(
    images: Sequence[torch.Tensor],
    *,
    min_size: int,
    max_size: int,
    normalization: str,
    device: torch.device,
    size_divisible: int,
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Resize (short side ``min_size``, long side <= ``max_size``), normalise and zero-pad to a multiple of
    ``size_divisible`` (at least one multiple). Returns the batch and each image's resized (h, w)."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; expected one of {', '.join(NORMALIZATIONS)}")
    mean, std, scale, order = NORMALIZATIONS[normalization]
    mean_t = torch.tensor(mean, device=device).view(3, 1, 1)
    std_t = torch.tensor(std, device=device).view(3, 1, 1)
    resized, sizes = [], []
    for i, img in enumerate(images):  # loop over the images of a batch
        if img.dtype != torch.uint8 or img.dim() != 3 or img.shape[0] != 3 or min(img.shape[1:]) < 1:
            raise ValueError(f"image {i}: expected a uint8 RGB tensor (3, H, W), got {img.dtype} {tuple(img.shape)}")
        h, w = int(img.shape[1]), int(img.shape[2])
        oh, ow = resize_size(h, w, min_size, max_size)
        x = img.to(device, non_blocking=True)
        if (oh, ow) != (h, w):
            x = TF.resize(x, [oh, ow], antialias=True)
        if order == "bgr":
            x = x.flip(0)
        resized.append((x.float() * scale - mean_t) / std_t)
        sizes.append((oh, ow))
    d = size_divisible
    max_h = max(d, math.ceil(max(s[0] for s in sizes) / d) * d)
    max_w = max(d, math.ceil(max(s[1] for s in sizes) / d) * d)
    batch = resized[0].new_zeros((len(resized), 3, max_h, max_w))
    for i, x in enumerate(resized):
        batch[i, :, : x.shape[1], : x.shape[2]] = x
    return batch, sizes


def load_backbone_weights(module: torch.nn.Module, path: str | os.PathLike, what: str, ignore_prefixes=("fc.",)) -> None:
    """Load a local ResNet weights file into ``module`` (torchvision names at the top level).

    Accepts a torchvision state dict, an mmcv/MMF wrapper (``{"state_dict": ...}`` / ``{"model": ...}``) and
    detector/VL checkpoints whose trunk sits under ``backbone.`` (SOHO). Missing trunk weights are an error.
    """
    path = Path(path)
    state = load_weights_file(path)
    for wrapper in ("state_dict", "model"):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    state = strip_prefix(state, "module.")
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    state = {
        k: v
        for k, v in state.items()
        if isinstance(v, torch.Tensor) and not k.startswith(ignore_prefixes) and not k.endswith("num_batches_tracked")
    }
    try:
        report = load_state_dict_with_report(module, state)
    except CheckpointError as e:
        raise CheckpointError(f"{path} does not fit the {what}; is --backbone the right architecture?\n{e}") from e
    missing = [k for k in report.missing if not k.startswith(ignore_prefixes)]
    if missing:
        raise CheckpointError(
            f"{path} does not hold weights for the {what}: {len(missing)} tensors missing "
            f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); pass a torchvision-format "
            "ResNet state dict or a checkpoint with the trunk under 'backbone.'"
        )
    if report.unused:
        logger.info("%s: %d tensors not used by the %s (%s ...)", path, len(report.unused), what, report.unused[0])


# ------------------------------------------------------------------------------------ VinVL
def vinvl_zoo_files(key: str) -> tuple[Path, Path | None]:
    """Download (if needed) zoo entry ``key`` and return (checkpoint, labelmap or None)."""
    from mmf_plugins.extraction.detectors.convert_vinvl_detector import LABELMAP_FILE
    from mmf_plugins.zoo.download import ensure_downloaded
    from mmf_plugins.zoo.loading import select_weights_file
    from mmf_plugins.zoo.zoo_config import get_zoo_entry

    entry = get_zoo_entry(key, kind="models")
    if entry.converter != "vinvl_x152c4":
        raise ValueError(
            f"zoo entry '{entry.key}' is converted by '{entry.converter or '(none)'}', not by the VinVL detector "
            "converter 'vinvl_x152c4'; use --zoo vinvl.detector.x152c4"
        )
    folder = ensure_downloaded(entry)
    weights = select_weights_file(folder, entry.weights_file, what=f"zoo entry {entry.key}")
    labelmap = next(iter(sorted(folder.rglob(LABELMAP_FILE))), None)
    return weights, labelmap


@registry.register_extractor("vinvl_x152c4")
class VinVLX152C4Extractor(FeatureExtractor):
    """VinVL X152-C4 region features (2048-d), classes, scores, class distribution and attributes.

    Weights: ``model_file`` (the official ``vinvl_vg_x152c4.pth``) or ``zoo`` (e.g. ``vinvl.detector.x152c4``);
    ``random_weights=True`` only for tests and benchmarks. ``labelmap``: ``VG-SGG-dicts-vgoi6-clipped.json``.
    ``nms_filter``: 0 per-class, 1 best class after per-class NMS (README command), 2 class-agnostic (released
    features). ``box_regression``: decode per-class boxes instead of keeping the proposals (the extraction
    command sets ``TEST.IGNORE_BOX_REGRESSION True``, so features describe their boxes exactly).
    ``detector_options``: any other ``VinVLDetectorConfig`` field (e.g. ``{"post_nms_top_n": 100}``).
    """

    boxes = "optional"

    def __init__(
        self,
        *,
        model_file: str | os.PathLike | None = None,
        zoo: str | None = None,
        labelmap: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        nms_filter: int = 2,
        score_thresh: float = 0.2,
        min_boxes: int = 10,
        max_boxes: int = 100,
        min_size: int = 600,
        max_size: int = 1000,
        box_regression: bool = False,
        attributes: bool = True,
        random_weights: bool = False,
        detector_options: dict | None = None,
    ):
        super().__init__(device=device, precision=precision)
        from mmf_plugins.extraction.detectors.convert_vinvl_detector import (
            CHECKPOINT_FILE,
            CHECKPOINT_URL,
            load_vinvl_detector,
        )

        if model_file is not None and zoo is not None:
            raise ValueError("give either --model_file or --zoo for vinvl_x152c4, not both")
        if model_file is None and zoo is None and not random_weights:
            raise ValueError(
                f"vinvl_x152c4 needs weights: --model_file {CHECKPOINT_FILE} (from {CHECKPOINT_URL}) or "
                "--zoo vinvl.detector.x152c4"
            )
        explicit = {"nms_filter", "score_thresh", "min_boxes", "max_boxes", "min_size", "max_size", "ignore_box_regression", "attribute_on"}
        clash = sorted(explicit & set(detector_options or {}))
        if clash:
            raise ValueError(f"detector_options {clash} repeat arguments of the extractor; give them once, as arguments")
        if zoo is not None:
            model_file, zoo_labelmap = vinvl_zoo_files(zoo)
            labelmap = labelmap if labelmap is not None else zoo_labelmap
        self.model = load_vinvl_detector(
            model_file,
            labelmap=labelmap,
            nms_filter=int(nms_filter),
            score_thresh=float(score_thresh),
            min_boxes=int(min_boxes),
            max_boxes=int(max_boxes),
            min_size=int(min_size),
            max_size=int(max_size),
            ignore_box_regression=not box_regression,
            attribute_on=bool(attributes),
            **dict(detector_options or {}),
        ).to(self.device)
        self.model.eval()

    def extract(self, images, boxes):
        return self.model(images, boxes)


# ------------------------------------------------------------------------------------- grid
@registry.register_extractor("grid")
class GridFeatureExtractor(FeatureExtractor):
    """C5 grid features: ``features`` (h*w, C) row-major, ``bbox`` = each cell's box in original pixels.

    ``backbone``: a torchvision ResNet/ResNeXt name; ``model_file``: local weights (torchvision format, or a
    SOHO/mmcv checkpoint whose trunk is under ``backbone.``); without it the trunk is randomly initialised.
    """

    boxes = "never"

    def __init__(
        self,
        *,
        backbone: str = "resnet50",
        model_file: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        min_size: int = 600,
        max_size: int = 1000,
        normalization: str = "imagenet",
    ):
        super().__init__(device=device, precision=precision)
        from mmf_plugins.modules.grid_backbones import GridBackbone

        if normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {normalization!r}; expected one of {', '.join(NORMALIZATIONS)}")
        self.net = GridBackbone(arch=backbone, norm_mode="frozen")
        if model_file is not None:
            load_backbone_weights(self.net, model_file, f"grid backbone {backbone}")
        else:
            logger.warning("grid extractor: no --model_file given, the %s trunk has random weights", backbone)
        self.net.eval().to(self.device)
        self.min_size, self.max_size, self.normalization = int(min_size), int(max_size), normalization

    def extract(self, images, boxes):
        stride = self.net.stride
        batch, sizes = prepare_batch(
            images, min_size=self.min_size, max_size=self.max_size, normalization=self.normalization,
            device=self.device, size_divisible=stride,
        )
        fmap = self.net(batch)
        records = []
        for i, (oh, ow) in enumerate(sizes):
            gh, gw = math.ceil(oh / stride), math.ceil(ow / stride)
            feats = fmap[i, :, :gh, :gw].flatten(1).t().float()  # (gh*gw, C), row-major cells
            y1 = torch.arange(gh, device=fmap.device, dtype=torch.float32) * stride
            x1 = torch.arange(gw, device=fmap.device, dtype=torch.float32) * stride
            yy1, xx1 = torch.meshgrid(y1, x1, indexing="ij")
            cells = torch.stack(
                (xx1, yy1, (xx1 + stride).clamp(max=ow), (yy1 + stride).clamp(max=oh)), dim=-1
            ).reshape(-1, 4)
            h, w = int(images[i].shape[1]), int(images[i].shape[2])
            bbox = cells * cells.new_tensor([w / ow, h / oh, w / ow, h / oh])
            records.append(
                {
                    "features": feats,
                    "bbox": bbox,
                    "num_boxes": gh * gw,
                    "image_width": w,
                    "image_height": h,
                    "objects": torch.zeros(gh * gw, dtype=torch.long),
                }
            )
        return records


# ------------------------------------------------------------------------------ given boxes
@registry.register_extractor("given_boxes")
class GivenBoxesExtractor(FeatureExtractor):
    """RoI features of given boxes: ResNet C4 trunk -> RoIAlign 14x14 @1/16 -> res5 -> avg pool.

    ``add_image_box`` puts the whole-image box ``[0, 0, W-1, H-1]`` first (VL-BERT); then boxes are
    optional (an image without boxes gets only the image box). ``res5_dilation=2`` (default) is VL-BERT's
    dilated res5, 1 is maskrcnn-benchmark's stride-2 C4 head.
    """

    boxes = "required"

    def __init__(
        self,
        *,
        backbone: str = "resnet101",
        model_file: str | os.PathLike | None = None,
        add_image_box: bool = False,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        min_size: int = 600,
        max_size: int = 1000,
        res5_dilation: int = 2,
        aligned: bool = False,
        normalization: str = "imagenet",
    ):
        super().__init__(device=device, precision=precision)
        from mmf_plugins.modules.roi_features import (
            ResNetRoIFeatures,
            build_torchvision_resnet,
        )

        if normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {normalization!r}; expected one of {', '.join(NORMALIZATIONS)}")
        resnet = build_torchvision_resnet(backbone, res5_dilation=int(res5_dilation))
        if model_file is not None:
            load_backbone_weights(resnet, model_file, f"given_boxes backbone {backbone}")
        else:
            logger.warning("given_boxes extractor: no --model_file given, the %s trunk has random weights", backbone)
        self.net = ResNetRoIFeatures.from_torchvision(resnet, aligned=bool(aligned)).eval().to(self.device)
        self.add_image_box = bool(add_image_box)
        self.boxes = "optional" if self.add_image_box else "required"
        self.min_size, self.max_size, self.normalization = int(min_size), int(max_size), normalization

    def extract(self, images, boxes):
        batch, sizes = prepare_batch(
            images, min_size=self.min_size, max_size=self.max_size, normalization=self.normalization,
            device=self.device, size_divisible=16,
        )
        originals, scaled = [], []
        for i, (oh, ow) in enumerate(sizes):
            h, w = int(images[i].shape[1]), int(images[i].shape[2])
            b = boxes[i] if boxes is not None else torch.zeros((0, 4))
            if self.add_image_box:
                b = torch.cat([b.new_tensor([[0.0, 0.0, w - 1.0, h - 1.0]]), b])
            originals.append(b)
            scaled.append(b.to(self.device) * b.new_tensor([ow / w, oh / h, ow / w, oh / h]).to(self.device))
        feats = self.net(batch, scaled)
        return [
            {
                "features": f.float(),
                "bbox": b,
                "num_boxes": int(b.shape[0]),
                "image_width": int(images[i].shape[2]),
                "image_height": int(images[i].shape[1]),
                "objects": torch.zeros(int(b.shape[0]), dtype=torch.long),
            }
            for i, (f, b) in enumerate(zip(feats, originals))
        ]


def build_extractor(name: str, **options) -> FeatureExtractor:
    """``registry.get_extractor_class(name)(**options)`` (imports registering modules first if needed)."""
    cls = registry.get_extractor_class(name, none_if_missing=True)
    if cls is None:
        import mmf_plugins

        mmf_plugins.setup_imports()
        cls = registry.get_extractor_class(name)
    return cls(**options)
