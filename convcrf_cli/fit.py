"""Decoupled training of the ConvCRF's parameters (the segmenter is frozen; only the CRF learns).

The unaries are fixed inputs; :class:`convcrf_cli.torch.ConvCRF` refines them and Adam minimises
the cross-entropy of the refined output (``log_softmax`` of the final Q) against the labels,
skipping pixels labelled ``ignore_label``. The final Q is divided by a learned temperature for
the loss only: the labels (argmax) do not depend on it, and it lets the loss calibrate the
scores' confidence without pulling the CRF's weights down to do so (it is not saved).
Training runs on random crops (batched: crops of one size form a batch); a held-out part of the
images is refined whole to report mean IoU with the starting and with the learned parameters.
Everything random follows ``seed``. A loss or parameter that stops being finite (too large a
step size) stops the training with :class:`~convcrf_cli.errors.RuntimeFailure`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from convcrf_cli.backends import DeviceError, parse_device
from convcrf_cli.backends.cpu import allocation_failures_as_memory_errors
from convcrf_cli.core import InputError
from convcrf_cli.denormals import run_flushing_denormals
from convcrf_cli.errors import RuntimeFailure
from convcrf_cli.metrics import confusion_matrix, iou_per_class
from convcrf_cli.params import CRFParams, ParamsError, integer_option, real_option
from convcrf_cli.torch import DEFAULT_LEARN, ConvCRF, parse_learn

ProgressCallback = Callable[[int, int, float], None]
"""Called after every optimisation step with (steps done, total steps, running loss of the
epoch so far)."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One training image.

    image: ``[H,W,F]`` or ``[H,W]`` raw value range (any real dtype); logits: ``[C,H,W]`` float
    class scores of the frozen segmenter; labels: ``[H,W]`` integer classes, ``ignore_label``
    where unknown.
    """

    name: str
    image: np.ndarray
    logits: np.ndarray
    labels: np.ndarray


@dataclasses.dataclass(frozen=True)
class FitOptions:
    """Training settings.

    epochs: passes over the training images (one random crop of each per pass).
    lr: Adam step size, relative: log-scales move by about ``lr`` per step, the kernel weights
        and the message weight by about ``lr`` times their starting magnitude, the "+C"/"+T"
        matrices by about ``lr`` per entry.
    learn: groups of :data:`convcrf_cli.torch.LEARNABLE_GROUPS` to learn.
    seed: seeds the split, the crops and their order (>= 0).
    val_fraction: share of the images held out for the before/after mean IoU (at least one
        image when > 0).
    crop_size: side of the square training crops (smaller images are used whole).
    batch_size: crops per optimisation step.
    ignore_label: label value left out of the loss and the metrics.

    The integer fields must be ints (NumPy integers are converted; bools are refused), ``lr``
    and ``val_fraction`` real numbers (NumPy ones are converted to float); anything else is a
    :class:`ParamsError` naming the field.
    """

    epochs: int = 20
    lr: float = 0.1
    learn: tuple[str, ...] = DEFAULT_LEARN
    seed: int = 0
    val_fraction: float = 0.25
    crop_size: int = 96
    batch_size: int = 4
    ignore_label: int = 255

    def __post_init__(self) -> None:
        object.__setattr__(self, "learn", parse_learn(self.learn))
        for name in ("epochs", "seed", "crop_size", "batch_size", "ignore_label"):
            object.__setattr__(self, name, integer_option(name, getattr(self, name)))
        for name in ("lr", "val_fraction"):
            object.__setattr__(self, name, real_option(name, getattr(self, name)))
        for name, least in (("epochs", 1), ("seed", 0), ("crop_size", 1), ("batch_size", 1)):
            if getattr(self, name) < least:
                raise ParamsError(f"{name} must be >= {least}, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ParamsError(f"lr must be a positive finite number, got {self.lr}")
        if not 0 <= self.val_fraction < 1:
            raise ParamsError(f"val_fraction must lie in [0, 1), got {self.val_fraction}")


@dataclasses.dataclass(frozen=True)
class FitResult:
    """Outcome of :func:`fit`.

    module: the trained :class:`ConvCRF` (on the CPU); ``module.to_params()`` /
    ``module.save(path)`` give the learned parameters. The mean IoUs (in [0, 1]) are over the
    held-out images, None when none were held out or their labels hold only the ignore label:
    ``miou_unary`` is the unary's argmax, ``miou_before`` the CRF with the starting
    parameters, ``miou_after`` with the learned ones.
    """

    module: ConvCRF
    train_names: tuple[str, ...]
    val_names: tuple[str, ...]
    miou_unary: float | None
    miou_before: float | None
    miou_after: float | None
    losses: tuple[float, ...]
    """Training loss of every step."""


def torch_device(device: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when torch sees one) as a torch device."""
    kind, index = parse_device(device)
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"cannot use device {device!r}: this torch build sees no CUDA device")
    if index >= torch.cuda.device_count():
        raise DeviceError(f"cannot use device {device!r}: no CUDA device {index}")
    return torch.device("cuda", index)


