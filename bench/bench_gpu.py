"""GPU benchmark of the CUDA backend (issue 3 item 5); prints a markdown table.

5-iteration inference on device-resident inputs, timed with CUDA events: warm-up, then the
median of many runs. "ours" is the backend as `refine` calls it (CuPy arrays in, a new scores
array out, the plan looked up in its cache), with the launch variant it chose by timing them
in the warm-up ("plan"; `convcrf_cli/backends/cuda_tune.py`); "launches" issues that plan's
kernels alone (`run_plan` with a plan and buffers of its own). At 500×375 both measure the
host's launch rate as much as the GPU.
Compared with a PyTorch im2col ConvCRF (the original implementation's method: materialise the
C·k²·h·w unfolded buffer) on the same GPU, and with the bandwidth floor: the bytes any
implementation must move over the measured device-copy bandwidth.
A second table times the whole inference (the kernels alone, as "launches") with the message
kernels and the fused iterations (`LaunchConfig.fuse_message`) the backend does not choose by
default, against its default, with the largest difference of their scores. A third times one
launch of each message kernel (one thread per cell, window rows split
over threads, register-tiled; the backend picks "tiled" from two blocks per multiprocessor, else
"per-cell") on the same inputs, and gives the largest difference of their messages from the
per-cell kernel's.

Run on a machine with CuPy and a CUDA device:  python bench/bench_gpu.py [--repeats 50]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import sys
import tempfile
from pathlib import Path

import cupy
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import im2col_baseline  # noqa: E402

from convcrf_cli.backends import cuda, cuda_plan, cuda_tune  # noqa: E402
from convcrf_cli.grid import coarse_size  # noqa: E402
from convcrf_cli.params import CRFParams  # noqa: E402

# (label, height, width, classes, blur, filter_size)
CASES = [
    ("500x375 C=21 blur 4 k=5", 375, 500, 21, 4, 5),
    ("500x375 C=21 blur 4 k=7", 375, 500, 21, 4, 7),
    ("500x375 C=21 blur 4 k=11", 375, 500, 21, 4, 11),
    ("500x375 C=21 blur 4 k=13", 375, 500, 21, 4, 13),
    ("2048x2048 C=21 blur 1 k=7", 2048, 2048, 21, 1, 7),
]
FEATURES = 3


def time_gpu_ms(fn, repeats: int, warmup: int = 5, inner: int = 1) -> float:
    """Median milliseconds of ``fn()`` between CUDA events on the current stream (each sample
    times ``inner`` back-to-back calls and divides)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        for _ in range(inner):
            fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop) / inner)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read and written."""
    src = cupy.ones(1 << 28, dtype=cupy.float32)  # 1 GiB
    dst = cupy.empty_like(src)
    ms = time_gpu_ms(lambda: cupy.copyto(dst, src), repeats=20)
    return 2 * src.nbytes / (ms * 1e-3)


def floor_bytes(height: int, width: int, classes: int, params: CRFParams) -> int:
    """Bytes any implementation moves: the image once, the logits every iteration, the coarse
    Q written and read between iterations, the scores written once (float32)."""
    h, w = coarse_size(height, params.blur), coarse_size(width, params.blur)
    its = params.iterations
    floats = FEATURES * height * width + its * classes * height * width
    floats += 2 * (its - 1) * classes * h * w + classes * height * width
    return 4 * floats


def message_kernels_ms(image, logits, params: CRFParams, config) -> dict[str, tuple]:
    """GPU ms of one message launch and the message, per kernel of cuda_plan.MESSAGE_KERNELS, on
    the same inputs: coarse features like the image's (positions, random colours), a random Q."""
    n, f = image.shape[:2]
    h, w = coarse_size(image.shape[2], params.blur), coarse_size(image.shape[3], params.blur)
    rng = cupy.random.default_rng(1)
    rows, cols = cupy.mgrid[0:h, 0:w].astype(cupy.float32) * params.blur / params.pos_sdims
    colours = rng.random((f, h, w), dtype=cupy.float32) * 255 / params.col_schan
    feat = cupy.concatenate([rows[None], cols[None], colours])[None]
    feat = cupy.ascontiguousarray(cupy.broadcast_to(feat, (n, 2 + f, h, w)))
    pooled = rng.random((n, logits.shape[1], h, w), dtype=cupy.float32)
    results = {}
    for name in cuda_plan.MESSAGE_KERNELS:
        variant = dataclasses.replace(config, message_kernel=name)
        plan = cuda_plan.MeanFieldPlan.create(image.shape, logits.shape, params, variant)
        if plan.message_kernel != name:
            continue  # the kernel does not fit this case
        launcher = cuda.plan_launcher(0, plan)
        message = cupy.full(pooled.shape, cupy.nan, cupy.float32)
        launch = functools.partial(launcher, *plan.message_launch(feat, pooled, message))
        results[name] = (time_gpu_ms(launch, 30, 3, 20), message)
    return results


