"""The method registry: a dict of names to specs, filled by the @register decorator."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from methods.config import ReductionConfig
from methods.errors import TokenBenchError

ApplyFn = Callable[[nn.Module, Any], None]


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: how to build its configuration and how to patch a model with it."""

    name: str
    config_cls: type[ReductionConfig]
    patch: ApplyFn
    summary: str

    def make_config(self, **options: Any) -> ReductionConfig:
        known = [f.name for f in dataclasses.fields(self.config_cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise TokenBenchError(
                f"method '{self.name}' has no option {', '.join(map(repr, unknown))}; its options are: "
                + ", ".join(known)
            )
        return self.config_cls(**options)

    def defaults(self) -> dict[str, Any]:
        """Each option with its default value, in declaration order."""
        return {f.name: f.default for f in dataclasses.fields(self.config_cls)}

    def option_docs(self) -> dict[str, str]:
        """What the method's own configuration says of each of its options, from the `name: text`
        paragraphs of its docstring (the options of ReductionConfig it leaves as they are: none)."""
        docs: dict[str, str] = {}
        body = inspect.cleandoc(self.config_cls.__doc__ or "").partition("\n\n")[2]
        option = None
        for line in body.splitlines():
            name, colon, text = line.partition(":")
            if colon and name in self.defaults():
                option, docs[name] = name, text.strip()
            elif option is not None and line.startswith(" "):
                docs[option] += " " + line.strip()
        return docs


_REGISTRY: dict[str, MethodSpec] = {}


def register(name: str, config: type[ReductionConfig]) -> Callable[[ApplyFn], ApplyFn]:
    """Register `patch(model, config)` under `name`; its docstring's first line is the summary."""

    def decorator(patch: ApplyFn) -> ApplyFn:
        if name in _REGISTRY:
            raise ValueError(f"method '{name}' is registered twice")
        summary = (patch.__doc__ or "").strip().splitlines()[0] if patch.__doc__ else ""
        _REGISTRY[name] = MethodSpec(name=name, config_cls=config, patch=patch, summary=summary)
        return patch

    return decorator


def list_methods() -> list[str]:
    """Names of the registered methods, sorted."""
    return sorted(_REGISTRY)


def lookup(name: str) -> MethodSpec:
    """The spec registered under `name`; an unknown name raises with the list of known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise TokenBenchError(f"unknown method {name!r}; known methods: {', '.join(list_methods())}") from None
