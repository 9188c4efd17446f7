"""Downloads through a local HTTP server: sha256, .built reuse, version bumps, file:// and paths,
mirrors, offline messages."""

from __future__ import annotations

import io
import json
import zipfile

import pytest
from zoo_helpers import resource, sha256, write_zoo

from mmf_plugins.zoo.download import (
    ChecksumError,
    DownloadError,
    ZooFileMissing,
    download_resource,
    ensure_downloaded,
    read_built,
    resolve_cache_dir,
    resolve_data_dir,
    resolve_url,
    verify_entry,
)
from mmf_plugins.zoo.zoo_config import Resource, get_zoo_entry

PAYLOAD = bytes(range(256)) * 64  # 16 KiB


def _no_leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith((".part", ".tmp"))]


def test_cache_and_data_dir_follow_env(isolated_cache, monkeypatch, tmp_path):
    assert resolve_cache_dir() == isolated_cache
    assert resolve_data_dir() == isolated_cache / "data"
    monkeypatch.setenv("MMF_DATA_DIR", str(tmp_path / "d"))
    assert resolve_data_dir() == tmp_path / "d"
    monkeypatch.delenv("MMF_CACHE_DIR")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    assert resolve_cache_dir() == tmp_path / "th" / "mmf"


def test_download_sha256_ok_then_built_reuse(http_server, tmp_path, monkeypatch, isolated_cache):
    (http_server.root / "w.pth").write_bytes(PAYLOAD)
    write_zoo(
        tmp_path / "zoo",
        monkeypatch,
        models={
            "m": {
                "pretrained": {
                    "version": "1.0",
                    "resources": [resource(http_server.url("w.pth"), "w.pth", sha256(PAYLOAD))],
                }
            }
        },
    )
    folder = ensure_downloaded("m.pretrained", progress=False)
    assert folder == isolated_cache / "data" / "models" / "m.pretrained"
    assert (folder / "w.pth").read_bytes() == PAYLOAD
    built = read_built(folder)
    assert built["version"] == "1.0" and built["files"] == {"w.pth": sha256(PAYLOAD)}
    assert http_server.total == 1
    assert _no_leftovers(folder) == []

    # second call: the .built marker matches, the server is not asked again (even if the file vanished upstream)
    (http_server.root / "w.pth").unlink()
    assert ensure_downloaded("m.pretrained", progress=False) == folder
    assert http_server.total == 1


def test_bad_sha256_removes_file_and_reports(http_server, tmp_path, monkeypatch):
    (http_server.root / "w.pth").write_bytes(PAYLOAD)
    wrong = "0" * 64
    url = http_server.url("w.pth")
    write_zoo(
        tmp_path / "zoo", monkeypatch, models={"m": {"version": "1", "resources": [resource(url, "w.pth", wrong)]}}
    )
    with pytest.raises(ChecksumError) as e:
        ensure_downloaded("m", progress=False)
    msg = str(e.value)
    assert wrong in msg and sha256(PAYLOAD) in msg and url in msg
    folder = resolve_data_dir() / "models" / "m"
    assert not (folder / "w.pth").exists()
    assert _no_leftovers(folder) == []
    assert read_built(folder) is None


def test_empty_hashcode_warns_unverified(http_server, tmp_path, caplog):
    (http_server.root / "a.bin").write_bytes(b"abc")
    path = download_resource({"url": http_server.url("a.bin"), "file_name": "a.bin"}, tmp_path / "t", progress=False)
    assert path.read_bytes() == b"abc"
    assert "unverified" in caplog.text and sha256(b"abc") in caplog.text


