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


def _dotted(text: str) -> bool:
    return all(part.isidentifier() for part in text.split("."))


def load_plugin(group: str, name: str, base: type[T], what: str) -> type[T]:
    """The class ``name`` names; raises LookupError saying why not and what is installed."""
    ep = next((e for e in entry_points(group=group) if e.name == name), None)
    if ep is None and ":" not in name:
        raise LookupError(f"no {what} {name!r}; installed: {', '.join(installed(group)) or 'none'} "
                          "(or package.module:Class)")
    if ep is None:
        module_name, _, attr = name.partition(":")
        if not (_dotted(module_name) and _dotted(attr)):
            # Checked up front: importlib raises ValueError for an empty name and
            # TypeError for a relative one (".:X"), not ImportError.
            raise LookupError(f"{what} {name!r} is not package.module:Class (dotted Python names either side "
                              "of one colon)")
    try:
        if ep is not None:
            obj = ep.load()
        else:
            obj = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError, TypeError) as err:
        raise LookupError(f"cannot load {what} {name!r}: {err}") from err
    except Exception as err:
        # Importing runs the plugin module's own code, which may raise anything: that is
        # the plugin's failure, reported against the config line that names it.
        raise LookupError(f"cannot load {what} {name!r}: importing it raised {type(err).__name__}: {err}") from err
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise LookupError(f"{name} is not a {base.__qualname__} subclass")
    return obj
