"""Feature-extraction throughput: end-to-end images/s (decode -> extractor -> writer) for the grid extractor
(ResNet-50) and the VinVL X152-C4 detector (random weights, 600x1000 inputs); the NMS stage alone
(class-agnostic vs our batched per-class NMS vs the original's Python loop over 1594 classes vs
torchvision ``batched_nms``); writer throughput per format.

    python benchmarks/extraction.py [--device cpu|cuda] [--parts nms,writers,grid,x152] [--grid_images 8]
                                    [--x152_images 2] [--records 200] [--nms_repeat 3] [--threads N]

Ratios are measured in one run on one device; absolute numbers are tagged with the device. Results go to
``benchmarks/results/extraction_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, device_tag, print_table, sync, timeit, write_json

from mmf_plugins import setup_imports
from mmf_plugins.common.registry import registry
from mmf_plugins.extraction import runner
from mmf_plugins.extraction.detectors.vinvl import (
    VinVLDetectorConfig,
    filter_best_class,
    filter_class_agnostic,
    filter_per_class,
)


def make_images(folder: Path, n: int, h: int, w: int) -> None:
    """Smooth JPEGs (realistic decode cost) of size h x w."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        base = rng.integers(0, 256, (h // 32 + 1, w // 32 + 1, 3), dtype=np.uint8)
        Image.fromarray(base).resize((w, h), Image.BILINEAR).save(folder / f"img{i:04d}.jpg", quality=90)


def end_to_end(extractor, images: Path, batch_size: int, workers: int) -> dict:
    listing = runner.list_images(images)
    with tempfile.TemporaryDirectory() as out:
        writer = registry.get_feature_writer_class("npy")(out)
        s = runner.run_extraction(extractor, writer, listing, batch_size=batch_size, num_workers=workers, progress=False)
        writer.close()
    t = s.timing
    return {
        "threads": torch.get_num_threads(),
        "images": s.done,
        "images_per_s": s.done / t["wall_s"],
        "s_per_image": t["wall_s"] / max(1, s.done),
        "extract_share": t["extract_s"] / t["wall_s"],
        "decode_wait_share": t["wait_for_decode_s"] / t["wall_s"],
        "failed": len(s.failed),
    }


