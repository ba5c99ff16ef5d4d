"""The ConvCRF as a differentiable ``torch.nn.Module`` with learnable parameters.

:class:`ConvCRF` computes exactly README's "The algorithm" (the same
:mod:`convcrf_cli.meanfield` functions as the CPU backend) with these learnable groups:

- ``"compat"``: the kernel weights ``pos_compat`` and ``col_compat``;
- ``"scales"``: the feature scales ``pos_sdims`` and ``col_schan``, stored as log-scales
  (``log_pos_sdims``, ``log_col_schan``) so that they stay positive;
- ``"weight"``: the message weight ``w``;
- ``"C"``: the compatibility transform of the paper's "+C": ``msg <- msg + M·msg`` with a
  learned ``[C,C]`` matrix ``M`` applied at every pixel, zero at initialisation (the Potts model);
- ``"T"``: the learned colour features of the paper's "+T": the colour kernel sees
  ``T·I / col_schan`` with a learned ``[F,F]`` matrix ``T`` applied at every pixel, identity at
  initialisation.

Use it inside a PyTorch training loop like any module::

    from convcrf_cli.torch import ConvCRF
    crf = ConvCRF.from_params(CRFParams(), num_classes=21, learn=("compat", "scales", "C"))
    scores = crf(images, segmenter_logits)   # [N,F,H,W] raw values, [N,C,H,W] -> [N,C,H,W]
    loss = torch.nn.functional.cross_entropy(scores, labels, ignore_index=255)

Learned parameters are saved as the JSON that ``convcrf refine --params`` reads
(:meth:`ConvCRF.save`). When ``C`` or ``T`` were learned, the file also holds the matrices under
the keys ``compat_transform`` and ``feature_transform`` (lists of rows); only this module
applies them (:meth:`ConvCRF.load`), and ``convcrf refine`` refuses such a file with a message
saying so. :meth:`ConvCRF.to_params` gives every learned scalar as the shortest decimal that
:meth:`ConvCRF.from_params` stores as the same value, so a saved file loads back bit for bit and
untouched defaults are written as given (``13.0``, not ``12.999999``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from convcrf_cli import meanfield
from convcrf_cli.grid import for_size
from convcrf_cli.params import (
    CRFParams,
    ParamsError,
    read_params_json,
    split_transforms,
    write_params_json,
)

LEARNABLE_GROUPS = ("compat", "scales", "weight", "C", "T")
"""Names of the parameter groups that :class:`ConvCRF` can learn."""

DEFAULT_LEARN = ("compat", "scales", "weight")
"""Groups learned by default: exactly the fields of :class:`CRFParams` (no extra matrices)."""


def parse_learn(learn: str | Iterable[str]) -> tuple[str, ...]:
    """Validate learnable groups given as ``"compat,scales"`` or an iterable of names."""
    names = [part.strip() for part in learn.split(",")] if isinstance(learn, str) else list(learn)
    names = [name for name in names if name]
    unknown = [name for name in names if name not in LEARNABLE_GROUPS]
    if unknown:
        raise ParamsError(
            f"unknown learnable group(s) {', '.join(unknown)}; "
            f"choose from {','.join(LEARNABLE_GROUPS)}"
        )
    if not names:
        raise ParamsError(f"nothing to learn; choose from {','.join(LEARNABLE_GROUPS)}")
    return tuple(dict.fromkeys(names))


class ConvCRF(nn.Module):
    """Differentiable ConvCRF mean-field inference (optional "+C" and "+T").

    Structural settings (``filter_size``, ``blur``, ``iterations``, ``init``) and the unary
    weight are fixed and taken from ``params``; the other fields are ``nn.Parameter`` scalars
    whose ``requires_grad`` says whether their group is learned. Construct with
    :meth:`from_params` or :meth:`load`.
    """

    def __init__(
        self,
        params: CRFParams,
        num_classes: int,
        *,
        num_features: int = 3,
        learn: str | Iterable[str] = DEFAULT_LEARN,
        compat_transform: np.ndarray | None = None,
        feature_transform: np.ndarray | None = None,
    ) -> None:
        """See :meth:`from_params`; ``compat_transform [C,C]`` / ``feature_transform [F,F]``
        start the "+C" / "+T" matrices from given values (implying those groups exist)."""
        super().__init__()
        groups = parse_learn(learn)
        self.params = params
        self.num_classes = int(num_classes)
        self.num_features = int(num_features)
        self.learn = groups

        def scalar(value: float, group: str) -> nn.Parameter:
            return nn.Parameter(_stored(value), requires_grad=group in groups)

        self.log_pos_sdims = scalar(math.log(params.pos_sdims), "scales")
        self.log_col_schan = scalar(math.log(params.col_schan), "scales")
        self.pos_compat = scalar(params.pos_compat, "compat")
        self.col_compat = scalar(params.col_compat, "compat")
        self.weight = scalar(params.weight, "weight")

        if compat_transform is None and "C" in groups:
            compat_transform = np.zeros((self.num_classes, self.num_classes))
        if feature_transform is None and "T" in groups:
            feature_transform = np.eye(self.num_features)
        self.compat_transform = _matrix(compat_transform, self.num_classes, "C" in groups, "C")
        self.feature_transform = _matrix(feature_transform, self.num_features, "T" in groups, "T")

    @classmethod
    def from_params(
        cls,
        params: CRFParams,
        num_classes: int,
        learn: str | Iterable[str] = DEFAULT_LEARN,
        *,
        num_features: int = 3,
    ) -> ConvCRF:
        """Module starting at ``params`` for ``num_classes`` classes.

        ``learn``: groups of :data:`LEARNABLE_GROUPS` (``"C"`` adds a zero ``[C,C]``
        compatibility transform, ``"T"`` an identity ``[F,F]`` colour transform for images of
        ``num_features`` channels). At initialisation the output equals
        ``convcrf_cli.refine(image, logits, params)``.
        """
        return cls(params, num_classes, num_features=num_features, learn=learn)

    def forward(self, image: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Refine floating ``logits [N,C,H,W]`` given ``image [N,F,H,W]`` (raw value range).

        The image is a feature input of any real dtype (``uint8`` included): it is converted to
        the logits' dtype first, so the result equals passing ``image.to(logits.dtype)``; the
        C / T matrices are used in that dtype too, as the scalar parameters are.
        Returns the final Q ``[N,C,H,W]`` (unnormalised scores in the logits' dtype):
        ``log_softmax`` of it is the refined log-probability, ``argmax`` the labels.
        """
        self._check_shapes(image, logits)
        image = image.to(logits.dtype)
        compat_matrix, feature_matrix = (
            None if matrix is None else matrix.to(logits.dtype)
            for matrix in (self.compat_transform, self.feature_transform)
        )
        if feature_matrix is not None:
            image = torch.einsum("gf,nfhw->nghw", feature_matrix, image)
        params = for_size(self.params, *logits.shape[2:])
        kernel = meanfield.crf_kernel(
            image,
            params,
            pos_sdims=self.log_pos_sdims.exp(),
            col_schan=self.log_col_schan.exp(),
            pos_compat=self.pos_compat,
            col_compat=self.col_compat,
        )
        return meanfield.mean_field(
            logits, kernel, params, weight=self.weight, compat_matrix=compat_matrix
        )

    def _check_shapes(self, image: torch.Tensor, logits: torch.Tensor) -> None:
        if image.dim() != 4 or logits.dim() != 4:
            raise ValueError(
                f"expected image [N,F,H,W] and logits [N,C,H,W], got shapes "
                f"{tuple(image.shape)} and {tuple(logits.shape)}"
            )
        if not logits.is_floating_point():
            raise ValueError(f"logits must be a floating-point tensor, got {logits.dtype}")
        if image.shape[0] != logits.shape[0] or image.shape[2:] != logits.shape[2:]:
            raise ValueError(
                f"image {tuple(image.shape)} and logits {tuple(logits.shape)} differ in "
                "batch size or height/width"
            )
        if self.compat_transform is not None and logits.shape[1] != self.num_classes:
            raise ValueError(
                f"logits have {logits.shape[1]} classes; the compatibility transform is for "
                f"{self.num_classes}"
            )
        if self.feature_transform is not None and image.shape[1] != self.num_features:
            raise ValueError(
                f"image has {image.shape[1]} channels; the feature transform is for "
                f"{self.num_features}"
            )

    def to_params(self) -> CRFParams:
        """The current scalar parameters as :class:`CRFParams` (without the C/T matrices).

        Each value is the shortest decimal that :meth:`from_params` stores as the parameter's
        current value, so ``from_params(to_params())`` reproduces the parameters bit for bit
        and an untrained module gives back its starting values exactly.
        """
        return self.params.replace(
            pos_sdims=_scale_from_log(self.log_pos_sdims),
            col_schan=_scale_from_log(self.log_col_schan),
            pos_compat=_shortest(self.pos_compat),
            col_compat=_shortest(self.col_compat),
            weight=_shortest(self.weight),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready parameters: the CRFParams fields, plus ``compat_transform`` ``[C,C]`` and
        ``feature_transform`` ``[F,F]`` (lists of rows) when the module has them."""
        data = self.to_params().to_dict()
        for key, matrix in (
            ("compat_transform", self.compat_transform),
            ("feature_transform", self.feature_transform),
        ):
            if matrix is not None:
                data[key] = matrix.detach().cpu().double().tolist()
        return data

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_dict` as JSON, atomically, creating missing directories."""
        write_params_json(path, self.to_dict())

    @classmethod
    def from_dict(
        cls,
        data: dict[str, Any],
        num_classes: int | None = None,
        learn: str | Iterable[str] | None = None,
        *,
        num_features: int = 3,
    ) -> ConvCRF:
        """Inverse of :meth:`to_dict`. Sizes come from the matrices when present; otherwise
        ``num_classes`` is required. ``learn`` sets which groups train further; when None
        (the default) these are :data:`DEFAULT_LEARN` plus ``"C"`` / ``"T"`` when ``data``
        holds the ``compat_transform`` / ``feature_transform`` matrix, so training goes on
        with every matrix it holds. An explicit ``learn`` is used as given (matrices of
        groups not in it are kept, frozen)."""
        fields, transforms = split_transforms(data)
        params = CRFParams.from_dict(fields)
        compat = _matrix_from_json(transforms.get("compat_transform"), "compat_transform")
        features = _matrix_from_json(transforms.get("feature_transform"), "feature_transform")
        if compat is not None:
            if num_classes is not None and num_classes != compat.shape[0]:
                raise ParamsError(
                    f"compat_transform is {compat.shape[0]}x{compat.shape[0]} but the data "
                    f"have {num_classes} classes"
                )
            num_classes = compat.shape[0]
        if num_classes is None:
            raise ParamsError("num_classes is needed when there is no compat_transform")
        if features is not None:
            num_features = features.shape[0]
        if learn is None:
            learn = default_learn(compat is not None, features is not None)
        return cls(
            params,
            num_classes,
            num_features=num_features,
            learn=learn,
            compat_transform=compat,
            feature_transform=features,
        )

    @classmethod
    def load(
        cls,
        path: str | Path,
        num_classes: int | None = None,
        learn: str | Iterable[str] | None = None,
        *,
        num_features: int = 3,
    ) -> ConvCRF:
        """Read a file written by :meth:`save` (or any CRFParams JSON); errors name the file.

        ``learn`` as in :meth:`from_dict`: by default the file's C / T matrices keep learning
        along with :data:`DEFAULT_LEARN`.
        """
        return read_params_json(
            path, lambda data: cls.from_dict(data, num_classes, learn, num_features=num_features)
        )


def default_learn(has_compat: bool, has_features: bool) -> tuple[str, ...]:
    """:data:`DEFAULT_LEARN` plus the groups ``"C"`` / ``"T"`` of the matrices present."""
    present = (("C", has_compat), ("T", has_features))
    return DEFAULT_LEARN + tuple(group for group, held in present if held)


def _stored(value: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A scalar parameter's value as the module stores it: the Python float ``value`` as a 0-d
    tensor of ``dtype`` (torch's default dtype, float32, when None)."""
    return torch.tensor(float(value), dtype=dtype)


def _scale_from_log(log_scale: torch.Tensor) -> float:
    """The scale of a stored 0-d log-scale: the shortest decimal ``d`` that the module stores
    as ``log_scale`` (``_stored(math.log(d))``, as :meth:`ConvCRF.from_params` does). When
    ``exp`` in the tensor's dtype is not a positive finite number, that value (which
    :class:`CRFParams` refuses)."""
    scale = float(log_scale.detach().exp())
    if not 0 < scale < math.inf:
        return scale
    return _shortest(log_scale, encode=math.log, decode=math.exp)


def _shortest(
    stored: torch.Tensor,
    encode: Callable[[float], float] = float,
    decode: Callable[[float], float] = float,
) -> float:
    """The shortest decimal ``d`` with ``_stored(encode(d), stored.dtype) == stored`` (float32
    0.2 gives 0.2, not 0.20000000298023224), searched around ``decode(float(stored))``; that
    value itself when non-finite or when no decimal of up to 17 digits qualifies (a log-scale
    within about 4e-9 of 0, finer in float32 than ``math.log`` of a float64 resolves).
    ``stored`` is a 0-d floating tensor."""
    target = stored.detach().cpu()
    approx = decode(float(target))
    if not math.isfinite(approx):
        return approx
    centre = Decimal(repr(approx))
    for digits in range(1, 18):
        for candidate in _decimals_around(centre, digits):
            if bool(_stored(encode(candidate), target.dtype) == target):
                return candidate
    return approx


def _decimals_around(centre: Decimal, digits: int) -> list[float]:
    """The decimals of ``digits`` significant digits just below and just above ``centre``
    (one when it has no more digits), nearest first, as floats."""
    quantum = Decimal(1).scaleb(centre.adjusted() - digits + 1)
    near = {centre.quantize(quantum, rounding=way) for way in (ROUND_FLOOR, ROUND_CEILING)}
    return [float(value) for value in sorted(near, key=lambda value: abs(value - centre))]


def _matrix(values: np.ndarray | None, size: int, learned: bool, name: str):
    """A ``[size,size]`` float32 parameter from ``values``, or None."""
    if values is None:
        return None
    matrix = torch.as_tensor(np.asarray(values, dtype=np.float32))
    if matrix.shape != (size, size):
        raise ParamsError(f"the {name} matrix must be {size}x{size}, got {tuple(matrix.shape)}")
    return nn.Parameter(matrix, requires_grad=learned)


def _matrix_from_json(value: Any, key: str) -> np.ndarray | None:
    """A square finite float64 matrix from a JSON list of rows, or None when absent."""
    if value is None:
        return None
    try:
        matrix = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ParamsError(f"{key} must be a square matrix of numbers") from exc
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 1:
        raise ParamsError(f"{key} must be a square matrix, got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise ParamsError(f"{key} holds non-finite values")
    return matrix
