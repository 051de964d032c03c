"""YAML with positions: every mapping and list remembers where its keys and items
were written, so a config error can name file:line:column instead of a path
through the document.  pyyaml keeps the marks only on its node graph; this
loader carries them onto the constructed dicts and lists."""

from __future__ import annotations

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


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: Any, first: Mark, again: Mark) -> None:
        super().__init__(f"key {key!r} appears twice (first at line {first.line})")
        self.mark = again


def _mark(loader: _Loader, node: yaml.Node) -> Mark:
    m = node.start_mark
    return Mark(loader.file_name, m.line + 1, m.column + 1)


#: libyaml's parser when pyyaml was built with it (Debian's and PyPI's wheels are):
#: about ten times faster on a config of thousands of rules, with the same nodes
#: and marks; the pure-Python one otherwise.
_BaseLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_BaseLoader):  # type: ignore[misc,valid-type]
    file_name = "<config>"


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> LocMap:
    loader.flatten_mapping(node)
    out = LocMap()
    out.mark = _mark(loader, node)
    out.key_marks, out.value_marks = {}, {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in out:
            raise DuplicateKeyError(key, out.key_marks[key], _mark(loader, key_node))
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_marks[key] = _mark(loader, key_node)
        out.value_marks[key] = _mark(loader, value_node)
    return out


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> LocList:
    out = LocList(loader.construct_object(child, deep=True) for child in node.value)
    out.mark = _mark(loader, node)
    out.item_marks = [_mark(loader, child) for child in node.value]
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def load(text: str, file_name: str) -> Any:
    """Parse one YAML document; raises yaml.YAMLError (with a problem_mark) on bad syntax."""
    loader = _Loader(text)
    loader.file_name = file_name
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
