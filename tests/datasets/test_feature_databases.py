"""Feature readers (npy / lmdb / tsv), the format factory, ConcatFeatureDatabase, pad_features, laziness."""

import base64
import json
import multiprocessing
import os
import pickle

import lmdb
import numpy as np
import pytest
import torch

from mmf_plugins.datasets.databases.feature_database import (
    ConcatFeatureDatabase,
    FeatureReadError,
    open_feature_database,
    oscar_box_dims,
    pad_features,
)
from mmf_plugins.datasets.databases.features_lmdb import LmdbFeatureDatabase
from mmf_plugins.datasets.databases.features_npy import NpyFeatureDatabase
from mmf_plugins.datasets.databases.features_tsv import TsvFeatureDatabase
from mmf_plugins.extraction.writers import open_feature_writer


def boxes(rng, n, w, h):
    x1, y1 = rng.uniform(0, w / 2, n), rng.uniform(0, h / 2, n)
    return np.stack([x1, y1, x1 + rng.uniform(1, w / 2, n), y1 + rng.uniform(1, h / 2, n)], 1).astype(np.float32)


def mmf_npy_folder(root, rng, ids=("a", "b", "c"), n=3, d=16):
    """Features written the way MMF's extraction scripts do (np.save of array + info dict)."""
    os.makedirs(root, exist_ok=True)
    data = {}
    for i in ids:
        feats = rng.standard_normal((n, d)).astype(np.float32)
        info = {"bbox": boxes(rng, n, 64, 48), "num_boxes": n, "objects": rng.integers(0, 10, n),
                "cls_prob": rng.uniform(size=(n, 11)).astype(np.float32), "image_width": 64, "image_height": 48}
        np.save(os.path.join(root, f"{i}.npy"), feats)
        np.save(os.path.join(root, f"{i}_info.npy"), info)
        data[i] = (feats, info)
    return data


def vmrss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


# ------------------------------------------------------------------------------ npy
def test_npy_reader_reads_mmf_layout_memory_mapped(tmp_path):
    rng = np.random.default_rng(0)
    data = mmf_npy_folder(tmp_path / "feats", rng)
    db = NpyFeatureDatabase(tmp_path / "feats")
    assert sorted(db.keys()) == ["a", "b", "c"] and len(db) == 3
    assert "b" in db and "b.npy" in db and "zz" not in db
    rec = db.get("b")
    feats, info = data["b"]
    np.testing.assert_array_equal(rec["features"], feats)
    np.testing.assert_array_equal(rec["bbox"], info["bbox"])
    np.testing.assert_array_equal(rec["objects"], info["objects"])
    np.testing.assert_array_equal(rec["cls_prob"], info["cls_prob"])
    assert (rec["num_boxes"], rec["image_width"], rec["image_height"]) == (3, 64, 48)
    assert not rec["features"].flags.owndata and not rec["features"].flags.writeable  # memory-mapped view
    with pytest.raises(KeyError, match="zz"):
        db.get("zz")


def test_npy_reader_splits_vinvl_2054_features(tmp_path):
    """VinVL extractor npy: [N, 2054] features, info with labels/attr_labels and a normalized 6-d bbox."""
    rng = np.random.default_rng(1)
    n, w, h = 4, 640, 480
    feats, bbox = rng.standard_normal((n, 2048)).astype(np.float32), boxes(rng, n, w, h)
    dims = oscar_box_dims(bbox, w, h)
    np.save(tmp_path / "9.npy", np.concatenate([feats, dims], 1))
    np.save(tmp_path / "9_info.npy", {"labels": np.arange(n), "scores": np.ones(n, np.float32), "attr_labels": np.ones((n, 2), np.int64),
                                      "attr_scores": np.full((n, 2), 0.5, np.float32), "bbox": dims, "image_width": w, "image_height": h})
    rec = NpyFeatureDatabase(tmp_path, split_box_dims=True, feature_dim=2048).get(9)
    np.testing.assert_array_equal(rec["features"], feats)
    np.testing.assert_allclose(rec["bbox"], bbox, atol=1e-3)
    np.testing.assert_array_equal(rec["objects"], np.arange(n))
    np.testing.assert_array_equal(rec["attributes"], np.ones((n, 2)))
    whole = NpyFeatureDatabase(tmp_path).get("9")  # without splitting: 2054-d, box still back in pixels
    assert whole["features"].shape == (n, 2054)
    np.testing.assert_allclose(whole["bbox"], bbox, atol=1e-3)
    with pytest.raises(FeatureReadError, match="feature_dim=2048"):
        NpyFeatureDatabase(tmp_path, feature_dim=2048).get("9")


