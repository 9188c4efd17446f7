"""Fetch, verify and unpack zoo entries into the MMF cache.

Follows MMF's ``mmf/utils/download.py`` (``DownloadableFile``, ``download_resources``,
``download_pretrained_model``) and cache layout: models in ``<env.data_dir>/models/<key>/``, datasets
in ``<env.data_dir>/datasets/<name>/<variation>/<category>/``, ``env.data_dir`` defaulting to
``<env.cache_dir>/data`` and ``env.cache_dir`` to ``$MMF_CACHE_DIR`` or ``$TORCH_HOME/mmf``
(``~/.cache/torch/mmf``). A folder is reused when its ``.built`` marker holds the entry's version.

HTTP(S)/FTP go through iopath's downloader (``iopath.common.download.download``, the function behind
its ``HTTPURLHandler``, called directly so the file lands in the entry folder instead of iopath's own
cache); ``file://`` URLs and plain paths are copied (iopath has no ``file://`` handler). ``mmf://`` is
MMF's alias for ``https://dl.fbaipublicfiles.com/mmf/data/``; Google Drive ``id=`` links are sent to
the direct-download host.

Deliberate differences from MMF:

* every file is written to a temporary name in the target folder and renamed (``os.replace``) only
  after its sha256 matched; a mismatch deletes the download and raises ``ChecksumError`` with the
  expected and actual digests and the URL (MMF asserts); an empty ``hashcode`` logs "unverified" and
  the digest to pin;
* archives are extracted by ``safe_extract``, which refuses absolute paths, ``..`` components and
  links leaving the target (MMF calls ``shutil.unpack_archive`` unchecked), into a staging folder that
  is moved in place only when the whole archive is good;
* a file that cannot be fetched (offline, ``MMF_OFFLINE=1``, dead link, an HTML page instead of the
  file) raises ``ZooFileMissing`` naming every missing file, its sha256, its URL and the exact path to
  put it at; files put there by hand are verified and used;
* the marker is ``.built`` (JSON: version, key, per-file sha256) instead of ``.built.json``;
* concurrent processes (DDP ranks) serialise on a file lock next to the entry folder.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import tarfile
import tempfile
import uuid
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse
from urllib.request import url2pathname

from mmf_plugins.zoo.zoo_config import (
    Resource,
    ZooEntry,
    ZooError,
    config_value,
    get_zoo_entry,
    parse_resource,
)

logger = logging.getLogger(__name__)

BUILT_MARKER = ".built"
MMF_URL_PREFIX = "https://dl.fbaipublicfiles.com/mmf/data/"
_CHUNK = 1 << 20
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


# ------------------------------------------------------------------------------------------ errors
class DownloadError(ZooError):
    """A URL that could not be fetched (network, HTTP status, HTML page instead of the file)."""


class ChecksumError(ZooError):
    """A file whose sha256 differs from the zoo yaml."""


class ArchiveError(ZooError):
    """An archive that cannot be read (corrupt, truncated, unknown format)."""


class UnsafeArchiveError(ArchiveError):
    """An archive member that would be written outside the extraction target."""


class ZooFileMissing(ZooError, FileNotFoundError):
    """Files of a zoo entry that are neither in the cache nor downloadable."""


# ------------------------------------------------------------------------------------ cache paths
def default_cache_dir() -> Path:
    """MMF's default ``env.cache_dir``: ``$TORCH_HOME/mmf`` (``~/.cache/torch/mmf``)."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "torch"
    )
    return Path(os.path.expanduser(torch_home)) / "mmf"


def resolve_cache_dir(config: Any = None) -> Path:
    """``env.cache_dir`` of ``config`` if set, else ``$MMF_CACHE_DIR``, else ``default_cache_dir()``."""
    value = config_value(config, "env.cache_dir") or os.environ.get("MMF_CACHE_DIR")
    return Path(os.path.expanduser(str(value))).absolute() if value else default_cache_dir()


def resolve_data_dir(config: Any = None) -> Path:
    """``env.data_dir`` of ``config`` if set, else ``$MMF_DATA_DIR``, else ``<cache_dir>/data``."""
    value = config_value(config, "env.data_dir") or os.environ.get("MMF_DATA_DIR")
    return Path(os.path.expanduser(str(value))).absolute() if value else resolve_cache_dir(config) / "data"


