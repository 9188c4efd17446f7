"""load_zoo_weights and the weights-file rules: converters run on what the zoo fetched, weights end
up in the model, unsafe or broken checkpoints are refused with a message."""

from __future__ import annotations

import io
import json
import zipfile

import pytest
import torch
from torch import nn
from zoo_helpers import resource, sha256, write_zoo

from mmf_plugins.common.registry import registry
from mmf_plugins.zoo.conversion import CheckpointError, ConversionReport, load_weights_file
from mmf_plugins.zoo.loading import (
    WeightsFileError,
    convert_checkpoint,
    find_weights_files,
    load_zoo_weights,
    select_weights_file,
)


class NotAWeight:
    """A custom class: a checkpoint pickling it must not be unpickled."""

    def __init__(self):
        self.payload = "anything"


def _strip_converter(official, prefix="", **opts):
    state = official.get("state_dict", official)
    out, report = {}, ConversionReport()
    for k, v in state.items():
        if k.startswith(prefix):
            out[k[len(prefix) :]] = v
            report.mapped.append((k, k[len(prefix) :]))
        else:
            report.unused.append(k)
    return out, report


def _dir_converter(folder, **opts):
    config = json.loads((folder / "config.json").read_text())
    state = load_weights_file(folder / "pytorch_model.bin")
    out = {k: v * config["scale"] for k, v in state.items()}
    return out, ConversionReport(mapped=[(k, k) for k in out], notes=[f"scaled by {config['scale']}"])


_dir_converter.accepts_directory = True


@pytest.fixture
def converters():
    names = {"_test_zoo_strip_converter": _strip_converter, "_test_zoo_dir_converter": _dir_converter}
    for name, fn in names.items():
        registry.register_converter(name)(fn)
    yield names
    for name in names:
        registry.mapping["converter"].pop(name, None)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def test_load_zoo_weights_end_to_end(http_server, tmp_path, monkeypatch, converters):
    source = _model()
    official = {f"module.{k}": v + 1.0 for k, v in source.state_dict().items()}  # DDP-style keys, new values
    official["module_extra.weight"] = torch.zeros(1)
    buf = io.BytesIO()
    torch.save({"state_dict": official, "epoch": 3}, buf)
    (http_server.root / "ckpt.pth").write_bytes(buf.getvalue())
    write_zoo(
        tmp_path / "zoo",
        monkeypatch,
        models={
            "tiny": {
                "pretrained": {
                    "version": "1",
                    "converter": "_test_zoo_strip_converter",
                    "converter_options": {"prefix": "module."},
                    "resources": [resource(http_server.url("ckpt.pth"), "ckpt.pth", sha256(buf.getvalue()))],
                }
            }
        },
    )
    model = _model()
    report = load_zoo_weights("tiny.pretrained", model, progress=False)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, official[f"module.{k}"])
    assert len(report.mapped) == 4 and report.missing == [] and report.unused == ["module_extra.weight"]
    assert report.ok

    # a second model loads from the cache without asking the server again
    load_zoo_weights("tiny.pretrained", _model(), progress=False)
    assert http_server.total == 1


def test_directory_converter_gets_the_checkpoint_folder(tmp_path, monkeypatch, converters):
    weights = {k: torch.ones_like(v) for k, v in _model().state_dict().items()}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        raw = io.BytesIO()
        torch.save(weights, raw)
        zf.writestr("best/pytorch_model.bin", raw.getvalue())
        zf.writestr("best/config.json", json.dumps({"scale": 3.0}))
        zf.writestr("best/training_args.bin", b"pickled argparse namespace")
    archive = tmp_path / "best.zip"
    archive.write_bytes(buf.getvalue())
    write_zoo(
        tmp_path / "zoo",
        monkeypatch,
        models={
            "tiny": {
                "version": "1",
                "converter": "_test_zoo_dir_converter",
                "resources": [resource(archive.as_uri(), "best.zip", sha256(buf.getvalue()), compressed=True)],
            }
        },
    )
    model = _model()
    report = load_zoo_weights("tiny", model, progress=False)
    for v in model.state_dict().values():
        assert torch.equal(v, torch.full_like(v, 3.0))
    assert report.notes == ["scaled by 3.0"]


def test_weights_file_selection(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        torch.save({"x": torch.zeros(1)}, tmp_path / sub / "pytorch_model.bin")
    (tmp_path / "a" / "training_args.bin").write_bytes(b"x")
    (tmp_path / ".extract-123").mkdir()
    (tmp_path / ".extract-123" / "half.pth").write_bytes(b"x")
    with pytest.raises(WeightsFileError) as e:
        select_weights_file(tmp_path)
    assert "a/pytorch_model.bin" in str(e.value) and "b/pytorch_model.bin" in str(e.value)
    assert "weights_file" in str(e.value)
    assert select_weights_file(tmp_path, "**/b/pytorch_model.bin") == tmp_path / "b" / "pytorch_model.bin"
    assert [p.name for p in find_weights_files(tmp_path / "a")] == ["pytorch_model.bin"]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.txt").write_text("no weights")
    with pytest.raises(WeightsFileError, match="README.txt"):
        select_weights_file(empty)


def test_pickle_with_custom_class_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(2), "obj": NotAWeight()}, path)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_weights_file(path)


def test_truncated_checkpoint_is_reported(tmp_path, converters):
    path = tmp_path / "cut.pth"
    torch.save({f"w{i}": torch.randn(64, 64) for i in range(4)}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_weights_file(path)
    with pytest.raises(CheckpointError, match=str(path)):
        convert_checkpoint("_test_zoo_strip_converter", path)


def test_shape_mismatch_is_an_error(tmp_path, monkeypatch, converters):
    state = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in _model().state_dict().items()}
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    write_zoo(
        tmp_path / "zoo",
        monkeypatch,
        models={
            "tiny": {
                "version": "1",
                "converter": "_test_zoo_strip_converter",
                "resources": [resource(str(path), "bad.pth")],
            }
        },
    )
    with pytest.raises(CheckpointError, match="mismatched"):
        load_zoo_weights("tiny", _model(), progress=False)
