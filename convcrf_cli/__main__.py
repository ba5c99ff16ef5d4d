"""``python -m convcrf_cli``."""

from convcrf_cli.cli import main

main(prog_name="convcrf")
