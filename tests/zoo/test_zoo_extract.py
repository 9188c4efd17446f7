"""safe_extract: good archives extract; zip-slip, absolute paths and escaping links are refused and
nothing is written inside or outside the target."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile

import pytest

from mmf_plugins.zoo.download import ArchiveError, UnsafeArchiveError, safe_extract


def _zip(path, members):
    """members: list of (name, bytes) or (name, ("symlink", target))."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members:
            if isinstance(data, tuple):
                info = zipfile.ZipInfo(name)
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
                zf.writestr(info, data[1])
            else:
                zf.writestr(name, data)
    return path


def _tar(path, members, mode="w:gz"):
    """members: (name, bytes) | (name, ("symlink"|"hardlink", target)) | (name, ("fifo",))."""
    with tarfile.open(path, mode) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if isinstance(data, tuple):
                info.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE}[data[0]]
                if data[0] != "fifo":
                    info.linkname = data[1]
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_good_archives_extract(tmp_path):
    z = _zip(tmp_path / "good.zip", [("ckpt/pytorch_model.bin", b"w" * 10), ("ckpt/config.json", b"{}")])
    out = tmp_path / "out_zip"
    written = safe_extract(z, out)
    assert written == [out / "ckpt"]
    assert (out / "ckpt" / "pytorch_model.bin").read_bytes() == b"w" * 10

    t = _tar(
        tmp_path / "good.tar.gz",
        [("d/a.txt", b"a"), ("d/link", ("symlink", "a.txt")), ("d/hard", ("hardlink", "d/a.txt"))],
    )
    out = tmp_path / "out_tar"
    safe_extract(t, out)
    assert (out / "d" / "a.txt").read_bytes() == b"a"
    assert (out / "d" / "link").is_symlink() and (out / "d" / "link").read_bytes() == b"a"
    assert (out / "d" / "hard").read_bytes() == b"a"
    assert [p.name for p in out.iterdir()] == ["d"]  # no staging folder left


@pytest.mark.parametrize("kind", ["zip", "tar"])
@pytest.mark.parametrize(
    "members, bad",
    [
        ([("ok.txt", b"ok"), ("../evil.txt", b"evil")], "../evil.txt"),
        ([("ok.txt", b"ok"), ("sub/../../evil.txt", b"evil")], "sub/../../evil.txt"),
        ([("ok.txt", b"ok"), ("/tmp/evil_abs.txt", b"evil")], "/tmp/evil_abs.txt"),
        ([("ok.txt", b"ok"), ("link", ("symlink", "../outside"))], "link"),
        ([("ok.txt", b"ok"), ("link", ("symlink", "/etc"))], "link"),
        # chain: an in-target link used as a path prefix to climb out
        ([("d/up", ("symlink", "..")), ("d/up/up2", ("symlink", "..")), ("d/up/up2/evil.txt", b"evil")], "d/up/up2"),
    ],
)
def test_unsafe_members_refused(tmp_path, kind, members, bad):
    work = tmp_path / "work"
    work.mkdir()
    archive = _zip(work / "a.zip", members) if kind == "zip" else _tar(work / "a.tar", members, mode="w")
    target = work / "target"
    with pytest.raises(UnsafeArchiveError) as e:
        safe_extract(archive, target)
    assert repr(bad) in str(e.value) or bad in str(e.value)
    assert _tree(target) == []  # nothing extracted, not even the good member
    assert sorted(p.name for p in work.iterdir()) == ["a." + ("zip" if kind == "zip" else "tar"), "target"]
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "outside").exists()


def test_tar_hardlink_outside_and_fifo_refused(tmp_path):
    bad_link = _tar(tmp_path / "h.tar", [("h", ("hardlink", "../../etc/passwd"))], mode="w")
    with pytest.raises(UnsafeArchiveError, match="'h'"):
        safe_extract(bad_link, tmp_path / "t1")
    fifo = _tar(tmp_path / "f.tar", [("pipe", ("fifo",))], mode="w")
    with pytest.raises(UnsafeArchiveError, match="pipe"):
        safe_extract(fifo, tmp_path / "t2")


def test_corrupt_and_unknown_archives(tmp_path):
    good = _zip(tmp_path / "x.zip", [("a", b"a" * 1000)])
    truncated = tmp_path / "t.zip"
    truncated.write_bytes(good.read_bytes()[:50])
    with pytest.raises(ArchiveError, match="corrupt"):
        safe_extract(truncated, tmp_path / "o")
    odd = tmp_path / "x.rar"
    odd.write_bytes(b"rar")
    with pytest.raises(ArchiveError, match="unknown archive type"):
        safe_extract(odd, tmp_path / "o2")