# ------------------------------------------------------------------------------------ NMS stage
def nms_inputs(n: int, c: int, device: str, seed: int = 0):
    """300 proposals over a 600x1000 image, softmax scores with a peaked class distribution."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([1000.0, 600.0])
    wh = torch.rand(n, 2, generator=g) * 300 + 8
    boxes = torch.cat([xy, (xy + wh).minimum(torch.tensor([999.0, 599.0]))], 1)
    logits = torch.randn(n, c, generator=g) * 2.5
    logits[:, 0] += 3.0  # most proposals are background
    return boxes.to(device), torch.softmax(logits, 1).to(device)


def python_loop_best_class(boxes, scores, thresh=0.2, min_boxes=10, max_boxes=100):
    """The original filter_results_peter: one torchvision NMS per class in a Python loop."""
    from torchvision.ops import nms

    mask = torch.zeros_like(scores)
    for j in range(1, scores.shape[1]):
        mask[nms(boxes, scores[:, j], 0.3), j] = 1
    best, _ = (mask * scores).max(1)
    order = best.argsort(descending=True)
    n_hi = int((best >= thresh).sum())
    return order[: min(max(n_hi, min_boxes), max_boxes)]


def torchvision_batched_best_class(boxes, scores, thresh=0.2, min_boxes=10, max_boxes=100):
    """torchvision.ops.batched_nms over every (box, class) pair (it falls back to a per-class loop for large inputs)."""
    from torchvision.ops import batched_nms

    n, c = scores.shape
    rows = torch.arange(n, device=boxes.device).repeat_interleave(c - 1)
    cols = torch.arange(1, c, device=boxes.device).repeat(n)
    keep = batched_nms(boxes[rows], scores[rows, cols], cols, 0.3)
    mask = torch.zeros_like(scores)
    mask[rows[keep], cols[keep]] = 1
    best, _ = (mask * scores).max(1)
    return best.argsort(descending=True)[:max_boxes]


def nms_stage(device: str, repeat: int) -> list[dict]:
    cfg = VinVLDetectorConfig()
    boxes, scores = nms_inputs(cfg.post_nms_top_n, cfg.num_classes, device)
    common = {"score_thresh": 0.2, "min_boxes": 10, "max_boxes": 100}
    # check first that the vectorised mode 1 keeps what the loop keeps
    vec = filter_best_class(boxes, scores, nms_thresh=0.3, **common).index
    ref = python_loop_best_class(boxes, scores)
    assert torch.equal(vec.cpu(), ref.cpu()), "vectorised mode 1 differs from the per-class loop"
    paths = {
        "mode 2: class-agnostic (1 NMS)": lambda: filter_class_agnostic(boxes, scores, nms_thresh=0.5, **common),
        "mode 1: batched per-class NMS (ours)": lambda: filter_best_class(boxes, scores, nms_thresh=0.3, **common),
        "mode 1: batched per-class NMS, all pairs (ours, no pre-filter)": lambda: filter_best_class(
            boxes, scores, nms_thresh=0.3, prefilter=0.0, **common
        ),
        "mode 0: per-class, score > 0.2 (ours)": lambda: filter_per_class(boxes, scores, nms_thresh=0.5, **common),
        "mode 1: Python loop over 1594 classes (original)": lambda: python_loop_best_class(boxes, scores),
        "mode 1: torchvision batched_nms on all pairs": lambda: torchvision_batched_best_class(boxes, scores),
    }
    times = {name: min(timeit(fn, warmup=1, repeat=repeat, device=device)) for name, fn in paths.items()}
    loop = times["mode 1: Python loop over 1594 classes (original)"]
    return [
        {"path": name, "ms_per_image": 1e3 * t, "speedup_vs_loop": loop / t, "boxes": cfg.post_nms_top_n,
         "classes": cfg.num_classes, "threads": torch.get_num_threads()}
        for name, t in times.items()
    ]


# --------------------------------------------------------------------------------------- writers
def writer_throughput(records: int) -> list[dict]:
    rng = np.random.default_rng(0)
    n = 50
    xy = rng.uniform(0, 500, (n, 2)).astype(np.float32)
    record = {
        "features": rng.standard_normal((n, 2048)).astype(np.float32),
        "bbox": np.concatenate([xy, xy + 50], 1),
        "num_boxes": n,
        "image_width": 640,
        "image_height": 480,
        "objects": rng.integers(1, 1595, n),
        "object_names": [f"class_{i}" for i in range(n)],
        "scores": rng.uniform(0.2, 1, n).astype(np.float32),
        "cls_prob": rng.dirichlet(np.ones(1595), n).astype(np.float32),
        "attributes": rng.integers(0, 525, (n, 16)),
        "attr_scores": rng.uniform(0, 1, (n, 16)).astype(np.float32),
    }
    rows = []
    for fmt in ("npy", "lmdb", "tsv"):
        with tempfile.TemporaryDirectory() as out:
            writer = registry.get_feature_writer_class(fmt)(out)
            t0 = time.perf_counter()
            for i in range(records):
                writer.write(f"img{i}", record)
            writer.close()
            dt = time.perf_counter() - t0
            size = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
        rows.append({"writer": fmt, "records": records, "records_per_s": records / dt, "MB_per_s": size / dt / 1e6,
                     "bytes_per_record": size / records})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--grid_images", type=int, default=8)
    p.add_argument("--x152_images", type=int, default=2)
    p.add_argument("--skip_x152", action="store_true")
    p.add_argument("--parts", default="nms,writers,grid,x152", help="comma list of nms, writers, grid, x152")
    p.add_argument("--records", type=int, default=200)
    p.add_argument("--nms_repeat", type=int, default=3)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    setup_imports()
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if args.skip_x152:
        parts.discard("x152")
    unknown = parts - {"nms", "writers", "grid", "x152"}
    if unknown:
        raise SystemExit(f"unknown --parts {sorted(unknown)}; choose from nms, writers, grid, x152")
    results = {"args": vars(args)}

    if "nms" in parts:
        nms_rows = nms_stage(args.device, args.nms_repeat)
        print_table(f"NMS stage: 300 proposals x 1595 classes ({args.device}, {torch.get_num_threads()} threads)", nms_rows)
        results["nms_stage"] = nms_rows

    if "writers" in parts:
        writer_rows = writer_throughput(args.records)
        print_table("Writers: 50 regions/record, 2048-d features + cls_prob 1595 + attributes", writer_rows)
        results["writers"] = writer_rows

    e2e = []
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "images"
        make_images(images, max(args.grid_images, args.x152_images), 600, 1000)
        if "grid" in parts:
            grid = registry.get_extractor_class("grid")(backbone="resnet50", device=args.device)
            row = end_to_end(grid, images, batch_size=2, workers=args.workers)
            e2e.append({"extractor": "grid resnet50 (C5, 19x32 cells)", "input": "600x1000", **row})
        if "x152" in parts:
            sub = Path(tmp) / "x152"
            sub.mkdir()
            for f in sorted(images.glob("*.jpg"))[: args.x152_images]:
                (sub / f.name).write_bytes(f.read_bytes())
            torch.manual_seed(0)
            t0 = time.perf_counter()
            det = registry.get_extractor_class("vinvl_x152c4")(random_weights=True, device=args.device)
            build_s = time.perf_counter() - t0
            row = end_to_end(det, sub, batch_size=1, workers=args.workers)
            e2e.append({"extractor": "vinvl_x152c4 (300 proposals, mode 2)", "input": "600x1000", **row, "build_s": build_s})
    if e2e:
        print_table(f"End to end: decode -> extractor -> npy writer ({args.device}, fp32)", e2e)
        results["end_to_end"] = e2e
    sync(args.device)
    previous = RESULTS / f"extraction_{device_tag(args.device)}.json"
    if previous.is_file() and parts != {"nms", "writers", "grid", "x152"}:  # a partial run updates its sections
        results = {**json.loads(previous.read_text()), **results}
    path = write_json("extraction", results, args.device)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
