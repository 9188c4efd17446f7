"""``mmf_convert_features``: copy a feature store into another format (VinVL TSV -> MMF LMDB, ...).

    mmf_convert_features --input vinvl/coco2014/features.tsv --output coco_trainval.lmdb --output_format lmdb

Resumable: ids the output already holds are skipped, so a killed conversion is simply rerun. A record
that cannot be read is reported with its id and counted; the run exits non-zero when more than
``--max_bad_fraction`` of the records failed. Thin by design: the readers live in
``mmf_plugins/datasets/databases``, the writers in ``mmf_plugins/extraction/writers.py``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from tqdm import tqdm

from mmf_plugins.datasets.databases.feature_database import (
    FORMATS,
    FeatureReadError,
    detect_format,
    open_feature_database,
)
from mmf_plugins.extraction.writers import open_feature_writer

logger = logging.getLogger("mmf_plugins.cli.convert_features")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmf_convert_features", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="feature store: .npy folder, LMDB, or features.tsv (or its folder)")
    p.add_argument("--input_format", default="auto", choices=["auto", *FORMATS])
    p.add_argument("--output", required=True, help="output folder (an LMDB environment for lmdb)")
    p.add_argument("--output_format", required=True, choices=sorted(FORMATS))
    p.add_argument("--feature_dim", type=int, default=None, help="expected feature size D (after splitting box dims)")
    p.add_argument(
        "--split_box_dims",
        action="store_true",
        help="npy/lmdb input whose features carry 6 trailing OSCAR box dims (VinVL extractor npy): split them off",
    )
    p.add_argument("--predictions", default="auto", help="tsv input: predictions/label TSV ('auto' looks beside it, 'none' skips)")
    p.add_argument("--label_map", default=None, help="tsv input: json with label_to_idx / attribute_to_idx for class ids")
    p.add_argument("--max_bad_fraction", type=float, default=0.01, help="exit non-zero above this fraction of unreadable records")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def _reader_params(args, fmt: str) -> dict:
    params: dict = {"feature_dim": args.feature_dim}
    if fmt == "tsv":
        params["predictions"] = None if args.predictions == "none" else args.predictions
        params["label_map"] = args.label_map
    elif args.split_box_dims:
        params["split_box_dims"] = True
    return params


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        in_format = detect_format(args.input) if args.input_format == "auto" else args.input_format
        reader = open_feature_database(args.input, in_format, **_reader_params(args, in_format))
    except (FileNotFoundError, ValueError) as e:
        print(f"mmf_convert_features: {e}", file=sys.stderr)
        return 2
    converted = skipped = 0
    failed: list[str] = []
    start = time.perf_counter()
    with reader, open_feature_writer(args.output_format, args.output) as writer:
        keys = list(reader.keys())
        for key in tqdm(keys, desc=f"{in_format} -> {args.output_format}", unit="rec", disable=args.no_progress):
            if writer.exists(key):
                skipped += 1
                continue
            try:
                record = reader.get(key)
            except FeatureReadError as e:
                logger.warning("skipped %s: %s", key, e)
                failed.append(key)
                continue
            writer.write(key, record)
            converted += 1
    elapsed = time.perf_counter() - start
    rate = converted / elapsed if elapsed > 0 else 0.0
    print(
        f"mmf_convert_features: {converted} converted, {skipped} already present, {len(failed)} unreadable "
        f"of {len(keys)} records in {elapsed:.1f}s ({rate:.0f} rec/s): {args.input} ({in_format}) -> "
        f"{args.output} ({args.output_format})"
    )
    if keys and len(failed) / len(keys) > args.max_bad_fraction:
        shown = ", ".join(failed[:10]) + (" ..." if len(failed) > 10 else "")
        print(
            f"mmf_convert_features: {len(failed)} unreadable records ({shown}) exceed --max_bad_fraction="
            f"{args.max_bad_fraction}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
