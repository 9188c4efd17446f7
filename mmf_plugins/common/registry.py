"""The registry: one name table per kind of component, with MMF's decorator names.

Follows facebookresearch/mmf ``mmf/common/registry.py`` (decorators ``register_model``,
``register_builder``, ...; getters ``get_model_class``, ...; a state store ``register/get``).
Deliberate differences from MMF:

* registering a name twice is an error (MMF silently overwrites);
* ``get_*_class`` raises ``KeyError`` listing what is registered and the closest match instead of
  returning ``None`` (``get_*_class(name, none_if_missing=True)`` gives MMF's behaviour);
* the registry stores classes and a few runtime values, never config.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable

# kind -> human name used in messages
KINDS = {
    "model": "model",
    "builder": "dataset builder",
    "processor": "processor",
    "metric": "metric",
    "loss": "loss",
    "optimizer": "optimizer",
    "scheduler": "scheduler",
    "encoder": "encoder",
    "trainer": "trainer",
    "callback": "callback",
    "extractor": "feature extractor",
    "feature_writer": "feature writer",
    "converter": "checkpoint converter",
}


class RegistryError(KeyError):
    """An unknown or duplicate registry name. ``str(e)`` is the full message (KeyError quotes it)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0] if self.args else ""


def closest(name: str, choices) -> str | None:
    matches = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.5)
    return matches[0] if matches else None


def unknown_message(kind: str, name: str, choices) -> str:
    choices = sorted(choices)
    msg = f"unknown {KINDS.get(kind, kind)} '{name}'; registered: {', '.join(choices) or '(none)'}"
    hint = closest(name, choices)
    if hint:
        msg += f". Did you mean '{hint}'?"
    return msg


class Registry:
    def __init__(self) -> None:
        self.mapping: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
        self.mapping["state"] = {}

    # ----------------------------------------------------------------- classes
    def _register(self, kind: str, name: str, obj: Any) -> Any:
        table = self.mapping[kind]
        if name in table and table[name] is not obj:
            raise RegistryError(
                f"{KINDS[kind]} '{name}' is already registered by "
                f"{getattr(table[name], '__module__', '?')}.{getattr(table[name], '__qualname__', table[name])}; "
                "choose another name"
            )
        table[name] = obj
        return obj

    def _decorator(self, kind: str, name: str) -> Callable[[Any], Any]:
        if not isinstance(name, str) or not name:
            raise TypeError(f"register_{kind} needs a non-empty string name, got {name!r}")

        def wrap(obj):
            return self._register(kind, name, obj)

        return wrap

    def get_class(self, kind: str, name: str, none_if_missing: bool = False):
        table = self.mapping[kind]
        if name in table:
            return table[name]
        if none_if_missing:
            return None
        raise RegistryError(unknown_message(kind, name, table))

    def names(self, kind: str) -> list[str]:
        return sorted(self.mapping[kind])

    # MMF decorator names -------------------------------------------------
    def register_model(self, name):
        return self._decorator("model", name)

    def register_builder(self, name):
        return self._decorator("builder", name)

    def register_processor(self, name):
        return self._decorator("processor", name)

    def register_metric(self, name):
        return self._decorator("metric", name)

    def register_loss(self, name):
        return self._decorator("loss", name)

    def register_optimizer(self, name):
        return self._decorator("optimizer", name)

    def register_scheduler(self, name):
        return self._decorator("scheduler", name)

    def register_encoder(self, name):
        return self._decorator("encoder", name)

    def register_trainer(self, name):
        return self._decorator("trainer", name)

    def register_callback(self, name):
        return self._decorator("callback", name)

    # ours ------------------------------------------------------------------
    def register_extractor(self, name):
        return self._decorator("extractor", name)

    def register_feature_writer(self, name):
        return self._decorator("feature_writer", name)

    def register_converter(self, name):
        return self._decorator("converter", name)

    # MMF getter names --------------------------------------------------------
    def get_model_class(self, name, none_if_missing=False):
        return self.get_class("model", name, none_if_missing)

    def get_builder_class(self, name, none_if_missing=False):
        return self.get_class("builder", name, none_if_missing)

    def get_processor_class(self, name, none_if_missing=False):
        return self.get_class("processor", name, none_if_missing)

    def get_metric_class(self, name, none_if_missing=False):
        return self.get_class("metric", name, none_if_missing)

    def get_loss_class(self, name, none_if_missing=False):
        return self.get_class("loss", name, none_if_missing)

    def get_optimizer_class(self, name, none_if_missing=False):
        return self.get_class("optimizer", name, none_if_missing)

    def get_scheduler_class(self, name, none_if_missing=False):
        return self.get_class("scheduler", name, none_if_missing)

    def get_encoder_class(self, name, none_if_missing=False):
        return self.get_class("encoder", name, none_if_missing)

    def get_trainer_class(self, name, none_if_missing=False):
        return self.get_class("trainer", name, none_if_missing)

    def get_callback_class(self, name, none_if_missing=False):
        return self.get_class("callback", name, none_if_missing)

    def get_extractor_class(self, name, none_if_missing=False):
        return self.get_class("extractor", name, none_if_missing)

    def get_feature_writer_class(self, name, none_if_missing=False):
        return self.get_class("feature_writer", name, none_if_missing)

    def get_converter(self, name, none_if_missing=False):
        return self.get_class("converter", name, none_if_missing)

    # ------------------------------------------------------------ runtime state
    def register(self, name: str, obj: Any) -> None:
        """Store a runtime value under a dotted name (MMF: ``registry.register("config", cfg)``)."""
        self.mapping["state"][name] = obj

    def get(self, name: str, default: Any = None, no_warning: bool = True) -> Any:
        return self.mapping["state"].get(name, default)

    def unregister(self, name: str) -> Any:
        return self.mapping["state"].pop(name, None)


registry = Registry()
