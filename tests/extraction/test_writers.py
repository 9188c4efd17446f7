"""Feature writers (npy / lmdb / tsv): round trips through the readers, atomicity, resume, and the
``mmf_convert_features`` CLI."""

import base64
import json
import os

import numpy as np
import pytest
import torch

from mmf_plugins.cli.convert_features import main as convert_main
from mmf_plugins.common.registry import registry
from mmf_plugins.datasets.databases.feature_database import (
    open_feature_database,
    oscar_box_dims,
)
from mmf_plugins.datasets.databases.features_tsv import row_offsets
from mmf_plugins.extraction import writers
from mmf_plugins.extraction.writers import open_feature_writer

FORMATS = ["npy", "lmdb", "tsv"]


def make_record(rng, n, w=640, h=480, d=2048, as_torch=False):
    x1, y1 = rng.uniform(0, w / 2, n), rng.uniform(0, h / 2, n)
    bbox = np.stack([x1, y1, x1 + rng.uniform(1, w / 2, n), y1 + rng.uniform(1, h / 2, n)], 1).astype(np.float32)
    feats = rng.standard_normal((n, d)).astype(np.float32)
    return {
        "features": torch.from_numpy(feats) if as_torch else feats,
        "bbox": bbox, "num_boxes": n, "image_width": w, "image_height": h,
        "objects": rng.integers(0, 1594, n), "object_names": [f"thing{j}" for j in rng.integers(0, 99, n)],
        "scores": rng.uniform(0.2, 1, n).astype(np.float32), "cls_prob": rng.uniform(size=(n, 6)).astype(np.float32),
        "attributes": rng.integers(0, 524, (n, 2)), "attribute_names": [["red", "big"]] * n,
        "attr_scores": rng.uniform(size=(n, 2)).astype(np.float32),
    }


