"""The exception tree of the device package."""

from __future__ import annotations


class DeviceError(Exception):
    """Base of every error the agent raises on purpose."""


class ModelError(DeviceError):
    """A model file cannot be loaded or run (not TFLite, truncated, wrong shapes)."""