def entry_dir(entry: ZooEntry, data_dir: str | os.PathLike | None = None) -> Path:
    """Folder of an entry: ``<data_dir>/models/<key>`` or ``<data_dir>/datasets/<name>/<variation>``."""
    root = Path(data_dir) if data_dir is not None else resolve_data_dir()
    if entry.kind == "models":
        return root / "models" / entry.key
    return root.joinpath("datasets", *entry.key.split("."))


# ------------------------------------------------------------------------------------------ hashes
def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(path: Path, resource: Resource, url: str | None = None, delete: bool = True) -> str:
    """Check ``path`` against the resource's sha256 (or mmcv hash prefix). Returns the digest.

    Mismatch: the file is deleted (unless ``delete=False``) and ``ChecksumError`` is raised."""
    got = sha256_file(path)
    expected = resource.hashcode or resource.hash_prefix
    if expected and not got.startswith(expected):
        if delete:
            path.unlink(missing_ok=True)
        kind = "sha256" if resource.hashcode else "sha256 prefix"
        raise ChecksumError(
            f"{kind} mismatch for {resource.file_name} from {url or resource.url}: expected {expected}, got {got}"
            + ("; the file was deleted" if delete else f"; remove or replace {path}")
            + ". A changed upstream file or a partial download: run again, or pin the new digest in the zoo yaml "
            "if you trust the source"
        )
    if not resource.hashcode:
        how = f"only its mmcv sha256 prefix {resource.hash_prefix} matched" if resource.hash_prefix else "no sha256"
        logger.warning(
            "%s is unverified (%s in the zoo yaml); its sha256 is %s — pin it as `hashcode` to verify",
            resource.file_name,
            how,
            got,
        )
    return got


# ------------------------------------------------------------------------------------------- URLs
def resolve_url(url: str, url_query_env: str = "") -> str:
    """Expand ``mmf://``, send Google Drive links to the direct host, append ``$url_query_env``."""
    if url.startswith("mmf://"):
        url = MMF_URL_PREFIX + url[len("mmf://") :]
    parsed = urlparse(url)
    if parsed.netloc in ("drive.google.com", "docs.google.com"):
        file_id = parse_qs(parsed.query).get("id", [None])[0]
        match = re.search(r"/file/d/([\w-]+)", parsed.path)
        file_id = file_id or (match.group(1) if match else None)
        if file_id:
            url = f"https://drive.usercontent.google.com/download?id={file_id}&export=download&confirm=t"
    if url_query_env and os.environ.get(url_query_env):
        query = os.environ[url_query_env].lstrip("?")
        url += ("&" if "?" in url else "?") + query
    return url


def _redact(url: str) -> str:
    """A URL for messages: the query (possibly a SAS token) is dropped."""
    return url.split("?", 1)[0] + ("?…" if "?" in url and "drive.usercontent" not in url else "")


def _copy(src: Path, dest: Path, progress: bool) -> None:
    if not src.is_file():
        raise DownloadError(f"source file not found: {src}")
    from tqdm import tqdm

    with (
        open(src, "rb") as fin,
        open(dest, "wb") as fout,
        tqdm(
            total=src.stat().st_size, unit="B", unit_scale=True, desc=src.name, disable=not progress, leave=False
        ) as bar,
    ):
        for chunk in iter(lambda: fin.read(_CHUNK), b""):
            fout.write(chunk)
            bar.update(len(chunk))


def _fetch(url: str, dest: Path, progress: bool) -> None:
    """Write the bytes at ``url`` to ``dest`` (a fresh temporary name)."""
    parsed = urlparse(url)
    scheme = parsed.scheme.lower()
    if scheme in ("http", "https", "ftp"):
        from http.client import HTTPException

        from iopath.common.download import download

        try:
            download(url, str(dest.parent), filename=dest.name, progress=progress)
        except (OSError, HTTPException, ValueError) as e:
            raise DownloadError(f"cannot download {_redact(url)}: {e}") from e
    elif scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise DownloadError(f"file:// URL with a remote host is not supported: {url}")
        _copy(Path(url2pathname(parsed.path)), dest, progress)
    elif scheme == "" or len(scheme) == 1:  # plain path (a one-letter scheme is a Windows drive)
        _copy(Path(os.path.expanduser(url)), dest, progress)
    else:
        raise DownloadError(f"unsupported URL scheme {scheme!r} in {url}; use http(s)://, ftp://, file:// or a path")


def _looks_like_html(path: Path, file_name: str) -> bool:
    if file_name.lower().endswith((".html", ".htm")):
        return False
    with open(path, "rb") as f:
        head = f.read(512).lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html"))


