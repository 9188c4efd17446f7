"""Generate the ``shapes`` demo corpus (images, VQA/COCO/NLVR2/SNLI-VE/VCR/RefCOCO+ files, tokenizer).

Usage: ``python tools/make_demo_data.py --out ~/.cache/torch/mmf/data/shapes --seed 0 --num_images 1800``.
Thin wrapper over ``mmf_plugins.datasets.builders.shapes.generator.generate_shapes``; prints where the
corpus is and the val accuracy of the text-only prior (how much the question alone gives away).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from mmf_plugins.datasets.builders.shapes.generator import (
    DEFAULT_NUM_IMAGES,
    generate_shapes,
    text_only_prior_accuracy,
)


def _default_out() -> Path:
    data_dir = os.environ.get("MMF_DATA_DIR", os.path.join("~", ".cache", "torch", "mmf", "data"))
    return Path(data_dir).expanduser() / "shapes"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=_default_out(), help="corpus folder (default: $MMF_DATA_DIR/shapes)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed -> identical files)")
    parser.add_argument("--num_images", type=int, default=DEFAULT_NUM_IMAGES,
                        help=f"total images, shared 4:1:1 over train/val/test (default {DEFAULT_NUM_IMAGES})")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    start = time.perf_counter()
    try:
        out = generate_shapes(args.out, seed=args.seed, num_images=args.num_images, progress=not args.no_progress)
    except (ValueError, TypeError) as err:
        parser.error(str(err))
    prior = text_only_prior_accuracy(out)
    print(f"shapes corpus ready in {out} ({time.perf_counter() - start:.1f} s)")
    print(f"text-only prior on val: {100 * prior['per_question_type_prior']:.2f} (per question type), "
          f"{100 * prior['most_frequent_answer']:.2f} (always '{prior['most_frequent_answer_text']}')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
