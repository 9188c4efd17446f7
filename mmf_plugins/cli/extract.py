"""``mmf_extract_features``: region or grid features for a folder of images, resumable and sharded.

    mmf_extract_features --extractor vinvl_x152c4 --model_file vinvl_vg_x152c4.pth \
        --image_dir images/ --output_folder feats/ --writer npy [--batch_size 4 --num_workers 4 --precision bf16]
    mmf_extract_features --extractor grid --backbone resnet50 --model_file resnet50.pth --image_dir ... --writer lmdb
    mmf_extract_features --extractor given_boxes --boxes instances_val.json --add_image_box --image_dir ...

Thin layer over ``mmf_plugins.extraction`` (extractors, writers, runner): parse, build, run, print the
summary. Follows MMF's ``tools/scripts/features/extract_features_vinvl.py`` flags where they exist
(``--image_dir``, ``--output_folder``, ``--batch_size``, ``--model_file``). Deliberate differences: every
flag is used, and a flag the chosen extractor does not take is an error (MMF parsed ``--num_features`` and
``--background`` and ignored them); ids already in the output are skipped (``--no-resume`` re-extracts);
``--shard i/n`` replaces ``--start_index/--end_index``. Exit status: 0 all images written or skipped,
1 some images failed (listed in the summary json), 2 bad arguments, 130 interrupted.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import sys

import yaml

# CLI flag -> extractor keyword argument; passed only when given, and only to extractors that accept it.
EXTRACTOR_FLAGS = {
    "model_file": "model_file",
    "zoo": "zoo",
    "labelmap": "labelmap",
    "max_boxes": "max_boxes",
    "min_boxes": "min_boxes",
    "score_thresh": "score_thresh",
    "nms_filter": "nms_filter",
    "box_regression": "box_regression",
    "backbone": "backbone",
    "add_image_box": "add_image_box",
    "min_size": "min_size",
    "max_size": "max_size",
    "device": "device",
    "precision": "precision",
}


def _key_value(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value) if value else ""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmf_extract_features",
        description="Extract region / grid features for a folder of images (resumable, sharded).",
    )
    io = p.add_argument_group("input / output")
    io.add_argument("--extractor", required=True, help="vinvl_x152c4, grid, given_boxes or another registered extractor")
    io.add_argument("--image_dir", default=None, help="folder of images (ids are file stems)")
    io.add_argument("--recursive", action="store_true", help="also walk sub-folders of --image_dir")
    io.add_argument("--image_list", default=None, help="text file, one image path per line (relative to --image_dir if given)")
    io.add_argument("--output_folder", required=True, help="where the writer stores the features")
    io.add_argument("--writer", default="npy", help="npy (MMF layout), lmdb, tsv (VinVL) or another registered writer")
    io.add_argument("--writer_option", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                    help="writer option (value parsed as YAML), e.g. commit_every=128; repeatable")
    io.add_argument("--boxes", default=None,
                    help="boxes per image: COCO instances json or {image_id: [[x1,y1,x2,y2], ...]} (given_boxes, vinvl_x152c4)")
    io.add_argument("--summary", default=None, help="summary json path (default: <output_folder>/extraction_summary[.shardIofN].json)")

    model = p.add_argument_group("model")
    model.add_argument("--model_file", default=None, help="weights: vinvl_vg_x152c4.pth, or a ResNet state dict for grid/given_boxes")
    model.add_argument("--zoo", default=None, help="model zoo key instead of --model_file (e.g. vinvl.detector.x152c4)")
    model.add_argument("--labelmap", default=None, help="VinVL labelmap json (VG-SGG-dicts-vgoi6-clipped.json) for class names")
    model.add_argument("--backbone", default=None, help="torchvision ResNet for grid / given_boxes (resnet50, resnet101, ...)")
    model.add_argument("--add_image_box", action="store_true", default=None, help="given_boxes: whole-image box first (VL-BERT)")
    model.add_argument("--min_size", type=int, default=None, help="resize: short side (default 600)")
    model.add_argument("--max_size", type=int, default=None, help="resize: cap on the long side (default 1000)")
    model.add_argument("--extractor_option", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                       help="any other extractor keyword (value parsed as YAML); repeatable")

    det = p.add_argument_group("detector post-processing (vinvl_x152c4)")
    det.add_argument("--max_boxes", type=int, default=None, help="at most this many regions per image (default 100)")
    det.add_argument("--min_boxes", type=int, default=None, help="at least this many regions per image (default 10)")
    det.add_argument("--score_thresh", type=float, default=None, help="keep regions scoring at least this (default 0.2)")
    det.add_argument("--nms_filter", type=int, choices=(0, 1, 2), default=None,
                     help="0 per-class NMS, 1 best class after per-class NMS (README), 2 class-agnostic (released features; default)")
    det.add_argument("--box_regression", action="store_true", default=None,
                     help="apply the box regression (the extraction command ignores it: features match proposal boxes)")

    run = p.add_argument_group("run")
    run.add_argument("--batch_size", type=int, default=2, help="images per forward pass (default 2)")
    run.add_argument("--num_workers", type=int, default=2, help="DataLoader decode workers (default 2)")
    run.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    run.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None, help="autocast dtype (default fp32)")
    run.add_argument("--shard", default="0/1", help="process shard i of n of the sorted image list (default 0/1)")
    run.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                     help="skip images already in the output (default); --no-resume extracts them again")
    run.add_argument("--max_failures", type=int, default=None, help="stop once more images than this failed (default: never)")
    run.add_argument("--max_pixels", type=int, default=None, help="larger images (W*H) are handled per --oversize (default 100M)")
    run.add_argument("--oversize", choices=("downscale", "refuse"), default="downscale",
                     help="huge images: decode JPEGs at reduced scale (default) or refuse them")
    run.add_argument("--bucket", choices=("size", "aspect"), default="size",
                     help="batch images of one size (default: features independent of the batch) or of one orientation")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")
    run.add_argument("--user_dir", default=os.environ.get("MMF_USER_DIR"),
                     help="import this .py file or package first (registers custom extractors/writers; env MMF_USER_DIR)")
    return p


def _accepted(cls) -> tuple[set[str], bool]:
    params = inspect.signature(cls.__init__).parameters
    names = {n for n, prm in params.items() if prm.kind in (prm.KEYWORD_ONLY, prm.POSITIONAL_OR_KEYWORD) and n != "self"}
    return names, any(prm.kind == prm.VAR_KEYWORD for prm in params.values())


def extractor_options(args: argparse.Namespace, cls, name: str) -> dict:
    """Keyword arguments for extractor ``cls`` from the flags given; a flag it does not take is an error."""
    accepted, var_kw = _accepted(cls)
    options = {}
    for flag, kw in EXTRACTOR_FLAGS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        if kw not in accepted and not var_kw:
            raise ValueError(
                f"--{flag} is not used by extractor '{name}' (it takes: {', '.join(sorted(accepted)) or 'nothing'}); drop it"
            )
        options[kw] = value
    for key, value in args.extractor_option:
        if key not in accepted and not var_kw:
            raise ValueError(f"--extractor_option {key}=... is not an option of extractor '{name}' (it takes: {', '.join(sorted(accepted))})")
        if key in options:
            raise ValueError(f"--extractor_option {key} repeats a flag given as --{key}; give it once")
        options[key] = value
    if "device" in accepted and "device" not in options:
        import torch

        options["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    return options


def writer_options(args: argparse.Namespace, cls, name: str) -> dict:
    accepted, var_kw = _accepted(cls)
    accepted.discard("output_folder")
    options = dict(args.writer_option)
    bad = [k for k in options if k not in accepted and not var_kw]
    if bad:
        raise ValueError(f"--writer_option {bad[0]}=... is not an option of writer '{name}' (it takes: {', '.join(sorted(accepted)) or 'nothing'})")
    return options


def run_from_args(args: argparse.Namespace) -> int:
    from mmf_plugins.common.registry import registry
    from mmf_plugins.extraction import runner

    extractor_cls = registry.get_extractor_class(args.extractor)
    writer_cls = registry.get_feature_writer_class(args.writer)
    if args.batch_size < 1 or args.num_workers < 0:
        raise ValueError(f"--batch_size must be >= 1 and --num_workers >= 0, got {args.batch_size} and {args.num_workers}")
    shard = runner.parse_shard(args.shard)
    listing = runner.list_images(args.image_dir, args.image_list, recursive=args.recursive)
    listing = runner.shard_listing(listing, *shard)
    boxes = runner.load_boxes_file(args.boxes) if args.boxes else None

    extractor = extractor_cls(**extractor_options(args, extractor_cls, args.extractor))
    mode = getattr(extractor, "boxes", "optional")
    if boxes is not None and mode == "never":
        raise ValueError(f"--boxes is not used by extractor '{args.extractor}' (it finds its own regions); drop it")
    if boxes is None and mode == "required":
        hint = " (or --add_image_box for whole-image features only)" if args.extractor == "given_boxes" else ""
        raise ValueError(f"extractor '{args.extractor}' needs --boxes FILE{hint}")

    summary_path = args.summary or runner.default_summary_path(args.output_folder, shard)
    job = {
        "extractor": args.extractor,
        "writer": args.writer,
        "output_folder": os.path.abspath(args.output_folder),
        "shard": args.shard,
        "batch_size": args.batch_size,
        "device": str(getattr(extractor, "device", "")),
        "precision": getattr(extractor, "precision", ""),
        "argv": sys.argv[1:],
    }
    options = {
        "boxes": boxes,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "resume": args.resume,
        "max_failures": args.max_failures,
        "oversize": args.oversize,
        "progress": args.progress,
        "bucketing": args.bucket,
    }
    if args.max_pixels is not None:
        options["max_pixels"] = args.max_pixels
    writer = writer_cls(args.output_folder, **writer_options(args, writer_cls, args.writer))
    try:
        summary = runner.run_extraction(extractor, writer, listing, summary_path=summary_path, job=job, **options)
    finally:
        writer.close()
    print(f"mmf_extract_features: {summary.line()}; summary: {summary_path}")
    for failure in summary.failed[:10]:
        print(f"  failed: {failure['path']}: {failure['reason']}")
    if len(summary.failed) > 10:
        print(f"  ... and {len(summary.failed) - 10} more (see the summary)")
    for dup in summary.duplicates[:5]:
        print(f"  skipped: {dup['path']}: {dup['reason']}")
    if summary.interrupted:
        return 130
    return 0 if summary.ok else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import mmf_plugins
    from mmf_plugins.common.config import import_user_dir
    from mmf_plugins.zoo.conversion import CheckpointError
    from mmf_plugins.zoo.zoo_config import ZooError

    try:
        mmf_plugins.setup_imports()
        import_user_dir(args.user_dir)
        return run_from_args(args)
    except KeyboardInterrupt:
        print("mmf_extract_features: interrupted", file=sys.stderr)
        return 130
    except (ValueError, KeyError, FileNotFoundError, CheckpointError, ZooError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"mmf_extract_features: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
