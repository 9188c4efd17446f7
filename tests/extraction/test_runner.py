"""The extraction runner and CLI: listing, sharding, boxes files, bad inputs, resuming after kill -9."""

import importlib.util
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmf_plugins.cli.extract import main as cli_main
from mmf_plugins.common.registry import registry
from mmf_plugins.datasets.databases.feature_database import open_feature_database
from mmf_plugins.extraction import runner
from mmf_plugins.extraction.writers import NpyFeatureWriter

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FAKE = HERE / "fake_extractors.py"


@pytest.fixture(scope="module")
def fake():
    name = "mmf_test_fake_extractors"  # own module name: never clashes with a --user_dir import
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, FAKE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return registry.get_extractor_class("slow_fake")


def _rgb(path, h, w, seed, **save):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, **save)
    return arr


def _png_header_only(path, w, h):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def make_image_zoo(folder: Path):
    """Good files (name -> expected mean colour of the decoded RGB image) and bad files (name -> reason text)."""
    folder.mkdir(parents=True)
    good = {}
    good["rgb.jpg"] = None
    _rgb(folder / "rgb.jpg", 30, 40, 0, quality=95)
    good["rgb_png.png"] = _rgb(folder / "rgb_png.png", 20, 30, 1).mean((0, 1))
    gray = np.random.default_rng(2).integers(0, 256, (25, 35), dtype=np.uint8)
    Image.fromarray(gray).save(folder / "gray.png")
    good["gray.png"] = np.repeat(gray.mean(), 3)
    Image.fromarray(gray).save(folder / "gray_jpeg.jpg")
    good["gray_jpeg.jpg"] = None
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (20, 20, 3), dtype=np.uint8)).convert("CMYK").save(folder / "cmyk.jpg")
    good["cmyk.jpg"] = None
    deep = (np.random.default_rng(4).integers(0, 65536, (16, 24))).astype(np.uint16)
    Image.fromarray(deep).save(folder / "deep16.png")
    good["deep16.png"] = np.repeat(((deep.astype(np.int64) + 128) // 257).mean(), 3)
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (12, 18, 3), dtype=np.uint8)).convert("P").save(folder / "palette.png")
    good["palette.png"] = None
    Image.fromarray(np.random.default_rng(6).integers(0, 256, (10, 10, 4), dtype=np.uint8)).save(folder / "alpha.png")
    good["alpha.png"] = None
    good["tiny.png"] = _rgb(folder / "tiny.png", 1, 1, 7).mean((0, 1))
    good["sliver.png"] = _rgb(folder / "sliver.png", 1, 300, 8).mean((0, 1))

    bad = {}
    (folder / "zero.jpg").write_bytes(b"")
    bad["zero.jpg"] = "zero-byte"
    (folder / "random.jpg").write_bytes(np.random.default_rng(9).bytes(500))
    bad["random.jpg"] = "cannot"
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + np.random.default_rng(10).bytes(300))
    bad["corrupt.jpg"] = "decode"
    data = (folder / "rgb.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    bad["truncated.jpg"] = "truncated"
    (folder / "text.png").write_text("this is not an image\n")
    bad["text.png"] = "cannot"
    _png_header_only(folder / "huge.png", 20000, 20000)
    bad["huge.png"] = "pixels"  # refused from the header: never decoded
    (folder / "folder.jpg").mkdir()  # a directory with an image name: unreadable as a file
    bad["folder.jpg"] = "not found"
    return good, bad


def test_listing_duplicates_and_shards(tmp_path):
    for rel in ("a/x.jpg", "b/x.JPG", "a/y.png", "a/z.jpeg", "c/deep/w.png", "notes.txt", "a/.hidden.jpg", "top.jpg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    flat = runner.list_images(tmp_path)
    assert [i.image_id for i in flat.items] == ["top"] and not flat.duplicates
    listing = runner.list_images(tmp_path, recursive=True)
    assert [i.image_id for i in listing.items] == ["x", "y", "z", "w", "top"]
    assert listing.items[0].path.endswith("a/x.jpg")
    assert len(listing.duplicates) == 1 and listing.duplicates[0]["path"].endswith("b/x.JPG")
    assert "already taken by" in listing.duplicates[0]["reason"]
    shards = [runner.shard_listing(listing, i, 2) for i in range(2)]
    assert [i.image_id for i in shards[0].items] == ["x", "z", "top"] and [i.image_id for i in shards[1].items] == ["y", "w"]
    assert len(shards[0].duplicates) == 1 and not shards[1].duplicates  # goes with the shard owning 'x'
    assert runner.parse_shard("1/4") == (1, 4)
    for spec in ("4/4", "-1/2", "a/b", "3"):
        with pytest.raises(ValueError, match="i/n"):
            runner.parse_shard(spec)
    lst = tmp_path / "list.txt"
    lst.write_text("# comment\na/y.png\n\n/abs/missing.jpg\n")
    from_list = runner.list_images(tmp_path, lst)
    assert [(i.image_id, i.path) for i in from_list.items] == [("missing", "/abs/missing.jpg"), ("y", str(tmp_path / "a/y.png"))]
    with pytest.raises(FileNotFoundError, match="not a folder"):
        runner.list_images(tmp_path / "nope")


def test_boxes_files(tmp_path):
    coco = {
        "images": [{"id": 1, "file_name": "val/COCO_1.jpg"}, {"id": 2, "file_name": "COCO_2.jpg"}],
        "annotations": [{"id": 5, "image_id": 1, "bbox": [10, 20, 30, 40]}, {"id": 6, "image_id": 1, "bbox": [0, 0, 1, 1]}],
        "categories": [],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    boxes = runner.load_boxes_file(tmp_path / "coco.json")
    assert boxes["COCO_1"].tolist() == [[10, 20, 40, 60], [0, 0, 1, 1]] and boxes["COCO_2"].shape == (0, 4)
    (tmp_path / "plain.json").write_text(json.dumps({"a": [[1, 2, 3, 4]], "b": []}))
    boxes = runner.load_boxes_file(tmp_path / "plain.json")
    assert boxes["a"].tolist() == [[1, 2, 3, 4]] and boxes["b"].shape == (0, 4)
    (tmp_path / "bad.json").write_text(json.dumps({"a": [[1, 2, 3]]}))
    with pytest.raises(ValueError, match="image 'a'"):
        runner.load_boxes_file(tmp_path / "bad.json")


def test_bad_image_zoo_is_counted(tmp_path, fake):
    good, bad = make_image_zoo(tmp_path / "imgs")
    listing = runner.list_images(tmp_path / "imgs")
    listing.items.append(runner.ImageItem("missing", str(tmp_path / "imgs" / "missing.jpg")))
    bad["missing.jpg"] = "not found"
    listing.items.append(runner.ImageItem("folder", str(tmp_path / "imgs" / "folder.jpg")))
    writer = NpyFeatureWriter(tmp_path / "out")
    summary = runner.run_extraction(
        fake(), writer, listing, batch_size=3, num_workers=2, progress=False, summary_path=tmp_path / "summary.json"
    )
    writer.close()
    reasons = {Path(f["path"]).name: f["reason"] for f in summary.failed}
    assert set(reasons) == set(bad), reasons
    for name, text in bad.items():
        assert text in reasons[name].lower(), (name, reasons[name])
    assert summary.done == len(good) and summary.skipped_existing == 0
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["done"] == len(good) and len(on_disk["failed"]) == len(bad)
    db = open_feature_database(tmp_path / "out")
    assert sorted(db.keys()) == sorted(Path(n).stem for n in good)
    for name, mean in good.items():
        rec = db.get(Path(name).stem)
        assert rec["features"].shape[1] == 3
        if mean is not None:
            np.testing.assert_allclose(rec["features"][0], mean, atol=1e-3)
    assert (db.get("sliver")["image_height"], db.get("sliver")["image_width"]) == (1, 300)


def test_oversize_jpeg_is_decoded_small_and_boxes_map_back(tmp_path, fake):
    (tmp_path / "imgs").mkdir()
    _rgb(tmp_path / "imgs" / "big.jpg", 80, 100, 0, quality=95)
    listing = runner.list_images(tmp_path / "imgs")
    boxes = {"big": torch.tensor([[10.0, 8.0, 90.0, 72.0]])}
    seen = {}

    class Spy(fake):
        def extract(self, images, boxes):
            seen["shape"], seen["boxes"] = tuple(images[0].shape), boxes[0].clone()
            return super().extract(images, boxes)

    writer = NpyFeatureWriter(tmp_path / "out")
    summary = runner.run_extraction(Spy(), writer, listing, boxes=boxes, max_pixels=2000, progress=False)
    writer.close()
    assert summary.done == 1 and not summary.failed
    assert seen["shape"][1] * seen["shape"][2] <= 2000  # never decoded at full size
    sy, sx = seen["shape"][1] / 80, seen["shape"][2] / 100
    assert torch.allclose(seen["boxes"], boxes["big"] * torch.tensor([sx, sy, sx, sy]))
    rec = open_feature_database(tmp_path / "out").get("big")
    np.testing.assert_allclose(rec["bbox"], boxes["big"].numpy(), atol=1e-4)  # back in original pixels
    assert (rec["image_width"], rec["image_height"]) == (100, 80)
    writer = NpyFeatureWriter(tmp_path / "out2")
    summary = runner.run_extraction(fake(), writer, listing, max_pixels=2000, oversize="refuse", progress=False)
    assert summary.done == 0 and "max_pixels" in summary.failed[0]["reason"]


def test_failing_batch_is_isolated_and_budget_stops(tmp_path, fake):
    (tmp_path / "imgs").mkdir()
    for i, w in enumerate((20, 37, 24, 28, 30)):
        _rgb(tmp_path / "imgs" / f"im{i}.png", 16, w, i)
    listing = runner.list_images(tmp_path / "imgs")
    writer = NpyFeatureWriter(tmp_path / "out")
    summary = runner.run_extraction(fake(fail_width=37), writer, listing, batch_size=4, progress=False)
    assert summary.done == 4 and [Path(f["path"]).name for f in summary.failed] == ["im1.png"]
    assert "extractor error: RuntimeError: fake failure" in summary.failed[0]["reason"]
    # resuming: nothing left but the failed image; --no-resume rewrites everything
    summary = runner.run_extraction(fake(), writer, listing, progress=False)
    assert (summary.done, summary.skipped_existing) == (1, 4)
    summary = runner.run_extraction(fake(), writer, listing, resume=False, progress=False)
    assert (summary.done, summary.skipped_existing) == (5, 0)
    (tmp_path / "bad").mkdir()
    for i in range(4):
        (tmp_path / "bad" / f"b{i}.jpg").write_bytes(b"")
    summary = runner.run_extraction(fake(), writer, runner.list_images(tmp_path / "bad"), max_failures=1, progress=False)
    assert summary.aborted and len(summary.failed) == 2 and not summary.ok


def test_batches_hold_one_image_size_so_features_do_not_depend_on_the_batch(tmp_path, fake):
    from mmf_plugins.extraction.extractors import GridFeatureExtractor

    (tmp_path / "imgs").mkdir()
    sizes = [(40, 50), (40, 60), (40, 50), (40, 60), (40, 50), (30, 70)]
    for i, (h, w) in enumerate(sizes):
        _rgb(tmp_path / "imgs" / f"im{i}.png", h, w, i)
    listing = runner.list_images(tmp_path / "imgs")
    calls = []

    class Spy(fake):
        def extract(self, images, boxes):
            calls.append([tuple(im.shape[1:]) for im in images])
            return super().extract(images, boxes)

    runner.run_extraction(Spy(), NpyFeatureWriter(tmp_path / "spy"), listing, batch_size=2, progress=False)
    assert calls == [[(40, 50)] * 2, [(40, 60)] * 2, [(40, 50)], [(30, 70)]]  # full buckets first, rest at the end

    torch.manual_seed(0)
    grid = GridFeatureExtractor(backbone="resnet18", device="cpu", min_size=32, max_size=64)
    writer = NpyFeatureWriter(tmp_path / "grid")
    runner.run_extraction(grid, writer, listing, batch_size=4, progress=False)
    db = open_feature_database(tmp_path / "grid")
    from mmf_plugins.datasets.databases.image_database import ImageDatabase

    for item in listing.items:
        alone = grid([ImageDatabase().load(item.path)])[0]
        np.testing.assert_allclose(db.get(item.image_id)["features"], alone["features"].numpy(), atol=1e-5)


def test_cli_errors_are_one_line(tmp_path, capsys, fake):
    (tmp_path / "imgs").mkdir()
    cases = [
        (["--extractor", "grid", "--nms_filter", "1"], "--nms_filter is not used by extractor 'grid'"),
        (["--extractor", "gird"], "unknown feature extractor 'gird'"),
        (["--extractor", "grid", "--writer", "hdf5"], "unknown feature writer 'hdf5'"),
        (["--extractor", "grid", "--boxes", str(tmp_path / "b.json")], "--boxes"),
        (["--extractor", "given_boxes", "--backbone", "resnet18", "--extractor_option", "res5_dilation=1"], "needs --boxes"),
        (["--extractor", "vinvl_x152c4"], "needs weights"),
        (["--extractor", "slow_fake", "--shard", "2/2"], "invalid shard"),
        (["--extractor", "slow_fake", "--writer_option", "colour=red"], "not an option of writer 'npy'"),
    ]
    for extra, message in cases:
        argv = ["--image_dir", str(tmp_path / "imgs"), "--output_folder", str(tmp_path / "out"), "--device", "cpu", *extra]
        if extra[1] == "grid" or extra[1] == "given_boxes":
            argv += ["--min_size", "32"]
        assert cli_main(argv) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mmf_extract_features: error:") and message in err[0], (extra, err)


def test_cli_sharded_run(tmp_path, capsys, fake):
    (tmp_path / "imgs").mkdir()
    for i in range(5):
        _rgb(tmp_path / "imgs" / f"im{i}.png", 12, 16 + i, i)
    argv = ["--extractor", "slow_fake", "--image_dir", str(tmp_path / "imgs"), "--output_folder", str(tmp_path / "out"),
            "--writer", "lmdb", "--writer_option", "commit_every=2", "--shard", "1/2", "--num_workers", "0", "--no-progress"]
    assert cli_main(argv) == 0
    summary = json.loads((tmp_path / "out" / "extraction_summary.shard1of2.json").read_text())
    assert summary["done"] == 2 and summary["job"]["shard"] == "1/2"
    assert sorted(open_feature_database(tmp_path / "out").keys()) == ["im1", "im3"]
    assert "done 2" in capsys.readouterr().out


def _launch(args, env):
    return subprocess.Popen(
        [sys.executable, str(REPO / "tools" / "extract_features.py"), *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def test_kill9_then_resume_writes_every_image_once(tmp_path):
    # TSV is the hard case (append-only files, a row may be cut mid-write); npy/lmdb records are atomic per file/txn
    fmt = "tsv"
    images = tmp_path / "imgs"
    images.mkdir()
    means = {}
    for i in range(20):
        means[f"im{i:02d}"] = _rgb(images / f"im{i:02d}.png", 8 + i % 3, 10 + i % 4, i).reshape(-1, 3).mean(0)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    common = ["--extractor", "slow_fake", "--user_dir", str(FAKE), "--image_dir", str(images), "--output_folder", str(out),
              "--writer", fmt, "--batch_size", "2", "--num_workers", "1", "--no-progress"]

    def written():
        p = out / "predictions.tsv"
        return p.read_bytes().count(b"\n") if p.exists() else 0

    proc = _launch([*common, "--extractor_option", "delay=0.25"], env)
    deadline = time.time() + 120
    while written() < 4 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = written()
    assert 4 <= before < 20

    proc = _launch(common, env)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, log
    summary = json.loads((out / "extraction_summary.json").read_text())
    assert summary["skipped_existing"] >= 4 and summary["done"] + summary["skipped_existing"] == 20, summary
    assert not summary["failed"]
    db = open_feature_database(out)
    keys = list(db.keys())
    assert sorted(keys) == sorted(means) and len(keys) == 20  # every image exactly once
    for key, mean in means.items():
        np.testing.assert_allclose(db.get(key)["features"][0], mean, atol=1e-3)
    assert (out / "features.tsv").read_bytes().count(b"\n") == 20
