"""The benchmark scripts of ``bench/`` find their imports as ``make bench`` and
``bench/gpu_check.sh`` run them: ``python bench/NAME.py`` with ``PYTHONSAFEPATH=1`` (needed
beside the repository's ``cuda/``), which leaves the script's own folder off ``sys.path``, so
a script that imports a sibling (``bench_gpu``, ``im2col_baseline``) must put it there itself.
The GPU scripts otherwise run only on a device, where such a failure would cost device time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(path.name for path in BENCH.glob("*.py"))
OPTIONAL = {"pydensecrf"}
"""Packages a script may lack here (``make bench`` installs them where they build)."""


def test_every_benchmark_script_is_checked():
    assert {"bench_gpu.py", "gpu_profile.py", "gpu_tune.py", "bench_cpu.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_script_imports_resolve_under_safe_path(script, tmp_path):
    """Each script's module-level code (its imports) runs from another folder under
    ``PYTHONSAFEPATH=1``; ``main`` is not called (``run_name`` is not ``__main__``)."""
    code = (
        "import runpy, sys\n"
        "try:\n"
        f"    runpy.run_path({str(BENCH / script)!r}, run_name='imported')\n"
        "except ModuleNotFoundError as exc:\n"
        f"    sys.exit(0 if exc.name in {sorted(OPTIONAL)!r} else f'missing module {{exc.name}}')\n"
    )
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_densecrf_benchmark_without_pydensecrf_stops_with_one_line_before_any_work(tmp_path):
    """Run as ``make bench`` would where pydensecrf does not build (its import blocked here,
    installed or not): one line and exit status 1, before minutes of ConvCRF timings."""
    code = (
        "import runpy, sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'pydensecrf':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"sys.argv = [{str(BENCH / 'bench_densecrf.py')!r}, '--count', '1']\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.startswith("bench_densecrf.py: pydensecrf does not import"), result.stderr
    assert result.stderr.count("\n") == 1 and result.stdout == ""