def test_npy_info_is_unpickled_without_running_code(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.remove, (str(tmp_path / "sentinel"),))

    (tmp_path / "sentinel").write_text("x")
    np.save(tmp_path / "x.npy", np.zeros((1, 4), np.float32))
    np.save(tmp_path / "x_info.npy", np.array({"bbox": Exploit()}, dtype=object), allow_pickle=True)
    with pytest.raises(FeatureReadError, match="refusing to unpickle global 'posix.remove'"):
        NpyFeatureDatabase(tmp_path).get("x")
    assert (tmp_path / "sentinel").exists()


def test_corrupt_npy_records_are_counted_and_skipped(tmp_path):
    rng = np.random.default_rng(2)
    mmf_npy_folder(tmp_path, rng, ids=("g1", "g2", "trunc", "wide"))
    raw = (tmp_path / "trunc.npy").read_bytes()
    (tmp_path / "trunc.npy").write_bytes(raw[: len(raw) - 10])
    np.save(tmp_path / "wide.npy", np.zeros((3, 32), np.float32))
    db = NpyFeatureDatabase(tmp_path, feature_dim=16)
    good, bad = [], []
    for key in sorted(db.keys()):
        try:
            good.append(db.get(key)["features"].shape)
        except OSError as e:  # what BaseDataset counts and skips
            bad.append(str(e))
    assert good == [(3, 16), (3, 16)]
    assert len(bad) == 2
    assert "trunc.npy" in bad[0] and "truncated" in bad[0]
    assert "wide.npy" in bad[1] and "32-d" in bad[1]


# ----------------------------------------------------------------------------- lmdb
def mmf_lmdb(path, records: dict):
    """An LMDB laid out like MMF's lmdb_conversion.py (pickled dicts + a b'keys' entry)."""
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        txn.put(b"keys", pickle.dumps([k.encode() for k in records]))
        for key, value in records.items():
            txn.put(key.encode(), pickle.dumps(value))
    env.close()


def test_lmdb_reads_mmf_pickled_layout_with_mmf_key_fallback(tmp_path):
    rng = np.random.default_rng(3)
    feats, bbox = rng.standard_normal((2, 8)).astype(np.float32), boxes(rng, 2, 100, 80)
    mmf_lmdb(tmp_path / "coco.lmdb", {"42": {"feature_path": "COCO_val2014_000000000042", "features": feats, "bbox": bbox,
                                            "num_boxes": 2, "objects": np.array([3, 4]), "image_width": 100, "image_height": 80}})
    db = open_feature_database(tmp_path / "coco.lmdb")
    assert isinstance(db, LmdbFeatureDatabase)
    assert len(db) == 1 and list(db.keys()) == ["42"]
    rec = db.get("COCO_val2014_000000000042")  # MMF looks up str(int(stem.split("_")[-1]))
    np.testing.assert_array_equal(rec["features"], feats)
    np.testing.assert_array_equal(rec["bbox"], bbox)
    np.testing.assert_array_equal(rec["objects"], [3, 4])
    assert rec["image_width"] == 100


