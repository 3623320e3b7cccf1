"""`python -m device_agents ...` is `robonas-agent ...` (works from a copied tree with PYTHONPATH=.)."""

from __future__ import annotations

import sys

from device_agents.cli import main

if __name__ == "__main__":
    sys.exit(main())
