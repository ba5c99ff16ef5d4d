"""The per-item report of a batch, in JSON Lines: its fields, a record for each item (from its
:class:`ItemReport`) and for each unpaired or missing input file, and the lines written.

Every record has the fields of :data:`REPORT_FIELDS`, in that order; a field that does not
apply is null (``outputs`` empty). No computing here: the records describe what the runner
(:mod:`convcrf_cli.batch_runner`) did and what the pairing left out.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from convcrf_cli.atomic import atomic_write_bytes
from convcrf_cli.batch_items import Pairing
from convcrf_cli.batch_runner import FAILED, ItemReport
from convcrf_cli.errors import BadInputError

UNPAIRED = "unpaired"
"""The status of an input file without a partner (the runner's are done, skipped, failed)."""
REPORT_FIELDS = (
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
)
"""The fields of every report line, in this order (see :func:`record`)."""


def record(status: str, error: str | None, **fields: object) -> dict:
    """A report line with every field of :data:`REPORT_FIELDS`: ``status``, ``error`` and
    ``fields``; the others null (``outputs`` empty), so that every line has the same keys."""
    line: dict = {**dict.fromkeys(REPORT_FIELDS), "outputs": []}
    line.update(fields, status=status, error=error)
    return line


def item_record(report: ItemReport) -> dict:
    """The line of one item: paths, status, error, seconds and the label histograms (null
    for an item not refined)."""
    item = report.item
    line = record(
        key=item.key,
        image=str(item.image),
        unary=str(item.unary),
        outputs=[str(path) for path in item.outputs()],
        status=report.status,
        error=report.error,
    )
    result = report.result
    if result is not None:
        pixels = int(result.histogram.sum())
        line.update(
            seconds=round(result.seconds, 4),
            crf_seconds=round(result.crf_seconds, 4),
            size=list(result.image_hw),
            classes=result.num_classes,
            histogram_before=result.unary_histogram.tolist(),
            histogram_after=result.histogram.tolist(),
            changed_fraction=round(result.changed_pixels / max(pixels, 1), 6),
        )
    return line


def missing_image_error(path: Path) -> str:
    """The failure of a listed image that does not exist, worded as the image reader words it."""
    return str(BadInputError(path, "no such file"))


def pairing_records(pairing: Pairing) -> list[dict]:
    """The lines of the listed images that do not exist (failed, keyed by stem as listed
    images are), then of the unpaired images and the unpaired unaries."""
    return [
        *(
            record(FAILED, missing_image_error(image), key=image.stem, image=str(image))
            for image in pairing.missing_images
        ),
        *(record(UNPAIRED, "no unary", image=str(i)) for i in pairing.unpaired_images),
        *(record(UNPAIRED, "no image", unary=str(u)) for u in pairing.unpaired_unaries),
    ]


def record_line(line: dict) -> str:
    """One record as a line of JSON (without the newline)."""
    return json.dumps(line)


def write_report(path: Path, records: Iterable[dict]) -> None:
    """Write ``records``, one line each, to ``path`` (its directory created if missing) under a
    temporary name and a rename; raises :class:`OSError` if it cannot."""
    text = "".join(f"{record_line(line)}\n" for line in records)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode())
