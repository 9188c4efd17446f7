"""mmf_plugins: SOHO, VinVL/OSCAR+ and VL-BERT in one MMF-compatible registry.

``import mmf_plugins`` is cheap; ``setup_imports()`` imports every module that registers something
(MMF's ``mmf.utils.env.setup_imports``), and every entry point calls it.
"""

from __future__ import annotations

import importlib
import pkgutil

from mmf_plugins.common.registry import registry

__version__ = "0.1.0"

# Sub-packages whose modules register models, builders, processors, metrics, ...
_REGISTERING_PACKAGES = (
    "common",
    "metrics",
    "processors",
    "datasets",
    "modules",
    "models",
    "extraction",
    "zoo",
    "trainers",
)


def setup_imports() -> None:
    """Import every module under the registering sub-packages once (idempotent)."""
    if registry.get("imports_setup"):
        return
    for sub in _REGISTERING_PACKAGES:
        pkg = importlib.import_module(f"{__name__}.{sub}")
        for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{pkg.__name__}."):
            importlib.import_module(info.name)
    registry.register("imports_setup", True)


def pipeline(*args, **kwargs):
    """Hugging Face style inference pipeline; see ``mmf_plugins.pipelines``."""
    from mmf_plugins.pipelines import pipeline as _pipeline

    return _pipeline(*args, **kwargs)


__all__ = ["registry", "setup_imports", "pipeline", "__version__"]
