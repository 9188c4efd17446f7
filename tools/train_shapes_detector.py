#!/usr/bin/env python
"""Train the shapes detector on the generated corpus and report its val box AP.

    python tools/train_shapes_detector.py --data_dir <data_dir>/shapes --out shapes_detector.safetensors \
        [--max_minutes 4] [--seed 0] [--epochs N] [--config projects/vinvl/configs/detector/shapes.yaml]

Writes the weights (safetensors) and ``<out>.json`` beside them (label map, config, training time, val AP);
then ``mmf_extract_features --extractor shapes_detector --model_file <out> ...`` extracts region features.
Thin: the work is ``mmf_plugins.extraction.detectors.shapes_detector_training.train_shapes_detector``.
Exit status: 0 done, 2 bad arguments or data.
"""

import argparse
import logging
import os
import sys

# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning threads made training up to
# 7x slower (measured: 430 vs 63 ms per image with another process busy; 20 % slower when the machine is idle).
# Set before torch is imported; an OMP_WAIT_POLICY already in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", required=True, help="the shapes corpus folder (holds images/ and annotations/)")
    p.add_argument("--out", required=True, help="weights file to write (.safetensors); the .json sidecar goes beside it")
    p.add_argument("--config", default=None, help="detector yaml (default: projects/vinvl/configs/detector/shapes.yaml)")
    p.add_argument("--max_minutes", type=float, default=None, help="wall-clock training budget (default from the yaml: 4)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default from the yaml: 0)")
    p.add_argument("--epochs", type=int, default=None, help="upper bound on epochs (default from the yaml)")
    p.add_argument("--no_eval", action="store_true", help="skip the val box AP")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from mmf_plugins.extraction.detectors.shapes_detector_training import (
        train_shapes_detector,
    )
    from mmf_plugins.zoo.conversion import CheckpointError

    try:
        summary = train_shapes_detector(
            args.data_dir, args.out, config=args.config, max_minutes=args.max_minutes, seed=args.seed,
            epochs=args.epochs, evaluate=not args.no_eval,
        )
    except (ValueError, KeyError, FileNotFoundError, CheckpointError) as e:
        print(f"train_shapes_detector: error: {e}", file=sys.stderr)
        return 2
    t = summary["training"]
    print(f"trained {t['iterations']} iterations ({t['epochs']} epochs, stopped by {t['stopped_by']}) "
          f"in {t['seconds']:.1f} s (data loading {t['load_seconds']:.1f} s); weights: {args.out}")
    if "val" in summary:
        v = summary["val"]
        print(f"val box AP {v['AP']:.3f}  AP50 {v['AP50']:.3f}  AP75 {v['AP75']:.3f}  "
              f"({v['num_images']} images, {v['images_per_second']:.1f} images/s)")
        attrs = "  ".join(f"{k[len('attr_acc_'):]} {x:.3f}" for k, x in v.items() if k.startswith("attr_acc_"))
        if attrs:
            print(f"val attribute accuracy on ground-truth boxes: {attrs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
