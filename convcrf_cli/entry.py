"""The ``convcrf`` command's entry point (``python -m convcrf_cli`` too).

Ctrl-C stops a command once: the first SIGINT raises ``KeyboardInterrupt``, which the commands
report as ``convcrf: error: interrupted`` with exit status 130, and later ones are ignored
while the command stops (a second Ctrl-C broke the shutdown of a batch's worker threads and
aborted the process). A Ctrl-C while the commands' modules (torch) are still being imported
gives the same line and status instead of a traceback.
"""

from __future__ import annotations

import signal
import sys
from typing import NoReturn


def main() -> None:
    """Run the ``convcrf`` command group on ``sys.argv``."""
    signal.signal(signal.SIGINT, interrupt_once)
    try:
        from convcrf_cli.cli import main as command_group
    except KeyboardInterrupt:
        _interrupted()
    command_group(prog_name="convcrf")


def interrupt_once(signum: int, frame: object) -> None:
    """The SIGINT handler: ignore further SIGINTs, then raise ``KeyboardInterrupt``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def _interrupted() -> NoReturn:
    sys.stderr.write("convcrf: error: interrupted\n")
    sys.exit(130)
