"""Launch-configuration sweep of the CUDA kernels (a GPU diagnostic for choosing defaults).

Each message kernel depends only on its block shape (per-cell: ``cell_block``, split:
``split_cells``, tiled: ``message_threads``) and the classes per chunk; the init, step and
final passes only on the pool block and the load group (values loaded at once). Each is
timed alone (GPU ms per launch, 20 back-to-back launches between CUDA events, median of 15) for
500×375 C=21 blur 4, k ∈ {5,7,11,13}, and for 2048×2048 C=21 blur 1 k=7.

    python3 bench/gpu_tune.py
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
from pathlib import Path

import cupy
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also under PYTHONSAFEPATH=1

from bench_gpu import time_gpu_ms  # noqa: E402
from gpu_profile import RecordingLauncher  # noqa: E402

from convcrf_cli.backends import cuda, cuda_plan  # noqa: E402
from convcrf_cli.params import CRFParams  # noqa: E402

CASES = [(375, 500, 4, 5), (375, 500, 4, 7), (375, 500, 4, 11), (375, 500, 4, 13)]
CASES += [(2048, 2048, 1, 7)]
CLASSES, FEATURES = 21, 3
MESSAGE_BLOCKS = {
    "per-cell": ("cell_block", ((16, 16), (16, 8), (32, 4), (8, 8))),
    "split": ("split_cells", ((8, 8), (8, 4), (16, 4), (4, 4))),
    "tiled": ("message_threads", ((8, 8), (8, 16), (8, 4), (16, 8), (4, 16))),
}
CLASS_BLOCKS = (21, 11, 7, 4)
POOLS = ((256, 1024), (256, 512), (128, 512), (128, 256), (64, 256), (64, 128), (256, 256))


def kernel_times(image, logits, params, config, class_block=None) -> dict[str, float]:
    plan = cuda_plan.MeanFieldPlan.create(image.shape, logits.shape, params, config, class_block)
    launcher = RecordingLauncher(cuda._compiled_module(0, *plan.module))
    scores = cupy.empty_like(logits)
    cuda_plan.run_plan(plan, image, logits, scores, launcher, cupy.empty)
    times = {}
    for call in launcher.calls:
        if call[0] not in times:
            times[call[0]] = time_gpu_ms(lambda call=call: launcher.launch(*call), 15, 2, 20)
    return times


def main() -> None:
    base = cuda.CUDABackend(0).launch_config()
    rng = np.random.default_rng(0)
    for height, width, blur, k in CASES:
        image = cupy.asarray(rng.uniform(0, 255, (1, FEATURES, height, width)), cupy.float32)
        logits = cupy.asarray(rng.normal(0, 2, (1, CLASSES, height, width)), cupy.float32)
        params = CRFParams(filter_size=k, blur=blur, iterations=5)
        print(f"\n## {width}x{height} blur {blur} k={k}")
        rows = []
        for kernel, (field, blocks) in MESSAGE_BLOCKS.items():
            for block in blocks:
                for class_block in CLASS_BLOCKS:
                    config = dataclasses.replace(base, message_kernel=kernel, **{field: block})
                    text = f"{kernel} message {field} {block} class_block {class_block}"
                    try:
                        ms = kernel_times(image, logits, params, config, class_block)
                    except Exception as exc:
                        print(f"{text}: {exc}")
                        continue
                    name = "convcrf_message" + ("" if kernel == "per-cell" else f"_{kernel}")
                    if name in ms:  # else the kernel did not fit and the plan fell back
                        rows.append((ms[name], text))
        for ms, text in sorted(rows)[:9]:
            print(f"{text}: {ms:.4f} ms")
        rows = []
        for (threads, box), group in itertools.product(POOLS, cuda_plan.LOAD_GROUPS):
            config = dataclasses.replace(
                base, pool_threads=threads, pool_box_pixels=box, load_group=group
            )
            ms = kernel_times(image, logits, params, config)
            total = ms["convcrf_init"] + 4 * ms["convcrf_step"] + ms["convcrf_final"]
            rows.append(
                (
                    total,
                    f"pool {threads} threads box {box} load group {group}: init "
                    f"{ms['convcrf_init']:.4f} step {ms['convcrf_step']:.4f} final "
                    f"{ms['convcrf_final']:.4f}",
                )
            )
        for total, text in sorted(rows):
            print(f"{text} (init+4 steps+final {total:.4f} ms)")


if __name__ == "__main__":
    main()
