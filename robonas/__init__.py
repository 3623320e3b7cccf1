"""robonas: host side of the policy-architecture search (search, training, scoring, export, fleet)."""

from __future__ import annotations

import sys

__version__ = "0.1.0"

if sys.version_info < (3, 11):  # noqa: UP036  (the robot side installs on 3.9; say why the host does not)
    raise ImportError(
        f"robonas (the host side) needs Python 3.11 or newer, this is {sys.version.split()[0]}; "
        "a robot needs only device_agents (`robonas-agent`)"
    )
