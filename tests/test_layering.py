"""Import direction: the library imports the backends, never the other way round.

The backend modules run kernels; the mean-field computation that composes kernel launches with
torch operations (:mod:`convcrf_cli.fused_meanfield`, :mod:`convcrf_cli.phases`) is library
code. The imports are read from the sources with :mod:`ast` (function-level imports included),
so nothing is imported to check them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

BACKENDS = Path(__file__).resolve().parents[1] / "convcrf_cli" / "backends"

BACKEND_MAY_IMPORT = (
    "convcrf_cli.backends",
    "convcrf_cli.params",  # the parameters' data class
    "convcrf_cli.grid",  # coarse-grid sizes
    "convcrf_cli.atomic",  # the tuning cache's file writes
)
"""The ``convcrf_cli`` modules a backend module may import (and what they hold)."""
CPU_BACKEND_MAY_IMPORT = ("convcrf_cli.meanfield", "convcrf_cli.denormals")
"""What the CPU backend imports besides: its kernels are the PyTorch implementation itself."""


def imported_names(source: str, package: str) -> set[str]:
    """Every ``convcrf_cli`` name a module of ``package`` with this source imports, anywhere
    in it, dotted: ``import a.b`` gives ``a.b``, ``from a import b`` gives ``a.b`` (so ``from
    convcrf_cli import phases`` is ``convcrf_cli.phases``); relative imports are resolved."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0]
                base = f"{parent}.{base}" if base else parent
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] == "convcrf_cli"}


def disallowed(names: set[str], allowed: tuple[str, ...]) -> list[str]:
    """The names that are none of ``allowed`` nor inside one of them."""
    return sorted(n for n in names if not any(n == a or n.startswith(a + ".") for a in allowed))


@pytest.mark.parametrize("path", sorted(BACKENDS.glob("*.py")), ids=lambda p: p.name)
def test_backends_import_no_library_computation(path):
    allowed = BACKEND_MAY_IMPORT + (CPU_BACKEND_MAY_IMPORT if path.name == "cpu.py" else ())
    wrong = disallowed(imported_names(path.read_text(), "convcrf_cli.backends"), allowed)
    assert not wrong, f"backends/{path.name} imports {wrong}"


def test_every_form_of_import_is_seen():
    source = (
        "import convcrf_cli.phases\n"
        "from convcrf_cli import meanfield\n"
        "from convcrf_cli.window import window_sum\n"
        "from . import cuda_plan\n"
        "from ..grid import coarse_size\n"
        "def f():\n"
        "    from convcrf_cli.fused_meanfield import mean_field\n"
    )
    names = imported_names(source, "convcrf_cli.backends")
    assert disallowed(names, BACKEND_MAY_IMPORT) == [
        "convcrf_cli.fused_meanfield.mean_field",
        "convcrf_cli.meanfield",
        "convcrf_cli.phases",
        "convcrf_cli.window.window_sum",
    ]
    assert {"convcrf_cli.backends.cuda_plan", "convcrf_cli.grid.coarse_size"} <= names
