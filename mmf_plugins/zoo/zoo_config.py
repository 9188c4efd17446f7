"""The model and dataset zoo tables: read ``configs/zoo/{models,datasets}.yaml`` and resolve a zoo key.

Follows MMF's zoo (``mmf/configs/zoo/*.yaml``, ``mmf.utils.configuration.get_zoo_config``,
``mmf.utils.download.download_pretrained_model``): nested keys, a leaf is a node with ``version`` and
``resources``; a key that names a group with a ``defaults`` child resolves to that child (an inline
node, or an alias such as ``defaults: ${vinvl.coco_ir}``). The yaml is found through, in order, the
config value ``env.model_zoo`` / ``env.dataset_zoo``, the environment variables ``MMF_MODEL_ZOO`` /
``MMF_DATASET_ZOO``, and ``configs/zoo/*.yaml`` at the repository root.

Deliberate differences from MMF:

* an unknown key raises ``UnknownZooKey`` (a ``KeyError``) naming the available keys and the closest
  match, instead of printing and re-raising an OmegaConf error;
* a group without ``defaults`` resolves to its only leaf, and with several leaves is an error listing
  them (MMF fails with an attribute error);
* a leaf carries metadata (``paper``, ``source_repo``, ``license``, ``description``), the registered
  ``converter`` that maps the official weights, and optionally ``weights_file`` (a glob that picks the
  weights inside a folder holding several, MMF issue #1174) and ``converter_options``;
* resources may be a list (models) or, as in MMF's dataset zoo, a dict of categories
  (``annotations``, ``features``, ``images``, ``extras``) whose files land in a sub-folder of that name;
* a resource may set ``hash_prefix`` (the 8 hex digits mmcv puts in its file names, a partial check
  when the full sha256 is not published), ``mirrors`` (other URLs for the same file), ``optional``
  (a missing file only warns) and ``url_query_env`` (the name of an environment variable whose value
  is appended as the URL query, for storage that needs a SAS token, e.g. Oscar's Azure blobs).
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]  # parent of the mmf_plugins package
ZOO_KINDS = ("models", "datasets")
_ZOO_ENV = {"models": ("model_zoo", "MMF_MODEL_ZOO"), "datasets": ("dataset_zoo", "MMF_DATASET_ZOO")}
_ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_ALIAS = re.compile(r"^\$\{([A-Za-z0-9_.\-]+)\}$")
_METADATA_KEYS = ("paper", "source_repo", "license", "description")


class ZooError(RuntimeError):
    """Base class of every zoo failure (bad yaml, unknown key, download, checksum, archive)."""


class ZooConfigError(ZooError, ValueError):
    """A zoo yaml that does not follow the schema."""


class UnknownZooKey(ZooError, KeyError):
    """A zoo key that names no entry. ``str(e)`` is the full message (KeyError would quote it)."""

    def __str__(self) -> str:
        return self.args[0] if self.args else ""


@dataclass(frozen=True)
class Resource:
    """One file of a zoo entry."""

    url: str
    file_name: str
    hashcode: str = ""  # sha256 hex; empty = unverified
    compressed: bool = False
    category: str = ""  # dataset sub-folder (annotations, features, ...); "" = the entry folder itself
    hash_prefix: str = ""  # leading hex digits of the sha256 (mmcv file names), checked when hashcode is empty
    mirrors: tuple[str, ...] = ()
    optional: bool = False
    url_query_env: str = ""

    @property
    def relative_path(self) -> Path:
        return Path(self.category) / self.file_name if self.category else Path(self.file_name)


@dataclass(frozen=True)
class ZooEntry:
    """A resolved leaf of a zoo yaml."""

    key: str  # canonical key (an alias resolved; an inline ``defaults`` child is ``<group>.defaults``)
    kind: str  # "models" or "datasets"
    version: str
    resources: tuple[Resource, ...]
    converter: str = ""
    weights_file: str = ""
    converter_options: dict = field(default_factory=dict)
    zoo_requirements: tuple[str, ...] = ()
    metadata: dict = field(default_factory=dict)
    requested_key: str = ""
    source_file: str = ""

    @property
    def description(self) -> str:
        return str(self.metadata.get("description", ""))


# ---------------------------------------------------------------------------------------- zoo files
def config_value(config: Any, dotted: str) -> Any:
    if config is None:
        return None
    node = config
    for part in dotted.split("."):
        try:
            node = node[part] if isinstance(node, dict) else getattr(node, part)
        except (KeyError, AttributeError, TypeError, OmegaConfBaseException):  # missing or unresolvable: unset
            return None
        if node is None:
            return None
    return node


def zoo_path(kind: str = "models", config: Any = None) -> Path:
    """Path of the ``models`` or ``datasets`` zoo yaml (config ``env.*_zoo`` > env var > repo default)."""
    if kind not in ZOO_KINDS:
        raise ValueError(f"unknown zoo kind {kind!r}; expected one of {', '.join(ZOO_KINDS)}")
    config_key, env_var = _ZOO_ENV[kind]
    value = config_value(config, f"env.{config_key}") or os.environ.get(env_var)
    if not value:
        return REPO_ROOT / "configs" / "zoo" / f"{kind}.yaml"
    path = Path(os.path.expanduser(str(value)))
    if not path.is_absolute():  # like MMF: relative to the working directory, else to the repository
        path = path.absolute() if path.exists() or not (REPO_ROOT / path).exists() else REPO_ROOT / path
    return path


_CACHE: dict[tuple[str, int, int], DictConfig] = {}


def load_zoo(kind: str = "models", config: Any = None, path: str | os.PathLike | None = None) -> DictConfig:
    """Parse a zoo yaml (cached by path, size and mtime)."""
    path = Path(path) if path is not None else zoo_path(kind, config)
    if not path.is_file():
        _, env_var = _ZOO_ENV[kind]
        raise ZooConfigError(
            f"{kind} zoo file not found: {path}; set env.{_ZOO_ENV[kind][0]} or {env_var} to an existing yaml, "
            f"or restore configs/zoo/{kind}.yaml in {REPO_ROOT}"
        )
    stat = path.stat()
    cache_key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if cache_key not in _CACHE:
        try:
            conf = OmegaConf.load(path)
        except Exception as e:  # yaml scanner / parser errors
            raise ZooConfigError(f"cannot parse zoo yaml {path}: {e}") from e
        if not isinstance(conf, DictConfig):
            raise ZooConfigError(f"zoo yaml {path} must hold a mapping of keys, got {type(conf).__name__}")
        _CACHE[cache_key] = conf
    return _CACHE[cache_key]


# ------------------------------------------------------------------------------------- key lookup
def _is_leaf(node: Any) -> bool:
    return isinstance(node, DictConfig) and "version" in node and "resources" in node


def _alias_target(group: DictConfig, child: str) -> str | None:
    """The key an alias child (``defaults: ${a.b}``) points at, or None for an inline node."""
    if not OmegaConf.is_interpolation(group, child):
        return None
    raw = group._get_node(child)._value()  # the '${...}' string itself
    match = _ALIAS.match(str(raw))
    if not match:
        raise ZooConfigError(f"zoo alias {child}: {raw!r} must be a plain '${{a.b.c}}' reference")
    return match.group(1)


def _walk(node: DictConfig, prefix: str, groups: bool = False) -> Iterator[str]:
    """Canonical keys of every leaf under ``node`` (aliases skipped: they point at another leaf);
    with ``groups``, also the groups that resolve to a leaf (those with ``defaults``)."""
    for child in node:
        key = f"{prefix}.{child}" if prefix else str(child)
        if _alias_target(node, child) is not None:
            continue
        value = node._get_node(child)
        if _is_leaf(value):
            yield key
        elif isinstance(value, DictConfig):
            if groups and "defaults" in value:
                yield key
            yield from _walk(value, key, groups)


def _select(conf: DictConfig, key: str) -> Any:
    node: Any = conf
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return None
        node = node[part]
    return node


def _canonical(conf: DictConfig, key: str, depth: int = 0) -> tuple[str, Any] | None:
    """Follow aliases along ``key``: returns (canonical key, node) or None when the key does not exist."""
    if depth > 16:
        raise ZooConfigError(f"zoo key '{key}': aliases nest deeper than 16 levels (an alias loop?)")
    parts = key.split(".")
    node: Any = conf
    for i, part in enumerate(parts):
        if not isinstance(node, DictConfig) or part not in node:
            return None
        target = _alias_target(node, part)
        if target is not None:
            rest = ".".join(parts[i + 1 :])
            return _canonical(conf, f"{target}.{rest}" if rest else target, depth + 1)
        node = node[part]
    return key, node


def _choices(kind: str | None, config: Any) -> list[str]:
    kinds = ZOO_KINDS if kind is None else (kind,)
    keys: list[str] = []
    for k in kinds:
        conf = load_zoo(k, config)
        keys.extend(_walk(conf, "", groups=True))
    return keys


def _unknown(key: str, kind: str | None, config: Any, why: str = "") -> UnknownZooKey:
    choices = _choices(kind, config)
    where = f"{kind} zoo" if kind else "model or dataset zoo"
    msg = f"unknown {where} key '{key}'" + (f" ({why})" if why else "")
    hint = difflib.get_close_matches(key, choices, n=1, cutoff=0.4)
    if hint:
        msg += f". Did you mean '{hint[0]}'?"
    msg += f" Available: {', '.join(sorted(choices)) or '(none)'}"
    return UnknownZooKey(msg)


def _resolve(conf: DictConfig, key: str, kind: str, config: Any, seen: tuple[str, ...] = ()) -> tuple[str, DictConfig]:
    if key in seen:
        raise ZooConfigError(f"zoo key '{key}' is an alias loop: {' -> '.join(seen + (key,))}")
    found = _canonical(conf, key)
    if found is None:
        raise _unknown(key, kind, config)
    key, node = found
    if _is_leaf(node):
        return key, node
    if not isinstance(node, DictConfig):
        raise ZooConfigError(f"zoo key '{key}' holds {node!r}, expected a node with 'version' and 'resources'")
    if "defaults" in node:
        target = _alias_target(node, "defaults")
        if target is not None:
            return _resolve(conf, target, kind, config, seen + (key,))
        return _resolve(conf, f"{key}.defaults", kind, config, seen + (key,))
    leaves = list(_walk(node, key))
    if len(leaves) == 1:  # a group with a single entry: no choice to make
        return _resolve(conf, leaves[0], kind, config, seen + (key,))
    raise UnknownZooKey(
        f"zoo key '{key}' is a group without 'defaults'; choose one of: {', '.join(leaves) or '(no entries)'}"
    )


def _as_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    raise ZooConfigError(f"{where} must be true or false, got {value!r}")


def parse_resource(raw: Any, where: str, category: str = "") -> Resource:
    if not isinstance(raw, (DictConfig, dict)):
        raise ZooConfigError(f"{where}: a resource must be a mapping with url and file_name, got {raw!r}")
    raw = OmegaConf.to_container(raw, resolve=True) if isinstance(raw, DictConfig) else dict(raw)
    unknown = set(raw) - {
        "url",
        "file_name",
        "hashcode",
        "compressed",
        "hash_prefix",
        "mirrors",
        "optional",
        "url_query_env",
    }
    if unknown:
        raise ZooConfigError(f"{where}: unknown resource field(s) {sorted(unknown)}")
    url, file_name = raw.get("url"), raw.get("file_name")
    if not url or not file_name:
        raise ZooConfigError(f"{where}: every resource needs 'url' and 'file_name', got {raw}")
    if "/" in str(file_name) or "\\" in str(file_name) or str(file_name) in (".", ".."):
        raise ZooConfigError(f"{where}: file_name must be a bare file name, got {file_name!r}")
    hashcode = str(raw.get("hashcode") or "").strip().lower()
    if hashcode and not _SHA256.match(hashcode):
        raise ZooConfigError(f"{where}: hashcode must be 64 hex digits (sha256) or empty, got {hashcode!r}")
    hash_prefix = str(raw.get("hash_prefix") or "").strip().lower()
    if hash_prefix and not re.fullmatch(r"[0-9a-f]{4,63}", hash_prefix):
        raise ZooConfigError(f"{where}: hash_prefix must be 4-63 hex digits, got {hash_prefix!r}")
    compressed = raw.get("compressed")
    if compressed is None:
        compressed = str(file_name).lower().endswith(_ARCHIVE_SUFFIXES)
    mirrors = raw.get("mirrors") or []
    if isinstance(mirrors, str):
        mirrors = [mirrors]
    return Resource(
        url=str(url),
        file_name=str(file_name),
        hashcode=hashcode,
        compressed=_as_bool(compressed, f"{where}.compressed"),
        category=category,
        hash_prefix=hash_prefix,
        mirrors=tuple(str(m) for m in mirrors),
        optional=_as_bool(raw.get("optional", False), f"{where}.optional"),
        url_query_env=str(raw.get("url_query_env") or ""),
    )


def _parse_entry(key: str, node: DictConfig, kind: str, requested: str, source: str) -> ZooEntry:
    where = f"{source}: {key}"
    resources_node = node["resources"]
    resources: list[Resource] = []
    if isinstance(resources_node, ListConfig):
        for i, raw in enumerate(resources_node):
            resources.append(parse_resource(raw, f"{where}.resources[{i}]"))
    elif isinstance(resources_node, DictConfig):  # MMF dataset form: {category: [resources]}
        for category in resources_node:
            items = resources_node[category]
            if not isinstance(items, ListConfig):
                raise ZooConfigError(f"{where}.resources.{category} must be a list of resources")
            for i, raw in enumerate(items):
                resources.append(parse_resource(raw, f"{where}.resources.{category}[{i}]", str(category)))
    else:
        raise ZooConfigError(f"{where}.resources must be a list (or a dict of lists), got {resources_node!r}")
    if not resources:
        raise ZooConfigError(f"{where} lists no resources")
    names = [r.relative_path for r in resources]
    if len(set(names)) != len(names):
        raise ZooConfigError(f"{where}: two resources share a file name: {sorted(map(str, names))}")
    version = node["version"]
    if version is None or str(version).strip() == "":
        raise ZooConfigError(f"{where}.version is empty; give a version string (e.g. 1.0_2021_05_01)")
    reqs = node.get("zoo_requirements") or []
    if isinstance(reqs, str):
        reqs = [reqs]
    opts = node.get("converter_options") or {}
    opts = OmegaConf.to_container(opts, resolve=True) if isinstance(opts, DictConfig) else dict(opts)
    metadata = {m: str(node.get(m)) for m in _METADATA_KEYS if node.get(m) is not None}
    return ZooEntry(
        key=key,
        kind=kind,
        version=str(version),
        resources=tuple(resources),
        converter=str(node.get("converter") or ""),
        weights_file=str(node.get("weights_file") or ""),
        converter_options=opts,
        zoo_requirements=tuple(str(r) for r in reqs),
        metadata=metadata,
        requested_key=requested,
        source_file=source,
    )


def get_zoo_entry(key: str, kind: str | None = None, config: Any = None) -> ZooEntry:
    """Resolve a dotted zoo key to its entry.

    ``kind`` is ``"models"``, ``"datasets"`` or None (search both; a key found in both is an error
    asking to choose). A key may carry the kind as a prefix: ``models:vinvl.pretrained``.
    """
    if not isinstance(key, str) or not key.strip():
        raise UnknownZooKey(f"zoo key must be a non-empty string like 'vinvl.pretrained', got {key!r}")
    key = key.strip()
    if ":" in key:
        prefix, key = key.split(":", 1)
        if prefix not in ZOO_KINDS:
            raise UnknownZooKey(f"zoo key prefix {prefix!r} must be one of {', '.join(ZOO_KINDS)} (e.g. models:{key})")
        kind = prefix
    kinds = ZOO_KINDS if kind is None else (kind,)
    for k in kinds:
        if k not in ZOO_KINDS:
            raise ValueError(f"unknown zoo kind {k!r}; expected one of {', '.join(ZOO_KINDS)}")
    found = []
    for k in kinds:
        conf = load_zoo(k, config)
        if _canonical(conf, key) is not None:
            found.append(k)
    if not found:
        raise _unknown(key, kind, config)
    if len(found) > 1:
        raise UnknownZooKey(
            f"zoo key '{key}' exists in both the model and the dataset zoo; write models:{key} or datasets:{key}"
        )
    k = found[0]
    conf = load_zoo(k, config)
    canonical, node = _resolve(conf, key, k, config)
    return _parse_entry(canonical, node, k, key, str(zoo_path(k, config)))


def list_entries(kind: str | None = None, config: Any = None) -> list[ZooEntry]:
    """Every leaf of the zoo(s), models first, in file order."""
    entries = []
    for k in ZOO_KINDS if kind is None else (kind,):
        conf = load_zoo(k, config)
        source = str(zoo_path(k, config))
        for key in _walk(conf, ""):
            entries.append(_parse_entry(key, _select(conf, key), k, key, source))
    return entries
