"""CPU benchmark: the CPU backend against a plain im2col implementation (`make bench`).

Setting (issue 2, item 7): a 500×375 image (H=375, W=500), C=21 classes, 5 iterations, blur 4,
filter sizes 5, 7 and 11. Both implementations run in the same process on the same random
inputs, in ``--repeat`` rounds that give each implementation one turn of an untimed and a timed
run (so that both see the same machine load and each is timed in steady state), reporting the
median per implementation, kernel weights included.
The im2col baseline (``bench/im2col_baseline.py``) is the original implementation's approach and
materialises the ``C·k²·h·w`` buffer; its output is checked against the backend's first, so
that both compute the same thing. Both run with denormal floats flushed to zero, as the CPU
backend and ``convcrf fit`` do (:mod:`convcrf_cli.denormals`). Inputs: random logits, and the
confident unary of a synthetic scene (``convcrf_cli.synthetic``, as a segmenter's), whose
mean field underflows to denormal numbers; for the latter the backend is also timed without
flushing; and very confident logits (the random ones ×50), whose log-probabilities lie far
below exp's normal float32 range (:mod:`convcrf_cli.underflow`). A second table times a
training step (the mean field forward and backward, as ``convcrf fit`` and the ``ConvCRF``
module run it) against autograd through the same baseline, after checking that both give the
same gradients.

    .venv/bin/python bench/bench_cpu.py [--repeat 7] [--train-repeat 3]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import im2col_baseline  # noqa: E402

from convcrf_cli import meanfield  # noqa: E402
from convcrf_cli.backends.cpu import CPUBackend, mean_field_scores  # noqa: E402
from convcrf_cli.denormals import run_flushing_denormals  # noqa: E402
from convcrf_cli.params import CRFParams  # noqa: E402
from convcrf_cli.synthetic import synthetic_sample  # noqa: E402

HEIGHT, WIDTH, CLASSES, ITERATIONS, BLUR = 375, 500, 21, 5, 4
FILTER_SIZES = (5, 7, 11)


def paired_median_ms(runs, repeat: int) -> list[float]:
    """Median steady-state wall time in milliseconds of each of ``runs``.

    In each of ``repeat`` rounds every run gets one turn: an untimed call, then a timed one, so
    that all see the same machine load and each is timed after a call of its own (as when
    processing a batch), not just after the other's large allocations were returned to the OS.
    """
    times = [[] for _ in runs]
    for _ in range(repeat):
        for run, own in zip(runs, times, strict=True):
            run()
            start = time.perf_counter()
            run()
            own.append(time.perf_counter() - start)
    return [1000.0 * statistics.median(own) for own in times]


def training_step(mean_field, logits: torch.Tensor, kernel: torch.Tensor, params: CRFParams):
    """Gradients ``(d logits, d kernel)`` (NumPy) of ``Σ Q·R`` for a fixed pseudo-random
    ``R``, with ``Q = mean_field(logits, kernel, params)``."""
    logits, kernel = logits.detach().requires_grad_(), kernel.detach().requires_grad_()
    scores = mean_field(logits, kernel, params)
    weights = torch.linspace(-1, 1, scores.numel()).view_as(scores).sin()
    torch.sum(scores * weights).backward()
    return logits.grad.numpy(), kernel.grad.numpy()


def machine_info() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            names = [
                line.split(":", 1)[1].strip() for line in info if line.startswith("model name")
            ]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    load = f", load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    return (
        f"{datetime.date.today()}: {cpu}, {os.cpu_count()} cores{load}; Python "
        f"{platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per measurement")
    parser.add_argument("--train-repeat", type=int, default=3, help="timed training steps")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    random_image = rng.uniform(0, 255, (1, 3, HEIGHT, WIDTH)).astype(np.float32)
    random_logits = rng.normal(0, 2, (1, CLASSES, HEIGHT, WIDTH)).astype(np.float32)
    scene, _, probs = synthetic_sample(0, 0, HEIGHT, WIDTH, CLASSES)
    scene_image = np.ascontiguousarray(scene.transpose(2, 0, 1)[None], dtype=np.float32)
    scene_logits = np.log(np.maximum(probs, 1e-6)).astype(np.float32)[None]
    confident_logits = random_logits * 50
    backend = CPUBackend()

    def baseline(image: np.ndarray, logits: np.ndarray, params: CRFParams) -> np.ndarray:
        def run() -> np.ndarray:
            with torch.no_grad():
                image_t, logits_t = torch.from_numpy(image), torch.from_numpy(logits)
                return im2col_baseline.refine(image_t, logits_t, params).numpy()

        return run_flushing_denormals(run)

    def unflushed(image: np.ndarray, logits: np.ndarray, params: CRFParams) -> np.ndarray:
        """The backend's computation in this thread, where denormals are not flushed."""
        return mean_field_scores(torch.from_numpy(image), torch.from_numpy(logits), params)

    print(machine_info())
    print(
        f"{WIDTH}x{HEIGHT} image, C={CLASSES}, {ITERATIONS} iterations, blur {BLUR}; "
        f"median of {args.repeat} alternating turns (untimed run, timed run)\n"
    )
    print(
        "| input | filter size | CPU backend (ms) | im2col baseline (ms) | speed-up "
        "| backend, denormals not flushed (ms) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, image, logits in (
        ("random logits", random_image, random_logits),
        ("synthetic scene", scene_image, scene_logits),
        ("confident logits (×50)", random_image, confident_logits),
    ):
        for k in FILTER_SIZES:
            params = CRFParams(filter_size=k, blur=BLUR, iterations=ITERATIONS)
            ours, theirs = backend.run(image, logits, params), baseline(image, logits, params)
            np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4 * np.abs(theirs).max())
            runs = [
                lambda p=params, i=image, lg=logits: backend.run(i, lg, p),
                lambda p=params, i=image, lg=logits: baseline(i, lg, p),
            ]
            if name == "synthetic scene":
                runs.append(lambda p=params, i=image, lg=logits: unflushed(i, lg, p))
            times = paired_median_ms(runs, args.repeat)
            plain = f"{times[2]:.1f}" if len(times) > 2 else "-"
            print(
                f"| {name} | {k} | {times[0]:.1f} | {times[1]:.1f} | {times[1] / times[0]:.1f}x "
                f"| {plain} |",
                flush=True,
            )

    image_t, logits_t = torch.from_numpy(random_image), torch.from_numpy(random_logits)
    print(
        "\nTraining step: mean field forward + backward (gradients of the logits and the kernel "
        "under a fixed linear loss), the hand-written backward against autograd through the "
        f"im2col baseline; median of {args.train_repeat} turns\n"
    )
    print("| filter size | ours (ms) | im2col + autograd (ms) | speed-up |")
    print("|---:|---:|---:|---:|")
    for k in FILTER_SIZES:
        params = CRFParams(filter_size=k, blur=BLUR, iterations=ITERATIONS)
        with torch.no_grad():
            kernel = meanfield.crf_kernel(image_t, params)
        ours_grads = run_flushing_denormals(
            training_step, meanfield.mean_field, logits_t, kernel, params
        )
        theirs_grads = run_flushing_denormals(
            training_step, im2col_baseline.mean_field, logits_t, kernel, params
        )
        for got, want in zip(ours_grads, theirs_grads, strict=True):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
        ours_ms, theirs_ms = paired_median_ms(
            [
                lambda p=params, kern=kernel: run_flushing_denormals(
                    training_step, meanfield.mean_field, logits_t, kern, p
                ),
                lambda p=params, kern=kernel: run_flushing_denormals(
                    training_step, im2col_baseline.mean_field, logits_t, kern, p
                ),
            ],
            args.train_repeat,
        )
        print(f"| {k} | {ours_ms:.0f} | {theirs_ms:.0f} | {theirs_ms / ours_ms:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
