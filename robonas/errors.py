"""The exception tree of the host package. The CLI turns any RobonasError into one line and exit 2."""

from __future__ import annotations


class RobonasError(Exception):
    """Base of every error robonas raises on purpose (bad input, missing data, refused export)."""


class ConfigError(RobonasError, ValueError):
    """A configuration value is invalid; the message names the field, the value and what is valid."""


class StoreError(RobonasError):
    """The store cannot do what was asked (unknown study or trial, schema mismatch)."""
