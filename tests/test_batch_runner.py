"""The batch runner: same-sized runs share one CRF call, results equal single refinement,
failures are isolated (or stop the run with fail_fast), existing outputs are skipped."""

from __future__ import annotations

import dataclasses
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convcrf_cli import batch_runner
from convcrf_cli.backends.cpu import CPUBackend
from convcrf_cli.batch_items import BatchItem
from convcrf_cli.batch_runner import DONE, FAILED, SKIPPED, BatchSettings, BatchStats, run_batch
from convcrf_cli.core import refine
from convcrf_cli.outputs import OutputSpec
from convcrf_cli.params import CRFParams
from convcrf_cli.pipeline import UnaryOptions

PARAMS = CRFParams(iterations=3)


class RecordingBackend(CPUBackend):
    """The CPU backend, noting the batch size and image size of every call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, int, int]] = []

    def run(self, image, logits, params):
        self.calls.append((image.shape[0], image.shape[2], image.shape[3]))
        return super().run(image, logits, params)


def _items(root: Path, sizes: list[tuple[int, int]]) -> list[BatchItem]:
    rng = np.random.default_rng(0)
    items = []
    for index, (height, width) in enumerate(sizes):
        image = root / f"{index}.png"
        unary = root / f"{index}.npy"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(image)
        np.save(unary, rng.normal(0, 2, (4, height, width)).astype(np.float32))
        items.append(BatchItem(str(index), image, unary, root / "out" / f"{index}.npy", None, None))
    return items


def _run(items, backend, settings, stats=None):
    def spec_for(item: BatchItem) -> OutputSpec:
        return OutputSpec(item.output)

    runner = run_batch(items, spec_for, PARAMS, backend, UnaryOptions("logit"), settings, stats)
    with closing(runner):
        return list(runner)


def test_same_sized_runs_share_a_call_and_equal_single_refinement(tmp_path):
    sizes = [(20, 30)] * 3 + [(17, 23)] + [(20, 30)] * 2
    items = _items(tmp_path, sizes)
    backend = RecordingBackend()
    stats = BatchStats()
    reports = _run(items, backend, BatchSettings(jobs=3, batch_size=2), stats)
    assert [r.status for r in reports] == [DONE] * 6
    assert backend.calls == [(2, 20, 30), (1, 20, 30), (1, 17, 23), (2, 20, 30)]
    assert stats.crf_seconds > 0
    for item in items:
        image = np.asarray(Image.open(item.image))
        logits = np.load(item.unary)
        expected = refine(image, logits, PARAMS, CPUBackend()).argmax(axis=0)
        np.testing.assert_array_equal(np.load(item.output), expected)


def test_a_failing_item_is_isolated_and_fail_fast_stops(tmp_path):
    items = _items(tmp_path, [(16, 16)] * 5)
    np.save(items[1].unary, np.zeros((4, 9, 9), np.float32))  # wrong size
    reports = _run(items, CPUBackend(), BatchSettings(jobs=2, batch_size=2))
    by_key = {r.item.key: r for r in reports}
    assert [by_key[str(i)].status for i in range(5)] == [DONE, FAILED, DONE, DONE, DONE]
    assert by_key["1"].error.startswith(str(items[1].unary))
    for item in items:
        item.output.unlink(missing_ok=True)
    stopped = _run(items, CPUBackend(), BatchSettings(jobs=1, fail_fast=True))
    assert sorted((r.item.key, r.status) for r in stopped) == [("0", DONE), ("1", FAILED)]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0.npy"]


def test_a_stopped_run_removes_the_directories_it_left_empty(tmp_path):
    items = [
        dataclasses.replace(item, output=tmp_path / "out" / item.key / f"{item.key}.npy")
        for item in _items(tmp_path, [(16, 16)] * 8)
    ]
    np.save(items[1].unary, np.zeros((4, 9, 9), np.float32))  # wrong size
    (tmp_path / "out" / "7").mkdir(parents=True)  # there before the run: kept
    reports = _run(items, CPUBackend(), BatchSettings(jobs=4, fail_fast=True))
    assert sorted((r.item.key, r.status) for r in reports) == [("0", DONE), ("1", FAILED)]
    left = sorted(p.relative_to(tmp_path / "out").as_posix() for p in tmp_path.rglob("out/**/*"))
    assert left == ["0", "0/0.npy", "7"]


def test_existing_outputs_are_skipped(tmp_path):
    items = _items(tmp_path, [(12, 12)] * 3)
    items[2].output.parent.mkdir()
    np.save(items[2].output, np.zeros((12, 12), np.int32))
    reports = _run(items, CPUBackend(), BatchSettings(jobs=2, skip_existing=True))
    assert sorted(r.status for r in reports) == [DONE, DONE, SKIPPED]
    assert not np.load(items[2].output).any()  # left as it was


def test_settings_are_validated():
    with pytest.raises(ValueError, match="at least 1"):
        BatchSettings(jobs=0)


def test_a_signal_while_waiting_for_a_write_keeps_the_item_for_the_report(tmp_path, monkeypatch):
    # SIGINT/SIGTERM raise in the main thread, here while it waits for an item's write: the
    # write completes (the pool is shut down with wait), so the item is reported as done.
    items = _items(tmp_path, [(20, 30)])
    waiting = batch_runner._Run._wait

    def interrupted_wait(run, item, future):
        if any(future is write for _, write in run.writes):
            future.result()  # the write finishes; the signal arrives just then
            raise KeyboardInterrupt
        return waiting(run, item, future)

    monkeypatch.setattr(batch_runner._Run, "_wait", interrupted_wait)
    stats = BatchStats()
    with pytest.raises(KeyboardInterrupt):
        _run(items, CPUBackend(), BatchSettings(jobs=1), stats)
    assert [(r.item.key, r.status) for r in stats.finished_while_stopping] == [("0", DONE)]
    assert items[0].output.is_file()
