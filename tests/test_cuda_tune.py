"""The choice of launch variant (``convcrf_cli/backends/cuda_tune.py``): which candidate plans
exist for a shape, which one :func:`tune` keeps from given timings and scores, the median of the
timed runs, and the cache file. No device and no shim: timings and scores are given here."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from convcrf_cli.backends import DeviceError, cuda_tune
from convcrf_cli.backends.cuda_plan import LaunchConfig, MeanFieldPlan
from convcrf_cli.backends.cuda_tune import (
    TuningCache,
    cache_key,
    candidate_plans,
    is_variant,
    load_group_plans,
    median_ms,
    tune,
    variant_config,
    variant_name,
)
from convcrf_cli.params import CRFParams

CONFIG = LaunchConfig(shared_memory=64 * 1024, tiled_min_blocks=1000)
PARAMS = CRFParams(filter_size=7, blur=4)
IMAGE, LOGITS = (1, 3, 375, 500), (1, 21, 375, 500)


def relative_difference(candidate, reference) -> float:
    return float(np.abs(candidate - reference).max() / max(1.0, np.abs(reference).max()))


def test_candidates_are_every_variant_default_first():
    plans = candidate_plans(IMAGE, LOGITS, PARAMS, CONFIG)
    names = [variant_name(plan) for plan in plans]
    # auto picks "per-cell" below tiled_min_blocks; fused iterations exist at blur > 1
    assert names == ["per-cell", "split", "tiled", "fused"]
    assert plans[0] == MeanFieldPlan.create(IMAGE, LOGITS, PARAMS, CONFIG)
    assert plans[3].fused and not any(plan.fused for plan in plans[:3])


def test_candidates_leave_out_variants_the_shape_cannot_take():
    # blur 1: no fused iterations; 5 image channels: 7 features, more than "tiled" holds
    plans = candidate_plans((2, 5, 64, 80), (2, 4, 64, 80), CRFParams(blur=1), CONFIG)
    assert [variant_name(plan) for plan in plans] == ["per-cell", "split"]
    # a plan "auto" resolves to "tiled" is listed once, first
    many_blocks = LaunchConfig(shared_memory=64 * 1024, tiled_min_blocks=1)
    names = [variant_name(p) for p in candidate_plans(IMAGE, LOGITS, PARAMS, many_blocks)]
    assert names == ["tiled", "per-cell", "split", "fused"]


def test_candidates_raise_where_the_default_plan_does():
    small = LaunchConfig(shared_memory=1024)
    with pytest.raises(DeviceError):
        candidate_plans(IMAGE, LOGITS, CRFParams(filter_size=13, blur=4), small)


def launches(plan: MeanFieldPlan) -> tuple:
    """What a plan launches: its message kernel, class block and fused layout."""
    return (plan.message_kernel, plan.class_block, plan.fused_layout, plan.message_launch(0, 0, 0))


def test_variant_config_reproduces_each_candidate():
    for plan in candidate_plans(IMAGE, LOGITS, PARAMS, CONFIG):
        config = variant_config(CONFIG, variant_name(plan))
        assert launches(MeanFieldPlan.create(IMAGE, LOGITS, PARAMS, config)) == launches(plan)
    for name in ("fastest", "split:g3", "split:gx", "fused:"):
        with pytest.raises(ValueError, match="unknown launch variant"):
            variant_config(CONFIG, name)


def test_load_group_variants_are_named_and_made():
    plan = candidate_plans(IMAGE, LOGITS, PARAMS, CONFIG)[1]  # split
    others = load_group_plans(plan)
    assert [variant_name(other) for other in others] == ["split:g4", "split:g8"]
    assert [other.module for other in others] == [(plan.class_block, 4), (plan.class_block, 8)]
    assert launches(others[1]) == launches(plan)  # the same launches, another module
    eight = variant_config(CONFIG, "fused:g8")
    assert (eight.fuse_message, eight.load_group) == (True, 8)
    assert variant_name(MeanFieldPlan.create(IMAGE, LOGITS, PARAMS, eight)) == "fused:g8"
    assert is_variant("tiled:g4") and not is_variant("tiled:g2") and not is_variant(["split"])
    with pytest.raises(ValueError, match="load_group must be one of"):
        MeanFieldPlan.create(IMAGE, LOGITS, PARAMS, dataclasses.replace(CONFIG, load_group=3))


def fake_measure(times_ms: dict, scores: dict, calls: list):
    def measure(plan):
        name = variant_name(plan)
        calls.append(name)
        if isinstance(times_ms[name], Exception):
            raise times_ms[name]
        return times_ms[name], scores.get(name, scores["per-cell"])

    return measure


def test_tune_keeps_the_fastest_variant_whose_scores_agree():
    plans = candidate_plans(IMAGE, LOGITS, PARAMS, CONFIG)
    reference = np.linspace(-8, 8, 50, dtype=np.float32)
    times = {"per-cell": 0.40, "split": 0.21, "tiled": 0.35, "fused": 0.18}
    scores = {"per-cell": reference, "fused": reference + 0.5, "split": reference + 1e-6}
    calls: list[str] = []
    best, tuning = tune(plans, fake_measure(times, scores, calls), relative_difference)
    assert calls == ["per-cell", "split", "tiled", "fused"]
    # fused is fastest but off by 0.5 / 8: left out; split is next and agrees to rounding
    assert variant_name(best) == tuning.chosen == "split"
    assert tuning.times_ms == {"per-cell": 0.40, "split": 0.21, "tiled": 0.35}
    assert tuning.rejected["fused"] == "scores differ from per-cell's by 6.25e-02"
    assert tuning.case == "1x21x375x500 k=7 blur 4"
    line = tuning.describe()
    assert line.startswith("CUDA launch plan for 1x21x375x500 k=7 blur 4: split (timed: ")
    assert "per-cell 0.400 ms" in line and "fused left out: scores differ" in line


def test_tune_then_tries_the_fastest_at_other_load_groups():
    plans = candidate_plans(IMAGE, LOGITS, PARAMS, CONFIG)
    reference = np.linspace(-8, 8, 50, dtype=np.float32)
    times = {"per-cell": 0.40, "split": 0.21, "tiled": 0.35, "fused": 0.30}
    times |= {"split:g4": 0.15, "split:g8": 0.17}
    calls: list[str] = []
    best, tuning = tune(
        plans,
        fake_measure(times, {"per-cell": reference}, calls),
        relative_difference,
        load_group_plans,
    )
    assert calls == ["per-cell", "split", "tiled", "fused", "split:g4", "split:g8"]
    assert variant_name(best) == tuning.chosen == "split:g4" and best.module[1] == 4


def test_tune_keeps_the_default_when_it_is_fastest_or_the_others_fail():
    plans = candidate_plans(IMAGE, LOGITS, PARAMS, CONFIG)
    reference = np.ones(4, np.float32)
    nan = np.full(4, np.nan, np.float32)
    failure = RuntimeError("too many resources requested for launch\nat convcrf_message_split")
    times = {"per-cell": 0.3, "split": failure, "tiled": 0.5, "fused": 0.1}
    best, tuning = tune(
        plans, fake_measure(times, {"per-cell": reference, "fused": nan}, []), relative_difference
    )
    assert best is plans[0] and tuning.chosen == "per-cell"
    assert tuning.rejected["split"] == "RuntimeError: too many resources requested for launch"
    assert tuning.rejected["fused"].startswith("scores differ from per-cell's by nan")
    assert list(tuning.times_ms) == ["per-cell", "tiled"]


def test_tune_raises_a_candidates_device_error():
    plans = candidate_plans(IMAGE, LOGITS, PARAMS, CONFIG)
    times = {"per-cell": 0.3, "split": DeviceError("cuda:0 unusable"), "tiled": 0.2}
    with pytest.raises(DeviceError, match="cuda:0 unusable"):
        tune(plans, fake_measure(times, {"per-cell": np.ones(3)}, []), relative_difference)


def test_tune_raises_the_default_plans_error():
    plans = candidate_plans(IMAGE, LOGITS, PARAMS, CONFIG)
    times = {"per-cell": RuntimeError("out of memory")}
    with pytest.raises(RuntimeError, match="out of memory"):
        tune(plans, fake_measure(times, {"per-cell": None}, []), relative_difference)


def runs_of(times: list[float]):
    """A timed run returning ``times`` in turn, and the list of runs made."""
    made: list[float] = []

    def timed_run() -> float:
        made.append(times[len(made)])
        return made[-1]

    return timed_run, made


def test_median_ms_times_as_many_runs_as_the_budget_allows():
    # 1 untimed run, then 20 ms / 1 ms -> at most 15 timed runs
    timed_run, made = runs_of([50.0] + [1.0, 3.0, 2.0] * 10)
    assert median_ms(timed_run) == 2.0 and len(made) == 16
    # 20 ms / 10 ms -> 2, at least 3 timed runs; the untimed first run is not in the median
    timed_run, made = runs_of([900.0, 10.0, 12.0, 11.0, 99.0])
    assert median_ms(timed_run) == 11.0 and len(made) == 4


def test_cache_key_names_everything_a_choice_depends_on():
    plan = MeanFieldPlan.create(IMAGE, LOGITS, PARAMS, CONFIG)
    key = cache_key("H100 sm_90", "source", plan, CONFIG)
    other_plans = [
        MeanFieldPlan.create((2, 3, 375, 500), (2, 21, 375, 500), PARAMS, CONFIG),
        MeanFieldPlan.create(IMAGE, LOGITS, CRFParams(filter_size=5, blur=4), CONFIG),
    ]
    others = [cache_key("H200 sm_90", "source", plan, CONFIG)]
    others += [cache_key("H100 sm_90", "source 2", plan, CONFIG)]
    others += [cache_key("H100 sm_90", "source", other, CONFIG) for other in other_plans]
    wider = LaunchConfig(shared_memory=48 * 1024, tiled_min_blocks=1000)
    others += [cache_key("H100 sm_90", "source", plan, wider)]
    assert len({key, *others}) == 1 + len(others)
    assert key == cache_key("H100 sm_90", "source", plan, CONFIG)


def test_batches_of_about_the_same_size_share_a_choice():
    def key(batch, height, width, classes=21):
        plan = MeanFieldPlan.create(
            (batch, 3, height, width), (batch, classes, height, width), PARAMS, CONFIG
        )
        return cache_key("H100 sm_90", "source", plan, CONFIG)

    # 500x375 (187500 pixels): 2·log2 = 35.03; the class holds 2·log2 in [34.5, 35.5)
    assert key(1, 375, 500) == key(1, 333, 500) == key(1, 375, 580) == key(1, 400, 500)
    assert key(1, 375, 500) != key(1, 300, 500)  # 2·log2 = 34.4: the next class down
    assert key(1, 375, 500) != key(2, 375, 500)  # twice the pixels: two classes up
    assert key(1, 375, 500) != key(1, 375, 500, classes=20)


def test_cache_round_trip_and_what_it_ignores(tmp_path):
    cache = TuningCache(tmp_path / "new")
    assert cache.get("a") is None
    cache.put("a", "split")
    cache.put("b", "fused")
    assert TuningCache(tmp_path / "new").get("a") == "split" and len(cache) == 2
    assert json.loads(cache.path.read_text()) == {"a": "split", "b": "fused"}
    cache.path.write_text(json.dumps({"a": "fastest", "b": ["tiled"]}))
    assert cache.get("a") is None and cache.get("b") is None
    cache.path.write_text("{not json")
    assert cache.get("a") is None
    cache.put("c", "tiled")  # a corrupt file is replaced
    assert json.loads(cache.path.read_text()) == {"c": "tiled"}


def test_cache_says_what_is_wrong_with_its_file(tmp_path):
    cache = TuningCache(tmp_path)
    assert cache.problem() is None and len(cache) == 0  # absent: nothing wrong
    cache.path.mkdir()
    assert cache.problem() == "cannot be read (Is a directory)" and len(cache) == 0
    cache.path.rmdir()
    cache.path.write_text(json.dumps({"a": "split", "b": "fastest"}))
    assert cache.problem() == "holds entries that are no launch plan (1 of 2, ignored)"
    assert len(cache) == 1


def test_cache_keeps_the_newest_entries(tmp_path, monkeypatch):
    monkeypatch.setattr(cuda_tune, "CACHE_ENTRIES", 3)
    cache = TuningCache(tmp_path)
    for key in "abcd":
        cache.put(key, "per-cell")
    cache.put("b", "split")  # written again: now the newest
    cache.put("e", "tiled")
    assert list(json.loads(cache.path.read_text())) == ["d", "b", "e"]


def test_cache_that_cannot_be_written_is_left_alone(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cache = TuningCache(blocker / "convcrf")
    cache.put("a", "split")  # no error: the choice is only not kept
    assert cache.get("a") is None and blocker.read_text() == "not a directory"


def test_cache_directory_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CONVCRF_CACHE_DIR", str(tmp_path / "here"))
    assert cuda_tune.cache_directory() == tmp_path / "here"
    monkeypatch.delenv("CONVCRF_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cuda_tune.cache_directory() == tmp_path / "xdg" / "convcrf"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cuda_tune.cache_directory() == tmp_path / "home" / ".cache" / "convcrf"