def inference_variants_ms(image, logits, params: CRFParams, config, repeats: int) -> dict:
    """``{variant: (ms, scores)}``: the kernels of one inference, timed like "launches", with
    the default configuration and the others worth comparing where they apply."""
    variants = {
        "default": config,
        "split message": dataclasses.replace(config, message_kernel="split"),
        "tiled message": dataclasses.replace(config, message_kernel="tiled"),
        "fused iterations": dataclasses.replace(config, fuse_message=True),
    }
    results = {}
    for name, variant in variants.items():
        plan = cuda_plan.MeanFieldPlan.create(image.shape, logits.shape, params, variant)
        if name == "fused iterations" and not plan.fused:
            continue
        scores = cupy.empty_like(logits)
        launcher = cuda.plan_launcher(0, plan)
        run = functools.partial(
            cuda_plan.run_plan, plan, image, logits, scores, launcher, cupy.empty
        )
        results[name] = (time_gpu_ms(run, repeats), scores)
    return results


def print_against(rows: list, reference: str, columns: tuple[str, str, str], digits: int) -> None:
    """A markdown table of ``rows`` ``[(case, {name: (ms, array)})]``: each name's time, the
    ratio of ``reference``'s time to it and the largest difference of its array from
    ``reference``'s; ``columns`` names the name, time and difference columns."""
    name_column, time_column, diff_column = columns
    print(f"\n| case | {name_column} | {time_column} | {reference} / this | {diff_column} |")
    print("|---|---|---|---|---|")
    for label, results in rows:
        reference_ms, expected = results[reference]
        for name, (ms, array) in results.items():
            diff = float(cupy.abs(array - expected).max())
            print(f"| {label} | {name} | {ms:.{digits}f} | {reference_ms / ms:.2f}x | {diff:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--no-baseline", action="store_true", help="skip the im2col baseline")
    args = parser.parse_args()

    # a cache of its own: the launch variants are timed in this run, not read from an earlier one
    os.environ["CONVCRF_CACHE_DIR"] = tempfile.mkdtemp(prefix="convcrf-bench-")
    backend = cuda.CUDABackend(0)
    bandwidth = copy_bandwidth()
    print(f"device: {backend.describe()}; copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    print(f"torch {torch.__version__}; median of {args.repeats} runs after warm-up, CUDA events\n")
    print(
        "| case | plan | ours (ms) | launches (ms) | im2col torch (ms) | speed-up | floor (ms) "
        "| ours / floor |"
    )
    print("|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    config = backend.launch_config()
    message_rows, variant_rows = [], []
    for label, height, width, classes, blur, k in CASES:
        params = CRFParams(filter_size=k, blur=blur, iterations=5)
        image = cupy.asarray(rng.uniform(0, 255, (1, FEATURES, height, width)), dtype=cupy.float32)
        logits = cupy.asarray(rng.normal(0, 2, (1, classes, height, width)), dtype=cupy.float32)
        ours = time_gpu_ms(functools.partial(backend.run, image, logits, params), args.repeats)
        chosen = backend.tunings[-1].chosen  # tuned in the warm-up of "ours"
        tuned = cuda_tune.variant_config(config, chosen)
        plan = cuda_plan.MeanFieldPlan.create(image.shape, logits.shape, params, tuned)
        launcher = cuda.plan_launcher(0, plan)
        scores = cupy.empty_like(logits)
        run = functools.partial(
            cuda_plan.run_plan, plan, image, logits, scores, launcher, cupy.empty
        )
        launches = time_gpu_ms(run, args.repeats)
        baseline = float("nan")
        if not args.no_baseline:
            tensors = (torch.from_dlpack(image), torch.from_dlpack(logits), params)
            try:
                with torch.no_grad():
                    baseline_run = functools.partial(im2col_baseline.refine, *tensors)
                    baseline = time_gpu_ms(baseline_run, max(5, args.repeats // 5))
            except torch.OutOfMemoryError:
                baseline = float("nan")
            torch.cuda.empty_cache()
        floor = floor_bytes(height, width, classes, params) / bandwidth * 1e3
        print(
            f"| {label} | {chosen} | {ours:.3f} | {launches:.3f} | {baseline:.2f} | "
            f"{baseline / ours:.0f}x | {floor:.3f} | {ours / floor:.1f}x |"
        )
        message_rows.append((label, message_kernels_ms(image, logits, params, config)))
        variant_rows.append((label, inference_variants_ms(image, logits, params, config, 20)))

    print("\nThe backend's choice of launch plan, timed in each case's warm-up:")
    for tuning in backend.tunings:
        print(f"- {tuning.describe()}")
    print_against(variant_rows, "default", ("variant", "launches (ms)", "max diff of scores"), 3)
    print_against(message_rows, "per-cell", ("message kernel", "GPU ms per launch", "max diff"), 4)


if __name__ == "__main__":
    main()
