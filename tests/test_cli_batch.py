"""``convcrf batch`` and shell pipelines through real processes: pairing, manifests, lists on
stdin, bad items in the middle, fail-fast, interrupt and resume, sharding, collisions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_runner
from PIL import Image

from convcrf_cli.cli import main

CONVCRF = [sys.executable, "-m", "convcrf_cli"]


def _item(root: Path, key: str, size: tuple[int, int] = (24, 32), seed: int = 0) -> None:
    """Write ``root/img/KEY.png`` (two-region RGB) and ``root/un/KEY.npy`` ``[3,H,W]`` probs."""
    rng = np.random.default_rng(seed)
    height, width = size
    truth = np.zeros((height, width), int)
    truth[:, width // 2 :] = 1
    truth[height // 2 :, : width // 3] = 2
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]])
    image = np.clip(colours[truth] + rng.normal(0, 10, (height, width, 3)), 0, 255)
    scores = np.eye(3)[truth].transpose(2, 0, 1) * 2.0 + rng.normal(0, 1.2, (3, height, width))
    probs = np.exp(scores - scores.max(axis=0))
    for folder in ("img", "un"):
        (root / folder / key).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.astype(np.uint8)).save(root / "img" / f"{key}.png")
    np.save(root / "un" / f"{key}.npy", (probs / probs.sum(axis=0)).astype(np.float32))


def _dataset(root: Path, keys: list[str], **kwargs) -> Path:
    for seed, key in enumerate(keys):
        _item(root, key, seed=seed, **kwargs)
    return root


def _batch(*args: object, stdin: bytes | None = None, timeout: float = 180):
    return subprocess.run(
        [*CONVCRF, "batch", *map(str, args)],
        input=stdin,
        capture_output=True,
        timeout=timeout,
    )


def _report(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _single(root: Path, key: str, output: Path) -> np.ndarray:
    """The labels of ``convcrf refine`` on one item."""
    result = cli_runner().invoke(
        main, ["refine", str(root / "img" / f"{key}.png"), str(root / "un" / f"{key}.npy"),
               "-o", str(output)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return np.asarray(Image.open(output))


def _files(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


def test_pairs_by_relative_path_lists_unpaired_and_equals_single_mode(tmp_path):
    root = _dataset(tmp_path, ["a", "city/b", "city/c"])
    Image.new("RGB", (8, 8)).save(root / "img" / "lonely.png")
    np.save(root / "un" / "orphan.npy", np.zeros((3, 8, 8), np.float32))
    done = _batch(
        root / "img", root / "un", "-o", root / "out", "--overlay-dir", root / "ov",
        "--probs-dir", root / "pr", "--report", root / "r.jsonl",
    )  # fmt: skip
    stderr = done.stderr.decode()
    assert done.returncode == 0, stderr
    assert done.stdout == b""
    assert _files(root / "out") == ["a.png", "city/b.png", "city/c.png"]
    assert _files(root / "ov") == ["a.png", "city/b.png", "city/c.png"]
    assert _files(root / "pr") == ["a.npy", "city/b.npy", "city/c.npy"]
    assert "1 file(s) without unary: " in stderr and "lonely.png" in stderr
    assert "1 file(s) without image: " in stderr and "orphan.npy" in stderr
    assert "3 done, 0 skipped, 0 failed" in stderr
    for key in ("a", "city/b"):
        single = _single(root, key, tmp_path / "single.png")
        np.testing.assert_array_equal(np.asarray(Image.open(root / "out" / f"{key}.png")), single)
    records = _report(root / "r.jsonl")
    statuses = [r["status"] for r in records]
    assert statuses.count("done") == 3 and statuses.count("unpaired") == 2
    first = next(r for r in records if r.get("key") == "a")
    assert sum(first["histogram_after"]) == 24 * 32 == sum(first["histogram_before"])
    assert 0.0 <= first["changed_fraction"] <= 1.0 and first["seconds"] > 0


def test_manifest_csv_and_jsonl_with_outputs(tmp_path):
    root = _dataset(tmp_path, ["x", "y"])
    (root / "m.csv").write_text("image,unary,output\nimg/x.png,un/x.npy,first/one.png\n"
                                "img/y.png,un/y.npy,second.png\n")  # fmt: skip
    done = _batch("--manifest", root / "m.csv", "-o", root / "out")
    assert done.returncode == 0, done.stderr.decode()
    assert _files(root / "out") == ["first/one.png", "second.png"]
    lines = [json.dumps({"image": str(root / "img/y.png"), "unary": str(root / "un/y.npy")})]
    done = _batch("--manifest", "-", "-o", root / "out2", "--out-format", "npy",
                  stdin="\n".join(lines).encode())  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    assert _files(root / "out2") == ["y.npy"]  # absolute image path: keyed by its name
    labels = np.load(root / "out2" / "y.npy")
    np.testing.assert_array_equal(labels, np.asarray(Image.open(root / "out/second.png")))


def test_collisions_are_refused_before_any_work(tmp_path):
    root = _dataset(tmp_path, ["x", "y"])
    (root / "m.csv").write_text("image,unary,output\nimg/x.png,un/x.npy,same.png\n"
                                "img/y.png,un/y.npy,same.png\n")  # fmt: skip
    done = _batch("--manifest", root / "m.csv", "-o", root / "out")
    assert done.returncode == 2
    assert "same.png: two inputs write here" in done.stderr.decode()
    assert not (root / "out").exists()
    (root / "up.csv").write_text("image,unary,output\nimg/x.png,un/x.npy,../x.png\n")
    escape = _batch("--manifest", root / "up.csv", "-o", root / "out")
    assert escape.returncode == 2 and "without '..'" in escape.stderr.decode()
    overwrite = _batch(root / "img", root / "un", "-o", root / "img")
    assert overwrite.returncode == 2 and "is the images directory too" in overwrite.stderr.decode()


def test_bad_items_in_the_middle_are_reported_and_the_batch_goes_on(tmp_path):
    root = _dataset(tmp_path, ["a", "b", "c", "d", "e"])
    (root / "img" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    nan = np.load(root / "un" / "d.npy")
    nan[1, 2, 3] = np.nan
    np.save(root / "un" / "d.npy", nan)
    done = _batch(root / "img", root / "un", "-o", root / "out", "--report", root / "r.jsonl",
                  "--jobs", "2")  # fmt: skip
    stderr = done.stderr.decode()
    assert done.returncode == 1, stderr
    assert _files(root / "out") == ["a.png", "c.png", "e.png"]
    assert f"{root / 'img' / 'b.png'}: " in stderr and "NaN" in stderr
    assert "3 done, 0 skipped, 2 failed" in stderr
    assert stderr.strip().splitlines()[-1].startswith("convcrf: error: 2 of 5 items failed: ")
    failed = {r["key"]: r["error"] for r in _report(root / "r.jsonl") if r["status"] == "failed"}
    assert set(failed) == {"b", "d"}
    assert "d.npy" in failed["d"] and "NaN" in failed["d"]

    fast = _batch(root / "img", root / "un", "-o", root / "fast", "--fail-fast", "--jobs", "1")
    assert fast.returncode == 1
    assert "not run" in fast.stderr.decode()
    assert "c.png" not in _files(root / "fast") and "e.png" not in _files(root / "fast")


def test_from_list_on_stdin_and_report_on_stdout(tmp_path):
    root = _dataset(tmp_path, ["p", "q", "r"])
    listing = "\n".join(str(root / "img" / f"{k}.png") for k in ("p", "r")) + "\n"
    done = _batch("--from-list", "-", root / "un", "-o", root / "out", "--report", "-",
                  stdin=listing.encode())  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    assert _files(root / "out") == ["p.png", "r.png"]
    records = [json.loads(line) for line in done.stdout.decode().splitlines()]
    assert sorted(r["key"] for r in records) == ["p", "r"]
    assert all(r["status"] == "done" for r in records)
    assert "without image" not in done.stderr.decode()  # q.npy was not listed: not reported


def test_report_on_stdout_has_the_unpaired_entries_and_every_line_the_same_keys(tmp_path):
    root = _dataset(tmp_path, ["a", "b"])
    (root / "img" / "b.png").write_bytes(b"garbage")
    Image.new("RGB", (8, 8)).save(root / "img" / "orphan.png")
    np.save(root / "un" / "lonely.npy", np.zeros((3, 8, 8), np.float32))
    run = [root / "img", root / "un", "-o", root / "out", "-q", "-n", "1"]
    streamed = _batch(*run, "--report", "-")
    assert streamed.returncode == 1, streamed.stderr.decode()
    _batch(*run, "--report", root / "r.jsonl")
    records = [json.loads(line) for line in streamed.stdout.decode().splitlines()]
    written = _report(root / "r.jsonl")

    def entries(lines: list[dict]) -> list[tuple]:
        return sorted((r["status"], str(r["image"]), str(r["unary"])) for r in lines)

    assert entries(records) == entries(written)
    assert sorted(r["status"] for r in records) == ["done", "failed", "unpaired", "unpaired"]
    keys = list(records[0])
    assert all(list(r) == keys for r in records + written)
    assert {"key", "outputs", "error", "seconds", "changed_fraction"} <= set(keys)
    orphan = next(r for r in records if r["image"] and r["image"].endswith("orphan.png"))
    assert orphan["unary"] is None and orphan["outputs"] == [] and orphan["seconds"] is None
    assert orphan["error"] == "no unary"


def test_from_list_names_a_missing_file_as_a_failed_item_and_goes_on(tmp_path):
    root = _dataset(tmp_path, ["p", "q"])
    nope = root / "img" / "nope.png"
    listing = f"{root / 'img' / 'p.png'}\n{nope}\n{root / 'img' / 'q.png'}\n"
    done = _batch("--from-list", "-", root / "un", "-o", root / "out", "--report", "-",
                  "-n", "1", stdin=listing.encode())  # fmt: skip
    stderr = done.stderr.decode()
    assert done.returncode == 1, stderr
    assert f"convcrf: error: {nope}: no such file" in stderr.splitlines()
    assert "without unary" not in stderr
    assert "2 done, 0 skipped, 1 failed" in stderr
    assert stderr.strip().splitlines()[-1] == f"convcrf: error: 1 of 3 items failed: {nope}"
    assert _files(root / "out") == ["p.png", "q.png"]
    failed = [json.loads(line) for line in done.stdout.decode().splitlines()]
    failed = [r for r in failed if r["status"] == "failed"]
    assert [(r["key"], r["image"], r["error"]) for r in failed] == [
        ("nope", str(nope), f"{nope}: no such file")
    ]
    fast = _batch("--from-list", "-", root / "un", "-o", root / "fast", "--fail-fast",
                  stdin=listing.encode())  # fmt: skip
    assert fast.returncode == 1 and "2 not run" in fast.stderr.decode()
    assert not (root / "fast").exists()


def test_from_list_shards_report_each_missing_or_unpaired_image_once(tmp_path):
    keys = [f"k{i}" for i in range(6)]
    root = _dataset(tmp_path, keys, size=(8, 8))
    for name in ("new0", "new1"):
        Image.new("RGB", (8, 8)).save(root / "img" / f"{name}.png")
    listed = [root / "img" / f"{name}.png" for name in (*keys, "new0", "new1", "gone0", "gone1")]
    listing = "".join(f"{path}\n" for path in listed).encode()
    failing, lines = [], []
    for index in range(3):
        done = _batch("--from-list", "-", root / "un", "-o", root / "out", "-n", "1",
                      "--shard", f"{index}/3", "--report", "-", stdin=listing)  # fmt: skip
        lines += [json.loads(line) for line in done.stdout.decode().splitlines()]
        failing += [index] if done.returncode == 1 else []
    by_status = {}
    for record in lines:
        by_status.setdefault(record["status"], []).append(Path(record["image"]).stem)
    assert sorted(by_status["done"]) == keys
    assert sorted(by_status["unpaired"]) == ["new0", "new1"]  # each from one shard only
    assert sorted(by_status["failed"]) == ["gone0", "gone1"]
    assert 1 <= len(failing) <= 3


def test_from_list_an_image_without_unary_is_unpaired_and_fails_the_run(tmp_path):
    root = _dataset(tmp_path, ["p"])
    Image.new("RGB", (8, 8)).save(root / "img" / "new.png")
    listing = f"{root / 'img' / 'p.png'}\n{root / 'img' / 'new.png'}\n"
    done = _batch("--from-list", "-", root / "un", "-o", root / "out", "--report", "-",
                  "-n", "1", stdin=listing.encode())  # fmt: skip
    stderr = done.stderr.decode()
    assert done.returncode == 1, stderr
    assert "1 file(s) without unary: " in stderr
    last = stderr.strip().splitlines()[-1]
    assert last == f"convcrf: error: 1 listed image(s) without unary: {root / 'img' / 'new.png'}"
    assert _files(root / "out") == ["p.png"]
    records = [json.loads(line) for line in done.stdout.decode().splitlines()]
    assert sorted(r["status"] for r in records) == ["done", "unpaired"]


@pytest.mark.parametrize("listed", ["gone.png", "new.png"])
def test_from_list_whose_only_image_has_no_pair_fails_it_as_an_item(tmp_path, listed):
    root = _dataset(tmp_path, ["p"])
    Image.new("RGB", (8, 8)).save(root / "img" / "new.png")
    image = root / "img" / listed
    done = _batch("--from-list", "-", root / "un", "-o", root / "out", "--report",
                  root / "r.jsonl", stdin=f"{image}\n".encode())  # fmt: skip
    stderr = done.stderr.decode()
    assert done.returncode == 1, stderr
    last = stderr.strip().splitlines()[-1]
    if listed == "gone.png":
        assert last == f"convcrf: error: 1 of 1 items failed: {image}"
    else:
        assert last == f"convcrf: error: 1 listed image(s) without unary: {image}"
    (record,) = _report(root / "r.jsonl")
    assert record["image"] == str(image)
    assert record["status"] == ("failed" if listed == "gone.png" else "unpaired")
    assert not (root / "out").exists()


@pytest.mark.parametrize("source", ["-", "list.txt"])
def test_from_list_without_image_paths_is_a_run_of_no_items(tmp_path, source):
    """`find -newer last_run | convcrf batch --from-list -` on a day with nothing new."""
    root = _dataset(tmp_path, ["p"])
    (tmp_path / "list.txt").write_text("# nothing new today\n\n")
    done = _batch("--from-list", tmp_path / source if source != "-" else "-", root / "un",
                  "-o", root / "out", "--report", root / "r.jsonl", stdin=b"")  # fmt: skip
    assert done.returncode == 0
    assert done.stderr.decode().splitlines() == ["convcrf: 0 done, 0 skipped, 0 failed: no items"]
    assert (root / "r.jsonl").read_bytes() == b""
    assert not (root / "out").exists()


@pytest.fixture
def read_only(tmp_path):
    """A directory that a normal user cannot write in (root ignores permissions: skip)."""
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    directory = tmp_path / "ro"
    directory.mkdir()
    directory.chmod(0o555)
    yield directory
    directory.chmod(0o755)


@pytest.mark.parametrize(
    ("option", "name", "problem"),
    [
        ("-o", "ro/out", "cannot be created: {blocker} is not writable"),
        ("--overlay-dir", "ro", "is not writable"),
        ("--probs-dir", "ro/deep/probs", "cannot be created: {blocker} is not writable"),
        ("-o", "file/out", "cannot be created: {blocker} is not a directory"),
    ],
)
def test_unwritable_output_directories_are_refused_before_any_work(
    tmp_path, request, option, name, problem
):
    root = _dataset(tmp_path, ["a", "b"])
    blocker = tmp_path / name.split("/")[0]
    if blocker.name == "ro":
        request.getfixturevalue("read_only")
    else:
        blocker.write_bytes(b"x")
    outputs = {"-o": root / "out", option: tmp_path / name}
    args = [arg for pair in outputs.items() for arg in map(str, pair)]
    done = _batch(root / "img", root / "un", *args, "--report", root / "r.jsonl")
    assert done.returncode == 2
    message = problem.format(blocker=blocker)
    assert done.stderr.decode().splitlines() == [f"convcrf: error: {tmp_path / name}: {message}"]
    assert not (root / "out").exists() and not (root / "r.jsonl").exists()
    assert not blocker.is_dir() or _files(blocker) == []


def test_shards_cover_every_item_exactly_once(tmp_path):
    keys = [f"k{i:02d}" for i in range(12)]
    root = _dataset(tmp_path, keys, size=(12, 12))
    seen: list[str] = []
    for index in range(3):
        done = _batch(root / "img", root / "un", "-o", root / "out", "--shard", f"{index}/3",
                      "--report", "-")  # fmt: skip
        assert done.returncode == 0, done.stderr.decode()
        seen += [json.loads(line)["key"] for line in done.stdout.decode().splitlines()]
    assert sorted(seen) == keys
    assert _files(root / "out") == [f"{k}.png" for k in keys]
    for spec, problem in (("3/3", "3/3: need 0 <= I < N"), ("abc", "must look like I/N")):
        bad = _batch(root / "img", root / "un", "-o", root / "out", "--shard", spec)
        message = bad.stderr.decode()
        assert bad.returncode == 2 and message.startswith("convcrf: error: Invalid value for ")
        assert problem in message and message.endswith("(see 'convcrf batch --help')\n")


def test_directory_shards_report_each_unpaired_file_once(tmp_path):
    keys = [f"k{i}" for i in range(4)]
    root = _dataset(tmp_path, keys, size=(8, 8))
    (root / "img" / "sub").mkdir()
    for name in ("sub/lone0", "lone1"):
        Image.new("RGB", (8, 8)).save(root / "img" / f"{name}.png")
    np.save(root / "un" / "orphan.npy", np.zeros((2, 8, 8), np.float32))
    lines, warnings = [], []
    for index in range(5):
        done = _batch(root / "img", root / "un", "-o", root / "out", "--shard", f"{index}/5",
                      "--report", "-")  # fmt: skip
        assert done.returncode == 0, done.stderr.decode()
        lines += [json.loads(line) for line in done.stdout.decode().splitlines()]
        warnings += [line for line in done.stderr.decode().splitlines() if "without" in line]
    unpaired = sorted(r["image"] or r["unary"] for r in lines if r["status"] == "unpaired")
    assert unpaired == sorted(
        str(root / name) for name in ("img/sub/lone0.png", "img/lone1.png", "un/orphan.npy")
    )  # each from one shard only, as the items are
    assert sorted(r["key"] for r in lines if r["status"] == "done") == keys
    assert 1 <= len(warnings) <= 3


def test_batched_calls_give_the_same_labels(tmp_path):
    root = _dataset(tmp_path, ["a", "b", "c"])
    _item(root, "d", size=(20, 28), seed=7)
    one = _batch(root / "img", root / "un", "-o", root / "one", "--batch-size", "1")
    three = _batch(root / "img", root / "un", "-o", root / "three", "--batch-size", "3")
    assert one.returncode == 0 and three.returncode == 0, three.stderr.decode()
    for name in _files(root / "one"):
        np.testing.assert_array_equal(
            np.asarray(Image.open(root / "one" / name)),
            np.asarray(Image.open(root / "three" / name)),
        )


def test_resize_unary_applies_to_every_item(tmp_path):
    root = _dataset(tmp_path, ["a", "b"])
    small = root / "un" / "a.npy"
    np.save(small, np.load(small)[:, 1::3, ::3])  # 8×11 for the 24×32 image; b as it is
    refused = _cli_batch(root / "img", root / "un", "-o", root / "none")
    assert refused.exit_code == 1
    assert f"convcrf: error: {small}: unary shape (3, 8, 11) does not fit" in refused.stderr
    assert "--resize-unary bilinear" in refused.stderr
    done = _cli_batch(root / "img", root / "un", "-o", root / "out", "--probs-dir", root / "p",
                      "--resize-unary", "bilinear", "-v")  # fmt: skip
    assert done.exit_code == 0, done.stderr
    assert np.load(root / "p" / "a.npy").shape == (3, 24, 32)
    lines = done.stderr.splitlines()
    resized = f"convcrf: note: {small}: unary resized from 8×11 to 24×32 (bilinear, on the logits)"
    assert lines[lines.index(resized) - 1].startswith("convcrf: done: a in ")  # after its status
    assert sum("resized" in line for line in lines) == 1  # b has the image's size
    for key in ("a", "b"):
        single = cli_runner().invoke(
            main, ["refine", str(root / "img" / f"{key}.png"), str(root / "un" / f"{key}.npy"),
                   "-o", str(tmp_path / f"{key}.png"), "--resize-unary", "bilinear"],
        )  # fmt: skip
        assert single.exit_code == 0, single.stderr
        np.testing.assert_array_equal(
            np.asarray(Image.open(root / "out" / f"{key}.png")),
            np.asarray(Image.open(tmp_path / f"{key}.png")),
        )


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_run_leaves_no_partial_file_and_resumes(tmp_path, signum, status):
    keys = [f"i{n:02d}" for n in range(16)]
    root = _dataset(tmp_path, keys, size=(160, 160))
    slow = ["--blur", "1", "-k", "11", "-n", "8", "--jobs", "1"]
    report = tmp_path / "report.jsonl"
    process = subprocess.Popen(
        [*CONVCRF, "batch", root / "img", root / "un", "-o", root / "out", *slow,
         "--report", report],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while len(list((root / "out").glob("*.png"))) < 2 and time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read().decode()
        time.sleep(0.02)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == status, stderr.decode()
    assert b"not run" in stderr
    written = _files(root / "out")
    assert 2 <= len(written) < len(keys)
    assert all(name.endswith(".png") and not name.startswith(".") for name in written)
    for name in written:
        Image.open(root / "out" / name).load()  # complete files only
    # every item written is in the report as done, also one whose write was in flight
    done = [f"{r['key']}.png" for r in _report(report) if r["status"] == "done"]
    assert sorted(done) == written

    resumed = _batch(root / "img", root / "un", "-o", root / "out", *slow, "--skip-existing")
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert f"{len(keys) - len(written)} done, {len(written)} skipped, 0 failed" in (
        resumed.stderr.decode()
    )
    assert _files(root / "out") == [f"{k}.png" for k in keys]


def test_shell_pipelines_segmenter_to_refine_to_consumer_and_find_to_batch(tmp_path):
    root = _dataset(tmp_path, ["a", "b"])
    segmenter = tmp_path / "segmenter.py"
    segmenter.write_text(textwrap.dedent(f"""
        import sys, numpy as np
        sys.stdout.buffer.write(open({str(root / "un" / "a.npy")!r}, "rb").read())
    """))  # fmt: skip
    consumer = (
        "import sys, io; from PIL import Image; "
        "print(Image.open(io.BytesIO(sys.stdin.buffer.read())).size)"
    )
    python = sys.executable
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    pipeline = (
        f"set -o pipefail; {python} {segmenter} | {python} -m convcrf_cli refine "
        f"{root / 'img' / 'a.png'} - -o - | {python} -c '{consumer}'"
    )
    done = subprocess.run(["bash", "-c", pipeline], capture_output=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().strip() == "(32, 24)"
    listing = (
        f"find {root / 'img'} -name '*.png' | {python} -m convcrf_cli batch --from-list - "
        f"{root / 'un'} -o {root / 'out'} --quiet"
    )
    done = subprocess.run(["bash", "-c", listing], capture_output=True, timeout=180, env=env)
    assert done.returncode == 0 and done.stderr == b"", done.stderr.decode()
    assert _files(root / "out") == ["a.png", "b.png"]
    single = _single(root, "b", tmp_path / "single.png")
    np.testing.assert_array_equal(np.asarray(Image.open(root / "out" / "b.png")), single)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_report_on_a_full_stdout_stops_with_one_line_and_status_1(tmp_path):
    root = _dataset(tmp_path, ["a", "b", "c"])
    with open("/dev/full", "wb") as full:
        done = subprocess.run(
            [*CONVCRF, "batch", root / "img", root / "un", "-o", root / "out", "--report", "-"],
            stdout=full,
            stderr=subprocess.PIPE,
            timeout=180,
        )
    lines = done.stderr.decode().splitlines()
    assert done.returncode == 1
    assert lines[-1] == ("convcrf: error: stdout: cannot write the report: No space left on device")
    assert "Traceback" not in done.stderr.decode()


def _cli_batch(*args: object):
    return cli_runner().invoke(main, ["batch", *map(str, args)])


def test_outputs_inside_the_input_directories_are_not_read_back_as_inputs(tmp_path):
    root = _dataset(tmp_path, ["a", "b"], size=(12, 12))
    img, un = root / "img", root / "un"
    args = (img, un, "-o", img / "refined", "--overlay-dir", img / "ov", "--probs-dir", un / "p")
    first = _cli_batch(*args)
    assert first.exit_code == 0, first.stderr
    again = _cli_batch(*args, "--skip-existing", "-v")
    assert again.exit_code == 0, again.stderr
    assert "without" not in again.stderr  # no outputs taken for unpaired inputs
    assert again.stderr.count("convcrf: skipped:") == 2
    for output_dir, role, options in [
        (img, "images", ("-o", img)),
        (img, "images", ("-o", tmp_path / "o2", "--overlay-dir", img)),
        (un, "unaries", ("-o", tmp_path / "o2", "--probs-dir", un)),
    ]:
        refused = _cli_batch(img, un, *options)
        assert refused.exit_code == 2
        assert refused.stderr.startswith(f"convcrf: error: {output_dir}: is the {role} directory")
    labels_beside_unaries = _cli_batch(img, un, "-o", un)  # .png labels are no unaries
    assert labels_beside_unaries.exit_code == 0, labels_beside_unaries.stderr


def test_symlinked_directories_are_followed_and_dangling_links_fail_by_name(tmp_path):
    root = _dataset(tmp_path / "data", ["a"], size=(12, 12))
    _dataset(tmp_path / "other", ["sub/b"], size=(12, 12))
    (root / "img" / "linked").symlink_to(tmp_path / "other" / "img" / "sub")
    (root / "un" / "linked").symlink_to(tmp_path / "other" / "un" / "sub")
    (root / "img" / "loop").symlink_to(root / "img")  # searched once
    (root / "img" / "gone.png").symlink_to(root / "img" / "nowhere.png")
    np.save(root / "un" / "gone.npy", np.full((3, 12, 12), 1 / 3, np.float32))
    result = _cli_batch(root / "img", root / "un", "-o", root / "out")
    assert result.exit_code == 1
    assert f"convcrf: error: {root / 'img' / 'gone.png'}: no such file" in result.stderr
    assert _files(root / "out") == ["a.png", "linked/b.png"]


def test_inputs_that_cannot_be_looked_at_fail_as_items_by_name(tmp_path):
    # A symlink loop (Path.resolve raised RuntimeError while the plan was checked) and a name
    # too long (Path.exists raised OSError before Python 3.12): tracebacks, before any work.
    root = _dataset(tmp_path, ["a"], size=(12, 12))
    loop, long = root / "img" / "loop.png", root / "img" / ("x" * 300 + ".png")
    loop.symlink_to(root / "img" / "loop2.png")
    (root / "img" / "loop2.png").symlink_to(loop)
    np.save(root / "un" / "loop.npy", np.full((3, 12, 12), 1 / 3, np.float32))
    (root / "m.csv").write_text(f"image,unary\nimg/a.png,un/a.npy\n{loop},un/loop.npy\n")
    looped = f"convcrf: error: {loop}: cannot read: Too many levels of symbolic links"
    manifest = _cli_batch("--manifest", root / "m.csv", "-o", root / "m")
    assert manifest.exit_code == 1 and looped in manifest.stderr.splitlines(), manifest.stderr
    assert _files(root / "m") == ["img/a.png"]
    listing = f"{root / 'img' / 'a.png'}\n{loop}\n{long}\n"
    listed = cli_runner().invoke(
        main, ["batch", "--from-list", "-", str(root / "un"), "-o", str(root / "l")], input=listing
    )
    assert listed.exit_code == 1 and looped in listed.stderr.splitlines(), listed.stderr
    assert f"1 listed image(s) without unary: {long}" in listed.stderr  # no unary has its stem
    assert _files(root / "l") == ["a.png"]


def test_input_directories_that_cannot_be_looked_at_are_one_line_naming_them(tmp_path):
    # Path.exists raised OSError for a name too long before Python 3.12, Path.resolve a
    # RuntimeError for a symlink loop: tracebacks, while the other inputs were one line.
    root = _dataset(tmp_path, ["a"], size=(12, 12))
    long, loop = tmp_path / ("x" * 300), tmp_path / "loop"
    loop.symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(loop)
    for images, unaries, problem in (
        (long, root / "un", "File name too long"),
        (root / "img", long, "File name too long"),
        (loop, root / "un", "Too many levels of symbolic links"),
    ):
        result = _cli_batch(images, unaries, "-o", root / "out")
        named = long if problem == "File name too long" else loop
        assert result.exit_code == 2, result.stderr
        assert result.stderr == f"convcrf: error: {named}: cannot read: {problem}\n"
    assert not (root / "out").exists()


def test_an_empty_shard_writes_an_empty_report(tmp_path):
    root = _dataset(tmp_path, ["a"], size=(12, 12))
    summaries = {}
    for index in range(2):
        report = tmp_path / f"r{index}.jsonl"
        result = _cli_batch(root / "img", root / "un", "-o", root / "out", "--shard",
                            f"{index}/2", "--report", report)  # fmt: skip
        assert result.exit_code == 0, result.stderr
        assert len(_report(report)) == len(report.read_text().splitlines())
        summaries[index] = result.stderr.splitlines()[-1]
    assert sorted(len(_report(tmp_path / f"r{i}.jsonl")) for i in range(2)) == [0, 1]
    empty = 0 if (tmp_path / "r0.jsonl").read_bytes() == b"" else 1
    assert (tmp_path / f"r{empty}.jsonl").read_bytes() == b""
    assert summaries[empty] == "convcrf: 0 done, 0 skipped, 0 failed: no items"
    assert summaries[1 - empty].startswith("convcrf: 1 done, 0 skipped, 0 failed in ")


def test_skip_existing_does_not_take_a_directory_for_an_output(tmp_path):
    root = _dataset(tmp_path, ["a"], size=(12, 12))
    (root / "out" / "a.png").mkdir(parents=True)
    result = _cli_batch(root / "img", root / "un", "-o", root / "out", "--skip-existing")
    assert result.exit_code == 1 and "is a directory" in result.stderr


def test_nothing_to_refine_names_the_directories(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "un").mkdir()
    empty = _cli_batch(tmp_path / "img", tmp_path / "un", "-o", tmp_path / "out")
    assert empty.exit_code == 2
    assert (
        empty.stderr == f"convcrf: error: {tmp_path / 'img'}: no images found (see --image-glob)\n"
    )
    _item(tmp_path, "a", (12, 12))
    (tmp_path / "un" / "a.npy").rename(tmp_path / "un" / "b.npy")
    unpaired = _cli_batch(tmp_path / "img", tmp_path / "un", "-o", tmp_path / "out")
    assert unpaired.exit_code == 2
    assert unpaired.stderr.splitlines()[-1] == (
        f"convcrf: error: {tmp_path / 'img'}: no image has a unary of the same relative path in "
        f"{tmp_path / 'un'}"
    )
    missing = _cli_batch(tmp_path / "nope", tmp_path / "un", "-o", tmp_path / "out")
    assert missing.stderr == f"convcrf: error: {tmp_path / 'nope'}: no such directory\n"


def test_verbose_says_why_auto_chose_the_cpu(tmp_path):
    from convcrf_cli.backends import select_backend

    if select_backend("auto").name != "cpu":
        pytest.skip("--device auto uses a GPU here")
    root = _dataset(tmp_path, ["a"], size=(12, 12))
    result = _cli_batch(root / "img", root / "un", "-o", root / "out", "--device", "auto", "-v")
    assert result.exit_code == 0 and "(auto chose the CPU: " in result.stderr