def download_resource(resource: Resource | dict, target_dir: str | os.PathLike, progress: bool = True) -> Path:
    """Download one resource into ``target_dir/<file_name>`` (mirrors tried in order) and verify it.

    ``resource`` is a ``Resource`` or a zoo-yaml mapping ``{url, file_name, hashcode, ...}``. The bytes
    go to a temporary file in ``target_dir``; it is renamed to ``file_name`` only after the sha256
    check. Raises ``DownloadError`` (nothing fetched) or ``ChecksumError`` (file removed)."""
    if not isinstance(resource, Resource):
        resource = parse_resource(resource, "download_resource")
    return _download(resource, Path(target_dir), progress)[0]


def _download(resource: Resource, target_dir: Path, progress: bool) -> tuple[Path, str]:
    """``download_resource`` returning (path, sha256) so callers need not hash the file again."""
    target_dir.mkdir(parents=True, exist_ok=True)
    dest = target_dir / resource.file_name
    errors = []
    for raw_url in (resource.url, *resource.mirrors):
        url = resolve_url(raw_url, resource.url_query_env)
        tmp = target_dir / f".{resource.file_name}.{uuid.uuid4().hex[:8]}.part"
        try:
            _fetch(url, tmp, progress)
            if _looks_like_html(tmp, resource.file_name):
                raise DownloadError(
                    f"{_redact(url)} returned an HTML page instead of {resource.file_name} (login or quota page, "
                    "Google Drive virus-scan notice, or an expired / token-protected link)"
                )
            digest = verify_file(tmp, resource, url=_redact(url))
            os.replace(tmp, dest)
            logger.info("downloaded %s -> %s", _redact(url), dest)
            return dest, digest
        except DownloadError as e:
            errors.append(str(e))
        finally:
            tmp.unlink(missing_ok=True)
    raise DownloadError("; ".join(errors))


# --------------------------------------------------------------------------------------- archives
def _check_name(name: str, archive: Path) -> str:
    clean = name.replace("\\", "/")
    if clean.startswith("/") or re.match(r"^[A-Za-z]:", clean):
        raise UnsafeArchiveError(f"refusing to extract {archive}: member {name!r} has an absolute path")
    parts = [p for p in clean.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"refusing to extract {archive}: member {name!r} contains '..'")
    return "/".join(parts)


def _check_link(name: str, link: str, archive: Path, hard: bool) -> None:
    link = link.replace("\\", "/")
    if link.startswith("/") or re.match(r"^[A-Za-z]:", link):
        raise UnsafeArchiveError(
            f"refusing to extract {archive}: link member {name!r} points at absolute path {link!r}"
        )
    base = "" if hard else posixpath.dirname(name)  # tar hard links are relative to the archive root
    resolved = posixpath.normpath(posixpath.join(base, link))
    if resolved == ".." or resolved.startswith("../"):
        raise UnsafeArchiveError(f"refusing to extract {archive}: link member {name!r} -> {link!r} leaves the target")


def _check_members(archive: Path, members: Iterable[tuple[str, str | None, bool]]) -> None:
    """``members``: (name, link target or None, is_hard_link). Refuses escapes and paths through links."""
    links: set[str] = set()
    names = []
    for name, link, hard in members:
        clean = _check_name(name, archive)
        if link is not None:
            _check_link(clean, link, archive, hard)
            if not hard:
                links.add(clean)
        names.append((name, clean))
    for name, clean in names:
        parts = clean.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in links:
                raise UnsafeArchiveError(
                    f"refusing to extract {archive}: member {name!r} is written through the link member "
                    f"{'/'.join(parts[:i])!r}"
                )


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root + os.sep)