def test_hash_prefix_checked(http_server, tmp_path):
    (http_server.root / "a.bin").write_bytes(b"abc")
    good = Resource(url=http_server.url("a.bin"), file_name="a.bin", hash_prefix=sha256(b"abc")[:8])
    assert download_resource(good, tmp_path / "ok", progress=False).is_file()
    bad = Resource(url=http_server.url("a.bin"), file_name="a.bin", hash_prefix="deadbeef")
    with pytest.raises(ChecksumError, match="deadbeef"):
        download_resource(bad, tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad" / "a.bin").exists()


def test_version_bump_downloads_again(http_server, tmp_path, monkeypatch):
    (http_server.root / "w.pth").write_bytes(b"old")
    entry = {"version": "1", "resources": [resource(http_server.url("w.pth"), "w.pth", sha256(b"old"))]}
    write_zoo(tmp_path / "zoo1", monkeypatch, models={"m": entry})
    folder = ensure_downloaded("m", progress=False)
    (folder / "stale.txt").write_text("from version 1")
    assert http_server.total == 1

    (http_server.root / "w.pth").write_bytes(b"new!")
    entry = {"version": "2", "resources": [resource(http_server.url("w.pth"), "w.pth", sha256(b"new!"))]}
    write_zoo(tmp_path / "zoo2", monkeypatch, models={"m": entry})
    assert ensure_downloaded("m", progress=False) == folder
    assert http_server.total == 2
    assert (folder / "w.pth").read_bytes() == b"new!"
    assert read_built(folder)["version"] == "2"
    assert not (folder / "stale.txt").exists()


def test_file_url_and_plain_path_resources(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.pth").write_bytes(b"A" * 1000)
    (src / "b.json").write_text('{"x": 1}')
    write_zoo(
        tmp_path / "zoo",
        monkeypatch,
        models={
            "local": {
                "version": "1",
                "resources": [
                    resource((src / "a.pth").as_uri(), "a.pth", sha256(b"A" * 1000)),
                    resource(str(src / "b.json"), "b.json"),
                ],
            }
        },
    )
    folder = ensure_downloaded("local", progress=False)
    assert (folder / "a.pth").read_bytes() == b"A" * 1000
    assert json.loads((folder / "b.json").read_text()) == {"x": 1}


def test_dataset_categories_and_zip_extraction(http_server, tmp_path, monkeypatch):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("v2_OpenEnded_mscoco_train2014_questions.json", '{"questions": []}')
    (http_server.root / "q.zip").write_bytes(buf.getvalue())
    write_zoo(
        tmp_path / "zoo",
        monkeypatch,
        datasets={
            "vqa_tiny": {
                "defaults": {
                    "version": "1",
                    "resources": {
                        "annotations": [
                            resource(http_server.url("q.zip"), "q.zip", sha256(buf.getvalue()), compressed=True)
                        ]
                    },
                }
            }
        },
    )
    folder = ensure_downloaded("vqa_tiny", progress=False)
    assert folder == resolve_data_dir() / "datasets" / "vqa_tiny" / "defaults"
    extracted = folder / "annotations" / "v2_OpenEnded_mscoco_train2014_questions.json"
    assert json.loads(extracted.read_text()) == {"questions": []}
    assert (folder / "annotations" / "q.zip").is_file()  # archive kept for `mmf_zoo verify`


def test_mirror_used_when_first_url_fails(http_server, tmp_path):
    (http_server.root / "m.bin").write_bytes(b"mirror")
    res = Resource(
        url=http_server.url("missing.bin"),
        file_name="m.bin",
        hashcode=sha256(b"mirror"),
        mirrors=(http_server.url("m.bin"),),
    )
    assert download_resource(res, tmp_path, progress=False).read_bytes() == b"mirror"
    assert http_server.requests["/missing.bin"] == 1 and http_server.requests["/m.bin"] == 1


def test_html_page_is_not_accepted(http_server, tmp_path):
    (http_server.root / "page").write_bytes(b"<!DOCTYPE html><html>quota exceeded</html>")
    with pytest.raises(DownloadError, match="HTML page"):
        download_resource(Resource(url=http_server.url("page"), file_name="w.pth"), tmp_path, progress=False)
    assert not (tmp_path / "w.pth").exists()


def test_missing_files_message_then_manual_placement_offline(http_server, tmp_path, monkeypatch):
    digest = sha256(PAYLOAD)
    url = http_server.url("gone/w.pth")  # 404
    write_zoo(
        tmp_path / "zoo",
        monkeypatch,
        models={
            "m": {
                "version": "1",
                "resources": [
                    resource(url, "w.pth", digest),
                    resource(http_server.url("gone/opt.json"), "opt.json", optional=True),
                ],
            }
        },
    )
    with pytest.raises(ZooFileMissing) as e:
        ensure_downloaded("m", progress=False)
    target = resolve_data_dir() / "models" / "m" / "w.pth"
    msg = str(e.value)
    assert "w.pth" in msg and digest in msg and url in msg and f"put at: {target}" in msg
    assert "404" in msg
    assert "opt.json" not in msg  # optional files only warn

    # offline: no request at all, same message
    before = http_server.total
    monkeypatch.setenv("MMF_OFFLINE", "1")
    with pytest.raises(ZooFileMissing, match="offline"):
        ensure_downloaded("m", progress=False)
    assert http_server.total == before

    # the user copies the file to the printed path: it is verified and used without network
    target.write_bytes(PAYLOAD)
    assert ensure_downloaded("m", progress=False) == target.parent
    assert read_built(target.parent)["files"]["w.pth"] == digest
    assert http_server.total == before
    assert [c.status for c in verify_entry("m")] == ["ok", "optional-missing"]


def test_resolve_url_forms(monkeypatch):
    assert resolve_url("mmf://models/x.tar.gz") == "https://dl.fbaipublicfiles.com/mmf/data/models/x.tar.gz"
    gd = resolve_url("https://drive.google.com/uc?export=download&id=ABC_123")
    assert gd == "https://drive.usercontent.google.com/download?id=ABC_123&export=download&confirm=t"
    assert "id=XYZ" in resolve_url("https://drive.google.com/file/d/XYZ/view?usp=sharing")
    monkeypatch.setenv("TOKEN_ENV", "?sv=1&sig=2")
    assert resolve_url("https://a.blob/x.zip", "TOKEN_ENV") == "https://a.blob/x.zip?sv=1&sig=2"
    monkeypatch.delenv("TOKEN_ENV")
    assert resolve_url("https://a.blob/x.zip", "TOKEN_ENV") == "https://a.blob/x.zip"


def test_entry_with_existing_bad_file_is_redownloaded(http_server, tmp_path, monkeypatch):
    (http_server.root / "w.pth").write_bytes(PAYLOAD)
    write_zoo(
        tmp_path / "zoo",
        monkeypatch,
        models={"m": {"version": "1", "resources": [resource(http_server.url("w.pth"), "w.pth", sha256(PAYLOAD))]}},
    )
    folder = resolve_data_dir() / "models" / "m"
    folder.mkdir(parents=True)
    (folder / "w.pth").write_bytes(b"corrupt")
    ensure_downloaded(get_zoo_entry("m"), progress=False)
    assert (folder / "w.pth").read_bytes() == PAYLOAD
    assert http_server.total == 1
