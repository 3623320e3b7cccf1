"""robonas: host side of the policy-architecture search (search, training, scoring, export, fleet).

The host side needs Python 3.11 or newer; a robot needs only device_agents (`robonas-agent`) and
may run 3.9. The `robonas` command says so in one line (robonas.cli.main): importing this package
does not raise, so that check can run on a robot's older Python.
"""

from __future__ import annotations

__version__ = "0.1.0"
