"""Loading plugin classes: by entry-point name, or ``package.module:Class`` for
one that is not packaged yet.  Handler types and memshare subscribers both
load this way, so a plugin author learns one rule."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import TypeVar

T = TypeVar("T")


def installed(group: str) -> list[str]:
    return sorted(ep.name for ep in entry_points(group=group))


def load_plugin(group: str, name: str, base: type[T], what: str) -> type[T]:
    """The class ``name`` names; raises LookupError saying why not and what is installed."""
    ep = next((e for e in entry_points(group=group) if e.name == name), None)
    try:
        if ep is not None:
            obj = ep.load()
        elif ":" in name:
            module_name, _, attr = name.partition(":")
            obj = getattr(importlib.import_module(module_name), attr)
        else:
            raise LookupError(f"no {what} {name!r}; installed: {', '.join(installed(group)) or 'none'} "
                              "(or package.module:Class)")
    except (ImportError, AttributeError) as err:
        raise LookupError(f"cannot load {what} {name!r}: {err}") from err
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise LookupError(f"{name} is not a {base.__qualname__} subclass")
    return obj
