"""Zoo yaml schema (the shipped files) and key resolution (aliases, defaults, unknown keys)."""

from __future__ import annotations

import re

import pytest
import yaml
from zoo_helpers import resource, write_zoo

from mmf_plugins.zoo.zoo_config import (
    REPO_ROOT,
    UnknownZooKey,
    ZooConfigError,
    get_zoo_entry,
    list_entries,
    zoo_path,
)

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _leaves(node, prefix=""):
    for key, value in node.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and "version" in value and "resources" in value:
            yield path, value
        elif isinstance(value, dict):
            yield from _leaves(value, path)


@pytest.mark.parametrize("kind", ["models", "datasets"])
def test_shipped_zoo_yaml_schema(kind):
    path = REPO_ROOT / "configs" / "zoo" / f"{kind}.yaml"
    raw = yaml.safe_load(path.read_text())
    leaves = dict(_leaves(raw))
    assert leaves, f"{path} has no entries"
    for key, entry in leaves.items():
        assert str(entry["version"]).strip(), key
        resources = entry["resources"]
        groups = resources.values() if isinstance(resources, dict) else [resources]
        items = [r for group in groups for r in group]
        assert items, key
        for r in items:
            assert r["url"].startswith(("http://", "https://", "mmf://")), (key, r)
            assert r["file_name"] and "/" not in r["file_name"], (key, r)
            assert r.get("hashcode", "") == "" or _HEX64.match(r["hashcode"]), (key, r)
            assert isinstance(r["compressed"], bool), (key, r)
        if kind == "models":
            assert entry["converter"] in {"soho", "vinvl", "vinvl_x152c4", "vl_bert"}, key
            for meta in ("paper", "source_repo", "description"):
                assert entry.get(meta), (key, meta)
    # the same files load through the library, every leaf becoming an entry
    parsed = {e.key: e for e in list_entries(kind)}
    assert set(parsed) == set(leaves)


def test_required_entries_present():
    keys = {e.key for e in list_entries()}
    for key in (
        "soho.pretrained",
        "vinvl.pretrained",
        "vinvl.vqa2.base",
        "vinvl.coco_caption.base",
        "oscar.pretrained.base",
        "vinvl.detector.x152c4",
        "vl_bert.pretrained.base.prec",
        "vl_bert.pretrained.base.e2e",
        "vl_bert.pretrained.large.prec",
        "vl_bert.pretrained.large.e2e",
        "vqa2.defaults",
        "karpathy.defaults",
        "nlvr2.defaults",
        "snli_ve.defaults",
    ):
        assert key in keys
    soho = get_zoo_entry("soho.pretrained")
    assert soho.resources[0].file_name == "soho_res18_fp16_40-9441cdd3.pth"
    assert soho.resources[0].hash_prefix == "9441cdd3"
    det = get_zoo_entry("vinvl.detector.x152c4")
    assert {r.file_name for r in det.resources} == {"vinvl_vg_x152c4.pth", "VG-SGG-dicts-vgoi6-clipped.json"}
    vqa = get_zoo_entry("vqa2")  # group -> defaults
    assert vqa.key == "vqa2.defaults" and vqa.kind == "datasets"
    assert {r.category for r in vqa.resources} == {"annotations"}
    assert "v2_Questions_Train_mscoco.zip" in {r.file_name for r in vqa.resources}


def test_key_resolution_aliases_and_defaults(tmp_path, monkeypatch):
    leaf = {"version": "1", "resources": [resource("file:///x", "a.pth")], "converter": "c"}
    write_zoo(
        tmp_path,
        monkeypatch,
        models={
            "fam": {
                "defaults": "${fam.big}",
                "big": dict(leaf, description="big one"),
                "small": leaf,
                "inline": {"defaults": dict(leaf, version="7")},
                "only": {"child": dict(leaf, version="3")},
            }
        },
    )
    assert get_zoo_entry("fam").key == "fam.big"  # alias resolved to its canonical key
    assert get_zoo_entry("fam.defaults").key == "fam.big"
    assert get_zoo_entry("fam").description == "big one"
    inline = get_zoo_entry("fam.inline")
    assert (inline.key, inline.version) == ("fam.inline.defaults", "7")
    assert get_zoo_entry("fam.only").key == "fam.only.child"  # single leaf
    assert get_zoo_entry("models:fam.small").key == "fam.small"
    # the alias is not listed twice
    assert sorted(e.key for e in list_entries("models")) == [
        "fam.big",
        "fam.inline.defaults",
        "fam.only.child",
        "fam.small",
    ]


def test_group_without_defaults_lists_choices(tmp_path, monkeypatch):
    leaf = {"version": "1", "resources": [resource("file:///x", "a.pth")]}
    write_zoo(tmp_path, monkeypatch, models={"g": {"a": leaf, "b": leaf}})
    with pytest.raises(UnknownZooKey) as e:
        get_zoo_entry("g")
    assert "g.a" in str(e.value) and "g.b" in str(e.value)


def test_unknown_key_names_closest_match():
    with pytest.raises(KeyError) as e:
        get_zoo_entry("vinvl.pretraind")
    msg = str(e.value)
    assert "Did you mean 'vinvl.pretrained'?" in msg
    assert "soho.pretrained" in msg  # the available keys are listed
    with pytest.raises(UnknownZooKey, match="Did you mean 'soho.pretrained'"):
        get_zoo_entry("soho.pretrianed", kind="models")


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"version": "1", "resources": [{"url": "http://x/a", "file_name": "a", "hashcode": "abc"}]}, "64 hex"),
        ({"version": "1", "resources": [{"url": "http://x/a"}]}, "file_name"),
        ({"version": "1", "resources": [{"url": "http://x/a", "file_name": "../a"}]}, "bare file name"),
        ({"version": "", "resources": [{"url": "http://x/a", "file_name": "a"}]}, "version"),
        ({"version": "1", "resources": []}, "no resources"),
    ],
)
def test_bad_entries_are_reported(tmp_path, monkeypatch, bad, match):
    write_zoo(tmp_path, monkeypatch, models={"bad": bad})
    with pytest.raises(ZooConfigError, match=match):
        get_zoo_entry("bad")


def test_zoo_path_precedence(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    assert zoo_path("models") == REPO_ROOT / "configs" / "zoo" / "models.yaml"
    monkeypatch.setenv("MMF_MODEL_ZOO", str(tmp_path / "env.yaml"))
    assert zoo_path("models") == tmp_path / "env.yaml"
    config = OmegaConf.create({"env": {"model_zoo": str(tmp_path / "cfg.yaml")}})
    assert zoo_path("models", config) == tmp_path / "cfg.yaml"
