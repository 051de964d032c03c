"""A VM's whole config: its settings, its handler instances' types and options,
and the compiled rule table.  This is where the layers below meet: settings
(:mod:`hvcproxyd.config`), plugins (handler types parse their own options),
and the rule compiler (:mod:`hvcproxyd.rules`).

Every problem is collected, not just the first, each naming file:line:column,
the key and what would be valid, so ``hvcproxyd check`` prints them all and a
refused reload says exactly why.  The format is documented in docs/config.md.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..config.diagnostics import ConfigError, Problem, Section, empty_map
from ..config.settings import SETTINGS_KEYS, VmSettings, parse_settings, read_document
from ..config.source import LocList, LocMap, Mark
from ..rules.checks import compile_rules
from ..rules.parse import RuleSpec, parse_rule
from ..rules.table import RuleTable
from ..rules.targets import BUILTIN_ACTIONS, Target
from .handler import Handler, load_handler_class
from .sidecar import load_sidecar_class

TOP_KEYS = (*SETTINGS_KEYS[:5], "handlers", "rules", *SETTINGS_KEYS[5:])


@dataclass(slots=True)
class HandlerSpec:
    """One entry under ``handlers:``: a name, a plugin class and its parsed options."""

    name: str
    type_name: str
    cls: type[Handler]
    options: Any
    timeout_s: float
    mark: Mark

    # -- what the rule checks need (rules.checks.HandlerFacts)
    @property
    def answers_discovery(self) -> bool:
        return self.cls.ANSWERS_DISCOVERY

    @property
    def per_call_warning(self) -> str | None:
        return self.cls.PER_CALL_WARNING

    def provided_versions(self, service: str) -> tuple[str, ...]:
        return self.cls.provided_versions(self.options, service)


@dataclass(slots=True)
class VmConfig(VmSettings):
    """The VM's settings plus what serves its calls."""

    handlers: dict[str, HandlerSpec]
    rules: list[RuleSpec]
    table: RuleTable[Target]
    warnings: list[Problem]


def _parse_handlers(hs: Section | None, default_timeout_ms: int, problems: list[Problem]
                    ) -> tuple[dict[str, HandlerSpec], list[str]]:
    """The valid handler specs, and the names of the handlers that are defined but
    broken (their problems already recorded), so that rules naming them are not
    reported a second time as naming no handler."""
    handlers: dict[str, HandlerSpec] = {}
    broken: list[str] = []  # in the file's order, as the valid names are
    if hs is None:
        return handlers, broken
    for hname in hs.data:
        h = hs.section(hname)
        if h is None:
            continue
        if not isinstance(hname, str) or hname in BUILTIN_ACTIONS:
            hs.problem(str(hname), f"handler names must be strings other than {tuple(BUILTIN_ACTIONS)}",
                       mark=hs.data.key_marks[hname])
            continue
        h.allow_keys(("type", "options", "timeout_ms"))
        htype = h.string("type")
        h_timeout = h.integer("timeout_ms", default=default_timeout_ms, lo=1, hi=600_000)
        broken.append(hname)
        if htype is None:
            continue
        try:
            cls = load_handler_class(htype)
        except LookupError as err:
            h.problem("type", str(err))
            continue
        broken.pop()
        opts_section = h.section("options") or Section(empty_map(h.data.mark), h.path + ".options", problems)
        options = cls.parse_options(opts_section)
        for sidecar_name in cls.SIDECARS:
            try:
                load_sidecar_class(sidecar_name).check(options, opts_section)
            except LookupError as err:
                h.problem("type", f"handler type {htype!r} needs a sidecar that cannot be loaded: {err}")
        handlers[hname] = HandlerSpec(hname, htype, cls, options, h_timeout / 1000, h.data.mark)
    return handlers, broken


def _parse_rules(s: Section, handlers: Collection[str], problems: list[Problem]) -> list[RuleSpec]:
    rules: list[RuleSpec] = []
    raw_rules = s.raw("rules")
    if not isinstance(raw_rules, LocList):
        s.problem("rules", "is required: a list of rules (match, conduit, vcpus, action)", mark=s.mark_of("rules"))
        return rules
    for i, item in enumerate(raw_rules):
        if not isinstance(item, LocMap):
            problems.append(Problem(raw_rules.item_marks[i], f"rules[{i}]", "each rule must be a mapping"))
            continue
        rule = parse_rule(Section(item, f"rules[{i}]", problems), i, handlers)
        if rule is not None:
            rules.append(rule)
    return rules


def _warn_timeouts(settings: VmSettings, handlers: dict[str, HandlerSpec], problems: list[Problem]) -> None:
    vmm_ms = settings.vmm.timeout_ms
    if vmm_ms is None:
        return
    for spec in handlers.values():
        if spec.timeout_s * 1000 >= vmm_ms:
            problems.append(Problem(
                spec.mark, f"handlers.{spec.name}.timeout_ms",
                f"{spec.timeout_s * 1000:.0f} ms is not shorter than vmm.timeout_ms ({vmm_ms} ms): the "
                "VMM gives up on a slow call first and the handler's answer is lost; keep handler timeouts "
                "below the VMM's", warning=True))


def load_config(path: str | os.PathLike[str], *, socket: str | None = None) -> VmConfig:
    """Read, validate and compile one VM's config, or raise ConfigError listing every problem."""
    path = Path(path)
    doc = read_document(path, TOP_KEYS)
    problems: list[Problem] = []
    s = Section(doc, "", problems)
    s.allow_keys(TOP_KEYS)
    settings = parse_settings(s, path, socket)
    handlers, broken = _parse_handlers(s.section("handlers"), round(settings.timeout_s * 1000), problems)
    rules = _parse_rules(s, [*handlers, *broken], problems)
    _warn_timeouts(settings, handlers, problems)
    table = None
    if not any(not p.warning for p in problems):
        table = compile_rules(rules, handlers, settings.versions, problems)
    if table is None or any(not p.warning for p in problems):
        raise ConfigError(problems)
    values = {f.name: getattr(settings, f.name) for f in fields(VmSettings)}
    return VmConfig(**values, handlers=handlers, rules=rules, table=table,
                    warnings=[p for p in problems if p.warning])


__all__ = ["TOP_KEYS", "HandlerSpec", "VmConfig", "load_config"]
