"""Sidecar plugins shipped with hvcproxyd (see :mod:`hvcproxyd.core.sidecar`)."""
