"""Image processor: keep-ratio resize, normalization, optional horizontal flip, for grid models.

Follows maskrcnn-benchmark ``maskrcnn_benchmark/data/transforms/transforms.py`` (``Resize.get_size``:
the short side becomes ``min_size`` unless the long side would then exceed ``max_size``, in which
case the long side becomes ``max_size``; multi-scale training picks ``min_size`` at random from a
list; ``ToTensor`` + ``to_bgr255`` + ``Normalize``), which SOHO (mmdet ``Resize`` keep-ratio,
``Normalize``, ``Pad`` to /32) and VL-BERT (``flip`` swaps "left"/"right" in the text) also use.

Deliberate differences: resizing runs on the uint8 tensor with torchvision's antialiased bilinear
kernel (``transforms.v2.functional.resize``) instead of PIL; random choices (scale, flip) draw from
``torch``'s global generator and are switched off at evaluation (``train: false``, or a
``dataset_type`` other than "train" passed to the constructor when ``train`` is unset); at
evaluation a list ``min_size`` uses ``test_min_size`` (default: its largest entry).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from mmf_plugins.common.registry import registry
from mmf_plugins.processors.base_processor import BaseProcessor
from mmf_plugins.processors.text_processors import check_processor_params

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Detectron / maskrcnn-benchmark / VL-BERT caffe-style BGR pixel means on the 0..255 scale, std 1.
CAFFE_BGR_MEAN = (102.9801, 115.9465, 122.7717)
CAFFE_BGR_STD = (1.0, 1.0, 1.0)

_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def keep_ratio_size(height: int, width: int, min_size: int, max_size: int | None) -> tuple[int, int]:
    """maskrcnn-benchmark ``Resize.get_size``: output ``(h, w)`` with the short side ``min_size``,
    shrunk so the long side stays ``<= max_size``; integer truncation as in the original."""
    size = int(min_size)
    if max_size is not None:
        short, long = float(min(height, width)), float(max(height, width))
        if long / short * size > max_size:
            size = round(max_size * short / long)
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def swap_left_right(text: str) -> str:
    """'left' <-> 'right' as whole words, keeping the capitalization ("Left" -> "Right")."""

    def swap(match: re.Match) -> str:
        word = match.group(0)
        other = "right" if word.lower() == "left" else "left"
        if word.isupper():
            return other.upper()
        if word[0].isupper():
            return other.capitalize()
        return other

    return _LEFT_RIGHT.sub(swap, text)


@registry.register_processor("image")
class ImageProcessor(BaseProcessor):
    """``{"image": uint8 [3,H,W], "text"?}`` -> normalized float image + resize/flip bookkeeping.

    Params: ``min_size`` (int or list; 600), ``max_size`` (1000; null = unbounded), ``test_min_size``
    (evaluation short side; default max of ``min_size``), ``mean``/``std`` (ImageNet on [0, 1] RGB;
    with ``to_bgr255`` the caffe BGR 0..255 means and std 1), ``to_bgr255`` (false),
    ``horizontal_flip`` (probability, 0.0), ``size_divisibility`` (0 = no padding; else zero-pad
    bottom/right to a multiple), ``train`` (random ops on; see the module docstring).

    Returns ``image`` (float [3,h,w]), ``image_scale`` (new short side / original short side),
    ``image_size`` (original ``(H, W)``), ``image_resized_size`` (``(h, w)`` before padding),
    ``flipped`` (bool) and, when the input has ``text``, ``text`` with left/right swapped if flipped.
    """

    PARAMS = ("min_size", "max_size", "test_min_size", "mean", "std", "to_bgr255", "horizontal_flip",
              "size_divisibility", "train")

    def __init__(self, config=None, *args, data_dir: str | None = None, dataset_type: str | None = None,
                 **kwargs):
        super().__init__(config, *args, **kwargs)
        check_processor_params(self.config, self.PARAMS, "image")
        min_size = self.config.get("min_size", 600)
        sizes = list(min_size) if not isinstance(min_size, (int, float)) else [min_size]
        if not sizes or any(int(s) <= 0 for s in sizes):
            raise ValueError(f"image min_size must be a positive int or a non-empty list of them, got {min_size!r}")
        self.min_sizes = [int(s) for s in sizes]
        test = self.config.get("test_min_size", None)
        self.test_min_size = int(test) if test is not None else max(self.min_sizes)
        max_size = self.config.get("max_size", 1000)
        self.max_size = int(max_size) if max_size is not None else None
        self.to_bgr255 = bool(self.config.get("to_bgr255", False))
        mean = self.config.get("mean", None) or (CAFFE_BGR_MEAN if self.to_bgr255 else IMAGENET_MEAN)
        std = self.config.get("std", None) or (CAFFE_BGR_STD if self.to_bgr255 else IMAGENET_STD)
        if len(mean) != 3 or len(std) != 3 or any(float(s) <= 0 for s in std):
            raise ValueError(f"image mean/std must be 3 values each (std > 0), got mean={list(mean)} std={list(std)}")
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        # normalization applied to 0..255 pixels in one pass: (x/255 - m)/s == (x - 255m)/(255s)
        unit = 1.0 if self.to_bgr255 else 255.0
        self._pixel_mean = [m * unit for m in self.mean]
        self._pixel_std = [s * unit for s in self.std]
        self.flip_probability = float(self.config.get("horizontal_flip", 0.0))
        if not 0.0 <= self.flip_probability <= 1.0:
            raise ValueError(f"horizontal_flip is a probability in [0, 1], got {self.flip_probability}")
        self.size_divisibility = int(self.config.get("size_divisibility", 0) or 0)
        train = self.config.get("train", None)
        if train is None:
            train = dataset_type is None or dataset_type == "train"
        self.train = bool(train)

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        if self.train and len(self.min_sizes) > 1:
            size = self.min_sizes[int(torch.randint(len(self.min_sizes), ()))]
        elif self.train:
            size = self.min_sizes[0]
        else:
            size = self.test_min_size
        return keep_ratio_size(height, width, size, self.max_size)

    def __call__(self, item: dict, *args, **kwargs) -> dict:
        image = item.get("image", None)
        if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] not in (1, 3):
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"image processor expects 'image' as a uint8 tensor [3, H, W], got {shape}")
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        if image.dtype != torch.uint8 and not image.is_floating_point():
            raise ValueError(f"image dtype must be uint8 (0..255) or float (0..1), got {image.dtype}")
        height, width = int(image.shape[-2]), int(image.shape[-1])
        out_h, out_w = self.target_size(height, width)
        if (out_h, out_w) != (height, width):
            image = TF.resize(image, [out_h, out_w], antialias=True)
        image = image.float() if image.dtype == torch.uint8 else image.float() * 255.0
        if self.to_bgr255:
            image = image[[2, 1, 0]]
        image = TF.normalize(image, self._pixel_mean, self._pixel_std)
        flipped = bool(self.train and self.flip_probability > 0 and float(torch.rand(())) < self.flip_probability)
        if flipped:
            image = TF.horizontal_flip(image)
        if self.size_divisibility > 0:
            d = self.size_divisibility
            pad_h, pad_w = (-out_h) % d, (-out_w) % d
            if pad_h or pad_w:
                image = F.pad(image, (0, pad_w, 0, pad_h))
        out = {
            "image": image,
            "image_scale": min(out_h, out_w) / min(height, width),
            "image_size": (height, width),
            "image_resized_size": (out_h, out_w),
            "flipped": flipped,
        }
        if "text" in item:
            text = item["text"]
            out["text"] = swap_left_right(text) if flipped and isinstance(text, str) else text
        return out
