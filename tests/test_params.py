"""CRFParams: validation, NumPy scalars, replace, dict and JSON round trips."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
from conftest import cli_runner

from convcrf_cli import CRFParams, ParamsError
from convcrf_cli import params as params_module
from convcrf_cli.cli import main
from convcrf_cli.params import ORIGINAL, PRESETS

POSITIVE = "must be a positive number in float32's range (1.2e-38 to 3.4e38)"
FINITE = "must be a finite number in float32's range (±3.4e38)"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"filter_size": 4}, "filter_size must be a positive odd integer, got 4"),
        ({"filter_size": -1}, "filter_size must be a positive odd integer, got -1"),
        ({"filter_size": True}, "filter_size must be an integer, got True"),
        ({"filter_size": 3.0}, "filter_size must be an integer, got 3.0"),
        ({"filter_size": "3"}, "filter_size must be an integer, got '3'"),
        ({"blur": 0}, "blur must be >= 1, got 0"),
        ({"iterations": 0}, "iterations must be >= 1, got 0"),
        ({"pos_sdims": 0.0}, f"pos_sdims {POSITIVE}, got 0.0"),
        ({"pos_sdims": 1e-320}, f"pos_sdims {POSITIVE}, got 1e-320"),  # 0 in float32
        ({"col_schan": 1e39}, f"col_schan {POSITIVE}, got 1e+39"),
        ({"col_schan": float("nan")}, f"col_schan {POSITIVE}, got nan"),
        ({"col_schan": np.float32("inf")}, f"col_schan {POSITIVE}, got inf"),
        ({"weight": float("inf")}, f"weight {FINITE}, got inf"),
        ({"pos_compat": -1e39}, f"pos_compat {FINITE}, got -1e+39"),  # -inf in float32
        ({"unary_weight": "1"}, f"unary_weight {FINITE}, got '1'"),
        ({"pos_compat": False}, f"pos_compat {FINITE}, got False"),
        ({"init": "random"}, "init must be one of softmax, log, got 'random'"),
    ],
)
def test_invalid_values_name_the_field(changes, message):
    with pytest.raises(ParamsError) as caught:
        CRFParams(**changes)
    assert str(caught.value) == message
    with pytest.raises(ParamsError):
        CRFParams().replace(**changes)


def test_numpy_scalars_become_python_numbers():
    params = CRFParams(
        filter_size=np.int64(5),
        blur=np.int32(2),
        iterations=np.uint8(3),
        pos_sdims=np.float32(2.5),
        col_schan=np.float64(7.0),
        weight=np.int64(1),
    )
    assert params == CRFParams(
        filter_size=5, blur=2, iterations=3, pos_sdims=2.5, col_schan=7.0, weight=1.0
    )
    types = [type(getattr(params, field.name)).__name__ for field in dataclasses.fields(params)]
    assert types == [field.type for field in dataclasses.fields(params)]  # "int", "float", ...
    assert json.loads(params.to_json())["weight"] == 1.0


def test_replace_validates_and_refuses_unknown_fields():
    assert CRFParams().replace(filter_size=7).filter_size == 7
    with pytest.raises(ParamsError, match="unknown parameter.s. foo; known: blur"):
        CRFParams().replace(foo=1)


def test_dict_and_file_round_trips(tmp_path):
    odd = CRFParams(filter_size=3, blur=1, pos_sdims=0.1, col_schan=1e-3, weight=-0.5)
    for params in (*PRESETS.values(), odd):
        assert CRFParams.from_dict(params.to_dict()) == params
        path = tmp_path / "missing" / "deeper" / "p.json"  # directories are created
        params.save(path)
        assert CRFParams.load(path) == params
    assert PRESETS["original"] == ORIGINAL and ORIGINAL.init == "log"


def test_a_parameter_file_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + CRFParams(filter_size=5).to_json().encode())
    assert CRFParams.load(path) == CRFParams(filter_size=5)


def test_a_parameter_file_with_a_key_given_twice_is_refused(tmp_path):
    path = tmp_path / "twice.json"
    path.write_text('{"blur": 2, "filter_size": 5, "blur": 4}')
    with pytest.raises(ParamsError, match=r"twice.json: key\(s\) given more than once: blur$"):
        CRFParams.load(path)


def test_json_nested_too_deeply_for_the_parser_is_invalid_json(tmp_path):
    # json.loads raised RecursionError: a traceback from refine, fit and params.
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(
        ParamsError, match=r"deep.json: not valid JSON: nested too deeply \(line 1\)$"
    ):
        CRFParams.load(path)
    result = cli_runner().invoke(main, ["params", "--params", str(path)])
    assert result.exit_code == 2
    assert result.stderr == f"convcrf: error: {path}: not valid JSON: nested too deeply (line 1)\n"


def test_a_parameter_file_over_the_size_limit_is_refused_unread(tmp_path, monkeypatch):
    # --params /dev/zero was read until the memory ran out.
    monkeypatch.setattr(params_module, "MAX_PARAMS_BYTES", 1 << 20)
    path = tmp_path / "big.json"
    path.write_text(json.dumps({"blur": 3}) + " " * (1 << 20))
    with pytest.raises(ParamsError, match=r"big.json: more than 1 MiB: not a parameter file$"):
        CRFParams.load(path)
    if os.path.exists("/dev/zero"):
        with pytest.raises(ParamsError, match=r"^/dev/zero: more than 1 MiB: not a parameter"):
            CRFParams.load("/dev/zero")


def test_a_matrix_key_set_to_null_means_no_matrix(tmp_path):
    path = tmp_path / "null.json"
    data = {"filter_size": 5, "compat_transform": None, "feature_transform": None}
    path.write_text(json.dumps(data))
    assert CRFParams.load(path) == CRFParams(filter_size=5)


def test_the_params_command_says_it_would_drop_a_files_matrices(tmp_path):
    path = tmp_path / "learned.json"
    path.write_text(json.dumps({**CRFParams().to_dict(), "compat_transform": [[0.0]]}))
    run = cli_runner().invoke(main, ["params", "--params", str(path), "-k", "5"])
    assert run.exit_code == 2 and run.stdout == ""
    assert run.stderr == (
        f"convcrf: error: {path}: learned compat_transform matrices present (written by "
        "`convcrf fit --learn ...,C,T`): `convcrf params` prints only the CRF fields and would "
        "drop them; pass the file to `convcrf fit --params` with the options to change, or use "
        "it in PyTorch through convcrf_cli.torch.ConvCRF.load\n"
    )


def test_params_are_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        CRFParams().blur = 2  # type: ignore[misc]
