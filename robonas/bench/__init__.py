"""`robonas bench`: speed figures measured against a baseline in the same run (environment steps
per second, search wall time per worker count)."""
