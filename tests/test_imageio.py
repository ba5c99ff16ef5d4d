"""Image and label-map reading: formats, modes, EXIF orientation and bad files."""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from convcrf_cli import imageio
from convcrf_cli.errors import BadInputError
from convcrf_cli.imageio import load_image, read_image, read_label_image

H, W = 24, 32


def _rgb(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _save(array: np.ndarray, path, **kwargs) -> None:
    Image.fromarray(array).save(path, **kwargs)


def test_rgb_png_tiff_and_lossless_webp_read_exactly(tmp_path):
    pixels = _rgb()
    for name, kwargs in (("a.png", {}), ("a.tif", {}), ("a.webp", {"lossless": True})):
        _save(pixels, tmp_path / name, **kwargs)
        got = read_image(tmp_path / name)
        assert got.dtype == np.uint8 and got.shape == (H, W, 3)
        np.testing.assert_array_equal(got, pixels)


def test_sixteen_bit_grayscale_png_keeps_raw_values(tmp_path):
    values = (np.arange(H * W).reshape(H, W) * 85).astype(np.uint16)
    _save(values, tmp_path / "g16.png")
    loaded = load_image(tmp_path / "g16.png")
    got = loaded.pixels
    assert got.dtype == np.uint16 and got.shape == (H, W, 1)
    assert any(note.startswith("16-bit grayscale values 0..") for note in loaded.notes)
    np.testing.assert_array_equal(got[:, :, 0], values)
    assert got.max() > 255


def test_thirty_two_bit_integer_tiff_is_named_so(tmp_path):
    values = (np.arange(H * W).reshape(H, W) * 1000).astype(np.int32)
    Image.fromarray(values).save(tmp_path / "i32.tif")
    loaded = load_image(tmp_path / "i32.tif")
    assert loaded.pixels.dtype == np.float32 and loaded.pixels.max() > 65535
    np.testing.assert_array_equal(loaded.pixels[:, :, 0], values)
    assert any(note.startswith("integer grayscale values 0..") for note in loaded.notes)


def test_float_tiff_is_float32(tmp_path):
    values = np.random.default_rng(1).normal(0, 100, (H, W)).astype(np.float32)
    Image.fromarray(values).save(tmp_path / "f.tif")
    got = read_image(tmp_path / "f.tif")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got[:, :, 0], values)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_float_tiff_with_nan_or_infinite_values_is_refused(tmp_path, bad):
    values = np.zeros((H, W), np.float32)
    values[3, 4] = bad
    Image.fromarray(values).save(tmp_path / "f.tif")
    assert _error(tmp_path / "f.tif").endswith("f.tif: image holds NaN or infinite values")


def test_grayscale_is_one_channel(tmp_path):
    values = _rgb()[:, :, 0]
    _save(values, tmp_path / "g.png")
    got = read_image(tmp_path / "g.png")
    assert got.shape == (H, W, 1)
    np.testing.assert_array_equal(got[:, :, 0], values)


def test_rgba_drops_alpha_and_keeps_colours(tmp_path):
    pixels = _rgb()
    rgba = np.dstack([pixels, np.full((H, W), 7, np.uint8)])
    _save(rgba, tmp_path / "a.png")
    loaded = load_image(tmp_path / "a.png")
    np.testing.assert_array_equal(loaded.pixels, pixels)
    assert any("alpha channel dropped" in note for note in loaded.notes)


def test_palette_image_becomes_rgb(tmp_path):
    indices = (np.arange(H * W).reshape(H, W) % 4).astype(np.uint8)
    picture = Image.fromarray(indices)
    colours = [10, 20, 30, 200, 0, 0, 0, 200, 0, 0, 0, 200]
    picture.putpalette(colours + [0] * (768 - len(colours)))
    picture.save(tmp_path / "p.png")
    got = read_image(tmp_path / "p.png")
    expected = np.array(colours, np.uint8).reshape(4, 3)[indices]
    np.testing.assert_array_equal(got, expected)


def _exif_jpeg(path, pixels: np.ndarray, orientation: int) -> None:
    picture = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[imageio.EXIF_ORIENTATION_TAG] = orientation
    picture.save(path, exif=exif, quality=95)


def test_exif_orientation_is_applied_unless_asked_not_to(tmp_path):
    _exif_jpeg(tmp_path / "r.jpg", _rgb(), 6)
    stored = load_image(tmp_path / "r.jpg", apply_exif=False)
    shown = load_image(tmp_path / "r.jpg")
    assert stored.pixels.shape == (H, W, 3) and stored.exif_orientation == 6
    assert shown.pixels.shape == (W, H, 3) and shown.exif_applied
    # Orientation 6: the stored pixels are shown rotated 90° clockwise.
    np.testing.assert_array_equal(shown.pixels, np.rot90(stored.pixels, k=-1))
    assert shown.orientation_name == "rotated 90° clockwise"