def _extract_zip(archive: Path, staging: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            is_link = {i.filename: ((i.external_attr >> 16) & 0o170000) == 0o120000 for i in infos}
            members = []
            for info in infos:
                link = zf.read(info).decode("utf-8", "replace") if is_link[info.filename] else None
                members.append((info.filename, link, False))
            _check_members(archive, members)
            root = os.path.realpath(staging)
            for (name, link, _), info in zip(members, infos):
                dest = os.path.realpath(staging / _check_name(name, archive))
                if not _inside(dest, root):
                    raise UnsafeArchiveError(
                        f"refusing to extract {archive}: member {name!r} resolves outside the target"
                    )
                if link is not None:
                    os.makedirs(os.path.dirname(dest), exist_ok=True)
                    os.symlink(link, dest)
                else:
                    zf.extract(info, staging)
    except zipfile.BadZipFile as e:
        raise ArchiveError(f"cannot read zip archive {archive}: {e}; the file is corrupt or truncated") from e


def _extract_tar(archive: Path, staging: Path) -> None:
    try:
        with tarfile.open(archive, "r:*") as tf:
            infos = tf.getmembers()
            for info in infos:
                if info.isdev():
                    raise UnsafeArchiveError(f"refusing to extract {archive}: member {info.name!r} is a device or fifo")
            _check_members(
                archive,
                [(i.name, i.linkname if (i.issym() or i.islnk()) else None, i.islnk()) for i in infos],
            )
            if hasattr(tarfile, "data_filter"):  # Python 3.11.4+ / 3.12: the stdlib's own checks on top
                tf.extractall(staging, members=infos, filter="data")
            else:  # pragma: no cover - older Pythons rely on the member checks above
                tf.extractall(staging, members=infos)
    except tarfile.FilterError as e:
        raise UnsafeArchiveError(f"refusing to extract {archive}: {e}") from e
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ArchiveError(f"cannot read tar archive {archive}: {e}; the file is corrupt or truncated") from e


def safe_extract(archive: str | os.PathLike, target: str | os.PathLike) -> list[Path]:
    """Extract a .zip / .tar(.gz|.bz2|.xz) / .tgz into ``target``; returns the top-level paths written.

    Members with absolute paths, ``..`` components, links leaving the target, paths through link
    members, or device files raise ``UnsafeArchiveError`` naming the member, before anything reaches
    ``target`` (extraction happens in a staging folder that is moved in place at the end)."""
    archive, target = Path(archive), Path(target)
    lower = archive.name.lower()
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=target))
    try:
        if lower.endswith(".zip"):
            _extract_zip(archive, staging)
        elif lower.endswith(_TAR_SUFFIXES):
            _extract_tar(archive, staging)
        else:
            raise ArchiveError(
                f"unknown archive type for {archive}; expected one of .zip, {', '.join(_TAR_SUFFIXES)} "
                "(or set compressed: false in the zoo yaml)"
            )
        written = []
        for child in sorted(staging.iterdir()):
            dest = target / child.name
            if dest.is_symlink() or dest.is_file():
                dest.unlink()
            elif dest.is_dir():
                shutil.rmtree(dest)
            os.replace(child, dest)
            written.append(dest)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ----------------------------------------------------------------------------------- .built marker
def read_built(path: str | os.PathLike) -> dict | None:
    """The ``.built`` marker of a folder as a dict (``version`` at least), or None when absent."""
    marker = Path(path) / BUILT_MARKER
    if not marker.is_file():
        return None
    text = marker.read_text(encoding="utf-8").strip()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict):  # a plain-text marker holding only the version
        data = {"version": text}
    data["version"] = str(data.get("version", ""))
    return data