def test_lmdb_bad_values_raise_feature_read_error(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.system, ("true",))

    env = lmdb.open(str(tmp_path / "bad"), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"garbage", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
        txn.put(b"evil", pickle.dumps({"features": Exploit()}))
    env.close()
    db = LmdbFeatureDatabase(tmp_path / "bad")
    with pytest.raises(FeatureReadError, match=r"bad\[garbage\].*corrupt record"):
        db.get("garbage")
    with pytest.raises(FeatureReadError, match="refusing to unpickle"):
        db.get("evil")


def _child_sum(db):
    return float(db.get("k1")["features"].sum()), os.getpid()


def test_lmdb_handle_is_per_process(tmp_path):
    with open_feature_writer("lmdb", tmp_path / "f.lmdb") as w:
        w.write("k1", {"features": np.full((2, 4), 1.5, np.float32)})
    db = LmdbFeatureDatabase(tmp_path / "f.lmdb")
    assert db.get("k1")["features"].sum() == 12.0  # parent opened its handle
    parent_env = db.env()
    clone = pickle.loads(pickle.dumps(db))  # spawn-style workers: the object carries no handle
    assert clone.get("k1")["num_boxes"] == 2 and clone.env() is parent_env  # one handle per process and path
    with multiprocessing.get_context("fork").Pool(1) as pool:  # fork-style workers reopen their own
        total, pid = pool.apply(_child_sum, (db,))
    assert total == 12.0 and pid != os.getpid()
    assert db.env() is parent_env
    db.close()
    assert db.env() is not parent_env and db.get("k1")["num_boxes"] == 2  # reopens after close


# ------------------------------------------------------------------------------ tsv
def official_tsv(folder, rng, n_boxes=(3, 2), w=320, h=240, label_file="predictions.tsv", with_sizes=True):
    """features.tsv + predictions.tsv as VinVL ships them (class names only, no .lineidx)."""
    os.makedirs(folder, exist_ok=True)
    truth = {}
    with open(folder / "features.tsv", "w") as ft, open(folder / label_file, "w") as fp:
        for i, n in enumerate(n_boxes):
            feats, bbox = rng.standard_normal((n, 2048)).astype(np.float32), boxes(rng, n, w, h)
            blob = base64.b64encode(np.concatenate([feats, oscar_box_dims(bbox, w, h)], 1).tobytes()).decode()
            ft.write(f"img{i}\t{n}\t{blob}\n")
            objects = [{"class": ["dog", "cat", "tree"][j % 3], "rect": bbox[j].tolist(), "conf": 0.5 + j / 10} for j in range(n)]
            payload = {"objects": objects, "image_h": h, "image_w": w} if with_sizes else objects
            fp.write(f"img{i}\t{json.dumps(payload)}\n")
            truth[f"img{i}"] = (feats, bbox, [o["class"] for o in objects])
    return truth


def test_tsv_reader_official_rows_with_label_map(tmp_path):
    rng = np.random.default_rng(4)
    truth = official_tsv(tmp_path / "vinvl", rng)
    (tmp_path / "labelmap.json").write_text(json.dumps({"label_to_idx": {"dog": 7, "cat": 8, "tree": 9}}))
    db = open_feature_database(tmp_path / "vinvl", label_map=str(tmp_path / "labelmap.json"), feature_dim=2048)
    assert isinstance(db, TsvFeatureDatabase) and list(db.keys()) == ["img0", "img1"] and len(db) == 2
    for key, (feats, bbox, names) in truth.items():
        rec = db.get(key)
        np.testing.assert_array_equal(rec["features"], feats)
        np.testing.assert_array_equal(rec["bbox"], bbox)  # rect agrees with the 6 dims: exact pixels
        assert rec["object_names"] == names
        np.testing.assert_array_equal(rec["objects"], [{"dog": 7, "cat": 8, "tree": 9}[c] for c in names])
        np.testing.assert_allclose(rec["scores"], [0.5 + j / 10 for j in range(len(names))], rtol=1e-6)
        assert (rec["image_width"], rec["image_height"]) == (320, 240) and "bbox_normalized" not in rec


def test_tsv_without_image_size_keeps_normalized_boxes(tmp_path):
    rng = np.random.default_rng(5)
    truth = official_tsv(tmp_path, rng, label_file="label.tsv", with_sizes=False)  # captioning label.tsv: bare lists
    rec = TsvFeatureDatabase(tmp_path / "features.tsv").get("img0")
    _, bbox, names = truth["img0"]
    assert rec["bbox_normalized"] is True and (rec["image_width"], rec["image_height"]) == (1, 1)
    np.testing.assert_allclose(rec["bbox"], bbox / np.array([320, 240, 320, 240], np.float32), rtol=1e-6)
    assert rec["object_names"] == names and (rec["objects"] == -1).all()  # no label map: unknown ids
    alone = TsvFeatureDatabase(tmp_path / "features.tsv", predictions=None).get("img1")
    assert alone["bbox_normalized"] is True and "object_names" not in alone


def test_tsv_corrupt_rows_and_captioning_json_form(tmp_path):
    rng = np.random.default_rng(6)
    good = rng.standard_normal((2, 2054)).astype(np.float32)
    blob = base64.b64encode(good.tobytes()).decode()
    (tmp_path / "train.feature.tsv").write_text(
        f"cap\t{json.dumps({'num_boxes': 2, 'features': blob})}\n"
        f"bad64\t2\t{blob[:-7]}!!\n"
        f"short\t3\t{blob}\n"
        f"ok\t2\t{blob}\n"
    )
    db = open_feature_database(tmp_path / "train.feature.tsv")
    np.testing.assert_array_equal(db.get("cap")["features"], good[:, :2048])
    np.testing.assert_array_equal(db.get("ok")["features"], good[:, :2048])
    with pytest.raises(FeatureReadError, match=r"bad64.*malformed"):
        db.get("bad64")
    with pytest.raises(FeatureReadError, match=r"short.*num_boxes=3"):
        db.get("short")


# ------------------------------------------------------------------ factory, concat
def test_open_feature_database_detection_and_errors(tmp_path):
    rng = np.random.default_rng(7)
    mmf_npy_folder(tmp_path / "npy", rng, ids=("a",))
    assert isinstance(open_feature_database(tmp_path / "npy"), NpyFeatureDatabase)
    assert isinstance(open_feature_database({"path": str(tmp_path / "npy"), "format": "npy", "feature_dim": 16}), NpyFeatureDatabase)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        open_feature_database(tmp_path / "nowhere")
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="cannot tell the feature format"):
        open_feature_database(tmp_path / "x.bin")
    with pytest.raises(ValueError, match="unknown feature format 'hdf5'"):
        open_feature_database(tmp_path / "npy", format="hdf5")


