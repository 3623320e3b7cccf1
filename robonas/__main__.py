"""`python -m robonas`: the same as the `robonas` command."""

from robonas.cli import main

main()