SHOWN = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}
"""How viewers show stored pixels ``[H,W,...]`` in each EXIF orientation (the EXIF spec)."""


@pytest.mark.parametrize("orientation", sorted(SHOWN))
@pytest.mark.parametrize("mode", ["L", "RGB", "I;16"])
def test_tiff_orientation_tag_is_applied_or_ignored_exactly(tmp_path, mode, orientation):
    # Pillow 13 turns TIFFs while decoding (and memory-maps uncompressed grayscale ones with
    # the turned size); both orientations of the pixels must still come out exactly.
    gray = _rgb()[:, :, 0]
    stored = {"L": gray, "RGB": _rgb(), "I;16": gray.astype(np.uint16) * 251}[mode]
    picture = Image.fromarray(stored)
    assert picture.mode == mode
    picture.save(tmp_path / "o.tif", tiffinfo={imageio.EXIF_ORIENTATION_TAG: orientation})
    as_stored = load_image(tmp_path / "o.tif", apply_exif=False)
    shown = load_image(tmp_path / "o.tif")
    expected = stored if stored.ndim == 3 else stored[:, :, None]
    np.testing.assert_array_equal(as_stored.pixels, expected)
    np.testing.assert_array_equal(shown.pixels, SHOWN[orientation](expected))
    assert as_stored.stored_hw == shown.stored_hw == (H, W)
    assert shown.exif_orientation == as_stored.exif_orientation == orientation


def test_first_frame_of_multi_page_tiff_with_a_note(tmp_path):
    first, second = _rgb(1), _rgb(2)
    Image.fromarray(first).save(
        tmp_path / "m.tif", save_all=True, append_images=[Image.fromarray(second)]
    )
    loaded = load_image(tmp_path / "m.tif")
    np.testing.assert_array_equal(loaded.pixels, first)
    assert any("2 frames" in note for note in loaded.notes)


def _error(path, reader=read_image) -> str:
    with pytest.raises(BadInputError) as caught:
        reader(path)
    assert caught.value.exit_code == 2
    message = str(caught.value)
    assert str(path) in message and "\n" not in message
    return message


def test_missing_file_and_directory(tmp_path):
    assert "no such file" in _error(tmp_path / "nope.png")
    assert "is a directory" in _error(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path):
    _save(_rgb(), tmp_path / "a.png")
    (tmp_path / "a.png").chmod(0)
    assert "cannot read" in _error(tmp_path / "a.png")


