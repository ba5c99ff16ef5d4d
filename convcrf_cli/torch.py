"""The ConvCRF as a differentiable ``torch.nn.Module`` with learnable parameters.

:class:`ConvCRF` computes exactly DESIGN §2 (the same :mod:`convcrf_cli.meanfield` functions
as the CPU backend) with these learnable groups:

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
saying so.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from convcrf_cli import meanfield
from convcrf_cli.params import TRANSFORM_KEYS, CRFParams, ParamsError, read_params_json

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
    """Differentiable ConvCRF mean-field inference (DESIGN §2, optional "+C" and "+T").

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
            return nn.Parameter(torch.tensor(float(value)), requires_grad=group in groups)

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
        """Refine ``logits [N,C,H,W]`` given ``image [N,F,H,W]`` (raw value range, float).

        Returns the final Q ``[N,C,H,W]`` (unnormalised scores in the dtype of the inputs):
        ``log_softmax`` of it is the refined log-probability, ``argmax`` the labels.
        """
        self._check_shapes(image, logits)
        if self.feature_transform is not None:
            image = torch.einsum("gf,nfhw->nghw", self.feature_transform, image)
        kernel = meanfield.crf_kernel(
            image,
            self.params,
            pos_sdims=self.log_pos_sdims.exp(),
            col_schan=self.log_col_schan.exp(),
            pos_compat=self.pos_compat,
            col_compat=self.col_compat,
        )
        return meanfield.mean_field(
            logits, kernel, self.params, weight=self.weight, compat_matrix=self.compat_transform
        )

    def _check_shapes(self, image: torch.Tensor, logits: torch.Tensor) -> None:
        if image.dim() != 4 or logits.dim() != 4:
            raise ValueError(
                f"expected image [N,F,H,W] and logits [N,C,H,W], got shapes "
                f"{tuple(image.shape)} and {tuple(logits.shape)}"
            )
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
        """The current scalar parameters as :class:`CRFParams` (without the C/T matrices)."""
        return self.params.replace(
            pos_sdims=_shortest(self.log_pos_sdims.detach().exp()),
            col_schan=_shortest(self.log_col_schan.detach().exp()),
            pos_compat=_shortest(self.pos_compat.detach()),
            col_compat=_shortest(self.col_compat.detach()),
            weight=_shortest(self.weight.detach()),
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
        """Write :meth:`to_dict` as JSON, atomically."""
        from convcrf_cli.atomic import atomic_write_bytes

        atomic_write_bytes(Path(path), (json.dumps(self.to_dict(), indent=2) + "\n").encode())

    @classmethod
    def from_dict(
        cls,
        data: dict[str, Any],
        num_classes: int | None = None,
        learn: str | Iterable[str] = DEFAULT_LEARN,
        *,
        num_features: int = 3,
    ) -> ConvCRF:
        """Inverse of :meth:`to_dict`. Sizes come from the matrices when present; otherwise
        ``num_classes`` is required. ``learn`` sets which groups train further."""
        if not isinstance(data, dict):
            raise ParamsError(f"expected a JSON object of parameters, got {type(data).__name__}")
        fields = {key: value for key, value in data.items() if key not in TRANSFORM_KEYS}
        params = CRFParams.from_dict(fields)
        compat = _matrix_from_json(data.get("compat_transform"), "compat_transform")
        features = _matrix_from_json(data.get("feature_transform"), "feature_transform")
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
        learn: str | Iterable[str] = DEFAULT_LEARN,
        *,
        num_features: int = 3,
    ) -> ConvCRF:
        """Read a file written by :meth:`save` (or any CRFParams JSON); errors name the file."""
        return read_params_json(
            path, lambda data: cls.from_dict(data, num_classes, learn, num_features=num_features)
        )


def _shortest(value: torch.Tensor) -> float:
    """A scalar tensor as the shortest decimal that rounds to it in its dtype (float32 0.2
    gives 0.2, not 0.20000000298023224)."""
    scalar = value.cpu().numpy()[()]  # a NumPy scalar of the tensor's dtype
    return float(np.format_float_scientific(scalar, unique=True, trim="-"))


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
