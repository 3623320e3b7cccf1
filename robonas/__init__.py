"""robonas: host side of the policy-architecture search (search, training, scoring, export, fleet)."""

from __future__ import annotations

__version__ = "0.1.0"