def test_concat_first_hit_wins(tmp_path):
    with open_feature_writer("npy", tmp_path / "one") as w:
        w.write("a", {"features": np.zeros((1, 4), np.float32)})
        w.write("b", {"features": np.ones((1, 4), np.float32)})
    with open_feature_writer("lmdb", tmp_path / "two.lmdb") as w:
        w.write("b", {"features": np.full((2, 4), 2, np.float32)})
        w.write("c", {"features": np.full((3, 4), 3, np.float32)})
    db = open_feature_database([str(tmp_path / "one"), str(tmp_path / "two.lmdb")])
    assert isinstance(db, ConcatFeatureDatabase)
    assert db.get("b")["features"].tolist() == [[1.0] * 4]  # first store answers
    assert db.get("c")["num_boxes"] == 3
    assert sorted(db.keys()) == ["a", "b", "c"] and len(db) == 3
    assert "c" in db and "d" not in db
    with pytest.raises(KeyError, match="'d' not found"):
        db.get("d")


def test_pad_features_pads_and_truncates():
    rec = {"features": np.arange(12, dtype=np.float32).reshape(3, 4), "bbox": np.ones((3, 4), np.float32),
           "objects": np.array([5, 6, 7]), "object_names": ["a", "b", "c"], "image_width": 10, "image_height": 20}
    feats, mask, info = pad_features(rec, 5)
    assert feats.shape == (5, 4) and torch.equal(feats[:3], torch.arange(12.0).view(3, 4)) and not feats[3:].any()
    assert mask.tolist() == [True, True, True, False, False]
    assert info["objects"].tolist() == [5, 6, 7, 0, 0] and info["bbox"][3:].abs().sum() == 0
    assert (info["num_boxes"], info["max_features"], info["image_width"], info["image_height"]) == (3, 3, 10, 20)
    feats, mask, info = pad_features(rec, 2)
    assert torch.equal(feats, torch.arange(8.0).view(2, 4)) and mask.all()
    assert info["object_names"] == ["a", "b"] and info["num_boxes"] == 2


# ------------------------------------------------------------------------ laziness
@pytest.mark.parametrize("fmt", ["lmdb", "npy"])
def test_reading_10k_records_keeps_rss_flat(tmp_path, fmt):
    """Readers cache nothing: RSS after reading 10k records ~ RSS after the first 1k."""
    rng = np.random.default_rng(8)
    feats = rng.standard_normal((8, 64)).astype(np.float32)  # 2 KB each: 9k leaked records would be > 18 MB
    rec = {"features": feats, "bbox": np.ones((8, 4), np.float32), "image_width": 4, "image_height": 4, "objects": np.arange(8)}
    with open_feature_writer(fmt, tmp_path / fmt) as w:
        for i in range(10_000):
            w.write(str(i), rec)
    db = open_feature_database(tmp_path / fmt)
    keys = list(db.keys())
    assert len(keys) == 10_000
    total = 0.0
    for key in keys[:1000]:
        total += float(db.get(key)["features"][0, 0])
    before = vmrss_kb()
    for key in keys[1000:]:
        total += float(db.get(key)["features"][0, 0])
    growth = vmrss_kb() - before
    assert total == pytest.approx(10_000 * feats[0, 0], rel=1e-4)
    assert growth < 4096, f"RSS grew {growth} kB reading 9k records from {fmt}"
