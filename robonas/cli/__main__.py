"""`python -m robonas.cli`: the same as the `robonas` script."""

from robonas.cli import main

main()
