"""Every kernel of ``cuda/*.cu`` run once on small inputs, for the checks that watch how the
kernels run rather than what they compute: the sanitizer builds of the shim (run as
``python -m cuda_shim.cases LIBRARY`` from ``tests/``) and the order of the blocks."""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import torch

from convcrf_cli import fused_meanfield, meanfield
from convcrf_cli.backends.cuda_plan import LaunchConfig, MeanFieldPlan, run_plan
from convcrf_cli.params import CRFParams

SMALL = LaunchConfig(
    cell_block=(8, 8),
    split_cells=(4, 4),
    pixel_block=(8, 8),
    pool_threads=64,
    pool_box_width=8,
    pool_box_pixels=64,
)
"""Small blocks: every CUDA thread is an OS thread in the shim. The message kernel is chosen as
on a GPU ("auto": tiled, with no minimum of blocks) unless set."""

# (message kernel, fused iterations, blur, filter size, init)
INFERENCE = [
    ("per-cell", False, 3, 5, "log"),
    ("split", False, 2, 5, "softmax"),
    ("tiled", False, 1, 7, "log"),
    ("per-cell", True, 2, 7, "softmax"),
    ("per-cell", True, 3, 3, "log"),
]
BATCH, CLASSES, HEIGHT, WIDTH, ITERATIONS = 2, 5, 11, 21, 2
"""Two images of 5 classes (a partial second chunk at 4 per chunk), 11×21 pixels: neither a
multiple of the blocks nor of the blur; 21 columns take two tiled blocks of 4×4 threads at
blur 1. Few threads in all (about 25 000): ThreadSanitizer starts each slowly."""


def run_every_kernel(launch, class_block: int) -> dict[str, np.ndarray]:
    """Launch every kernel through ``launch`` (the shim's, compiled with ``class_block``):
    inference with each message kernel and with fused iterations, then the module's mean field
    forward and backward. Returns each result by name (``[N,C,H,W] float32`` scores, and the
    gradients)."""
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, (BATCH, 3, HEIGHT, WIDTH)).astype(np.float32)
    logits = rng.normal(0, 2, (BATCH, CLASSES, HEIGHT, WIDTH)).astype(np.float32)
    results = {}
    for kernel, fuse, blur, k, init in INFERENCE:
        params = CRFParams(filter_size=k, blur=blur, init=init, iterations=ITERATIONS)
        config = dataclasses.replace(
            SMALL, message_threads=(4, 4), message_kernel=kernel, fuse_message=fuse
        )
        plan = MeanFieldPlan.create(image.shape, logits.shape, params, config, class_block)
        scores = np.empty_like(logits)
        run_plan(plan, image, logits, scores, launch, np.empty)
        results[f"{kernel} fused={fuse} blur={blur}"] = scores

    params = CRFParams(filter_size=5, blur=2, iterations=ITERATIONS)
    logits_t, image_t = torch.from_numpy(logits), torch.from_numpy(image)
    kernel_t = meanfield.crf_kernel(image_t, params)
    matrix = torch.from_numpy(rng.normal(0, 0.3, (CLASSES, CLASSES)).astype(np.float32))
    grad = torch.from_numpy(rng.normal(0, 1, logits.shape).astype(np.float32))
    scores, record = fused_meanfield.mean_field(
        logits_t, kernel_t, params, 0.6, matrix, launch, class_block, SMALL
    )
    grads = fused_meanfield.mean_field_backward(
        record, logits_t, grad, kernel_t, 0.6, matrix, True, launch
    )
    results["module scores"] = scores.numpy()
    for name, value in zip(("logits", "kernel", "weight", "matrix"), grads, strict=True):
        results[f"module d {name}"] = value.numpy()
    return results


def main(library: str) -> None:
    """Run every kernel with the shim ``library``; fails unless each kernel was launched."""
    from cuda_shim.launcher import ShimLauncher

    from convcrf_cli.backends.cuda import KERNEL_NAMES

    torch.set_num_threads(1)
    shim = ShimLauncher(library)
    run_every_kernel(shim, shim.class_block)
    missed = set(KERNEL_NAMES) - {launch[0] for launch in shim.launches}
    if missed:
        raise SystemExit(f"not launched: {sorted(missed)}")
    print(f"{len(shim.launches)} launches of {len(KERNEL_NAMES)} kernels")


if __name__ == "__main__":
    main(sys.argv[1])