def assert_same(got, want, fmt):
    np.testing.assert_array_equal(got["features"], np.asarray(want["features"]))
    np.testing.assert_array_equal(got["bbox"], want["bbox"])
    np.testing.assert_array_equal(got["objects"], want["objects"])
    np.testing.assert_array_equal(got["scores"], want["scores"])
    assert got["object_names"] == want["object_names"]
    assert got["attribute_names"] == want["attribute_names"]
    assert (got["num_boxes"], got["image_width"], got["image_height"]) == (want["num_boxes"], 640, 480)
    if want["num_boxes"]:
        np.testing.assert_array_equal(got["attributes"], want["attributes"])
        np.testing.assert_array_equal(got["attr_scores"], want["attr_scores"])
    if fmt != "tsv":  # the TSV form has no place for the class distribution
        np.testing.assert_array_equal(got["cls_prob"], want["cls_prob"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_writer_reader_round_trip(tmp_path, fmt):
    rng = np.random.default_rng(0)
    records = {f"COCO_val2014_{i:012d}": make_record(rng, n, as_torch=i % 2 == 0) for i, n in enumerate([3, 1, 0, 7])}
    assert registry.get_feature_writer_class(fmt).format == fmt
    with open_feature_writer(fmt, tmp_path / "out") as w:
        for key, rec in records.items():
            assert not w.exists(key)
            w.write(key, rec)
            assert w.exists(key)
        assert w.num_written == 4
    w.close()  # idempotent
    db = open_feature_database(tmp_path / "out")
    assert sorted(db.keys()) == sorted(records) and len(db) == 4
    for key, rec in records.items():
        assert_same(db.get(key), rec, fmt)


def test_tsv_writer_writes_official_2054_form(tmp_path):
    rng = np.random.default_rng(1)
    rec = make_record(rng, 4)
    with open_feature_writer("tsv", tmp_path) as w:
        w.write("img", rec)
    image_id, n, blob = (tmp_path / "features.tsv").read_text().rstrip("\n").split("\t")
    arr = np.frombuffer(base64.b64decode(blob), np.float32).reshape(int(n), -1)
    assert (image_id, arr.shape) == ("img", (4, 2054))
    np.testing.assert_array_equal(arr[:, :2048], rec["features"])
    x1, y1, x2, y2 = rec["bbox"].T
    by_hand = np.stack([x1 / 640, y1 / 480, x2 / 640, y2 / 480, (x2 - x1) / 640, (y2 - y1) / 480], 1)
    np.testing.assert_allclose(arr[:, 2048:], by_hand, rtol=1e-6, atol=1e-7)
    pid, payload = (tmp_path / "predictions.tsv").read_text().rstrip("\n").split("\t")
    payload = json.loads(payload)
    assert pid == "img" and (payload["image_h"], payload["image_w"]) == (480, 640)
    assert [o["class"] for o in payload["objects"]] == rec["object_names"]
    np.testing.assert_array_equal(np.array([o["rect"] for o in payload["objects"]], np.float32), rec["bbox"])
    np.testing.assert_array_equal(np.array([o["conf"] for o in payload["objects"]], np.float32), rec["scores"])
    assert (tmp_path / "features.lineidx").read_text() == "0\n"
    # reading through the 6 dims only (no predictions): boxes come back within float tolerance
    db = open_feature_database(tmp_path / "features.tsv", predictions=None)
    rec_dims = db.get("img")
    assert rec_dims["bbox_normalized"] is True
    np.testing.assert_allclose(rec_dims["bbox"] * [640, 480, 640, 480], rec["bbox"], rtol=1e-5, atol=1e-3)


def test_npy_writes_info_first_features_last(tmp_path, monkeypatch):
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(writers.os, "replace", lambda src, dst: (replaced.append(os.path.basename(dst)), real_replace(src, dst)))
    w = open_feature_writer("npy", tmp_path)
    w.write("a", {"features": np.ones((2, 4), np.float32)})
    assert replaced == ["a_info.npy", "a.npy"]
    assert sorted(os.listdir(tmp_path)) == ["a.npy", "a_info.npy"]  # no temp files left
    os.remove(tmp_path / "a.npy")  # a kill between the two replaces: the record does not exist
    assert not w.exists("a") and list(open_feature_database(tmp_path).keys()) == []
    with pytest.raises(ValueError, match="without '..'"):
        w.write("../escape", {"features": np.ones((1, 4), np.float32)})


def test_writers_reject_bad_records(tmp_path):
    with open_feature_writer("npy", tmp_path / "n") as w:
        with pytest.raises(ValueError, match=r"image x: 'bbox' has 3 rows but features has 2"):
            w.write("x", {"features": np.ones((2, 4)), "bbox": np.ones((3, 4))})
        with pytest.raises(ValueError, match="num_boxes=5 but features has 2 rows"):
            w.write("x", {"features": np.ones((2, 4)), "num_boxes": 5})
    with open_feature_writer("tsv", tmp_path / "t") as w:
        with pytest.raises(ValueError, match="needs 'bbox', 'image_width' and 'image_height'"):
            w.write("x", {"features": np.ones((2, 4))})
        with pytest.raises(ValueError, match="tabs or newlines"):
            w.write("a\tb", {"features": np.ones((2, 4))})
    with pytest.raises(ValueError, match="is closed"):
        w.write("y", {"features": np.ones((1, 4))})


def test_lmdb_map_grows_and_batches_commit(tmp_path):
    rng = np.random.default_rng(2)
    w = open_feature_writer("lmdb", tmp_path / "f.lmdb", map_size=1 << 16, commit_every=8)
    feats = {str(i): rng.standard_normal((4, 512)).astype(np.float32) for i in range(40)}  # 8 KB each, 5x the map
    for key, f in feats.items():
        w.write(key, {"features": f})
    assert w.exists("39")  # pending (uncommitted) records count as written
    w.close()
    assert os.path.getsize(tmp_path / "f.lmdb" / "data.mdb") > 1 << 16
    db = open_feature_database(tmp_path / "f.lmdb")
    assert len(db) == 40
    for key, f in feats.items():
        np.testing.assert_array_equal(db.get(key)["features"], f)
    db.close()


def test_tsv_writer_resumes_after_a_kill(tmp_path):
    rng = np.random.default_rng(3)
    records = {f"im{i}": make_record(rng, 2 + i % 3, d=16) for i in range(8)}
    keys = list(records)
    with open_feature_writer("tsv", tmp_path) as w:
        for key in keys[:4]:
            w.write(key, records[key])
    # the kill: one features row without its predictions row, then half of the next features row
    from mmf_plugins.datasets.databases.feature_record import check_record
    from mmf_plugins.datasets.databases.features_tsv import encode_features_row

    orphan = encode_features_row(keys[4], check_record(records[keys[4]], keys[4]))
    with open(tmp_path / "features.tsv", "ab") as f:
        f.write(orphan + encode_features_row(keys[5], check_record(records[keys[5]], keys[5]))[:40])
    with open(tmp_path / "features.lineidx", "a") as f:
        f.write("99999\n12")  # a stale entry and a partial one

    with open_feature_writer("tsv", tmp_path) as w:
        done = [k for k in keys if w.exists(k)]
        assert done == keys[:4]
        for key in keys:
            if not w.exists(key):
                w.write(key, records[key])
        with pytest.raises(ValueError, match="append-only"):
            w.write(keys[0], records[keys[0]])
    ids = [line.split("\t", 1)[0] for line in (tmp_path / "features.tsv").read_text().splitlines()]
    assert ids == keys  # each id once, in order
    for name in ("features", "predictions"):
        lineidx = np.array((tmp_path / f"{name}.lineidx").read_text().split(), dtype=np.int64)
        np.testing.assert_array_equal(lineidx, row_offsets(str(tmp_path / f"{name}.tsv")))
    db = open_feature_database(tmp_path)
    for key in keys:
        np.testing.assert_array_equal(db.get(key)["features"], records[key]["features"])
        np.testing.assert_array_equal(db.get(key)["bbox"], records[key]["bbox"])


def test_convert_tsv_to_lmdb_to_npy_keeps_records_and_resumes(tmp_path, capsys):
    rng = np.random.default_rng(4)
    records = {f"{i}": make_record(rng, 1 + i % 4) for i in range(6)}
    with open_feature_writer("tsv", tmp_path / "vinvl") as w:
        for key, rec in records.items():
            w.write(key, rec)
    argv = ["--input", str(tmp_path / "vinvl" / "features.tsv"), "--output", str(tmp_path / "f.lmdb"), "--output_format", "lmdb", "--no_progress"]
    assert convert_main(argv) == 0
    assert "6 converted, 0 already present, 0 unreadable of 6 records" in capsys.readouterr().out
    assert convert_main(argv) == 0  # rerun: nothing left to do
    assert "0 converted, 6 already present" in capsys.readouterr().out
    assert convert_main(["--input", str(tmp_path / "f.lmdb"), "--output", str(tmp_path / "npy"), "--output_format", "npy", "--no_progress"]) == 0
    db = open_feature_database(tmp_path / "npy")
    for key, rec in records.items():
        got = db.get(key)
        np.testing.assert_array_equal(got["features"], rec["features"])
        np.testing.assert_array_equal(got["bbox"], rec["bbox"])
        np.testing.assert_array_equal(got["objects"], rec["objects"])
        assert got["object_names"] == rec["object_names"]
    np.testing.assert_allclose(oscar_box_dims(db.get("0")["bbox"], 640, 480)[:, :4], records["0"]["bbox"] / [640, 480, 640, 480], rtol=1e-6)


def test_convert_counts_unreadable_records(tmp_path, capsys):
    with open_feature_writer("npy", tmp_path / "in") as w:
        for i in range(4):
            w.write(str(i), {"features": np.full((2, 8), i, np.float32)})
    raw = (tmp_path / "in" / "2.npy").read_bytes()
    (tmp_path / "in" / "2.npy").write_bytes(raw[:-8])
    args = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out.lmdb"), "--output_format", "lmdb", "--no_progress"]
    assert convert_main(args) == 1  # 1 of 4 > 1%
    captured = capsys.readouterr()
    assert "3 converted, 0 already present, 1 unreadable of 4" in captured.out and "2" in captured.err
    assert convert_main(args + ["--max_bad_fraction", "0.5"]) == 0
    assert sorted(open_feature_database(tmp_path / "out.lmdb").keys()) == ["0", "1", "3"]
    assert convert_main(["--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "o"), "--output_format", "npy"]) == 2
    assert str(tmp_path / "nothing") in capsys.readouterr().err
