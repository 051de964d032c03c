"""Reading a VM's config: YAML with positions (:mod:`.source`), diagnostics and
typed sections every handler uses for its options (:mod:`.diagnostics`), and
the VM's own settings (:mod:`.settings`)."""

from .diagnostics import ConfigError, Problem, Section
from .settings import DEFAULT_RUNTIME_DIR, MetricsConfig, VmmAuth, VmSettings
from .source import Mark

__all__ = ["DEFAULT_RUNTIME_DIR", "ConfigError", "Mark", "MetricsConfig", "Problem", "Section", "VmSettings",
           "VmmAuth"]
