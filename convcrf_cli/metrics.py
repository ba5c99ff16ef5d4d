"""Segmentation quality metrics: confusion matrix and per-class IoU (NumPy).

Predictions and labels are integer class maps of the same shape (any shape, e.g. ``[H,W]`` or
``[N,H,W]``). Label pixels equal to ``ignore_label`` are left out of every metric.
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(
    pred: np.ndarray, labels: np.ndarray, num_classes: int, ignore_label: int = 255
) -> np.ndarray:
    """Counts ``[num_classes, num_classes] int64``: row = true class, column = predicted class.

    ``pred`` and ``labels`` are integer arrays of the same shape (another dtype, float or bool,
    is a ValueError rather than truncated). Pixels whose label is ``ignore_label`` are skipped;
    any other label or prediction outside ``[0, num_classes)`` is an error.
    """
    pred = np.asarray(pred)
    labels = np.asarray(labels)
    for name, values in (("prediction", pred), ("label", labels)):
        if not np.issubdtype(values.dtype, np.integer):
            raise ValueError(f"{name}s must be integer class ids, got dtype {values.dtype}")
    if pred.shape != labels.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from label shape {labels.shape}")
    keep = labels != ignore_label
    truth = labels[keep].astype(np.int64)
    guess = pred[keep].astype(np.int64)
    for name, values in (("label", truth), ("prediction", guess)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            worst = values.min() if values.min() < 0 else values.max()
            raise ValueError(f"{name} values must lie in [0, {num_classes}), got {worst}")
    counts = np.bincount(truth * num_classes + guess, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def iou_per_class(confusion: np.ndarray) -> np.ndarray:
    """IoU of each class ``[C] float64`` from a confusion matrix; NaN for classes absent from
    both labels and predictions."""
    confusion = np.asarray(confusion, dtype=np.float64)
    inter = np.diag(confusion)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, np.nan)
