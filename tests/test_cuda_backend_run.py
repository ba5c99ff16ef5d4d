"""The CUDA backend's own Python code run end to end without a GPU: ``tests/cuda_shim/
fake_cupy.py`` stands in for CuPy (NumPy arrays as device arrays, the C++ shim as the device),
so ``CUDABackend.run``, ``refine(device="cuda")``, ``convcrf info``, ``bench/bench_gpu.py`` and
``bench/gpu_profile.py`` run unchanged on the real kernels and are checked against the float64
reference."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_runner
from PIL import Image
from test_cuda_shim import assert_matches_reference, random_inputs

from convcrf_cli import refine
from convcrf_cli.backends import cuda, cuda_plan, select_backend
from convcrf_cli.backends.cuda_tune import TuningCache, is_variant
from convcrf_cli.params import CRFParams

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_backend_run_matches_reference(fake_cupy):
    params = CRFParams(filter_size=5, blur=2, iterations=3)
    image, logits = random_inputs(1, 2, 13, 17, 5, 3)
    backend = select_backend("cuda")
    assert backend.name == "cuda" and "C++ shim" in backend.describe()
    scores = backend.run(np.ascontiguousarray(image.transpose(0, 3, 1, 2)), logits, params)
    assert type(scores) is np.ndarray and scores.dtype == np.float32
    assert_matches_reference(scores, image, logits, params)


def test_backend_returns_the_kind_of_array_it_was_given(fake_cupy):
    params = CRFParams(filter_size=3, blur=2, iterations=2)
    image, logits = random_inputs(2, 1, 9, 11, 3, 3)
    image_nfhw = np.ascontiguousarray(image.transpose(0, 3, 1, 2))
    backend = select_backend("cuda")
    on_device = backend.run(fake_cupy.asarray(image_nfhw), fake_cupy.asarray(logits), params)
    assert type(on_device) is fake_cupy.ndarray
    on_torch = backend.run(torch.from_numpy(image_nfhw), torch.from_numpy(logits), params)
    assert isinstance(on_torch, torch.Tensor)
    np.testing.assert_array_equal(on_torch.numpy(), on_device.get())


def test_batch_beyond_one_grid_takes_several_launches(fake_cupy, monkeypatch):
    # a grid of 12 blocks along z: 2 images of 5 classes per launch, so 3 launches for 5
    monkeypatch.setattr(cuda_plan, "MAX_GRID_YZ", 12)
    params = CRFParams(filter_size=3, blur=2, iterations=2)
    image, logits = random_inputs(3, 5, 10, 12, 5, 3)
    backend = select_backend("cuda", tune=False)
    scores = backend.run(np.ascontiguousarray(image.transpose(0, 3, 1, 2)), logits, params)
    assert fake_cupy.launches.count("convcrf_init") == 3
    assert_matches_reference(scores, image, logits, params)


TUNE_PARAMS = CRFParams(filter_size=5, blur=2, iterations=2)


def tune_inputs():
    image, logits = random_inputs(5, 2, 14, 18, 4, 3)
    return np.ascontiguousarray(image.transpose(0, 3, 1, 2)), logits, image


def test_tuning_times_every_variant_then_keeps_its_choice(fake_cupy):
    image_nfhw, logits, image = tune_inputs()
    backend = select_backend("cuda")
    scores = backend.run(image_nfhw, logits, TUNE_PARAMS)
    assert_matches_reference(scores, image, logits, TUNE_PARAMS)
    [tuning] = backend.tunings
    # blur 2 on a small device: the default is "per-cell"; split, tiled, fused are timed too,
    # then the fastest of them with loads in groups of 4 and 8
    names = list(tuning.times_ms)
    assert names[:4] == ["per-cell", "split", "tiled", "fused"]
    fastest = min(names[:4], key=tuning.times_ms.get)
    assert names[4:] == [f"{fastest}:g4", f"{fastest}:g8"]
    assert tuning.rejected == {} and not tuning.from_cache
    assert tuning.times_ms[tuning.chosen] == min(tuning.times_ms.values())
    # each variant: one untimed and at least 3 timed runs (one convcrf_init each)
    assert fake_cupy.launches.count("convcrf_init") >= 6 * 4
    assert "convcrf_message_split" in fake_cupy.launches
    assert "convcrf_step_fused" in fake_cupy.launches
    cache = json.loads((Path(os.environ["CONVCRF_CACHE_DIR"]) / "cuda_tuning.json").read_text())
    assert list(cache.values()) == [tuning.chosen]
    fake_cupy.launches.clear()
    again = backend.run(image_nfhw, logits, TUNE_PARAMS)  # remembered: one run, no timing
    assert fake_cupy.launches.count("convcrf_init") == 1 and len(backend.tunings) == 1
    np.testing.assert_allclose(again, scores, rtol=1e-5, atol=1e-5)
    # a batch of about the same size (2x14x19 against 2x14x18 pixels) takes the same choice
    fake_cupy.launches.clear()
    wider_image, wider_logits = random_inputs(6, 2, 14, 19, 4, 3)
    wider = backend.run(np.ascontiguousarray(wider_image.transpose(0, 3, 1, 2)), wider_logits,
                        TUNE_PARAMS)  # fmt: skip
    assert fake_cupy.launches.count("convcrf_init") == 1 and len(backend.tunings) == 1
    assert_matches_reference(wider, wider_image, wider_logits, TUNE_PARAMS)


@pytest.mark.parametrize("cached", ["split", "fused:g8"])
def test_a_cached_choice_is_launched_without_timing(fake_cupy, cached):
    image_nfhw, logits, image = tune_inputs()
    config = cuda._device_launch_config(0)
    plan = cuda._cached_plan(image_nfhw.shape, logits.shape, TUNE_PARAMS, config)
    TuningCache().put(cuda._tuning_key(0, plan), cached)  # as a process before this one left it
    backend = select_backend("cuda")
    scores = backend.run(image_nfhw, logits, TUNE_PARAMS)
    assert_matches_reference(scores, image, logits, TUNE_PARAMS)
    assert [t.describe() for t in backend.tunings] == [
        f"CUDA launch plan for 2x4x14x18 k=5 blur 2: {cached} (tuned earlier, cached)"
    ]
    assert fake_cupy.launches.count("convcrf_pool_features") == 1
    chosen = {"split": "convcrf_message_split", "fused:g8": "convcrf_step_fused"}[cached]
    assert chosen in fake_cupy.launches and "convcrf_message" not in fake_cupy.launches
    # the module launched is compiled with the variant's load group
    assert fake_cupy.compiled[-1] == (plan.class_block, {"split": 1, "fused:g8": 8}[cached])


def _failing_split_launches(fake_cupy, monkeypatch) -> None:
    """Launches of convcrf_message_split raise, as a launch the device refuses."""
    launch = fake_cupy._Kernel.__call__

    def refuse_split(kernel, *args, **kwargs):
        if kernel.name == "convcrf_message_split":
            raise RuntimeError("CUDA_ERROR_LAUNCH_FAILED: unspecified launch failure")
        return launch(kernel, *args, **kwargs)

    monkeypatch.setattr(fake_cupy._Kernel, "__call__", refuse_split)


def test_a_variant_that_fails_to_launch_is_left_out(fake_cupy, monkeypatch):
    _failing_split_launches(fake_cupy, monkeypatch)
    image_nfhw, logits, image = tune_inputs()
    backend = select_backend("cuda")
    scores = backend.run(image_nfhw, logits, TUNE_PARAMS)
    assert_matches_reference(scores, image, logits, TUNE_PARAMS)
    [tuning] = backend.tunings
    assert tuning.rejected == {"split": "RuntimeError: CUDA_ERROR_LAUNCH_FAILED: unspecified "
                               "launch failure"}  # fmt: skip
    assert "split" not in tuning.times_ms and tuning.chosen != "split"


def test_a_variant_that_breaks_the_device_stops_with_the_way_out(fake_cupy, monkeypatch):
    from convcrf_cli.backends import DeviceError

    _failing_split_launches(fake_cupy, monkeypatch)

    def broken():
        raise RuntimeError("cudaErrorIllegalAddress: an illegal memory access was encountered")

    monkeypatch.setattr(fake_cupy.cuda.runtime, "deviceSynchronize", broken)
    image_nfhw, logits, _ = tune_inputs()
    with pytest.raises(DeviceError, match=r"variant split failed .* unusable .* --no-tune"):
        select_backend("cuda").run(image_nfhw, logits, TUNE_PARAMS)


def rejected_problem(class_block: int, load_group: int = 1) -> str:
    """What the backend says of a module of ``fake_cupy.rejected``: its defines and the error
    line of ``fake_cupy.NVRTC_LOG`` (not its first line, a warning)."""
    defines = f"-DCONVCRF_CLASS_BLOCK={class_block} -DCONVCRF_LOAD_GROUP={load_group}"
    error = "line 840: error: too many resources requested for launch"
    return f"the CUDA kernels do not compile or load with {defines}: {error}"


def test_a_variant_that_fails_to_compile_is_left_out(fake_cupy):
    fake_cupy.rejected.update({(4, 4), (4, 8)})  # NVRTC rejects the modules of grouped loads
    image_nfhw, logits, image = tune_inputs()
    backend = select_backend("cuda")
    scores = backend.run(image_nfhw, logits, TUNE_PARAMS)
    assert_matches_reference(scores, image, logits, TUNE_PARAMS)
    [tuning] = backend.tunings
    fastest = tuning.chosen  # the fastest of the variants at load group 1
    rejected = {f"{fastest}:g4": rejected_problem(4, 4), f"{fastest}:g8": rejected_problem(4, 8)}
    assert tuning.rejected == rejected and ":g" not in fastest
    assert f"; {fastest}:g8 left out: {rejected_problem(4, 8)}" in tuning.describe()  # -v
    # another size class tunes again, without compiling the rejected modules again
    backend.run(image_nfhw, logits, dataclasses.replace(TUNE_PARAMS, iterations=1))
    [_, again] = backend.tunings
    assert again.rejected.keys() == {f"{again.chosen}:g4", f"{again.chosen}:g8"}
    assert fake_cupy.attempted.count((4, 4)) == fake_cupy.attempted.count((4, 8)) == 1


def test_a_cached_plan_that_no_longer_compiles_is_timed_again(fake_cupy):
    fake_cupy.rejected.add((4, 8))  # as where the cache was written with another compiler
    image_nfhw, logits, image = tune_inputs()
    config = cuda._device_launch_config(0)
    default = cuda._cached_plan(image_nfhw.shape, logits.shape, TUNE_PARAMS, config)
    key = cuda._tuning_key(0, default)
    TuningCache().put(key, "fused:g8")
    backend = select_backend("cuda")
    scores = backend.run(image_nfhw, logits, TUNE_PARAMS)
    assert_matches_reference(scores, image, logits, TUNE_PARAMS)
    [tuning] = backend.tunings
    assert not tuning.from_cache and not tuning.chosen.endswith(":g8")
    assert TuningCache().get(key) == tuning.chosen  # the new choice replaces the cached one
    cuda._tuned_variants.clear()  # as a later process: it takes the new choice from the cache
    later = select_backend("cuda")
    later.run(image_nfhw, logits, TUNE_PARAMS)
    assert [(t.chosen, t.from_cache) for t in later.tunings] == [(tuning.chosen, True)]


@pytest.mark.parametrize("command", ["refine", "batch"])
@pytest.mark.parametrize("tune_flag", ["--tune", "--no-tune"])
def test_a_default_plan_that_does_not_compile_stops_with_one_line(
    fake_cupy, tmp_path, tune_flag, command
):
    from convcrf_cli.cli import main

    # 5 classes, one chunk of 5: a module of its own (selecting the device compiles 4)
    fake_cupy.rejected.add((5, 1))
    image, logits = random_inputs(6, 1, 12, 16, 5, 3)
    (tmp_path / "images").mkdir()
    (tmp_path / "unaries").mkdir()
    Image.fromarray(np.clip(image[0], 0, 255).astype(np.uint8)).save(tmp_path / "images/a.png")
    np.save(tmp_path / "unaries/a.npy", logits[0])
    if command == "refine":
        args = ["refine", str(tmp_path / "images/a.png"), str(tmp_path / "unaries/a.npy")]
        args += ["-o", str(tmp_path / "labels.png")]
    else:
        args = ["batch", str(tmp_path / "images"), str(tmp_path / "unaries"), "-o"]
        args += [str(tmp_path / "labels"), "--quiet"]
    result = cli_runner().invoke(main, [*args, "--device", "cuda", "--blur", "2", tune_flag])
    line = f"convcrf: error: {rejected_problem(5)}; use --device cpu\n"
    if command == "refine":
        assert (result.exit_code, result.stderr) == (2, line)
        assert not (tmp_path / "labels.png").exists()
    else:  # the item fails, as on any backend error
        item = tmp_path / "images/a.png"
        line = line.replace("error: ", f"error: {item}: ", 1)
        assert (result.exit_code, result.stderr) == (
            1,
            f"{line}convcrf: error: 1 of 1 items failed: {item}\n",
        )


def test_auto_reports_the_module_that_does_not_compile_in_one_line(fake_cupy):
    fake_cupy.rejected.add((4, 1))  # the module selecting a device compiles
    assert select_backend("auto").fallback_reason == rejected_problem(4)


def test_no_tuning_runs_the_default_plan_once(fake_cupy):
    image_nfhw, logits, image = tune_inputs()
    backend = select_backend("cuda", tune=False)
    assert_matches_reference(
        backend.run(image_nfhw, logits, TUNE_PARAMS), image, logits, TUNE_PARAMS
    )
    assert fake_cupy.launches.count("convcrf_init") == 1 and backend.tunings == []
    assert "convcrf_message" in fake_cupy.launches
    assert not any(Path(os.environ["CONVCRF_CACHE_DIR"]).iterdir())


@pytest.mark.parametrize("tune_flag", ["--tune", "--no-tune"])
def test_refine_reports_the_tuning_with_verbose(fake_cupy, tmp_path, tune_flag):
    from convcrf_cli.cli import main

    image, logits = random_inputs(6, 1, 12, 16, 3, 3)
    Image.fromarray(np.clip(image[0], 0, 255).astype(np.uint8)).save(tmp_path / "image.png")
    np.save(tmp_path / "unary.npy", logits[0])
    args = ["refine", str(tmp_path / "image.png"), str(tmp_path / "unary.npy")]
    args += ["-o", str(tmp_path / "labels.png"), "--device", "cuda", "--blur", "2", "-v"]
    result = cli_runner().invoke(main, [*args, tune_flag])
    assert result.exit_code == 0, result.output
    tuned = "convcrf: CUDA launch plan for 1x3x12x16 k=9 blur 2: "
    assert (tuned in result.stderr) == (tune_flag == "--tune")
    assert np.asarray(Image.open(tmp_path / "labels.png")).shape == (12, 16)


def test_batch_on_cuda_takes_the_labels_on_the_device(fake_cupy, tmp_path):
    """``convcrf batch --device cuda`` writes the CPU backend's labels, probabilities and
    report, copying back only the labels, the unary's labels and the scores of the items that
    write probabilities."""
    from convcrf_cli.cli import main

    runner = cli_runner()
    data = tmp_path / "data"
    assert runner.invoke(main, ["synth", str(data), "--count", "3", "--size", "20x26",
                                "--classes", "4"]).exit_code == 0  # fmt: skip
    reports = {}
    for device in ("cuda", "cpu"):
        out = tmp_path / device
        args = ["batch", str(data / "images"), str(data / "unaries"), "-o", str(out / "labels")]
        args += ["--probs-dir", str(out / "probs"), "--report", str(out / "report.jsonl")]
        args += ["--device", device, "--no-tune", "-k", "5", "--blur", "2", "--out-format", "npy"]
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
        records = [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]
        reports[device] = {r["key"]: r for r in records if "key" in r}
    names = sorted(p.name for p in (data / "unaries").glob("*.npy"))
    assert len(names) == 3 and len(reports["cuda"]) == 3
    for name in names:
        cuda_labels = np.load(tmp_path / "cuda" / "labels" / name)
        np.testing.assert_array_equal(cuda_labels, np.load(tmp_path / "cpu" / "labels" / name))
        cuda_probs = np.load(tmp_path / "cuda" / "probs" / name)
        np.testing.assert_allclose(cuda_probs, np.load(tmp_path / "cpu" / "probs" / name),
                                   atol=1e-4)  # fmt: skip
    for key, record in reports["cuda"].items():
        for field in ("status", "changed_pixels", "histogram", "unary_histogram"):
            assert record.get(field) == reports["cpu"][key].get(field), (key, field)
    # three images in one launch: labels and unary labels [3,20,26] once each, scores per item
    shapes = [shape for shape, _ in fake_cupy.transfers]
    assert shapes.count((3, 20, 26)) == 2 and shapes.count((4, 20, 26)) == 3


def test_class_argmax_takes_the_first_of_tied_classes(fake_cupy):
    from convcrf_cli.pipeline import class_argmax

    scores = np.random.default_rng(0).normal(size=(2, 6, 5, 7)).astype(np.float32)
    top = scores[0].max(axis=0)
    scores[0, 0] = top - 1
    scores[0, 1] = scores[0, 4] = top  # tied maxima: class 1 wins
    labels = select_backend("cuda").class_argmax(fake_cupy.asarray(scores))
    assert labels.dtype == np.int32 and (labels[0] == 1).all()
    np.testing.assert_array_equal(labels, np.stack([class_argmax(s) for s in scores]))


def test_refine_on_cuda_copies_scores_back_only_for_probabilities(fake_cupy, tmp_path):
    from convcrf_cli.cli import main

    image, logits = random_inputs(8, 1, 18, 21, 5, 3)
    Image.fromarray(np.clip(image[0], 0, 255).astype(np.uint8)).save(tmp_path / "image.png")
    np.save(tmp_path / "unary.npy", logits[0])
    args = ["refine", str(tmp_path / "image.png"), str(tmp_path / "unary.npy"), "--blur", "2"]
    args += ["--unary-type", "logit", "--device", "cuda", "--no-tune", "-o"]
    for extra, copies in (([], 0), (["--probs", str(tmp_path / "probs.npy")], 1)):
        fake_cupy.transfers.clear()
        result = cli_runner().invoke(main, [*args, str(tmp_path / "labels.npy"), *extra])
        assert result.exit_code == 0, result.output
        shapes = [shape for shape, _ in fake_cupy.transfers]
        assert shapes.count((1, 18, 21)) == 2  # the refined and the unary labels, int32
        assert shapes.count((5, 18, 21)) == copies  # the scores, only for the probabilities
    labels = np.load(tmp_path / "labels.npy")
    probs = np.load(tmp_path / "probs.npy")
    np.testing.assert_array_equal(labels, probs.argmax(0))


def test_refine_on_cuda_equals_refine_on_cpu(fake_cupy):
    params = CRFParams(filter_size=5, blur=3, iterations=4)
    image, logits = random_inputs(4, 1, 20, 23, 4, 3)
    on_cuda = refine(image[0], logits[0], params, device="cuda")
    on_cpu = refine(image[0], logits[0], params, device="cpu")
    np.testing.assert_allclose(on_cuda, on_cpu, rtol=1e-4, atol=1e-4)


def test_info_reports_the_device_and_auto_takes_it(fake_cupy):
    from convcrf_cli.cli import main

    result = cli_runner().invoke(main, ["info"])
    assert result.exit_code == 0, result.output
    assert "cuda devices: 1" in result.output
    assert "cuda:0: C++ shim of the CUDA kernels" in result.output
    assert "(kernels load)" in result.output
    cache = Path(os.environ["CONVCRF_CACHE_DIR"]) / "cuda_tuning.json"
    assert f"tuned launch plans: none yet (kept in {cache} once timed)\n" in result.output
    assert "--device auto uses: cuda:0 (C++ shim of the CUDA kernels" in result.output


@pytest.mark.parametrize(
    ("text", "count", "fault"),
    [
        ('{"a": "tiled", "b": 1, "c": "fastest"}', 1,
         "; the file holds entries that are no launch plan (2 of 3, ignored)"),
        ('["tiled", "split"]', 0, "; the file holds no JSON object"),
        ("{not json", 0, "; the file is not valid JSON"),
        ("[" * 100_000, 0, "; the file is not valid JSON"),
        ('{"a": "tiled"}', 1, ""),
    ],
)  # fmt: skip
def test_info_counts_only_the_launch_plans_of_the_tuning_cache(fake_cupy, text, count, fault):
    from convcrf_cli.cli import main

    cache = Path(os.environ["CONVCRF_CACHE_DIR"]) / "cuda_tuning.json"
    cache.write_text(text)
    result = cli_runner().invoke(main, ["info"])
    assert result.exit_code == 0, result.output
    line = f"tuned launch plans: {count} in {cache}{fault} (delete it to time them again)\n"
    assert line in result.output


def test_gpu_benchmark_script_runs_and_prints_its_tables(fake_cupy, monkeypatch, capsys):
    """bench/bench_gpu.py as on a GPU, on two small cases, each timing one run (the shim's
    times mean nothing): each case's row of the main table with the launch variant the backend
    chose, its tuning line, and its rows of the inference variants and of the message kernels,
    each equal to the default's numbers to 1e-4."""
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("bench_gpu", None)
    bench_gpu = importlib.import_module("bench_gpu")
    try:
        cases = [
            ("40x30 C=5 blur 2 k=5", 30, 40, 5, 2, 5),
            ("40x30 C=3 blur 1 k=3", 30, 40, 3, 1, 3),
        ]
        monkeypatch.setattr(bench_gpu, "CASES", cases)
        monkeypatch.setattr(bench_gpu, "copy_bandwidth", lambda: 1e12)
        monkeypatch.setattr(bench_gpu, "time_gpu_ms", lambda fn, *args: _once_ms(fn))
        monkeypatch.setattr(cuda, "median_ms", lambda timed_run: timed_run())
        monkeypatch.setattr(sys, "argv", ["bench_gpu.py", "--repeats", "1", "--no-baseline"])
        bench_gpu.main()
    finally:
        sys.modules.pop("bench_gpu", None)
    output = capsys.readouterr().out
    for case in ("1x5x30x40 k=5 blur 2", "1x3x30x40 k=3 blur 1"):
        assert f"- CUDA launch plan for {case}: " in output
    rows = [line.split(" | ") for line in output.splitlines()]
    names = {label: [] for label, *_ in cases}
    for row in rows:
        label = row[0].lstrip("| ")
        if label in names:
            names[label].append(row[1])
        if label in names and len(row) == 5:  # comparison rows: time, ratio, largest difference
            assert float(row[4].rstrip(" |")) <= 1e-4, row
    assert all(is_variant(names[label][0]) for label in names)
    assert names["40x30 C=5 blur 2 k=5"][1:] == [
        *("default", "split message", "tiled message", "fused iterations"),
        *("per-cell", "split", "tiled"),
    ]
    assert names["40x30 C=3 blur 1 k=3"][1:] == [
        *("default", "split message", "tiled message"),  # no fused iterations at blur 1
        *("per-cell", "split", "tiled"),
    ]


