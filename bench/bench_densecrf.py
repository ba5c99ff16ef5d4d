"""ConvCRF against the permutohedral DenseCRF of pydensecrf on the synthetic task.

pydensecrf is the fully-connected CRF (Krähenbühl & Koltun) that segmentation code reaches for
today. Both CRFs get the same unary (the log-probabilities; DenseCRF takes their negation as
energies), 5 mean-field iterations and the same kernel parameters: pydensecrf's customary
Gaussian (``sxy=3, compat=3``) and bilateral (``sxy=80, srgb=13, compat=10``) kernels, and
ConvCRF's defaults (``pos_sdims 3, pos_compat 3, col_schan 13, col_compat 10``; its colour
kernel is limited to the filter window instead of the bilateral's ``sxy``). Reports mIoU and
pixel accuracy against the known labels and the median time per image (decoded arrays in,
labels out): pydensecrf runs on one thread, so ConvCRF is timed on one thread too, and with
torch's default thread count.

    .venv/bin/pip install pydensecrf2==1.1       # builds from source in about a minute
    .venv/bin/python bench/bench_densecrf.py     # 20 images, 375x500, 21 classes
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from choose_defaults import Score, evaluate, score, synthetic_samples  # noqa: E402

from convcrf_cli.metrics import confusion_matrix  # noqa: E402
from convcrf_cli.params import CRFParams  # noqa: E402

ITERATIONS = 5


def densecrf_labels(image: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """pydensecrf's DenseCRF2D: ``image [H,W,3] uint8``, ``logits [C,H,W]`` -> ``[H,W]``."""
    import pydensecrf.densecrf as dcrf

    classes, height, width = logits.shape
    crf = dcrf.DenseCRF2D(width, height, classes)
    crf.setUnaryEnergy(np.ascontiguousarray(-logits.reshape(classes, -1), dtype=np.float32))
    crf.addPairwiseGaussian(sxy=3, compat=3)
    crf.addPairwiseBilateral(sxy=80, srgb=13, rgbim=image, compat=10)
    probabilities = np.asarray(crf.inference(ITERATIONS))
    return probabilities.argmax(axis=0).reshape(height, width)


def evaluate_densecrf(samples, classes: int) -> Score:
    counts = np.zeros((classes, classes), dtype=np.int64)
    seconds = []
    for image, logits, labels in samples:
        rgb = np.ascontiguousarray(image[0].transpose(1, 2, 0).astype(np.uint8))
        start = time.perf_counter()
        predicted = densecrf_labels(rgb, logits[0])
        seconds.append(time.perf_counter() - start)
        counts += confusion_matrix(predicted, labels, classes)
    return score(counts, seconds)


def require_pydensecrf() -> None:
    """Exit with one line before any work if pydensecrf does not import."""
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError as exc:
        sys.exit(
            f"bench_densecrf.py: pydensecrf does not import ({exc}); install it with "
            "pip install pydensecrf2==1.1 (make bench does, where it builds)"
        )


def main() -> None:
    require_pydensecrf()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--size", default="375x500", help="HEIGHTxWIDTH")
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.lower().split("x"))
    samples, unary = synthetic_samples(args.count, height, width, args.classes, args.seed)

    threads = torch.get_num_threads()
    params = CRFParams(iterations=ITERATIONS)
    torch.set_num_threads(1)
    convcrf_one = evaluate(samples, params, args.classes)
    torch.set_num_threads(threads)
    convcrf_all = evaluate(samples, params, args.classes)
    densecrf = evaluate_densecrf(samples, args.classes)

    print(
        f"Synthetic task: {args.count} images {height}x{width}, {args.classes} classes, seed "
        f"{args.seed}; CPU: {os.cpu_count()} cores ({platform.processor() or platform.machine()}),"
        f" torch {torch.__version__}\n"
    )
    print("| method | mIoU | pixel acc. | ms / image |")
    print("|---|---:|---:|---:|")
    rows = [
        ("unary alone", unary),
        ("DenseCRF (pydensecrf, 1 thread)", densecrf),
        (f"ConvCRF k={params.filter_size} blur={params.blur} (1 thread)", convcrf_one),
        (f"ConvCRF k={params.filter_size} blur={params.blur} ({threads} threads)", convcrf_all),
    ]
    for name, result in rows:
        ms = f"{1000 * result.seconds_per_image:.0f}" if result.seconds_per_image else "–"
        print(f"| {name} | {result.miou:.1f} | {result.accuracy:.2f} | {ms} |")
    ratio = densecrf.seconds_per_image / convcrf_one.seconds_per_image
    print(f"\nConvCRF on one thread is {ratio:.1f}x faster than DenseCRF on one thread.")


if __name__ == "__main__":
    main()
