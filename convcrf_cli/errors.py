"""Error types with exit statuses: 2 for bad usage or input, 1 for a runtime failure."""

from __future__ import annotations

from pathlib import Path

OUT_OF_MEMORY_ADVICE = "try a larger --blur or a smaller image"
"""What to do when the CRF runs out of memory."""


class ConvCRFError(Exception):
    """Base of the errors the CLI reports as one line; ``exit_code`` is the process status."""

    exit_code = 1


class BadInputError(ConvCRFError):
    """An input file or argument is missing, unreadable or invalid (exit status 2)."""

    exit_code = 2

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(problem if path is None else f"{path}: {problem}")


class RuntimeFailure(ConvCRFError):
    """Inputs were valid but the computation or output failed (exit status 1)."""

    exit_code = 1
