"""How the cuda/*.cu kernels run, checked on the CPU in every CI run: the C++ shim built with
ThreadSanitizer (a race between the threads of a block, such as a missing ``__syncthreads()``:
compute-sanitizer's racecheck) and with AddressSanitizer and UndefinedBehaviorSanitizer (an
access outside an input, an output or the block's dynamic shared memory: its memcheck), each
running every kernel once (``cuda_shim/cases.py``); blocks run in reverse order give the same
numbers (no block reads what another block of its launch writes); and every shim launch checks
that the threads of a block reach the same number of ``__syncthreads()`` (its synccheck), which
a planted divergent barrier fails, and that no two array arguments overlap (the kernels'
pointers are ``__restrict__``)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SHIM_CLASS_BLOCK, require_gxx
from cuda_shim.cases import SMALL, run_every_kernel
from cuda_shim.launcher import (
    CUDA_DIR,
    ShimLauncher,
    build_shim,
    sanitizer_environment,
    sanitizer_runtime,
)

from convcrf_cli.backends.cuda_plan import MeanFieldPlan
from convcrf_cli.params import CRFParams

TESTS = Path(__file__).resolve().parent
SANITIZERS = ("thread", "address")


def require_sanitizer(sanitizer: str) -> None:
    """Skip the test where the shim cannot be built with ``sanitizer``."""
    require_gxx()
    if sanitizer_runtime(sanitizer) is None:
        pytest.skip(f"g++ has no {sanitizer} sanitizer runtime: sanitizer check skipped")


def run_cases(library: Path, sanitizer: str) -> subprocess.CompletedProcess:
    """``python -m cuda_shim.cases library`` with the sanitizer's runtime preloaded."""
    env = {**sanitizer_environment(sanitizer), "PYTHONPATH": str(TESTS)}
    command = [sys.executable, "-m", "cuda_shim.cases", str(library)]
    return subprocess.run(command, cwd=TESTS, env=env, capture_output=True, text=True, timeout=600)


def report(result: subprocess.CompletedProcess) -> str:
    return f"exit code {result.returncode}\n{result.stdout}\n{result.stderr[-6000:]}"


@pytest.mark.parametrize(
    ("sanitizer", "load_group"), [*((name, 1) for name in SANITIZERS), ("address", 8)]
)
def test_every_kernel_runs_clean_under_the_sanitizer(sanitizer, load_group, tmp_path):
    # load group 8: 8 classes per thread in the full-resolution passes, partly filled (5),
    # and the staging of the message tiles in groups of 8 values
    require_sanitizer(sanitizer)
    library = build_shim(tmp_path, SHIM_CLASS_BLOCK, sanitizer, load_group=load_group)
    result = run_cases(library, sanitizer)
    assert result.returncode == 0, report(result)
    assert "launches of 13 kernels" in result.stdout, report(result)


# (sanitizer, file, text, replacement, what the sanitizer says): one planted bug per build
PLANTED = [
    # the per-cell message reads its shared tile before every thread has staged it
    ("thread", "message.cu", "    __syncthreads();\n", "", "ThreadSanitizer: data race"),
    # convcrf_final writes one class past the scores
    (
        "address",
        "fullres.cu",
        "if (first + g < num_classes) out[(first + g) * plane] = z[g];",
        "if (first + g < num_classes) out[(first + g + 1) * plane] = z[g];",
        "AddressSanitizer: heap-buffer-overflow",
    ),
]


def planted(tmp_path: Path, name: str, text: str, replacement: str) -> Path:
    """A copy of ``cuda/`` with the first ``text`` of file ``name`` replaced."""
    cuda_dir = tmp_path / "cuda"
    shutil.copytree(CUDA_DIR, cuda_dir)
    source = (cuda_dir / name).read_text()
    assert text in source, f"the planted bug's text is no longer in cuda/{name}"
    (cuda_dir / name).write_text(source.replace(text, replacement, 1))
    return cuda_dir


@pytest.mark.parametrize(("sanitizer", "name", "text", "replacement", "message"), PLANTED)
def test_the_sanitizer_reports_a_planted_bug(sanitizer, name, text, replacement, message, tmp_path):
    require_sanitizer(sanitizer)
    cuda_dir = planted(tmp_path, name, text, replacement)
    result = run_cases(build_shim(tmp_path, SHIM_CLASS_BLOCK, sanitizer, cuda_dir), sanitizer)
    assert result.returncode != 0, report(result)
    assert message in result.stderr, report(result)


def test_a_barrier_that_some_threads_skip_fails_the_launch(tmp_path):
    require_gxx()
    # thread x = 0 of each block skips the per-cell message kernel's barrier
    skip = "    if (threadIdx.x != 0) __syncthreads();\n"
    cuda_dir = planted(tmp_path, "message.cu", "    __syncthreads();\n", skip)
    divergent = ShimLauncher(build_shim(tmp_path, SHIM_CLASS_BLOCK, cuda_dir=cuda_dir))
    with pytest.raises(RuntimeError, match=r"convcrf_message: .* numbers of __syncthreads"):
        run_every_kernel(divergent, divergent.class_block)


def test_blocks_in_reverse_order_give_the_same_numbers(shim):
    in_order = run_every_kernel(shim, shim.class_block)
    shim.reverse_blocks(True)
    try:
        reversed_order = run_every_kernel(shim, shim.class_block)
    finally:
        shim.reverse_blocks(False)
    assert in_order.keys() == reversed_order.keys()
    for name, expected in in_order.items():
        assert np.isfinite(expected).all(), name
        np.testing.assert_array_equal(reversed_order[name], expected, err_msg=name)


def test_overlapping_arguments_fail_the_launch(shim):
    plan = MeanFieldPlan.create((1, 3, 9, 9), (1, 5, 9, 9), CRFParams(blur=3), SMALL)
    feat = np.zeros((1, 5, 3, 3), np.float32)
    pooled = np.zeros((1, 5, 3, 3), np.float32)
    shim(*plan.message_launch(feat, pooled, np.zeros_like(pooled)))
    with pytest.raises(RuntimeError, match="arguments 1 and 2 overlap"):
        shim(*plan.message_launch(feat, pooled, pooled))  # the message written over P
    with pytest.raises(RuntimeError, match="arguments 0 and 1 overlap"):
        shim(*plan.message_launch(feat, feat[:, 2:], pooled))
