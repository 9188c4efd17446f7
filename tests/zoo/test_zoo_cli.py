"""mmf_convert and mmf_zoo end to end: files written, exit codes, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from zoo_helpers import resource, sha256, write_zoo

from mmf_plugins.cli.convert import main as convert_main
from mmf_plugins.cli.zoo import main as zoo_main
from mmf_plugins.common.registry import registry
from mmf_plugins.zoo.conversion import ConversionReport


class NotAWeight:
    pass


def _test_identity_converter(official, **opts):
    state = official.get("state_dict", official)
    report = ConversionReport(mapped=[(k, k) for k in state], notes=[f"options: {opts}"] if opts else [])
    return dict(state), report


def _test_mismatch_converter(official, **opts):
    report = ConversionReport(mapped=[("a", "a")], mismatched=[("b", (3,), (4,))])
    return {"a": torch.zeros(1)}, report


@pytest.fixture
def converters():
    names = {"_test_identity_converter": _test_identity_converter, "_test_mismatch_converter": _test_mismatch_converter}
    import mmf_plugins

    mmf_plugins.setup_imports()  # as main() does; registering after it keeps the names ours
    for name, fn in names.items():
        registry.register_converter(name)(fn)
    yield names
    for name in names:
        registry.mapping["converter"].pop(name, None)


def test_mmf_convert_round_trip(tmp_path, converters, capsys):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state = {
        "embeddings.weight": base,
        "decoder.weight": base,  # tied: same storage
        "proj.weight": torch.randn(4, 5).t(),  # non-contiguous
        "bn.num_batches_tracked": torch.tensor(7),
    }
    src = tmp_path / "official.pth"
    torch.save({"state_dict": state, "epoch": 1}, src)
    out, report_file = tmp_path / "out" / "model.safetensors", tmp_path / "report.json"
    code = convert_main(
        [
            "--converter",
            "_test_identity_converter",
            "--input",
            str(src),
            "--output",
            str(out),
            "--report",
            str(report_file),
            "--option",
            "head=vqa",
            "--option",
            "layers=3",
        ]
    )
    assert code == 0
    loaded = load_file(str(out))
    assert set(loaded) == set(state)
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
    report = json.loads(report_file.read_text())
    assert len(report["mapped"]) == 4 and report["mismatched"] == []
    assert report["notes"] == ["options: {'head': 'vqa', 'layers': 3}"]
    printed = capsys.readouterr().out
    assert "mapped: 4" in printed and "wrote 4 tensors" in printed
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.safetensors"]  # no temp file left


def test_mmf_convert_mismatch_exits_nonzero(tmp_path, converters):
    src = tmp_path / "x.pth"
    torch.save({"a": torch.zeros(1)}, src)
    out = tmp_path / "o.safetensors"
    with pytest.raises(SystemExit) as e:
        convert_main(
            [
                "--converter",
                "_test_mismatch_converter",
                "--input",
                str(src),
                "--output",
                str(out),
                "--report",
                str(tmp_path / "r.json"),
            ]
        )
    assert e.value.code != 0 and "mismatched" in str(e.value.code)
    assert not out.exists()
    assert json.loads((tmp_path / "r.json").read_text())["mismatched"] == [["b", [3], [4]]]


def test_mmf_convert_errors_are_one_line(tmp_path, converters):
    src = tmp_path / "x.pth"
    torch.save({"a": torch.zeros(1)}, src)
    with pytest.raises(SystemExit) as e:
        convert_main(
            ["--converter", "_test_identity_convertr", "--input", str(src), "--output", str(tmp_path / "o.safetensors")]
        )
    msg = str(e.value.code)
    assert "_test_identity_converter" in msg and "Did you mean" in msg and "\n" not in msg

    evil = tmp_path / "evil.pth"
    torch.save({"obj": NotAWeight()}, evil)
    with pytest.raises(SystemExit) as e:
        convert_main(
            [
                "--converter",
                "_test_identity_converter",
                "--input",
                str(evil),
                "--output",
                str(tmp_path / "o.safetensors"),
            ]
        )
    assert "refusing to unpickle" in str(e.value.code)
    assert not (tmp_path / "o.safetensors").exists()


def test_mmf_zoo_list_download_verify(http_server, tmp_path, monkeypatch, capsys):
    payload = b"weights" * 100
    (http_server.root / "w.pth").write_bytes(payload)
    write_zoo(
        tmp_path / "zoo",
        monkeypatch,
        models={
            "tiny": {
                "pretrained": {
                    "version": "1",
                    "converter": "x",
                    "description": "a tiny test entry",
                    "resources": [resource(http_server.url("w.pth"), "w.pth", sha256(payload))],
                }
            }
        },
    )
    assert zoo_main(["list"]) == 0
    out = capsys.readouterr().out
    assert "tiny.pretrained" in out and "a tiny test entry" in out
    assert out.splitlines()[1].split()[3] == "no"

    cache = tmp_path / "elsewhere"
    assert zoo_main(["download", "tiny.pretrained", "--cache_dir", str(cache), "--no_progress"]) == 0
    folder = cache / "data" / "models" / "tiny.pretrained"
    assert capsys.readouterr().out.strip() == str(folder)
    assert (folder / "w.pth").read_bytes() == payload
    zoo_main(["list", "--cache_dir", str(cache)])
    assert capsys.readouterr().out.splitlines()[1].split()[3] == "yes"

    assert zoo_main(["verify", "tiny.pretrained", "--cache_dir", str(cache)]) == 0
    assert capsys.readouterr().out.startswith("ok")
    (folder / "w.pth").write_bytes(b"tampered")
    with pytest.raises(SystemExit) as e:
        zoo_main(["verify", "tiny.pretrained", "--cache_dir", str(cache)])
    assert e.value.code == 1
    out = capsys.readouterr().out
    assert "mismatch" in out and sha256(payload) in out and sha256(b"tampered") in out


def test_mmf_zoo_errors_are_messages(tmp_path, monkeypatch):
    write_zoo(
        tmp_path / "zoo",
        monkeypatch,
        models={"tiny": {"version": "1", "resources": [resource("http://127.0.0.1:9/none.pth", "none.pth")]}},
    )
    with pytest.raises(SystemExit) as e:
        zoo_main(["download", "tiy"])
    assert str(e.value.code).startswith("mmf_zoo: error: unknown") and "Did you mean 'tiny'" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        zoo_main(["download", "tiny", "--offline"])
    assert "put at:" in str(e.value.code) and "none.pth" in str(e.value.code)
