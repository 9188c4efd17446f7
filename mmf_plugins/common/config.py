"""Configuration: load, merge and validate a run's config the way MMF does.

Follows MMF ``mmf/utils/configuration.py``:

* merge order ``configs/defaults.yaml`` < model defaults (``model_config.<model>``) < each dataset's
  defaults in ``datasets`` order < user config (``config=``, with recursive ``includes:``) < command-line
  ``key=value`` overrides;
* ``includes:`` is a list; each entry is resolved relative to the including file, then to the
  repository root; later includes win, the file itself wins over its includes; a cycle is an error;
* ``MMF_CACHE_DIR / MMF_DATA_DIR / MMF_SAVE_DIR / MMF_USER_DIR / MMF_LOG_DIR / MMF_REPORT_DIR /
  MMF_MODEL_ZOO / MMF_DATASET_ZOO`` fill ``env.*`` with MMF's defaults; ``env.user_dir`` imports a
  plugin folder (priority: env var < user yaml < command line) before model/dataset defaults load;
* top-level ``learning_rate`` is copied to ``optimizer.params.lr``; legacy ``training.resume*`` keys
  move to ``checkpoint.*``; ``training.fp16: true`` maps to mixed precision.

Deliberate differences: an override of a key that exists nowhere is an error that suggests the
closest existing key (MMF raises a bare AttributeError), overrides may add keys only inside empty
mappings (e.g. ``checkpoint.pretrained_state_mapping.bert=bert``), and the merged, resolved config is
saved to ``<save_dir>/config.yaml`` atomically.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf

from mmf_plugins.common.registry import registry, unknown_message

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULTS_YAML = REPO_ROOT / "configs" / "defaults.yaml"
SPECIAL_KEYS = ("config", "model", "datasets", "dataset")


class ConfigError(ValueError):
    """A config file, include or override that cannot be used; the message says why and how to fix it."""


# --------------------------------------------------------------------------- resolvers
def _default_cache_dir() -> str:
    torch_home = os.environ.get("TORCH_HOME", os.path.join(os.path.expanduser("~"), ".cache", "torch"))
    return os.path.join(torch_home, "mmf")


def resolve_cache_dir(env_var: str = "MMF_CACHE_DIR") -> str:
    return os.environ.get(env_var) or _default_cache_dir()


def resolve_dir(env_var: str = "MMF_DATA_DIR", default: str = "data") -> str:
    """``$env_var`` if set, else ``<cache_dir>/<default>`` (MMF's ``resolve_dir``)."""
    value = os.environ.get(env_var)
    if value:
        return value
    return os.path.join(resolve_cache_dir(), default)


def _device_count() -> int:
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except Exception:  # torch without CUDA runtime
        return 1


def register_resolvers() -> None:
    for name, fn in (
        ("resolve_cache_dir", resolve_cache_dir),
        ("resolve_dir", resolve_dir),
        ("device_count", _device_count),
    ):
        OmegaConf.register_resolver(name, fn, replace=True, annotation_validation="off")


register_resolvers()


# --------------------------------------------------------------------------- paths
def resolve_path(path: str | os.PathLike, relative_to: Iterable[Path] = ()) -> Path:
    """Find ``path`` as given (cwd), then under each of ``relative_to``, then under the repository."""
    p = Path(os.path.expanduser(str(path)))
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, *[Path(r) / p for r in relative_to], REPO_ROOT / p]
    for c in candidates:
        if c.exists():
            return c.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise ConfigError(f"config file '{path}' not found (tried: {tried}); give a path relative to the working "
                      "directory or to the repository, e.g. projects/soho/configs/vqa2/demo.yaml")


# --------------------------------------------------------------------------- yaml + includes
def load_yaml(path: str | os.PathLike, _stack: tuple[Path, ...] = ()) -> DictConfig:
    """Load a yaml with recursive ``includes:`` (relative to the including file, then the repo)."""
    path = Path(path).resolve()
    if path in _stack:
        chain = " -> ".join(str(p) for p in (*_stack, path))
        raise ConfigError(f"include cycle: {chain}; remove one of these includes")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError and friends
        raise ConfigError(f"cannot parse {path}: {e}") from e
    if cfg is None or isinstance(cfg, ListConfig):
        if cfg is None:
            return OmegaConf.create({})
        raise ConfigError(f"{path} must hold a mapping at top level, got a list")
    includes = cfg.pop("includes", None) if "includes" in cfg else None
    if includes is None:
        return cfg
    if not isinstance(includes, (ListConfig, list)):
        raise ConfigError(f"'includes' in {path} must be a list of yaml paths, got {includes!r}")
    merged = OmegaConf.create({})
    for inc in includes:
        inc_path = resolve_path(inc, relative_to=[path.parent])
        merged = OmegaConf.merge(merged, load_yaml(inc_path, (*_stack, path)))
    return OmegaConf.merge(merged, cfg)


