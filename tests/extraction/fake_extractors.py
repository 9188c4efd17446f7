"""Test helper (not a test module): a deterministic, optionally slow extractor for runner and CLI tests.

Imported by the tests directly and by the CLI through ``--user_dir tests/extraction/fake_extractors.py``.
Its record: ``features`` = the image's mean colour (one row per box), ``bbox`` = the given boxes or the whole
decoded image, so tests can check what the runner fed in and how it mapped boxes back.
"""

import time

import torch

from mmf_plugins.common.registry import registry
from mmf_plugins.extraction.extractors import FeatureExtractor


class SlowFakeExtractor(FeatureExtractor):
    boxes = "optional"

    def __init__(self, *, delay: float = 0.0, fail_width: int = 0, device: str = "cpu", precision: str = "fp32"):
        super().__init__(device=device, precision=precision)
        self.delay = float(delay)
        self.fail_width = int(fail_width)
        self.calls = 0

    def extract(self, images, boxes):
        self.calls += 1
        time.sleep(self.delay * len(images))
        out = []
        for i, img in enumerate(images):
            h, w = int(img.shape[1]), int(img.shape[2])
            if self.fail_width and w == self.fail_width:
                raise RuntimeError(f"fake failure on a {w}-px wide image")
            b = boxes[i] if boxes is not None else torch.tensor([[0.0, 0.0, float(w), float(h)]])
            out.append(
                {
                    "features": img.float().mean(dim=(1, 2)).repeat(b.shape[0], 1),
                    "bbox": b.clone(),
                    "num_boxes": int(b.shape[0]),
                    "image_width": w,
                    "image_height": h,
                    "objects": torch.arange(b.shape[0]),
                }
            )
        return out


if registry.get_extractor_class("slow_fake", none_if_missing=True) is None:
    registry.register_extractor("slow_fake")(SlowFakeExtractor)