def test_gpu_profile_script_runs_and_prints_each_kernel(fake_cupy, monkeypatch, capsys):
    """bench/gpu_profile.py as on a GPU (one small case, a sweep of two configurations, one
    run per timing): a row per kernel with its launches per inference, the host, event and
    graph-replay times, and a row per configuration of the sweep."""
    monkeypatch.syspath_prepend(str(BENCH))
    for name in ("bench_gpu", "gpu_profile"):
        sys.modules.pop(name, None)
    gpu_profile = importlib.import_module("gpu_profile")
    try:
        monkeypatch.setattr(gpu_profile, "CASES", [("40x30 blur 2 k=5", 30, 40, 2, 5)])
        monkeypatch.setattr(gpu_profile, "CELL_BLOCKS", ((16, 16), (8, 8)))
        monkeypatch.setattr(gpu_profile, "POOLS", ((256, 256),))
        monkeypatch.setattr(gpu_profile, "HOST_RUNS", 1)
        monkeypatch.setattr(gpu_profile, "time_gpu_ms", lambda fn, *args: _once_ms(fn))
        gpu_profile.main()
    finally:
        for name in ("bench_gpu", "gpu_profile"):
            sys.modules.pop(name, None)
    output = capsys.readouterr().out
    rows = {
        row[0]: row[1:] for row in (line.strip("| ").split(" | ") for line in output.splitlines())
    }
    launches = {"convcrf_pool_features": 1, "convcrf_init": 1, "convcrf_message": 5}
    launches |= {"convcrf_step": 4, "convcrf_final": 1}
    for kernel, count in launches.items():
        assert rows[kernel][0] == str(count), (kernel, output)
        assert float(rows[kernel][1]) > 0
    assert "CUDA graph replay" in output
    assert [row for row in rows if row in ("(16, 16)", "(8, 8)")] == ["(16, 16)", "(8, 8)"]
    assert all(float(rows[cell][-1]) > 0 for cell in ("(16, 16)", "(8, 8)"))


