"""The exception tree of the host package. The CLI turns any RobonasError into one line and exit 2."""

from __future__ import annotations


class RobonasError(Exception):
    """Base of every error robonas raises on purpose (bad input, missing data, refused export)."""


class ConfigError(RobonasError, ValueError):
    """A configuration value is invalid; the message names the field, the value and what is valid."""


class StoreError(RobonasError):
    """The store cannot do what was asked (unknown study or trial, schema mismatch)."""


class StoreUnavailable(StoreError):
    """The store's server did not answer (connection refused or dropped) within the wait."""


class ClaimLost(StoreError):
    """A worker wrote to a trial it no longer holds: its lease ran out and another took it."""


class EventOrderConflict(StoreError):
    """A numbered event (ask or tell) was not the study's next one: another process wrote first."""
