"""YAML with positions: every mapping and list remembers where its keys and items
were written, so a config error can name file:line:column instead of a path
through the document.  pyyaml keeps the marks only on its node graph; this
loader carries them onto the constructed dicts and lists."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import yaml


@dataclass(frozen=True, slots=True)
class Mark:
    file: str
    line: int  # 1-based
    column: int  # 1-based

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


class LocMap(dict[Any, Any]):
    """A dict that knows where it, each key and each value stood in the file."""

    mark: Mark
    key_marks: dict[Any, Mark]
    value_marks: dict[Any, Mark]


class LocList(list[Any]):
    mark: Mark
    item_marks: list[Mark]


#: The deepest nesting of mappings and lists a config may have.  Real configs
#: stay under ten; the bound keeps construction far from Python's recursion
#: limit (libyaml's own parser stops at 1000 levels, the constructor would not).
MAX_DEPTH = 64


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: Any, first: Mark, again: Mark) -> None:
        super().__init__(f"key {key!r} appears twice (first at line {first.line})")
        self.mark = again


class PlacedError(yaml.YAMLError):
    """A problem the constructor finds at one node (``mark``), in words for the config's author."""

    def __init__(self, message: str, mark: Mark) -> None:
        super().__init__(message)
        self.mark = mark


def _mark(loader: _Loader, node: yaml.Node) -> Mark:
    m = node.start_mark
    return Mark(loader.file_name, m.line + 1, m.column + 1)


#: libyaml's parser when pyyaml was built with it (Debian's and PyPI's wheels are):
#: about ten times faster on a config of thousands of rules, with the same nodes
#: and marks; the pure-Python one otherwise.
_BaseLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
C_PARSER = _BaseLoader is not yaml.SafeLoader


class _Loader(_BaseLoader):  # type: ignore[misc,valid-type]
    file_name = "<config>"
    depth = 0


@contextmanager
def _nested(loader: _Loader, node: yaml.Node) -> Iterator[None]:
    """One more level of mappings/lists; refuse a document nested deeper than MAX_DEPTH."""
    if loader.depth >= MAX_DEPTH:
        raise PlacedError(f"nested more than {MAX_DEPTH} mappings/lists deep; a config never needs that",
                          _mark(loader, node))
    loader.depth += 1
    try:
        yield
    finally:
        loader.depth -= 1


def _construct_mapping(loader: _Loader, node: yaml.Node) -> LocMap:
    if not isinstance(node, yaml.MappingNode):  # !!map on a scalar or a list
        raise PlacedError(f"!!map needs a mapping, not a {_kind(node)}", _mark(loader, node))
    with _nested(loader, node):
        loader.flatten_mapping(node)
        out = LocMap()
        out.mark = _mark(loader, node)
        out.key_marks, out.value_marks = {}, {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise PlacedError(f"keys must be scalars (a name or a number), not a {_kind(key_node)}",
                                  _mark(loader, key_node))
            key = loader.construct_object(key_node, deep=True)
            if key in out:
                raise DuplicateKeyError(key, out.key_marks[key], _mark(loader, key_node))
            out[key] = loader.construct_object(value_node, deep=True)
            out.key_marks[key] = _mark(loader, key_node)
            out.value_marks[key] = _mark(loader, value_node)
        return out


def _construct_sequence(loader: _Loader, node: yaml.Node) -> LocList:
    if not isinstance(node, yaml.SequenceNode):  # !!seq on a scalar or a mapping
        raise PlacedError(f"!!seq needs a list, not a {_kind(node)}", _mark(loader, node))
    with _nested(loader, node):
        out = LocList(loader.construct_object(child, deep=True) for child in node.value)
        out.mark = _mark(loader, node)
        out.item_marks = [_mark(loader, child) for child in node.value]
        return out


def _quoted(text: str) -> str:
    return repr(text) if len(text) <= 40 else repr(text[:35]) + "..."


def _scalar(kind: str, tag: str,
            construct: Callable[[Any, yaml.ScalarNode], Any]) -> Callable[[_Loader, yaml.Node], Any]:
    """pyyaml's constructor for ``kind``, with its failures as a problem at the node.

    The resolver only tags plain scalars that look right, but an explicit tag
    (``!!int ''``, ``!!bool maybe``, ``!!timestamp 2024-13-45``) hands pyyaml's
    constructors any text, and they fail with whatever indexing or parsing raised."""

    def constructor(loader: _Loader, node: yaml.Node) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise PlacedError(f"!!{tag} needs a scalar, not a {_kind(node)}", _mark(loader, node))
        try:
            value = construct(loader, node)
        except (ValueError, IndexError, KeyError, TypeError, AttributeError, OverflowError) as err:
            if isinstance(err, ValueError) and sum(c.isdigit() for c in node.value) > sys.get_int_max_str_digits():
                why = f"{kind} too large (more than {sys.get_int_max_str_digits()} digits)"
            else:
                why = f"{_quoted(node.value)} is not a valid {kind}"
            raise PlacedError(why, _mark(loader, node)) from None
        if isinstance(value, int):
            # A hex int parses at any length (power-of-two bases are not limited) and would
            # then fail to print in decimal in any message about it: refuse it here.
            try:
                str(value)
            except ValueError:
                raise PlacedError(f"{kind} too large (more than {sys.get_int_max_str_digits()} digits)",
                                  _mark(loader, node)) from None
        return value

    return constructor


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "mapping"
    return "list" if isinstance(node, yaml.SequenceNode) else "scalar"


_SC = yaml.constructor.SafeConstructor
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)
for _kind_name, _tag, _method in (("integer", "int", _SC.construct_yaml_int),
                                  ("number", "float", _SC.construct_yaml_float),
                                  ("boolean", "bool", _SC.construct_yaml_bool),
                                  ("date/time", "timestamp", _SC.construct_yaml_timestamp)):
    _Loader.add_constructor(f"tag:yaml.org,2002:{_tag}", _scalar(_kind_name, _tag, _method))


def load(text: str, file_name: str) -> Any:
    """Parse one YAML document; raises yaml.YAMLError (with a problem_mark) on bad syntax."""
    loader = _Loader(text)
    loader.file_name = file_name
    try:
        return loader.get_single_data()
    except RecursionError:
        # The pure-Python composer (pyyaml without libyaml) recurses per level before
        # MAX_DEPTH is checked, and so does a long chain of merge keys (<<): say what
        # it is rather than crash.
        raise yaml.YAMLError(f"nested too deeply (more than {MAX_DEPTH} mappings/lists)") from None
    finally:
        loader.dispose()