def split_examples(
    examples: Sequence[Example], val_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Random (seeded) split into training and held-out examples, each in input order."""
    count = len(examples)
    held_out = 0 if val_fraction == 0 else max(1, round(count * val_fraction))
    if count - held_out < 1:
        raise InputError(
            f"{count} image(s) leave none for training after holding out {held_out}; "
            "add images or lower the held-out fraction"
        )
    order = np.random.default_rng(seed).permutation(count)
    val = set(order[:held_out].tolist())
    return (
        [e for i, e in enumerate(examples) if i not in val],
        [e for i, e in enumerate(examples) if i in val],
    )


def fit(
    examples: Sequence[Example],
    start: CRFParams | ConvCRF,
    options: FitOptions,
    *,
    device: str = "cpu",
    progress: ProgressCallback | None = None,
) -> FitResult:
    """Learn ConvCRF parameters from ``examples``, starting at ``start``: parameters, or a
    module (such as ``ConvCRF.load`` of an earlier fit's output) whose parameters and "+C" /
    "+T" matrices are copied; ``options.learn`` says what trains further.

    All examples must have the same number of classes and image channels. Returns the trained
    module and the held-out mean IoU before and after. Raises :class:`InputError` for
    inconsistent examples or training labels that hold only the ignore label, and
    :class:`~convcrf_cli.errors.RuntimeFailure` when the training diverges, MemoryError when
    the CPU runs out of memory (torch raises RuntimeError). On the CPU it runs with denormal
    floats flushed to zero (:mod:`convcrf_cli.denormals`), in the calling thread
    (``progress`` is called from the fallback worker thread where that one flushes instead).
    """
    target = torch_device(device)
    if target.type == "cpu":
        with allocation_failures_as_memory_errors():
            return run_flushing_denormals(_fit, examples, start, options, target, progress)
    return _fit(examples, start, options, target, progress)


def _fit(
    examples: Sequence[Example],
    start: CRFParams | ConvCRF,
    options: FitOptions,
    target: torch.device,
    progress: ProgressCallback | None,
) -> FitResult:
    """:func:`fit` on the torch device ``target``."""
    num_classes, num_features = check_examples(examples, options.ignore_label)
    train, val = split_examples(examples, options.val_fraction, options.seed)
    if not any(_labelled(example, options.ignore_label) for example in train):
        raise InputError(
            f"the training images' labels hold only the ignore label {options.ignore_label} "
            "(the labelled ones were all held out); hold out fewer images or change the seed"
        )
    module = starting_module(start, num_classes, num_features, options.learn).to(target)
    miou_before = held_out_miou(module, val, num_classes, options.ignore_label)
    log_temperature = torch.zeros((), device=target, requires_grad=True)
    optimizer = torch.optim.Adam(
        [*_param_groups(module, options.lr), {"params": [log_temperature], "lr": options.lr}]
    )
    rng = np.random.default_rng(options.seed)
    total = options.epochs * _batches_per_epoch(train, options)
    losses: list[float] = []
    module.train()
    for _ in range(options.epochs):
        epoch_losses = []
        for crops in _epoch_batches(train, options, rng):
            loss = _batch_loss(module, crops, log_temperature, options.ignore_label, target)
            optimizer.zero_grad()
            loss.backward()
            try:
                optimizer.step()
            except RuntimeError as exc:  # lr / (1 - beta) beyond float32: Adam cannot step
                if "overflow" not in str(exc):
                    raise
                raise _diverged(len(losses) + 1, "the step overflows float32") from exc
            losses.append(float(loss.detach()))
            _check_finite(module, losses)
            epoch_losses.append(losses[-1])
            if progress is not None:
                progress(len(losses), total, float(np.mean(epoch_losses)))
    module.eval()
    try:
        module.to_params()
    except ParamsError as exc:
        raise _diverged(len(losses), str(exc)) from exc
    miou_after = held_out_miou(module, val, num_classes, options.ignore_label)
    return FitResult(
        module=module.cpu(),
        train_names=tuple(e.name for e in train),
        val_names=tuple(e.name for e in val),
        miou_unary=_unary_miou(val, num_classes, options.ignore_label),
        miou_before=miou_before,
        miou_after=miou_after,
        losses=tuple(losses),
    )


def starting_module(
    start: CRFParams | ConvCRF, num_classes: int, num_features: int, learn: tuple[str, ...]
) -> ConvCRF:
    """A new module at ``start`` (see :func:`fit`) for data of ``num_classes`` classes and
    ``num_features`` image channels, learning the groups ``learn``. Raises
    :class:`InputError` when a matrix of ``start`` does not fit the data."""
    if isinstance(start, CRFParams):
        return ConvCRF.from_params(start, num_classes, learn=learn, num_features=num_features)
    check_start_module(start, num_classes, num_features)
    return ConvCRF.from_dict(start.to_dict(), num_classes, learn, num_features=num_features)


def check_start_module(start: ConvCRF, num_classes: int, num_features: int) -> None:
    """Raise :class:`InputError` when the C or T matrix of ``start`` does not fit data of
    ``num_classes`` classes and ``num_features`` image channels."""
    for matrix, size, key, what in (
        (start.compat_transform, num_classes, "compat_transform", "classes"),
        (start.feature_transform, num_features, "feature_transform", "image channels"),
    ):
        if matrix is not None and matrix.shape[0] != size:
            side = matrix.shape[0]
            raise InputError(f"{key} is {side}x{side} but the data have {size} {what}")


def check_examples(examples: Sequence[Example], ignore_label: int) -> tuple[int, int]:
    """Check shapes and labels; return (classes, image channels) shared by all examples.

    Labels that hold only ``ignore_label`` in every example are an error: nothing to learn.
    """
    if not examples:
        raise InputError("no training images")
    num_classes = num_features = None
    for example in examples:
        image, logits, labels = example.image, example.logits, example.labels
        if image.ndim not in (2, 3) or logits.ndim != 3 or labels.ndim != 2:
            raise InputError(
                f"{example.name}: expected image [H,W,F] or [H,W], logits [C,H,W] and labels "
                f"[H,W], got {image.shape}, {logits.shape} and {labels.shape}"
            )
        features = 1 if image.ndim == 2 else image.shape[2]
        if not image.shape[:2] == logits.shape[1:] == labels.shape:
            raise InputError(
                f"{example.name}: image {image.shape[:2]}, unary {logits.shape[1:]} and labels "
                f"{labels.shape} sizes differ"
            )
        if num_classes is None:
            num_classes, num_features = logits.shape[0], features
        if (logits.shape[0], features) != (num_classes, num_features):
            raise InputError(
                f"{example.name}: {logits.shape[0]} classes and {features} image channels, "
                f"while the first image has {num_classes} and {num_features}"
            )
        problem = label_range_problem(labels, num_classes, ignore_label)
        if problem:
            raise InputError(f"{example.name}: {problem}")
    if not any(_labelled(example, ignore_label) for example in examples):
        raise InputError(f"labels hold only the ignore label {ignore_label}: nothing to learn")
    return int(num_classes), int(num_features)


def label_range_problem(labels: np.ndarray, num_classes: int, ignore_label: int) -> str | None:
    """What is wrong with the values of ``labels`` (integers, any shape) for ``num_classes``
    classes, pixels equal to ``ignore_label`` left out; None when every value is a class."""
    values = labels[labels != ignore_label]
    if values.size and (values.min() < 0 or values.max() >= num_classes):
        return (
            f"label values must lie in [0, {num_classes}) or equal the ignore label "
            f"{ignore_label}; found {int(values.min())}..{int(values.max())}"
        )
    return None


def _labelled(example: Example, ignore_label: int) -> bool:
    """Whether some pixel of ``example`` has a label other than ``ignore_label``."""
    return bool((example.labels != ignore_label).any())


def held_out_miou(
    module: ConvCRF, examples: Sequence[Example], num_classes: int, ignore_label: int
) -> float | None:
    """Mean IoU of ``module``'s refinement over whole ``examples`` (None when there are none
    or their labels hold only ``ignore_label``)."""
    if not examples:
        return None
    device = next(module.parameters()).device
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    with torch.no_grad():
        for example in examples:
            image, logits = _tensors(example, 0, 0, *example.labels.shape, device)
            predicted = module(image[None], logits[None])[0].argmax(0).cpu().numpy()
            confusion += confusion_matrix(predicted, example.labels, num_classes, ignore_label)
    return _miou(confusion)


def _unary_miou(examples: Sequence[Example], num_classes: int, ignore_label: int) -> float | None:
    if not examples:
        return None
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    for example in examples:
        pred = np.asarray(example.logits).argmax(0)
        confusion += confusion_matrix(pred, example.labels, num_classes, ignore_label)
    return _miou(confusion)


def _miou(confusion: np.ndarray) -> float | None:
    """Mean IoU over the classes present of a ``[C,C]`` confusion matrix; None when empty."""
    if not confusion.any():
        return None
    return float(np.nanmean(iou_per_class(confusion)))


def _check_finite(module: ConvCRF, losses: list[float]) -> None:
    """Raise :class:`RuntimeFailure` unless the last loss and every parameter are finite."""
    if not math.isfinite(losses[-1]):
        raise _diverged(len(losses), f"loss is {losses[-1]}")
    for name, parameter in module.named_parameters():
        if not bool(torch.isfinite(parameter).all()):
            raise _diverged(len(losses), f"{name} is not finite")


def _diverged(step: int, problem: str) -> RuntimeFailure:
    return RuntimeFailure(
        f"training diverged at step {step} ({problem}); lower the learning rate (--lr)"
    )


def _param_groups(module: ConvCRF, lr: float) -> list[dict]:
    """Adam groups with relative step sizes (see :class:`FitOptions`)."""
    groups = []
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad:
            continue
        scaled = name in ("pos_compat", "col_compat", "weight")
        scale = max(abs(float(parameter.detach())), 1e-2) if scaled else 1.0
        groups.append({"params": [parameter], "lr": lr * scale})
    return groups


def _crop_shape(example: Example, crop_size: int) -> tuple[int, int]:
    height, width = example.labels.shape
    return min(crop_size, height), min(crop_size, width)


def _batches_per_epoch(train: Sequence[Example], options: FitOptions) -> int:
    sizes: dict[tuple[int, int], int] = {}
    for example in train:
        shape = _crop_shape(example, options.crop_size)
        sizes[shape] = sizes.get(shape, 0) + 1
    return sum(-(-count // options.batch_size) for count in sizes.values())


def _epoch_batches(train: Sequence[Example], options: FitOptions, rng: np.random.Generator):
    """Yield batches as lists of ``(example, top, left, height, width)`` crops: one random crop
    per training image, crops of one size batched together, batches in random order."""
    by_shape: dict[tuple[int, int], list[tuple[Example, int, int]]] = {}
    for index in rng.permutation(len(train)):
        example = train[index]
        crop_h, crop_w = _crop_shape(example, options.crop_size)
        height, width = example.labels.shape
        top = int(rng.integers(0, height - crop_h + 1))
        left = int(rng.integers(0, width - crop_w + 1))
        by_shape.setdefault((crop_h, crop_w), []).append((example, top, left))
    batches = []
    for (crop_h, crop_w), crops in by_shape.items():
        for begin in range(0, len(crops), options.batch_size):
            chunk = crops[begin : begin + options.batch_size]
            batches.append([(e, top, left, crop_h, crop_w) for e, top, left in chunk])
    for index in rng.permutation(len(batches)):
        yield batches[index]


def _tensors(example: Example, top: int, left: int, height: int, width: int, device):
    """Crop of ``example`` as float32 ``image [F,h,w]`` and ``logits [C,h,w]`` on ``device``."""
    image = np.asarray(example.image)
    if image.ndim == 2:
        image = image[:, :, None]
    image = image[top : top + height, left : left + width].transpose(2, 0, 1)
    logits = np.asarray(example.logits)[:, top : top + height, left : left + width]
    return (
        torch.as_tensor(np.ascontiguousarray(image, dtype=np.float32), device=device),
        torch.as_tensor(np.ascontiguousarray(logits, dtype=np.float32), device=device),
    )


def _batch_loss(
    module: ConvCRF, crops, log_temperature: torch.Tensor, ignore_label: int, device
) -> torch.Tensor:
    """Mean cross-entropy of the refined crops (scores / temperature) over labelled pixels."""
    images, logits, labels = [], [], []
    for example, top, left, height, width in crops:
        image, logit = _tensors(example, top, left, height, width, device)
        images.append(image)
        logits.append(logit)
        label = example.labels[top : top + height, left : left + width]
        labels.append(torch.as_tensor(label.astype(np.int64), device=device))
    scores = module(torch.stack(images), torch.stack(logits)) * torch.exp(-log_temperature)
    target = torch.stack(labels)
    total = F.cross_entropy(scores, target, ignore_index=ignore_label, reduction="sum")
    return total / max(int((target != ignore_label).sum()), 1)