def test_corrupt_and_truncated_images(tmp_path):
    (tmp_path / "junk.jpg").write_bytes(b"this is not an image at all" * 10)
    assert "not an image" in _error(tmp_path / "junk.jpg")
    buffer = io.BytesIO()
    Image.fromarray(_rgb()).save(buffer, format="PNG")
    (tmp_path / "cut.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    assert "corrupt or truncated" in _error(tmp_path / "cut.png")


def test_damaged_later_frame_and_damaged_png_header_name_the_file(tmp_path):
    # Counting the frames reads every page's header: an empty second IFD raised TypeError
    # ('Missing dimensions'), a traceback; a PNG header chunk too short, ValueError.
    buffer = io.BytesIO()
    pages = [Image.fromarray(_rgb(1)), Image.fromarray(_rgb(2))]
    pages[0].save(buffer, format="TIFF", save_all=True, append_images=pages[1:])
    data = bytearray(buffer.getvalue())
    (first,) = struct.unpack("<I", data[4:8])
    (entries,) = struct.unpack("<H", data[first : first + 2])
    end = first + 2 + 12 * entries
    (second,) = struct.unpack("<I", data[end : end + 4])
    data[second : second + 2] = struct.pack("<H", 0)  # the second page has no tags
    (tmp_path / "pages.tif").write_bytes(bytes(data))
    message = _error(tmp_path / "pages.tif")
    # Pillow's own words differ: 'Missing dimensions' (Pillow 13), int() of None (10.0)
    assert message.startswith(f"{tmp_path / 'pages.tif'}: corrupt or truncated image data (")
    png = raw_png(W, H, 8, 2, b"\0" * (1 + 3 * W) * H)
    short = png[:8] + struct.pack(">I", 5) + b"IHDR" + png[16:21]
    short += struct.pack(">I", zlib.crc32(short[12:]))
    (tmp_path / "short.png").write_bytes(short + png[33:])
    assert "corrupt or truncated image data (Truncated IHDR chunk)" in _error(
        tmp_path / "short.png"
    )


def raw_png(width: int, height: int, bit_depth: int, colour_type: int, data: bytes) -> bytes:
    """A PNG with the given header and ``data`` (filtered scanlines) as its one IDAT chunk."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        tagged = kind + body
        return struct.pack(">I", len(body)) + tagged + struct.pack(">I", zlib.crc32(tagged))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(data))
        + chunk(b"IEND", b"")
    )


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width × height`` pixels, with almost no data."""
    return raw_png(width, height, 8, 0, b"\0" * 16)


def test_16_bit_gray_with_alpha_png_is_one_channel_of_its_high_bytes(tmp_path):
    gray = (np.arange(H * W).reshape(H, W) * 61).astype(">u2")
    pixels = np.stack([gray, np.full_like(gray, 40000)], axis=-1).astype(">u2")  # grey, alpha
    rows = b"".join(b"\0" + row.tobytes() for row in pixels)  # filter 0 (none) per row
    (tmp_path / "la16.png").write_bytes(raw_png(W, H, 16, 4, rows))
    loaded = load_image(tmp_path / "la16.png")
    np.testing.assert_array_equal(loaded.pixels, (gray >> 8).astype(np.uint8)[:, :, None])
    assert any("16-bit grayscale PNG with alpha" in note for note in loaded.notes)


@pytest.mark.parametrize(("colour_type", "channels"), [(2, 3), (6, 4)])
def test_16_bit_colour_png_is_read_as_its_high_bytes_with_a_note(tmp_path, colour_type, channels):
    stored = (np.arange(H * W * channels).reshape(H, W, channels) * 157 % 65536).astype(">u2")
    rows = b"".join(b"\0" + row.tobytes() for row in stored)  # filter 0 (none) per row
    (tmp_path / "c16.png").write_bytes(raw_png(W, H, 16, colour_type, rows))
    loaded = load_image(tmp_path / "c16.png")
    np.testing.assert_array_equal(loaded.pixels, (stored[:, :, :3] >> 8).astype(np.uint8))
    assert any(note.startswith("16-bit colour PNG: Pillow reads 8 bits") for note in loaded.notes)


def test_decompression_bomb_header_is_refused_before_decoding(tmp_path):
    (tmp_path / "bomb.png").write_bytes(bomb_png(100_000, 100_000))
    assert "too large" in _error(tmp_path / "bomb.png")


def test_pixel_limit_is_configurable(tmp_path, monkeypatch):
    _save(_rgb(), tmp_path / "a.png")
    monkeypatch.setenv("CONVCRF_MAX_PIXELS", str(H * W - 1))
    message = _error(tmp_path / "a.png")
    assert f"{H}×{W} = {H * W} pixels" in message  # height × width, as everywhere
    monkeypatch.setenv("CONVCRF_MAX_PIXELS", str(H * W))
    assert read_image(tmp_path / "a.png").shape == (H, W, 3)
    monkeypatch.delenv("CONVCRF_MAX_PIXELS")
    assert imageio.max_pixels() == imageio.DEFAULT_MAX_PIXELS


@pytest.mark.parametrize("value", ["abc", "1e6", "0", "-5", ""])
def test_invalid_pixel_limit_names_the_variable(tmp_path, monkeypatch, value):
    _save(_rgb(), tmp_path / "a.png")
    monkeypatch.setenv("CONVCRF_MAX_PIXELS", value)
    with pytest.raises(BadInputError) as caught:
        read_image(tmp_path / "a.png")
    assert caught.value.exit_code == 2
    assert str(caught.value) == (
        f"CONVCRF_MAX_PIXELS: must be a positive whole number of pixels, got {value!r}"
    )


def test_label_maps_palette_and_sixteen_bit(tmp_path):
    labels = (np.arange(H * W).reshape(H, W) % 256).astype(np.uint8)
    picture = Image.fromarray(labels)
    picture.putpalette(bytes(range(256)) * 3)
    picture.save(tmp_path / "p.png")
    got = read_label_image(tmp_path / "p.png")
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, labels)
    wide = (np.arange(H * W).reshape(H, W) * 50).astype(np.uint16)
    _save(wide, tmp_path / "w.png")
    np.testing.assert_array_equal(read_label_image(tmp_path / "w.png"), wide)


def test_label_map_must_be_single_channel_and_unrotated(tmp_path):
    _save(_rgb(), tmp_path / "rgb.png")
    assert "palette or grayscale" in _error(tmp_path / "rgb.png", read_label_image)
    exif = Image.Exif()
    exif[imageio.EXIF_ORIENTATION_TAG] = 3
    Image.fromarray(np.zeros((H, W), np.uint8)).save(tmp_path / "rot.png", exif=exif)
    assert "EXIF orientation 3" in _error(tmp_path / "rot.png", read_label_image)
