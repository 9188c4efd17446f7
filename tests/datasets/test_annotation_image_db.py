"""AnnotationDatabase (json / jsonl / npy) and ImageDatabase (decode, EXIF, odd modes, corrupt files)."""

import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from mmf_plugins.datasets.databases.annotation_database import AnnotationDatabase
from mmf_plugins.datasets.databases.image_database import (
    ImageDatabase,
    ImageDecodeError,
)


# ------------------------------------------------------------------------ annotations
def test_json_list_and_keyed_dict(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps([{"id": 1}, {"id": 2}]))
    assert [x["id"] for x in AnnotationDatabase(tmp_path / "list.json")] == [1, 2]
    vqa = {"info": {}, "license": {}, "questions": [{"question_id": 5, "image_id": 9}]}
    (tmp_path / "q.json").write_text(json.dumps(vqa))
    db = AnnotationDatabase(tmp_path / "q.json")  # the only list-valued key
    assert len(db) == 1 and db[0]["question_id"] == 5
    coco = {"images": [{"id": 1}], "annotations": [{"id": 7}, {"id": 8}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    with pytest.raises(ValueError, match="images, annotations.*list_key"):
        AnnotationDatabase(tmp_path / "coco.json")
    assert [a["id"] for a in AnnotationDatabase(tmp_path / "coco.json", list_key="annotations")] == [7, 8]
    (tmp_path / "mmf.json").write_text(json.dumps({"metadata": {"version": 1}, "data": [{"a": 1}]}))
    db = AnnotationDatabase(tmp_path / "mmf.json")
    assert db.metadata == {"version": 1} and db[0] == {"a": 1}


def test_jsonl_bad_lines_are_logged_counted_and_skipped(tmp_path, caplog):
    lines = [json.dumps({"id": i}) for i in range(200)]
    lines[3] = '{"id": 3, "broken'
    lines[50] = "[1, 2]"
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n\n")
    with caplog.at_level(logging.WARNING):
        db = AnnotationDatabase(tmp_path / "a.jsonl", max_bad_fraction=0.05)
    assert db.num_bad == 2 and len(db) == 198
    assert [x["id"] for x in db][:4] == [0, 1, 2, 4]
    assert f"{tmp_path / 'a.jsonl'}:4:" in caplog.text and f"{tmp_path / 'a.jsonl'}:51:" in caplog.text
    with pytest.raises(ValueError, match=r"2 of 200 lines are malformed \(lines 4, 51\)"):
        AnnotationDatabase(tmp_path / "a.jsonl", max_bad_fraction=0.005)


def test_npy_imdb_with_header_and_answer_fixups(tmp_path):
    imdb = np.array([
        {"dataset_name": "vqa2", "version": 1},
        {"image_id": 1, "question_id": 10, "valid_answers": ["yes"] * 10, "all_answers": ["no"] * 10},
        {"image_id": 2, "question_id": 11, "all_answers": ["two", "<copy>"]},
    ], dtype=object)
    np.save(tmp_path / "imdb_train.npy", imdb, allow_pickle=True)
    db = AnnotationDatabase(tmp_path / "imdb_train.npy")
    assert len(db) == 2 and db.metadata["dataset_name"] == "vqa2"
    assert db[0]["answers"] == ["yes"] * 10  # valid_answers preferred (MMF)
    assert db[1]["answers"] == ["two"]  # trailing <copy> dropped
    assert "answers" not in db.data[1]  # stored items are not mutated


def test_annotation_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing.json")):
        AnnotationDatabase(tmp_path / "missing.json")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"x\.csv.*'\.csv'"):
        AnnotationDatabase(tmp_path / "x.csv")
    (tmp_path / "bad.json").write_text('{"data": [1,\n 2,,]}')
    with pytest.raises(ValueError, match=r"bad\.json:2:"):
        AnnotationDatabase(tmp_path / "bad.json")


# ----------------------------------------------------------------------------- images
def make_images(root):
    """Good images in odd modes plus broken files; returns {name: expected uint8 HxWx3 or None for bad}."""
    rng = np.random.default_rng(0)
    os.makedirs(root, exist_ok=True)
    rgb = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "rgb.png")
    gray = rng.integers(0, 256, (12, 20), dtype=np.uint8)
    Image.fromarray(gray).save(root / "gray.png")
    rgba = rng.integers(0, 256, (12, 20, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    g16 = rng.integers(0, 65536, (12, 20), dtype=np.uint16)
    Image.fromarray(g16).save(root / "gray16.png")
    Image.new("CMYK", (20, 12), (10, 200, 30, 40)).save(root / "cmyk.jpg", quality=100)
    Image.new("RGB", (1, 1), (7, 8, 9)).save(root / "one.png")
    Image.fromarray(rgb).save(root / "rgb.bmp")  # torchvision cannot read BMP: PIL fallback
    (root / "empty.jpg").write_bytes(b"")
    Image.fromarray(rgb).save(root / "full.jpg")
    (root / "trunc.jpg").write_bytes((root / "full.jpg").read_bytes()[:200])
    (root / "trunc.png").write_bytes((root / "rgb.png").read_bytes()[:300])
    (root / "noise.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 256, 500, dtype=np.uint8)))
    os.remove(root / "full.jpg")
    return {
        "rgb.png": rgb,
        "gray.png": np.repeat(gray[:, :, None], 3, 2),
        "rgba.png": rgba[:, :, :3],
        "gray16.png": np.repeat(((g16.astype(np.int64) + 128) // 257).astype(np.uint8)[:, :, None], 3, 2),
        "cmyk.jpg": np.asarray(Image.open(root / "cmyk.jpg").convert("RGB")),
        "one.png": np.array([[[7, 8, 9]]], np.uint8),
        "rgb.bmp": rgb,
        "empty.jpg": None,
        "trunc.jpg": None,
        "trunc.png": None,
        "noise.png": None,
    }


def test_images_decode_to_rgb_uint8_and_bad_files_are_counted(tmp_path):
    expected = make_images(tmp_path)
    db = ImageDatabase(tmp_path)
    bad = {}
    for name, want in expected.items():
        try:
            img = db.load(name)
        except OSError as e:  # what BaseDataset counts and skips
            assert isinstance(e, ImageDecodeError) and e.path == str(tmp_path / name)
            bad[name] = e.reason
            continue
        assert img.dtype == torch.uint8 and img.shape == (3, *want.shape[:2]), name
        got = img.permute(1, 2, 0).numpy().astype(int)
        tolerance = 2 if name.endswith(".jpg") else 0  # libjpeg-turbo vs PIL colour conversion rounding
        assert np.abs(got - want.astype(int)).max() <= tolerance, name
    assert sorted(bad) == ["empty.jpg", "noise.png", "trunc.jpg", "trunc.png"]
    assert bad["empty.jpg"] == "zero-byte file"
    assert "truncated" in bad["trunc.jpg"].lower()


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((10, 20, 3), np.uint8)
    pixels[:, :10] = (255, 0, 0)
    pixels[:, 10:] = (0, 0, 255)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    image.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    img = ImageDatabase(tmp_path).load("rot")  # extension found by the resolver
    assert img.shape == (3, 20, 10)  # W x H swapped
    want = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "rot.jpg")))
    assert np.abs(img.permute(1, 2, 0).numpy().astype(int) - want.astype(int)).max() <= 2
    assert img[0, 2, 5] > 200 and img[2, 17, 5] > 200  # red on top, blue at the bottom


def test_min_side_max_pixels_and_missing_file(tmp_path):
    make_images(tmp_path)
    with pytest.raises(ImageDecodeError, match="1x1, smaller than min_side=2"):
        ImageDatabase(tmp_path, min_side=2).load("one.png")
    with pytest.raises(ImageDecodeError, match="20x12 = 240 pixels > max_pixels=100"):
        ImageDatabase(tmp_path, max_pixels=100).load("rgb.png")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(tmp_path / "big.jpg")
    small = ImageDatabase(tmp_path, max_pixels=10_000, oversize="downscale").load("big.jpg")
    assert small.shape[1] * small.shape[2] <= 10_000 and small.shape[2] > small.shape[1]  # aspect kept
    assert abs(small.shape[2] / small.shape[1] - 640 / 480) < 0.05
    png_small = ImageDatabase(tmp_path, max_pixels=60, oversize="downscale").load("rgb.png")
    assert png_small.shape[1] * png_small.shape[2] <= 60
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        ImageDatabase(tmp_path).load("nope")
    with pytest.raises(ValueError, match="oversize"):
        ImageDatabase(tmp_path, oversize="crop")
