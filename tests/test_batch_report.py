"""The batch report's records: same fields in the same order on every line, nulls where a
field does not apply, and the JSON Lines file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from convcrf_cli import batch_report
from convcrf_cli.batch_items import BatchItem, Pairing
from convcrf_cli.batch_runner import DONE, SKIPPED, ItemReport
from convcrf_cli.pipeline import ItemResult

FIELDS = [
    "key",
    "image",
    "unary",
    "outputs",
    "status",
    "error",
    "seconds",
    "crf_seconds",
    "size",
    "classes",
    "histogram_before",
    "histogram_after",
    "changed_fraction",
]
MEASURES = FIELDS[FIELDS.index("seconds") :]


def _item() -> BatchItem:
    return BatchItem(
        key="city/a",
        image=Path("img/city/a.jpg"),
        unary=Path("un/city/a.npy"),
        output=Path("out/city/a.png"),
        overlay=None,
        probs=Path("probs/city/a.npy"),
    )


def _result() -> ItemResult:
    return ItemResult(
        image="img/city/a.jpg",
        unary="un/city/a.npy",
        written=("out/city/a.png", "probs/city/a.npy"),
        image_hw=(2, 3),
        num_classes=3,
        unary_reason="",
        histogram=np.array([4, 2, 0], dtype=np.int64),
        unary_histogram=np.array([3, 2, 1], dtype=np.int64),
        changed_pixels=1,
        seconds=0.123456,
        crf_seconds=0.0456789,
        device="cpu",
        notes=(),
        warnings=(),
    )


def test_a_done_item_has_every_field_in_order_with_its_measures():
    record = batch_report.item_record(ItemReport(_item(), DONE, _result()))
    assert list(record) == FIELDS
    assert record == {
        "key": "city/a",
        "image": "img/city/a.jpg",
        "unary": "un/city/a.npy",
        "outputs": ["out/city/a.png", "probs/city/a.npy"],
        "status": "done",
        "error": None,
        "seconds": 0.1235,
        "crf_seconds": 0.0457,
        "size": [2, 3],
        "classes": 3,
        "histogram_before": [3, 2, 1],
        "histogram_after": [4, 2, 0],
        "changed_fraction": round(1 / 6, 6),
    }


def test_an_item_not_refined_has_null_measures():
    record = batch_report.item_record(ItemReport(_item(), SKIPPED))
    assert list(record) == FIELDS
    assert record["status"] == "skipped" and record["error"] is None
    assert record["outputs"] == ["out/city/a.png", "probs/city/a.npy"]
    assert all(record[name] is None for name in MEASURES)


def test_unpaired_and_missing_files_have_the_same_fields_and_nulls():
    pairing = Pairing(
        pairs=[],
        unpaired_images=[Path("img/b.jpg")],
        unpaired_unaries=[Path("un/c.npy")],
        missing_images=[Path("img/gone.png")],
    )
    missing, no_unary, no_image = batch_report.pairing_records(pairing)
    for record in (missing, no_unary, no_image):
        assert list(record) == FIELDS
        assert record["outputs"] == []
        assert all(record[name] is None for name in MEASURES)
    assert missing["status"] == "failed" and missing["key"] == "gone"
    assert missing["error"] == "img/gone.png: no such file"
    assert (missing["image"], missing["unary"]) == ("img/gone.png", None)
    assert no_unary["status"] == no_image["status"] == "unpaired"
    assert (no_unary["key"], no_unary["image"], no_unary["unary"]) == (None, "img/b.jpg", None)
    assert no_unary["error"] == "no unary"
    assert (no_image["key"], no_image["image"], no_image["unary"]) == (None, None, "un/c.npy")
    assert no_image["error"] == "no image"


def test_write_report_writes_one_json_line_per_record(tmp_path):
    records = [
        batch_report.record(batch_report.UNPAIRED, "no image", unary="un/c.npy"),
        batch_report.item_record(ItemReport(_item(), SKIPPED)),
    ]
    path = tmp_path / "reports" / "run.jsonl"
    batch_report.write_report(path, records)
    text = path.read_text()
    assert text.endswith("}\n") and text.count("\n") == 2
    assert [json.loads(line) for line in text.splitlines()] == records
    assert [list(json.loads(line)) for line in text.splitlines()] == [FIELDS, FIELDS]
    batch_report.write_report(path, [])
    assert path.read_bytes() == b""