def write_built(path: str | os.PathLike, entry: ZooEntry, files: dict[str, str]) -> None:
    marker = Path(path) / BUILT_MARKER
    payload = {
        "version": entry.version,
        "key": entry.key,
        "created_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "files": files,
    }
    tmp = marker.with_name(f"{BUILT_MARKER}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, marker)


def is_built(entry: ZooEntry, data_dir: str | os.PathLike | None = None) -> bool:
    built = read_built(entry_dir(entry, data_dir))
    return built is not None and built["version"] == entry.version


# ----------------------------------------------------------------------------------------- ensure
def _offline_default() -> bool:
    return os.environ.get("MMF_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _missing_message(entry: ZooEntry, root: Path, missing: list[tuple[Resource, str]]) -> str:
    lines = [
        (
            f"zoo entry '{entry.key}' (version {entry.version}) is missing {len(missing)} file(s) that could not be "
            "downloaded; put each at the path shown and run again:"
        )
    ]
    for res, why in missing:
        sha = res.hashcode or (f"unpublished (mmcv prefix {res.hash_prefix})" if res.hash_prefix else "unpublished")
        lines.append(f"  {res.file_name}")
        lines.append(f"    url:    {res.url}" + "".join(f"\n    mirror: {m}" for m in res.mirrors))
        lines.append(f"    sha256: {sha}")
        lines.append(f"    put at: {root / res.relative_path}")
        if res.url_query_env and not os.environ.get(res.url_query_env):
            lines.append(
                f"    note:   this storage may need a read token: set {res.url_query_env} to the SAS query string"
            )
        lines.append(f"    reason: {why}")
    return "\n".join(lines)


def ensure_downloaded(
    key: str | ZooEntry,
    cache_dir: str | os.PathLike | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    kind: str | None = None,
    config: Any = None,
    progress: bool = True,
    offline: bool | None = None,
) -> Path:
    """Make sure the files of zoo entry ``key`` are in the cache; returns the entry folder.

    The folder is ``<data_dir>/models/<key>`` or ``<data_dir>/datasets/<name>/<variation>``;
    ``data_dir`` is ``data_dir`` if given, else ``<cache_dir>/data`` if ``cache_dir`` is given, else
    ``resolve_data_dir(config)``. A folder whose ``.built`` version equals the entry's is returned
    untouched (no hashing, no network); another version is removed and rebuilt. Files already present
    (e.g. copied by hand) are verified instead of downloaded. ``offline`` (default ``$MMF_OFFLINE``)
    forbids network access."""
    entry = key if isinstance(key, ZooEntry) else get_zoo_entry(key, kind=kind, config=config)
    if data_dir is None:
        data_dir = Path(cache_dir) / "data" if cache_dir is not None else resolve_data_dir(config)
    offline = _offline_default() if offline is None else offline
    for requirement in entry.zoo_requirements:
        ensure_downloaded(requirement, data_dir=data_dir, config=config, progress=progress, offline=offline)

    root = entry_dir(entry, data_dir)
    from iopath.common.file_io import file_lock

    try:
        root.parent.mkdir(parents=True, exist_ok=True)
    except PermissionError as e:
        raise ZooError(
            f"cannot create the zoo cache folder {root.parent} ({e}); set MMF_CACHE_DIR or MMF_DATA_DIR"
        ) from e
    with file_lock(str(root)):
        built = read_built(root)
        if built is not None and built["version"] == entry.version:
            return root
        if built is not None:
            logger.warning(
                "%s: cached version %s differs from the zoo's %s; removing %s and downloading again",
                entry.key,
                built["version"],
                entry.version,
                root,
            )
            shutil.rmtree(root)
        root.mkdir(parents=True, exist_ok=True)

        digests: dict[str, str] = {}
        missing: list[tuple[Resource, str]] = []
        for res in entry.resources:
            dest = root / res.relative_path
            if dest.is_file():
                try:
                    digests[str(res.relative_path)] = verify_file(
                        dest, res, url=f"the existing file {dest}", delete=not offline
                    )
                    continue
                except ChecksumError as e:
                    if offline:
                        raise
                    logger.warning("%s; downloading it again", e)
            if offline:
                missing.append((res, "offline (MMF_OFFLINE is set or offline=True)"))
                continue
            try:
                digests[str(res.relative_path)] = _download(res, dest.parent, progress)[1]
            except DownloadError as e:
                missing.append((res, str(e)))
        for res, why in missing:
            if res.optional:
                logger.warning("%s: optional file %s not fetched (%s)", entry.key, res.file_name, why)
        required = [(res, why) for res, why in missing if not res.optional]
        if required:
            raise ZooFileMissing(_missing_message(entry, root, required))

        for res in entry.resources:
            dest = root / res.relative_path
            if res.compressed and dest.is_file():
                safe_extract(dest, dest.parent)
        write_built(root, entry, digests)
    return root


# ----------------------------------------------------------------------------------------- verify
@dataclass(frozen=True)
class FileCheck:
    path: Path
    status: str  # ok | mismatch | missing | unverified | optional-missing
    expected: str
    got: str


def verify_entry(
    key: str | ZooEntry,
    cache_dir: str | os.PathLike | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    kind: str | None = None,
    config: Any = None,
) -> list[FileCheck]:
    """Re-hash the cached files of an entry against the zoo yaml (nothing is deleted or downloaded)."""
    entry = key if isinstance(key, ZooEntry) else get_zoo_entry(key, kind=kind, config=config)
    if data_dir is None:
        data_dir = Path(cache_dir) / "data" if cache_dir is not None else resolve_data_dir(config)
    root = entry_dir(entry, data_dir)
    checks = []
    for res in entry.resources:
        path = root / res.relative_path
        expected = res.hashcode or res.hash_prefix
        if not path.is_file():
            checks.append(FileCheck(path, "optional-missing" if res.optional else "missing", expected, ""))
            continue
        got = sha256_file(path)
        if not expected:
            status = "unverified"
        else:
            status = "ok" if got.startswith(expected) else "mismatch"
        checks.append(FileCheck(path, status, expected, got))
    return checks
