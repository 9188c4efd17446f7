"""Data pipeline throughput: samples/s of each builder on `shapes` with images and with region
features, at 0 and 2 DataLoader workers, beside the time of one model step where given; feature read
rate and RSS for npy vs lmdb vs tsv as the number of records grows (RSS must stay flat).

    python benchmarks/data_pipeline.py [--data_dir DIR] [--records 10000] [--batches 10]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import current_rss_mib, print_table, write_json  # noqa: E402

from mmf_plugins import setup_imports  # noqa: E402
from mmf_plugins.common.config import build_config  # noqa: E402
from mmf_plugins.common.registry import registry  # noqa: E402
from mmf_plugins.trainers.data_module import build_datasets  # noqa: E402

BUILDERS = ["vqa2", "coco", "coco_retrieval", "nlvr2", "snli_ve", "vl_pretrain"]


def ensure_features(data_dir: Path, dim: int = 256) -> Path:
    """Random region features for every shapes image (the demo writes real ones with the detector)."""
    out = data_dir / "shapes" / "features" / "bench_random.lmdb"
    if out.exists():
        return out
    rng = np.random.default_rng(0)
    w = registry.get_feature_writer_class("lmdb")(str(out))
    for img in sorted((data_dir / "shapes" / "images").rglob("*.jpg")):
        n = int(rng.integers(3, 10))
        xy = rng.uniform(0, 200, size=(n, 2)).astype(np.float32)
        w.write(img.stem, {"features": rng.standard_normal((n, dim)).astype(np.float32),
                           "bbox": np.concatenate([xy, xy + 40], 1), "num_boxes": n, "image_width": 400,
                           "image_height": 300, "objects": np.zeros(n, dtype=np.int64),
                           "object_names": ["shape"] * n})
    w.close()
    return out


def loader_rate(name: str, data_dir: Path, mode: str, workers: int, batches: int, feat_path: Path) -> float:
    opts = ["model=soho", f"datasets={name}", f"env.data_dir={data_dir}", "training.batch_size=16",
            f"training.num_workers={workers}"]
    if mode == "features":
        opts += [f"dataset_config.{name}.use_images=False", f"dataset_config.{name}.use_features=True",
                 *[f"dataset_config.{name}.features.{sp}={feat_path}" for sp in ("train", "val", "test")],
                 f"dataset_config.{name}.processors.bbox_processor.params.feature_dim=256"]
    else:
        opts += [f"dataset_config.{name}.processors.image_processor.params.min_size=384",
                 f"dataset_config.{name}.processors.image_processor.params.max_size=640"]
    cfg = build_config(opts)
    (ds,) = build_datasets(cfg, "train")
    loader = torch.utils.data.DataLoader(ds, batch_size=16, shuffle=True, num_workers=workers, collate_fn=ds.collate_fn,
                                         generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    next(it)  # worker start-up excluded
    t0, n = time.perf_counter(), 0
    for _ in range(batches):
        n += next(it).get_batch_size()
    return n / (time.perf_counter() - t0)


def store_rates(records: int, dim: int = 2048, boxes: int = 10) -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((boxes, dim)).astype(np.float32)
    bbox = np.tile(np.array([[1, 2, 30, 40]], dtype=np.float32), (boxes, 1))
    from mmf_plugins.datasets.databases.feature_database import open_feature_database

    for fmt in ("npy", "lmdb", "tsv"):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / ("f.lmdb" if fmt == "lmdb" else "f")
            w = registry.get_feature_writer_class(fmt)(str(path))
            t0 = time.perf_counter()
            for i in range(records):
                w.write(f"img{i}", {"features": feats, "bbox": bbox, "num_boxes": boxes, "image_width": 640,
                                    "image_height": 480, "objects": np.zeros(boxes, dtype=np.int64)})
            w.close()
            write_rate = records / (time.perf_counter() - t0)
            target = path / "features.tsv" if fmt == "tsv" else path
            db = open_feature_database(str(target))
            order = np.random.default_rng(1).permutation(records)
            rss0 = current_rss_mib()
            rss_at = {}
            t0 = time.perf_counter()
            for k, i in enumerate(order):
                rec = db.get(f"img{i}")
                float(rec["features"][0, 0])
                if k + 1 in (records // 10, records):
                    rss_at[k + 1] = current_rss_mib() - rss0
            read_rate = records / (time.perf_counter() - t0)
            rows.append({"format": fmt, "records": records, "write rec/s": write_rate, "read rec/s": read_rate,
                         f"RSS growth MiB @{records // 10}": rss_at.get(records // 10, 0.0),
                         f"RSS growth MiB @{records}": rss_at.get(records, 0.0)})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", default=str(Path(tempfile.gettempdir()) / "mmf_bench_data"))
    p.add_argument("--records", type=int, default=10000)
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--workers", default="0,2")
    a = p.parse_args(argv)
    setup_imports()
    data_dir = Path(a.data_dir)
    from mmf_plugins.datasets.builders.shapes.generator import generate_shapes

    generate_shapes(data_dir / "shapes", progress=False)
    feat = ensure_features(data_dir)
    rows = []
    for name in BUILDERS:
        for mode in ("images", "features"):
            row = {"builder": name, "mode": mode}
            for w in [int(x) for x in a.workers.split(",")]:
                row[f"samples/s w={w}"] = loader_rate(name, data_dir, mode, w, a.batches, feat)
            rows.append(row)
    t1 = print_table("builder throughput (batch 16; images resized to 384..640)", rows)
    rows2 = store_rates(a.records)
    t2 = print_table(f"feature stores ({a.records} records of 10x2048)", rows2)
    write_json("data_pipeline", {"builders": rows, "stores": rows2, "tables": [t1, t2]})


if __name__ == "__main__":
    main()
