"""The exception tree of the sim package: every deliberate error is a SimError.

SimError subclasses ValueError because every case is a bad value passed in by the caller
(unknown env id, unknown profile, inverted randomisation range); the message names the bad
value and the valid choices.
"""

from __future__ import annotations


class SimError(ValueError):
    """A bad value was given to sim; the message names it and what would be valid."""