# --------------------------------------------------------------------------- CLI grammar
def parse_opts(opts: list[str]) -> tuple[dict, list[str]]:
    """MMF's grammar: all ``key=value`` (detected by '=' in the first opt) or alternating ``key value``.

    Returns (special, overrides): special holds config/model/datasets; overrides is a dotlist."""
    opts = list(opts or [])
    if not opts:
        return {}, []
    if "=" in opts[0]:
        pairs = []
        for o in opts:
            if "=" not in o:
                raise ConfigError(f"option '{o}' is not key=value; write e.g. training.max_updates=100")
            k, v = o.split("=", 1)
            pairs.append((k, v))
    else:
        if len(opts) % 2:
            raise ConfigError(f"options must be key=value or 'key value' pairs; got an odd count: {opts}")
        pairs = list(zip(opts[0::2], opts[1::2]))
    special, overrides = {}, []
    for k, v in pairs:
        k = k.lstrip("-")
        if k in SPECIAL_KEYS:
            special["datasets" if k == "dataset" else k] = v
        else:
            overrides.append(f"{k}={v}")
    return special, overrides


def _parse_value(text: str):
    """``ast.literal_eval`` as MMF (numbers, True, None, lists), else the string itself."""
    if text in ("None", "null", "~"):
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if text.startswith(("[", "{")):  # unquoted lists/maps, e.g. datasets.x.files=[a.jsonl, b.jsonl]
            import yaml

            try:
                return yaml.safe_load(text)
            except yaml.YAMLError:
                return text
        low = text.lower()
        if low in ("true", "false"):
            return low == "true"
        return text
    return value


