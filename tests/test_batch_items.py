"""Batch pairing, manifests, sharding and output planning."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from convcrf_cli import batch_items as bi
from convcrf_cli.errors import BadInputError


def _touch(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def test_pairs_by_relative_path_and_lists_unpaired(tmp_path):
    _touch(tmp_path / "img", "a.jpg", "sub/b.png", "c.jpg", "notes.txt")
    _touch(tmp_path / "un", "a.npy", "sub/b.npz", "d.npy")
    pairing = bi.pair_directories(tmp_path / "img", tmp_path / "un")
    assert [(p.key, p.image.name, p.unary.name) for p in pairing.pairs] == [
        ("a", "a.jpg", "a.npy"),
        ("sub/b", "b.png", "b.npz"),
    ]
    assert [p.name for p in pairing.unpaired_images] == ["c.jpg"]
    assert [p.name for p in pairing.unpaired_unaries] == ["d.npy"]


def test_globs_restrict_matches(tmp_path):
    _touch(tmp_path / "img", "a.jpg", "b.png")
    _touch(tmp_path / "un", "a.npy", "b.npy")
    pairing = bi.pair_directories(
        tmp_path / "img", tmp_path / "un", bi.split_globs("*.png", bi.IMAGE_GLOBS)
    )
    assert [p.key for p in pairing.pairs] == ["b"]
    assert [p.name for p in pairing.unpaired_unaries] == ["a.npy"]


def test_same_stem_twice_is_an_error(tmp_path):
    _touch(tmp_path / "img", "a.jpg", "a.png")
    _touch(tmp_path / "un", "a.npy")
    with pytest.raises(BadInputError, match="pairing is by name"):
        bi.pair_directories(tmp_path / "img", tmp_path / "un")


def test_csv_and_jsonl_manifests(tmp_path):
    (tmp_path / "m.csv").write_text(
        "image,unary,output\nx/1.jpg,u/1.npy,out/one.png\nx/2.jpg,u/2.npy,\n"
    )
    pairs = bi.read_manifest(str(tmp_path / "m.csv"))
    assert pairs[0] == bi.Pair(
        "out/one", tmp_path / "x/1.jpg", tmp_path / "u/1.npy", Path("out/one.png")
    )
    assert pairs[1].key == "x/2" and pairs[1].output is None
    (tmp_path / "m.jsonl").write_text('{"image": "a.jpg", "unary": "/abs/a.npy"}\n')
    (pair,) = bi.read_manifest(str(tmp_path / "m.jsonl"))
    assert pair.image == tmp_path / "a.jpg" and pair.unary == Path("/abs/a.npy")


def test_csv_manifest_ignores_spaces_after_commas(tmp_path):
    # 'image, unary' was refused as a header without those columns, and a row 'a.jpg, a.npy'
    # named the unary ' a.npy'
    (tmp_path / "m.csv").write_text('image, unary, output\nx/1.jpg, u/1.npy, "o 1.png"\n')
    (pair,) = bi.read_manifest(str(tmp_path / "m.csv"))
    assert pair == bi.Pair("o 1", tmp_path / "x/1.jpg", tmp_path / "u/1.npy", Path("o 1.png"))


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("m.txt", "img,un\na,b\n", "header"),
        ("m.txt", '{"image": "a.jpg"}\n', "missing unary"),
        ("m.txt", "{bad\n", "JSON"),
        ("m.csv", "image,unary\n", "the manifest lists no items"),
        ("m.jsonl", "", "the manifest lists no items"),
        ("m.jsonl", '"a.jpg"\n{"image": "a.jpg", "unary": "a.npy"}\n', "line 1: expected a JSON"),
        ("m.json", '[{"image": "a.jpg", "unary": "a.npy"}]', "a JSON array; a manifest holds"),
        ("m.txt", '[{"image": "a.jpg", "unary": "a.npy"}]', "a JSON array; a manifest holds"),
        ("m.jsonl", '{"image": ' + "[" * 100_000, r"line 1: not valid JSON \(nested too deeply\)"),
    ],
)
def test_bad_manifest_names_the_file(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(BadInputError, match=message) as info:
        bi.read_manifest(str(path))
    assert str(path) in str(info.value)


def test_shards_cover_every_item_exactly_once():
    pairs = [bi.Pair(f"dir{i % 7}/img{i}", Path(f"{i}.jpg"), Path(f"{i}.npy")) for i in range(500)]
    for count in (1, 3, 8):
        shards = [bi.select_shard(pairs, i, count) for i in range(count)]
        keys = [p.key for shard in shards for p in shard]
        assert sorted(keys) == sorted(p.key for p in pairs)
        assert len(keys) == len(set(keys))
        if count > 1:  # a hash spreads the items; no shard is empty or holds nearly all
            assert all(len(s) > len(pairs) / count / 2 for s in shards)
    # Stable: the shard depends only on the key, not on the other items or their order.
    assert bi.select_shard(pairs[::-1], 1, 3) == bi.select_shard(pairs, 1, 3)[::-1]


@pytest.mark.parametrize("text", ["3/3", "-1/2", "a/b", "1"])
def test_bad_shard_spec(text):
    with pytest.raises(ValueError, match="I/N|0 <= I < N"):
        bi.parse_shard(text)


def test_plan_outputs_keeps_relative_paths_and_detects_collisions(tmp_path):
    pairs = [
        bi.Pair("sub/a", Path("a.jpg"), Path("a.npy")),
        bi.Pair("b", Path("b.jpg"), Path("b.npy")),
    ]
    items = bi.plan_outputs(pairs, tmp_path / "out", ".png", tmp_path / "ov", tmp_path / "pr")
    assert items[0].output == tmp_path / "out/sub/a.png"
    assert items[0].overlay == tmp_path / "ov/sub/a.png"
    assert items[0].probs == tmp_path / "pr/sub/a.npy"
    clash = [
        bi.Pair("a", Path("1.jpg"), Path("1.npy"), Path("same.png")),
        bi.Pair("b", Path("2.jpg"), Path("2.npy"), Path("same.png")),
    ]
    with pytest.raises(BadInputError, match="two inputs write here"):
        bi.plan_outputs(clash, tmp_path)


def test_image_list_pairs_by_stem_and_reports_only_listed_images(tmp_path):
    _touch(tmp_path / "un", "a.npy", "b.npy", "d.npy")
    _touch(tmp_path, "x/a.jpg", "y/c.jpg")
    listed = [str(tmp_path / name) for name in ("x/a.jpg", "y/c.jpg", "z/d.jpg")]
    pairing = bi.pair_image_list(listed, tmp_path / "un")
    assert [(p.key, p.unary.name) for p in pairing.pairs] == [("a", "a.npy")]
    assert pairing.unpaired_images == [tmp_path / "y/c.jpg"]
    assert pairing.missing_images == [tmp_path / "z/d.jpg"]  # listed, does not exist
    assert pairing.unpaired_unaries == []  # b.npy and d.npy: no listed image names them


def test_read_lines_skips_blank_lines_and_comments_also_indented(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_bytes(
        b"\xef\xbb\xbf# new images\r\na.jpg  \r\n\r\n   \r\n  # old:\r\n\tb.jpg\r\n"
    )
    assert bi.read_lines(str(listing)) == ["a.jpg", "b.jpg"]


def test_image_list_refuses_a_stem_that_two_unaries_have(tmp_path):
    _touch(tmp_path / "un", "x/a.npy", "y/a.npy", "b.npy")
    _touch(tmp_path, "img/a.jpg", "img/b.jpg")
    with pytest.raises(BadInputError, match="2 unaries have its stem") as raised:
        bi.pair_image_list([str(tmp_path / "img/a.jpg")], tmp_path / "un")
    assert raised.value.path == str(tmp_path / "img/a.jpg")
    assert str(tmp_path / "un/x/a.npy") in str(raised.value)
    assert str(tmp_path / "un/y/a.npy") in str(raised.value)
    pairing = bi.pair_image_list([str(tmp_path / "img/b.jpg")], tmp_path / "un")
    assert [p.unary.name for p in pairing.pairs] == ["b.npy"]  # a.npy twice: a is not listed


def test_plan_outputs_names_an_image_given_twice(tmp_path):
    pair = bi.Pair("a", Path("img/a.png"), Path("un/a.npy"))
    with pytest.raises(BadInputError) as raised:
        bi.plan_outputs([pair, bi.Pair("a", Path("./img/a.png"), Path("un/b.npy"))], tmp_path)
    assert str(raised.value) == f"img/a.png: given twice: both items would write {tmp_path}/a.png"
    with pytest.raises(BadInputError, match="label output of img/a.png and the probabilities"):
        bi.plan_outputs([pair], tmp_path, ".npy", probs_dir=tmp_path)


def test_plan_outputs_refuses_to_overwrite_an_input(tmp_path):
    pairs = [bi.Pair("a", tmp_path / "a.png", tmp_path / "u/a.npy")]
    with pytest.raises(BadInputError, match="overwrite an input"):
        bi.plan_outputs(pairs, tmp_path, ".png")
    assert bi.plan_outputs(pairs, tmp_path, ".npy")[0].output == tmp_path / "a.npy"


def test_output_directories_are_left_out_where_their_files_could_match_the_globs(tmp_path):
    refined = tmp_path / "refined"
    # outputs keep the input stems, so img_*.png matches the labels img_001.png written back
    for globs in [("*.png",), ("img_*.png",), ("*",), ("*.[pP][nN][gG]",), ("IMG_*.PNG",)]:
        assert bi.output_dirs_to_skip([(refined, ".png")], tmp_path, globs, "images") == [refined]
        with pytest.raises(BadInputError, match="is the images directory too"):
            bi.output_dirs_to_skip([(tmp_path, ".png")], tmp_path, globs, "images")
    for globs in [("*.jpg",), ("img_*.jpeg", "*.npz")]:
        assert bi.output_dirs_to_skip([(refined, ".png")], tmp_path, globs, "images") == []
        assert bi.output_dirs_to_skip([(tmp_path, ".png")], tmp_path, globs, "images") == []
    assert (
        bi.output_dirs_to_skip([(tmp_path / "elsewhere" / "x", ".png")], refined, ("*",), "x") == []
    )


def test_a_directory_that_cannot_be_listed_is_an_error_naming_it(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.png").touch()
    (tmp_path / "sub" / "b.png").touch()
    listing = os.scandir

    def forbidden_sub(path="."):
        if Path(path).name == "sub":  # as chmod 000 would, for a user other than root
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return listing(path)

    monkeypatch.setattr(os, "scandir", forbidden_sub)
    with pytest.raises(BadInputError) as caught:
        bi.find_files(tmp_path, ("*.png",))
    assert str(caught.value) == f"{tmp_path / 'sub'}: cannot list directory: Permission denied"
    assert caught.value.exit_code == 2