def _once_ms(fn) -> float:
    fn()
    return 1.0


def test_refine_on_a_second_device_allocates_and_computes_there(fake_cupy, monkeypatch, tmp_path):
    """``--device cuda:1``: the pipeline's copies to the device, the labels taken there and
    the checks of device arrays run on cuda:1, not on CuPy's current device (cuda:0)."""
    from convcrf_cli.cli import main

    monkeypatch.setattr(fake_cupy, "device_count", 2)
    image, logits = random_inputs(8, 1, 18, 21, 5, 3)
    Image.fromarray(np.clip(image[0], 0, 255).astype(np.uint8)).save(tmp_path / "image.png")
    np.save(tmp_path / "unary.npy", logits[0])
    args = ["refine", str(tmp_path / "image.png"), str(tmp_path / "unary.npy"), "--blur", "2"]
    args += ["--unary-type", "logit", "--no-tune", "-o"]
    for device in ("cuda:0", "cuda:1"):
        out = tmp_path / f"{device[-1]}.npy"
        result = cli_runner().invoke(main, [*args, str(out), "--device", device])
        assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(np.load(tmp_path / "1.npy"), np.load(tmp_path / "0.npy"))

    params = CRFParams(filter_size=5, blur=2, iterations=2)
    with fake_cupy.cuda.Device(1):
        image_d, logits_d = fake_cupy.asarray(image[0]), fake_cupy.asarray(logits[0])
    scores = refine(image_d, logits_d, params, device="cuda:1")
    assert scores.device.id == 1
    np.testing.assert_allclose(scores.get(), refine(image[0], logits[0], params), atol=1e-4)
