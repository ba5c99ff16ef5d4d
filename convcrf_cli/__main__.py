"""``python -m convcrf_cli``."""

from convcrf_cli.entry import main

main()
