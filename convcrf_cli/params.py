"""CRF parameters: one dataclass, validation, presets and JSON load/save."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

INIT_CHOICES = ("softmax", "log")

FLOAT32_MAX = 3.4028234663852886e38
"""The largest float32: the CRF computes in float32, so every real field must fit it."""
FLOAT32_TINY = 1.1754943508222875e-38
"""The smallest normal float32: the feature scales divide, and smaller ones flush to 0."""
TRANSFORM_KEYS = ("compat_transform", "feature_transform")
"""Extra keys of a parameter file written by ``convcrf fit --learn ...,C,T``: the learned "+C"
and "+T" matrices, which only :class:`convcrf_cli.torch.ConvCRF` applies."""


class ParamsError(ValueError):
    """A parameter value or parameter file is invalid; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class CRFParams:
    """Parameters of ConvCRF mean-field inference (README, "The algorithm").

    filter_size: odd window size k on the (blurred) grid.
    blur: message passing runs on a grid ``blur`` times coarser than the image.
    iterations: number of mean-field steps.
    pos_sdims: positional feature scale in pixels.
    pos_compat: weight of the positional (smoothness) kernel.
    col_schan: colour feature scale in intensity units of the image.
    col_compat: weight of the colour (appearance) kernel.
    weight: message weight w.
    unary_weight: unary weight u.
    init: first Q: ``"softmax"`` (textbook mean field) or ``"log"`` (the original implementation).
    """

    filter_size: int = 9
    blur: int = 3
    iterations: int = 5
    pos_sdims: float = 3.0
    pos_compat: float = 3.0
    col_schan: float = 13.0
    col_compat: float = 10.0
    weight: float = 0.2
    unary_weight: float = 1.0
    init: str = "softmax"

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool):
                continue  # refused by validate()
            if field.type == "int" and isinstance(value, numbers.Integral):
                object.__setattr__(self, field.name, int(value))  # NumPy integers too
            elif field.type == "float" and isinstance(value, numbers.Real):
                object.__setattr__(self, field.name, _to_float(value))
        self.validate()

    def validate(self) -> None:
        """Raise ParamsError naming the first invalid field."""
        for name in ("filter_size", "blur", "iterations"):
            integer_option(name, getattr(self, name))
        if self.filter_size < 1 or self.filter_size % 2 == 0:
            raise ParamsError(f"filter_size must be a positive odd integer, got {self.filter_size}")
        if self.blur < 1:
            raise ParamsError(f"blur must be >= 1, got {self.blur}")
        if self.iterations < 1:
            raise ParamsError(f"iterations must be >= 1, got {self.iterations}")
        for name in ("pos_sdims", "col_schan"):  # divisors: normal float32 numbers
            value = getattr(self, name)
            if not _is_real(value) or not FLOAT32_TINY <= value <= FLOAT32_MAX:
                raise ParamsError(
                    f"{name} must be a positive number in float32's range (1.2e-38 to "
                    f"3.4e38), got {value!r}"
                )
        for name in ("pos_compat", "col_compat", "weight", "unary_weight"):
            value = getattr(self, name)
            if not _is_real(value) or not abs(value) <= FLOAT32_MAX:
                raise ParamsError(
                    f"{name} must be a finite number in float32's range (±3.4e38), got {value!r}"
                )
        if self.init not in INIT_CHOICES:
            raise ParamsError(f"init must be one of {', '.join(INIT_CHOICES)}, got {self.init!r}")

    def replace(self, **changes: Any) -> CRFParams:
        """Return a copy with the given fields changed (validated); an unknown field is a
        :class:`ParamsError`."""
        _check_known(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The fields by name (JSON-ready)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """The parameters as an indented JSON object (as :meth:`save` writes it)."""
        return _json_text(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CRFParams:
        """Build from a mapping; unknown keys are an error, missing keys take the defaults."""
        fields, transforms = split_transforms(data)
        if transforms:
            raise ParamsError(
                f"learned {' and '.join(transforms)} matrices present (written by `convcrf fit "
                "--learn ...,C,T`): plain refinement cannot apply them; use them in PyTorch "
                "through convcrf_cli.torch.ConvCRF.load, or fit without C and T"
            )
        _check_known(fields)
        return cls(**fields)

    @classmethod
    def load(cls, path: str | Path) -> CRFParams:
        """Read parameters from a JSON file; errors name the file."""
        return read_params_json(path, cls.from_dict)

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_json` to ``path`` (see :func:`write_params_json`)."""
        write_params_json(path, self.to_dict())


def split_transforms(data: object) -> tuple[dict[str, Any], dict[str, Any]]:
    """A parameter file's JSON object as (its CRFParams fields, its C/T matrices by key of
    :data:`TRANSFORM_KEYS`; a key set to ``null`` means no matrix, as :class:`ConvCRF
    <convcrf_cli.torch.ConvCRF>` reads it, and is left out); a :class:`ParamsError` when
    ``data`` is no object."""
    if not isinstance(data, dict):
        raise ParamsError(f"expected a JSON object of parameters, got {type(data).__name__}")
    fields = {key: value for key, value in data.items() if key not in TRANSFORM_KEYS}
    return fields, {key: data[key] for key in TRANSFORM_KEYS if data.get(key) is not None}


def write_params_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON, atomically (temporary file, then rename), creating
    missing directories; an OS error (an unwritable place) is raised as it is."""
    from convcrf_cli.atomic import atomic_write_bytes

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(path), _json_text(data).encode())


def _json_text(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2) + "\n"


def read_params_json(path: str | Path, build: Callable[[dict], T]) -> T:
    """Read the JSON object in ``path`` (UTF-8, with or without a byte-order mark; ``-``:
    stdin) and ``build`` something from it; every fault (an unreadable file, invalid JSON, a
    key given twice, a rejected value) is a :class:`ParamsError` naming the file (or stdin).
    Integers too long for Python to convert are read as infinite floats, which the validation
    then refuses by name."""
    path = Path(path)
    name = params_file_name(path)
    try:
        data = parse_json(_read_text(path), parse_int=_parse_int, object_pairs_hook=_object)
    except ParamsError as exc:
        raise ParamsError(f"{name}: {exc}") from exc
    except OSError as exc:
        raise ParamsError(f"{name}: cannot read parameter file: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ParamsError(
            f"{name}: not valid JSON: not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from exc
    except json.JSONDecodeError as exc:
        raise ParamsError(f"{name}: not valid JSON: {exc.msg} (line {exc.lineno})") from exc
    try:
        return build(data)
    except (ParamsError, TypeError) as exc:
        raise ParamsError(f"{name}: {exc}") from exc


def parse_json(text: str, **options: Any) -> Any:
    """``json.loads(text, **options)``; JSON nested too deeply for Python's parser (which
    raises RecursionError) is a :class:`json.JSONDecodeError` too, as other invalid JSON."""
    try:
        return json.loads(text, **options)
    except RecursionError as exc:
        raise json.JSONDecodeError("nested too deeply", text, 0) from exc


def params_file_name(path: str | Path) -> str:
    """The name of the parameter file ``path`` in messages: ``stdin`` for ``-``."""
    return "stdin" if str(path) == "-" else str(path)


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's ``(key, value)`` pairs as a dict; a key given twice (of which JSON
    would keep the last value without a word) is a :class:`ParamsError`."""
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise ParamsError(f"key(s) given more than once: {', '.join(repeated)}")
    return dict(pairs)


MAX_PARAMS_BYTES = 64 << 20
"""Largest parameter file read (a fit's C and T matrices for 256 classes take about 2 MB)."""


def _read_text(path: Path) -> str:
    """The UTF-8 text of ``path``, or of stdin for ``-``. More than :data:`MAX_PARAMS_BYTES`
    is a :class:`ParamsError`: ``/dev/zero`` would be read until the memory runs out."""
    if str(path) == "-":
        data = sys.stdin.buffer.read(MAX_PARAMS_BYTES + 1)
    else:
        with open(path, "rb") as handle:
            data = handle.read(MAX_PARAMS_BYTES + 1)
    if len(data) > MAX_PARAMS_BYTES:
        raise ParamsError(f"more than {MAX_PARAMS_BYTES >> 20} MiB: not a parameter file")
    return data.decode("utf-8-sig")


def _check_known(names: Iterable[str]) -> None:
    """Raise :class:`ParamsError` naming every one of ``names`` that is no CRFParams field."""
    known = {f.name for f in dataclasses.fields(CRFParams)}
    unknown = sorted(set(names) - known)
    if unknown:
        raise ParamsError(
            f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )


def integer_option(name: str, value: object) -> int:
    """``value`` as an int: a Python or NumPy integer, not a bool; else a
    :class:`ParamsError` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ParamsError(f"{name} must be an integer, got {value!r}")
    return int(value)


def real_option(name: str, value: object) -> float:
    """``value`` as a float: a Python or NumPy real number, not a bool; else a
    :class:`ParamsError` naming ``name``."""
    if not _is_real(value):
        raise ParamsError(f"{name} must be a number, got {value!r}")
    return _to_float(value)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _to_float(value: numbers.Real) -> float:
    """``float(value)``, infinite for an integer beyond the float range (validation refuses
    it by the field's name)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _parse_int(text: str) -> int | float:
    """A JSON integer: an int, or an infinite float when it has more digits than Python
    converts (``sys.get_int_max_str_digits``)."""
    try:
        return int(text)
    except ValueError:
        return -math.inf if text.startswith("-") else math.inf


ORIGINAL = CRFParams(filter_size=11, blur=4, init="log")
"""The original implementation's defaults (its paper configuration, first Q = log-probabilities)."""

PRESETS: dict[str, CRFParams] = {"default": CRFParams(), "original": ORIGINAL}
