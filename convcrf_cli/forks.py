"""Whether this process is a child forked after ``import convcrf_cli``.

The package imports this module, so the flag is set in such a child even where the parent
never loaded the module that needs it: :mod:`convcrf_cli.denormals`, which must not use the
forking thread's OpenMP team there (a stale copy on which GNU OpenMP hangs).
"""

from __future__ import annotations

import os

forked = False
"""True in a process forked from one that had imported this module."""


def _after_fork_in_child() -> None:
    global forked
    forked = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
