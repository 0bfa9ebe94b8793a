"""Exporting models for simulation engines: ``e2ip.export.to_metatomic(model)`` (what
``e2ip export --format metatomic`` runs; :mod:`e2ip.integrations.metatomic`)."""

from e2ip.integrations.metatomic import to_metatomic

__all__ = ["to_metatomic"]
