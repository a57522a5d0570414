"""Name -> constructor tables, one per component kind, so a study-file string selects a component."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any


class ConfigError(ValueError):
    """An invalid model or run configuration, worded for the user (names the key and valid values)."""


class Registry:
    """Maps names to constructors for one component kind (encoder, pooling, head, classifier, loss, activation)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._constructors: dict[str, Callable[..., Any]] = {}
        self._requires: dict[str, dict[str, Any]] = {}

    def register(
        self, name: str, requires: dict[str, Any] | None = None
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator; `requires` names other ModelConfig values this component only works with
        (e.g. a margin loss needs classifier="cosine"), checked when a config is validated."""

        def add(constructor: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._constructors:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._constructors[name] = constructor
            self._requires[name] = dict(requires or {})
            return constructor

        return add

    def requirements(self, name: str) -> dict[str, Any]:
        return self._requires.get(name, {})

    def names(self) -> list[str]:
        return sorted(self._constructors)

    def check(self, name: str, key: str) -> None:
        if name not in self._constructors:
            raise ConfigError(f"{key}={name!r} is not a known {self.kind}; valid: {', '.join(self.names())}")

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        self.check(name, self.kind)
        return self._constructors[name](*args, **kwargs)


ENCODERS = Registry("encoder")
POOLINGS = Registry("pooling")
HEADS = Registry("head")
CLASSIFIERS = Registry("classifier")
LOSSES = Registry("loss")
ACTIVATIONS = Registry("activation")