def _all_keys(cfg, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(cfg, DictConfig):
        for k in cfg.keys():
            full = f"{prefix}{k}"
            keys.append(full)
            node = cfg._get_node(k)
            if isinstance(node, (DictConfig,)):
                keys.extend(_all_keys(node, full + "."))
    return keys


def _open_mappings(cfg: DictConfig, prefix: str = "") -> set[str]:
    """Dotted paths of the empty mappings in ``cfg``: places where overrides may create keys."""
    out = set()
    for k in cfg.keys():
        node = cfg._get_node(k)
        if isinstance(node, DictConfig):
            path = f"{prefix}{k}"
            if len(node) == 0:
                out.add(path)
            else:
                out |= _open_mappings(node, path + ".")
    return out


def apply_overrides(cfg: DictConfig, overrides: list[str], skip_missing: bool = False) -> DictConfig:
    open_paths = _open_mappings(cfg)
    for item in overrides:
        key, text = item.split("=", 1)
        value = _parse_value(text)
        parts = key.split(".")
        exists = OmegaConf.select(cfg, key, default="__missing__", throw_on_missing=False) != "__missing__"
        if not exists:
            # keys may be created below a mapping that was empty before the overrides
            # (e.g. feature_extractor.type=... then feature_extractor.params.model_file=...)
            addable = any(".".join(parts[:i]) in open_paths for i in range(1, len(parts)))
            if not addable:
                if skip_missing:
                    continue
                hint = difflib.get_close_matches(key, _all_keys(cfg), n=1, cutoff=0.6)
                raise ConfigError(
                    f"override '{key}' matches no config key"
                    + (f"; did you mean '{hint[0]}'?" if hint else "")
                    + " Check the spelling, or add the key to your config file first."
                )
        OmegaConf.update(cfg, key, value, merge=True, force_add=True)
    return cfg


# --------------------------------------------------------------------------- user dir
def import_user_dir(user_dir: str | None) -> None:
    """Import a plugin package (folder with __init__.py) or a single .py file (MMF ``import_user_module``)."""
    if not user_dir or registry.get("__mmf_user_dir_imported__") == str(user_dir):
        return
    path = Path(os.path.expanduser(str(user_dir)))
    if not path.is_absolute():
        path = (Path.cwd() / path) if (Path.cwd() / path).exists() else REPO_ROOT / path
    if not path.exists():
        raise ConfigError(f"env.user_dir '{user_dir}' does not exist; point it at a package folder or a .py file")
    if path.is_file():
        spec = importlib.util.spec_from_file_location("mmf_user_dir", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["mmf_user_dir"] = module
        spec.loader.exec_module(module)
    else:
        if not (path / "__init__.py").exists():
            raise ConfigError(f"env.user_dir '{path}' is a folder without __init__.py; make it a package")
        parent = str(path.parent)
        if parent not in sys.path:
            sys.path.insert(0, parent)
        module = importlib.import_module(path.name)
        sys.modules["mmf_user_dir"] = module
    registry.register("__mmf_user_dir_imported__", str(user_dir))


# --------------------------------------------------------------------------- build
def _component_defaults(kind: str, name: str, user_dir_roots: list[Path]) -> DictConfig:
    cls = registry.get_class(kind, name)
    rel = cls.config_path() if hasattr(cls, "config_path") else None
    if not rel:
        return OmegaConf.create({})
    return load_yaml(resolve_path(rel, relative_to=user_dir_roots))


def build_config(opts: list[str] | None = None, *, validate: bool = True) -> DictConfig:
    """Build the full run config from ``mmf_run`` style options."""
    from mmf_plugins import setup_imports

    special, overrides = parse_opts(opts or [])
    defaults = load_yaml(DEFAULTS_YAML)
    # env.* overrides must be visible while setting up (MMF applies opts silently first).
    apply_overrides(defaults, [o for o in overrides if o.startswith("env.")], skip_missing=True)

    user_cfg = OmegaConf.create({})
    config_file = special.get("config")
    if config_file:
        config_path = resolve_path(config_file)
        user_cfg = load_yaml(config_path)
        special["config"] = str(config_path)

    # plugin folder: env var (defaults) < user yaml < command line
    user_dir = OmegaConf.select(defaults, "env.user_dir", default="")
    user_dir = OmegaConf.select(user_cfg, "env.user_dir", default=user_dir) or user_dir
    for o in overrides:
        if o.startswith("env.user_dir="):
            user_dir = o.split("=", 1)[1]
    setup_imports()
    import_user_dir(user_dir)
    roots = [Path(user_dir)] if user_dir else []

    model = special.get("model") or OmegaConf.select(user_cfg, "model", default=None)
    datasets = special.get("datasets") or OmegaConf.select(user_cfg, "datasets", default=None)
    if validate and not model:
        raise ConfigError("Required argument 'model' not passed; add model=<name> (registered: "
                          + ", ".join(registry.names("model")) + ")")
    if validate and not datasets:
        raise ConfigError("Required argument 'datasets' not passed; add datasets=<name[,name]> (registered: "
                          + ", ".join(registry.names("builder")) + ")")
    layers = [defaults]
    if model:
        if model not in registry.mapping["model"]:
            raise ConfigError(unknown_message("model", model, registry.names("model")))
        layers.append(_component_defaults("model", model, roots))
    dataset_list = [d.strip() for d in str(datasets).split(",") if d.strip()] if datasets else []
    for d in dataset_list:
        if d not in registry.mapping["builder"]:
            raise ConfigError(unknown_message("builder", d, registry.names("builder")))
        layers.append(_component_defaults("builder", d, roots))
    layers.append(user_cfg)
    cfg = OmegaConf.merge(*layers)
    cfg.model = model
    cfg.datasets = ",".join(dataset_list) if dataset_list else datasets
    cfg.config = special.get("config")
    if user_dir:
        cfg.env.user_dir = str(user_dir)
    apply_overrides(cfg, overrides)
    _update_specific(cfg)
    OmegaConf.resolve(cfg)
    OmegaConf.set_struct(cfg, True)
    registry.register("config", cfg)
    return cfg


def _update_specific(cfg: DictConfig) -> None:
    if "learning_rate" in cfg:
        cfg.optimizer.params.lr = cfg.pop("learning_rate")
    # legacy MMF keys living under training.*
    for key in ("resume", "resume_file", "resume_best", "resume_pretrained", "pretrained_state_mapping"):
        if key in cfg.training:
            cfg.checkpoint[key] = cfg.training.pop(key)
    if "run_type" in cfg.training:
        cfg.run_type = cfg.training.pop("run_type")
    if cfg.training.get("fp16", False) and str(cfg.training.precision) == "32":
        cfg.training.precision = "16-mixed"
    if cfg.training.get("clip_gradients", False) and cfg.training.get("clip_norm") is None:
        cfg.training.clip_norm = cfg.training.get("max_grad_l2_norm") or 0.25
    cfg.training.precision = str(cfg.training.precision)


def save_config(cfg: DictConfig, save_dir: str | os.PathLike) -> Path:
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    target = save_dir / "config.yaml"
    tmp = target.with_suffix(".yaml.tmp")
    tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    os.replace(tmp, target)
    return target


def dataset_list(cfg: DictConfig) -> list[str]:
    return [d for d in str(cfg.datasets or "").split(",") if d]
