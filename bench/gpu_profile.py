"""Where the CUDA backend's time goes (a GPU diagnostic, run by `bench/gpu_check.sh`).

For 500×375 C=21 blur 4 k=7 and 2048×2048 C=21 blur 1 k=7 it prints: the GPU time of each
kernel (20 back-to-back launches between CUDA events), the host time to issue one inference,
the event-timed inference as `bench_gpu.py` measures it, the same captured in a CUDA graph and
replayed (GPU time without launch gaps), and a sweep of launch configurations (graph-timed).

    python3 bench/gpu_profile.py
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
import sys
import time
from pathlib import Path

import cupy
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also under PYTHONSAFEPATH=1

from bench_gpu import time_gpu_ms  # noqa: E402

from convcrf_cli.backends import cuda, cuda_plan  # noqa: E402
from convcrf_cli.params import CRFParams  # noqa: E402

CASES = [("500x375 blur 4 k=7", 375, 500, 4, 7), ("2048x2048 blur 1 k=7", 2048, 2048, 1, 7)]
CLASSES, FEATURES = 21, 3
CELL_BLOCKS = ((16, 16), (32, 8), (32, 4), (16, 8), (8, 8))
POOLS = ((256, 1024), (128, 512), (256, 512), (512, 2048))
"""The sweep: per-cell message blocks × (pool threads, pooling box pixels)."""
HOST_RUNS = 30
"""Inferences whose host time (to issue the launches) gives the median."""


class RecordingLauncher:
    """Launches through a module and remembers every launch (name, grid, block, args, shm)."""

    def __init__(self, module) -> None:
        self.launch = cuda._CuPyLauncher(module)
        self.calls: list[tuple] = []

    def __call__(self, name, grid, block, args, shared_mem) -> None:
        self.calls.append((name, grid, block, args, shared_mem))
        self.launch(name, grid, block, args, shared_mem)


def graph_ms(run) -> float:
    """GPU time of ``run()`` captured as a CUDA graph and replayed."""
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        run()  # buffers cached in the pool before capture
        stream.synchronize()
        stream.begin_capture()
        run()
        graph = stream.end_capture()
        return time_gpu_ms(lambda: graph.launch(stream), 30, 3, 10)


def profile(label: str, height: int, width: int, blur: int, k: int) -> None:
    rng = np.random.default_rng(0)
    image = cupy.asarray(rng.uniform(0, 255, (1, FEATURES, height, width)), dtype=cupy.float32)
    logits = cupy.asarray(rng.normal(0, 2, (1, CLASSES, height, width)), dtype=cupy.float32)
    scores = cupy.empty_like(logits)
    params = CRFParams(filter_size=k, blur=blur, iterations=5)
    base = cuda.CUDABackend(0).launch_config()

    def runner(config: cuda_plan.LaunchConfig):
        plan = cuda_plan.MeanFieldPlan.create(image.shape, logits.shape, params, config)
        launcher = RecordingLauncher(cuda._compiled_module(0, *plan.module))
        return (
            plan,
            launcher,
            lambda: cuda_plan.run_plan(plan, image, logits, scores, launcher, cupy.empty),
        )

    plan, launcher, run = runner(base)
    run()
    cupy.cuda.Device().synchronize()
    print(
        f"\n## {label}: class_block {plan.class_block}, pool_tile {plan.pool_tile}, "
        f"chunk_classes {plan.chunk_classes}, message_shared {plan.message_shared} B"
    )
    print("| kernel | launches per inference | GPU ms per launch |")
    print("|---|---:|---:|")
    seen: dict[str, int] = {}
    for name, *_ in launcher.calls:
        seen[name] = seen.get(name, 0) + 1
    for name, count in seen.items():
        call = next(c for c in launcher.calls if c[0] == name)
        ms = time_gpu_ms(lambda call=call: launcher.launch(*call), 30, 3, 20)
        print(f"| {name} | {count} | {ms:.4f} |")
    host = []
    for _ in range(HOST_RUNS):
        cupy.cuda.Device().synchronize()
        start = time.perf_counter()
        run()
        host.append(1000 * (time.perf_counter() - start))
    print(
        f"\nhost time to issue one inference: {statistics.median(host):.3f} ms; "
        f"event-timed inference {time_gpu_ms(run, 30, 3):.3f} ms; CUDA graph replay "
        f"{graph_ms(run):.3f} ms"
    )

    print("\n| cell_block | pixel_block | pool_threads | pool_box_pixels | graph ms |")
    print("|---|---|---:|---:|---:|")
    for cell, (pool_threads, box) in itertools.product(CELL_BLOCKS, POOLS):
        config = dataclasses.replace(
            base, cell_block=cell, pool_threads=pool_threads, pool_box_pixels=box
        )
        try:
            _, _, run = runner(config)
            ms = graph_ms(run)
        except Exception as exc:  # a configuration the device refuses
            print(f"| {cell} | {config.pixel_block} | {pool_threads} | {box} | {exc} |")
            continue
        print(f"| {cell} | {config.pixel_block} | {pool_threads} | {box} | {ms:.4f} |")


def main() -> None:
    print(f"device: {cuda.CUDABackend(0).describe()}")
    for case in CASES:
        profile(*case)


if __name__ == "__main__":
    main()
