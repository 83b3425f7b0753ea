"""Tests for ladic.image_io: every bad input gives one clear ImageLoadError."""

from __future__ import annotations

import io
import os
import pickle
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from ladic.image_io import (
    IMAGE_EXTENSIONS,
    MAX_BYTES_DEFAULT,
    MAX_PIXELS_DEFAULT,
    ImageLoadError,
    iter_image_files,
    load_image,
    load_images,
)

FUZZ = settings(
    deadline=None,
    max_examples=60,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow],
)


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def noise(w: int = 64, h: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def png_with_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR claims ``width`` x ``height`` (header only, no big pixels)."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def assert_error(err: ImageLoadError, source: str, reason: str) -> None:
    msg = str(err)
    assert "\n" not in msg and "\r" not in msg
    assert err.source == source
    assert msg.startswith(f"{source}: "), msg
    assert reason in err.reason, msg


def assert_rgb(img: object, size: tuple[int, int] | None = None) -> None:
    assert isinstance(img, Image.Image)
    assert img.mode == "RGB"
    if size is not None:
        assert img.size == size


# --- files: errors -----------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.jpg"
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert str(info.value) == f"{path}: file not found"


def test_missing_file_message_uses_path_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ImageLoadError) as info:
        load_image("missing.jpg")
    assert str(info.value) == "missing.jpg: file not found"


def test_directory_passed_as_file(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError) as info:
        load_image(tmp_path)
    assert str(info.value) == f"{tmp_path}: is a directory, not an image file"


def test_empty_file(tmp_path: Path) -> None:
    path = write(tmp_path / "empty.jpg", b"")
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert str(info.value) == f"{path}: empty file (0 bytes)"


def test_text_file_named_jpg(tmp_path: Path) -> None:
    path = write(tmp_path / "cat.jpg", b"this is not a picture\n" * 10)
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert str(info.value) == f"{path}: not an image (cannot identify image file)"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "TIFF", "BMP", "WEBP"])
def test_truncated_image_is_an_error(tmp_path: Path, fmt: str) -> None:
    data = encode(noise(), fmt)
    path = write(tmp_path / f"photo.{fmt.lower()}", data[: len(data) // 2])
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert_error(info.value, str(path), "truncated or corrupt image data")


def test_truncated_jpeg_header(tmp_path: Path) -> None:
    path = write(tmp_path / "photo.jpg", encode(noise(), "JPEG")[:30])
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert str(info.value) == f"{path}: truncated or corrupt image data"


def test_png_with_bad_crc(tmp_path: Path) -> None:
    data = bytearray(encode(noise(), "PNG"))
    data[data.find(b"IDAT") + 100] ^= 0xFF
    path = write(tmp_path / "photo.png", bytes(data))
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert_error(info.value, str(path), "truncated or corrupt image data")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_fifo_is_not_read(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(ImageLoadError) as info:
        load_image(fifo)
    assert str(info.value) == f"{fifo}: not a regular file"


def test_eps_is_not_opened(tmp_path: Path) -> None:
    path = write(tmp_path / "doc.jpg", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert_error(info.value, str(path), "not an image")


def test_file_too_many_bytes(tmp_path: Path) -> None:
    path = write(tmp_path / "photo.png", encode(noise(300, 200), "PNG"))
    with pytest.raises(ImageLoadError) as info:
        load_image(path, max_bytes=2**20 // 10)
    size_mb = path.stat().st_size / 2**20
    assert str(info.value) == f"{path}: file too large ({size_mb:.1f} MB > 0.1 MB limit)"
    assert_rgb(load_image(path, max_bytes=path.stat().st_size), (300, 200))


def test_bytes_too_many() -> None:
    with pytest.raises(ImageLoadError) as info:
        load_image(b"\0" * 2000, max_bytes=1000)
    assert_error(info.value, "<bytes>", "input too large")


def test_filename_with_newline_stays_one_line(tmp_path: Path) -> None:
    path = write(tmp_path / "bad\nname.jpg", b"")
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    msg = str(info.value)
    assert "\n" not in msg and "bad\\nname.jpg" in msg and msg.endswith("empty file (0 bytes)")


def test_unsupported_input_types() -> None:
    for bad in (123, None, ["a.jpg"], 1.5):
        with pytest.raises(ImageLoadError) as info:
            load_image(bad)  # type: ignore[arg-type]
        assert "unsupported input type" in str(info.value)


def test_name_overrides_source() -> None:
    with pytest.raises(ImageLoadError) as info:
        load_image(b"junk", name="upload.png")
    assert str(info.value) == "upload.png: not an image (cannot identify image file)"


def test_error_is_valueerror_and_picklable() -> None:
    err = ImageLoadError("a.jpg", "file not found")
    assert isinstance(err, ValueError)
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.source, copy.reason, str(copy)) == ("a.jpg", "file not found", "a.jpg: file not found")


# --- huge images -------------------------------------------------------------


def test_defaults() -> None:
    assert MAX_PIXELS_DEFAULT == 64_000_000
    assert MAX_BYTES_DEFAULT == 50 * 2**20


def test_huge_png_is_refused_from_header(tmp_path: Path) -> None:
    path = write(tmp_path / "big.png", png_with_size(12000, 12000))
    limit_before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageLoadError) as info:
            load_image(path)
    assert str(info.value) == f"{path}: image too large (12000x12000 = 144.0 MP > 64.0 MP limit)"
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert Image.MAX_IMAGE_PIXELS == limit_before


def test_image_over_pillow_hard_limit_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "bomb.png", png_with_size(30000, 30000))
    with pytest.raises(ImageLoadError) as info:
        load_image(path, max_pixels=10**12)
    assert str(info.value) == f"{path}: image too large (over Pillow's decompression bomb limit)"


def test_max_pixels_parameter(tmp_path: Path) -> None:
    path = write(tmp_path / "photo.png", encode(noise(100, 50), "PNG"))
    with pytest.raises(ImageLoadError) as info:
        load_image(path, max_pixels=4999)
    assert_error(info.value, str(path), "image too large (100x50 = 0.0 MP")
    assert_rgb(load_image(path, max_pixels=5000), (100, 50))


def test_max_pixels_applies_to_arrays_and_pil() -> None:
    with pytest.raises(ImageLoadError, match="image too large"):
        load_image(np.zeros((100, 100), np.uint8), max_pixels=9999)
    with pytest.raises(ImageLoadError, match="image too large"):
        load_image(Image.new("RGB", (100, 100)), max_pixels=9999)


def test_broadcast_array_is_refused_without_copying() -> None:
    huge = np.broadcast_to(np.zeros((1, 1), np.uint8), (100_000, 100_000))
    with pytest.raises(ImageLoadError, match=r"image too large \(100000x100000"):
        load_image(huge)


# --- files: modes and formats ------------------------------------------------


def test_rgba_png_composited_on_white(tmp_path: Path) -> None:
    img = Image.new("RGBA", (2, 1), (255, 0, 0, 0))
    img.putpixel((1, 0), (0, 0, 0, 128))
    out = load_image(write(tmp_path / "a.png", encode(img, "PNG")))
    assert_rgb(out, (2, 1))
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert all(abs(v - 127) <= 1 for v in out.getpixel((1, 0)))


def test_grayscale_l(tmp_path: Path) -> None:
    out = load_image(write(tmp_path / "g.png", encode(Image.new("L", (3, 2), 77), "PNG")))
    assert_rgb(out, (3, 2))
    assert out.getpixel((0, 0)) == (77, 77, 77)


def test_la_transparent_is_white(tmp_path: Path) -> None:
    out = load_image(write(tmp_path / "la.png", encode(Image.new("LA", (2, 2), (0, 0)), "PNG")))
    assert out.getpixel((0, 0)) == (255, 255, 255)


def test_palette_with_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (2, 1), 0)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    img.putpixel((1, 0), 1)
    out = load_image(write(tmp_path / "p.png", encode(img, "PNG", transparency=0)))
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (0, 255, 0)


def test_one_bit(tmp_path: Path) -> None:
    img = Image.new("1", (3, 1), 0)
    img.putpixel((1, 0), 1)
    out = load_image(write(tmp_path / "b.png", encode(img, "PNG")))
    assert np.asarray(out)[0, :, 0].tolist() == [0, 255, 0]


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_is_scaled_not_clipped(tmp_path: Path, fmt: str) -> None:
    img = Image.fromarray(np.array([[0, 257, 1000, 32768, 65535]], np.uint16))
    out = load_image(write(tmp_path / f"d.{fmt.lower()}", encode(img, fmt)))
    assert np.asarray(out)[0, :, 0].tolist() == [0, 1, 4, 128, 255]


def test_mode_i_is_scaled_as_sixteen_bit() -> None:
    img = Image.fromarray(np.array([[-5, 0, 1000, 65535, 70000]], np.int32))
    assert img.mode == "I"
    assert np.asarray(load_image(img))[0, :, 0].tolist() == [0, 0, 4, 255, 255]


def test_mode_f_uses_pillow_range(tmp_path: Path) -> None:
    img = Image.fromarray(np.array([[-1.0, 0.0, 100.4, 300.0]], np.float32))
    assert img.mode == "F"
    assert np.asarray(load_image(img))[0, :, 0].tolist() == [0, 0, 100, 255]
    out = load_image(write(tmp_path / "f.tiff", encode(img, "TIFF")))
    assert np.asarray(out)[0, :, 0].tolist() == [0, 0, 100, 255]


def test_mode_f_nan_is_an_error() -> None:
    img = Image.fromarray(np.array([[np.nan, 0.0]], np.float32))
    with pytest.raises(ImageLoadError, match="NaN"):
        load_image(img)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    data = encode(Image.new("CMYK", (8, 8), (255, 0, 0, 0)), "JPEG")
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = load_image(write(tmp_path / "c.jpg", data))
    assert_rgb(out, (8, 8))
    r, g, b = out.getpixel((4, 4))
    assert r < 20 and g > 235 and b > 235


def test_animated_gif_uses_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (4, 4), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(buf.getvalue())).n_frames == 3
    out = load_image(write(tmp_path / "anim.gif", buf.getvalue()))
    assert out.getpixel((0, 0)) == (255, 0, 0)


def test_one_by_one(tmp_path: Path) -> None:
    out = load_image(write(tmp_path / "dot.png", encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG")))
    assert_rgb(out, (1, 1))
    assert out.getpixel((0, 0)) == (1, 2, 3)


def test_zero_size_pil_image() -> None:
    with pytest.raises(ImageLoadError, match="empty image"):
        load_image(Image.new("RGB", (0, 5)))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_applied(tmp_path: Path, fmt: str) -> None:
    img = Image.new("RGB", (4, 2), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 2, 2))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = load_image(write(tmp_path / f"o.{fmt.lower()}", encode(img, fmt, exif=exif)))
    assert out.size == (2, 4)
    top, bottom = out.getpixel((0, 0)), out.getpixel((1, 3))
    assert top[0] > 200 and top[2] < 50
    assert bottom[2] > 200 and bottom[0] < 50


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "TGA", "ICO"])
def test_formats_and_bytes_input(fmt: str) -> None:
    data = encode(noise(32, 16), fmt)
    assert_rgb(load_image(data), None if fmt == "ICO" else (32, 16))


def test_path_str_and_pil_inputs(tmp_path: Path) -> None:
    path = write(tmp_path / "x.png", encode(noise(), "PNG"))
    assert_rgb(load_image(str(path)), (64, 48))
    assert_rgb(load_image(path), (64, 48))
    with Image.open(path) as img:
        out = load_image(img)
    assert_rgb(out, (64, 48))
    assert out is not img


def test_rgb_pil_input_is_copied() -> None:
    img = noise()
    out = load_image(img)
    assert out is not img and out.tobytes() == img.tobytes()


# --- arrays and tensors ------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 1), (5, 7, 3), (5, 7, 4)])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.float64, np.bool_])
def test_array_shapes_and_dtypes(shape: tuple[int, ...], dtype: type) -> None:
    top = np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else 1
    arr = np.full(shape, top, dtype=dtype)
    out = load_image(arr)
    assert_rgb(out, (7, 5))
    assert np.asarray(out).min() == 255


def test_array_values() -> None:
    floats = np.array([[-1.0, 0.0, 0.5, 1.0, 2.0]])
    assert np.asarray(load_image(floats))[0, :, 0].tolist() == [0, 0, 128, 255, 255]
    u16 = np.array([[0, 1000, 65535]], dtype=">u2")
    assert np.asarray(load_image(u16))[0, :, 0].tolist() == [0, 4, 255]
    rgba = np.zeros((1, 2, 4), np.uint8)
    rgba[0, 1] = (10, 20, 30, 255)
    assert np.asarray(load_image(rgba)).tolist() == [[[255, 255, 255], [10, 20, 30]]]
    hwc = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    assert np.array_equal(np.asarray(load_image(hwc)), hwc)
    assert np.array_equal(np.asarray(load_image(hwc[:, ::-1])), hwc[:, ::-1])


@pytest.mark.parametrize(
    ("arr", "reason"),
    [
        (np.zeros((4,), np.uint8), "unsupported array shape"),
        (np.zeros((2, 2, 2), np.uint8), "unsupported array shape"),
        (np.zeros((1, 2, 2, 3), np.uint8), "unsupported array shape"),
        (np.zeros((3, 8, 8), np.uint8), "unsupported array shape"),
        (np.zeros((0, 4), np.uint8), "empty array"),
        (np.zeros((2, 2), np.complex64), "unsupported dtype complex64"),
        (np.array([[None, 1]], dtype=object), "unsupported dtype object"),
        (np.zeros((2, 2), np.int64), "unsupported dtype int64"),
        (np.array([["a"]]), "unsupported dtype"),
        (np.array([[0.5, np.nan]]), "NaN or infinite"),
        (np.array([[np.inf]], np.float32), "NaN or infinite"),
        (np.array(3.0), "unsupported array shape"),
    ],
)
def test_bad_arrays(arr: np.ndarray, reason: str) -> None:
    with pytest.raises(ImageLoadError) as info:
        load_image(arr)
    assert_error(info.value, "<array>", reason)


@pytest.mark.parametrize(
    ("tensor", "size"),
    [
        (torch.rand(3, 5, 7), (7, 5)),
        (torch.rand(1, 5, 7), (7, 5)),
        (torch.rand(4, 5, 7), (7, 5)),
        (torch.rand(5, 7, 3), (7, 5)),
        (torch.randint(0, 256, (5, 7, 3), dtype=torch.uint8), (7, 5)),
        (torch.rand(1, 3, 5, 7), (7, 5)),
        (torch.rand(3, 5, 7, dtype=torch.float64), (7, 5)),
        (torch.rand(3, 5, 7).to(torch.bfloat16), (7, 5)),
        (torch.rand(3, 5, 7).to(torch.float16), (7, 5)),
        (torch.rand(3, 5, 7, requires_grad=True), (7, 5)),
    ],
)
def test_tensors(tensor: torch.Tensor, size: tuple[int, int]) -> None:
    assert_rgb(load_image(tensor), size)


def test_tensor_values_match_layouts() -> None:
    chw = torch.tensor([[[0.0, 1.0]] * 2, [[0.5, 0.0]] * 2, [[1.0, 0.25]] * 2])
    expected = [[[0, 128, 255], [255, 0, 64]]] * 2
    assert np.asarray(load_image(chw)).tolist() == expected
    assert np.asarray(load_image(chw.permute(1, 2, 0))).tolist() == expected
    assert np.asarray(load_image((chw * 255).round().to(torch.uint8))).tolist() == expected


@pytest.mark.parametrize(
    ("tensor", "reason"),
    [
        (torch.rand(5, 7), "unsupported tensor shape"),
        (torch.rand(2, 3, 5, 7), "unsupported tensor shape"),
        (torch.rand(5, 7, 2), "unsupported tensor shape"),
        (torch.rand(3, 0, 7), "empty array"),
        (torch.zeros(3, 5, 7, dtype=torch.complex64), "unsupported dtype"),
        (torch.zeros(3, 5, 7, dtype=torch.int64), "unsupported dtype"),
        (torch.full((3, 5, 7), float("nan")), "NaN or infinite"),
    ],
)
def test_bad_tensors(tensor: torch.Tensor, reason: str) -> None:
    with pytest.raises(ImageLoadError) as info:
        load_image(tensor)
    assert_error(info.value, "<tensor>", reason)


# --- batches and directories -------------------------------------------------


def test_load_images_keeps_going(tmp_path: Path) -> None:
    good = write(tmp_path / "good.png", encode(noise(), "PNG"))
    bad = write(tmp_path / "bad.jpg", b"nope")
    results = load_images([good, bad, tmp_path / "missing.jpg", b"", np.zeros((2, 3)), 42, noise(8, 8)])
    assert_rgb(results[0], (64, 48))
    assert str(results[1]) == f"{bad}: not an image (cannot identify image file)"
    assert str(results[2]) == f"{tmp_path / 'missing.jpg'}: file not found"
    assert str(results[3]) == "<bytes #3>: empty input (0 bytes)"
    assert_rgb(results[4], (3, 2))
    assert str(results[5]) == "<int #5>: unsupported input type int"
    assert_rgb(results[6], (8, 8))


def test_load_images_passes_limits(tmp_path: Path) -> None:
    path = write(tmp_path / "p.png", encode(noise(), "PNG"))
    (err,) = load_images([path], max_pixels=10)
    assert isinstance(err, ImageLoadError) and "image too large" in str(err)


def make_tree(root: Path) -> None:
    img = encode(Image.new("RGB", (2, 2)), "PNG")
    for name in ["b.PNG", "a.jpg", "sub/c.png", "sub/deeper/d.webp", ".hidden/e.png"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        write(root / name, img)
    write(root / "notes.txt", b"hello")
    write(root / "README", b"hello")
    write(root / ".DS_Store", b"junk")


def test_iter_image_files_directory(tmp_path: Path) -> None:
    make_tree(tmp_path)
    files, errors = iter_image_files(tmp_path)
    assert files == [tmp_path / "a.jpg", tmp_path / "b.PNG"]
    messages = sorted(str(e) for e in errors)
    assert messages == sorted(
        [
            f"{tmp_path / 'README'}: skipped: not an image file (no extension)",
            f"{tmp_path / 'notes.txt'}: skipped: not an image file (extension '.txt')",
            f"{tmp_path / 'sub'}: skipped: directory (not recursive)",
        ]
    )


def test_iter_image_files_recursive(tmp_path: Path) -> None:
    make_tree(tmp_path)
    files, errors = iter_image_files(str(tmp_path), recursive=True)
    assert files == sorted(
        [tmp_path / "a.jpg", tmp_path / "b.PNG", tmp_path / "sub/c.png", tmp_path / "sub/deeper/d.webp"]
    )
    assert len(errors) == 2
    assert all(isinstance(load_image(f), Image.Image) for f in files)


def test_iter_image_files_single_file_any_extension(tmp_path: Path) -> None:
    path = write(tmp_path / "photo.unknown", b"x")
    assert iter_image_files(path) == ([path], [])


def test_iter_image_files_missing_and_empty(tmp_path: Path) -> None:
    files, errors = iter_image_files(tmp_path / "nope")
    assert files == [] and [str(e) for e in errors] == [f"{tmp_path / 'nope'}: file not found"]
    empty = tmp_path / "empty"
    empty.mkdir()
    files, errors = iter_image_files(empty)
    assert files == [] and [str(e) for e in errors] == [f"{empty}: no image files found"]


def test_iter_image_files_links(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    write(tmp_path / "real.png", encode(Image.new("RGB", (2, 2)), "PNG"))
    (root / "link.png").symlink_to(tmp_path / "real.png")
    (root / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    (root / "loop").symlink_to(root, target_is_directory=True)
    files, errors = iter_image_files(root, recursive=True)
    assert files == [root / "link.png"]
    assert sorted(e.reason for e in errors) == [
        "skipped: broken link or not a regular file",
        "skipped: symlinked directory",
    ]


def test_image_extensions() -> None:
    assert {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"} <= IMAGE_EXTENSIONS
    assert all(ext.startswith(".") and ext == ext.lower() for ext in IMAGE_EXTENSIONS)


# --- property-based ----------------------------------------------------------

SAMPLES = [
    encode(noise(16, 8, seed=1), "JPEG"),
    encode(noise(16, 8, seed=2), "PNG"),
    encode(noise(16, 8, seed=3).convert("P"), "GIF"),
    encode(noise(16, 8, seed=4), "WEBP"),
    encode(noise(16, 8, seed=5), "TIFF"),
    encode(noise(16, 8, seed=6), "BMP"),
    encode(Image.new("RGBA", (5, 3), (1, 2, 3, 4)), "PNG"),
]


def check_bytes_result(data: bytes) -> None:
    try:
        out = load_image(data)
    except ImageLoadError as err:
        assert err.source == "<bytes>" and "\n" not in str(err) and err.reason
    else:
        assert_rgb(out)
        assert out.width * out.height <= MAX_PIXELS_DEFAULT


@FUZZ
@given(st.binary(max_size=512))
def test_fuzz_random_bytes(data: bytes) -> None:
    check_bytes_result(data)


@FUZZ
@given(
    st.sampled_from(SAMPLES),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
    st.one_of(st.none(), st.integers(0, 10**6)),
)
def test_fuzz_mutated_images(sample: bytes, edits: list[tuple[int, int]], cut: int | None) -> None:
    data = bytearray(sample)
    for pos, value in edits:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[: cut % len(data)]
    check_bytes_result(bytes(data))


ARRAY_DTYPES = [
    "uint8", "uint16", ">u2", "bool", "float16", "float32", "float64",
    "int8", "int32", "int64", "uint32", "complex64", "U2",
]
GOOD_KINDS = {"u1", "u2", "b1", "f2", "f4", "f8"}


def array_is_valid(arr: np.ndarray) -> bool:
    shape_ok = arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4))
    dtype_ok = f"{arr.dtype.kind}{arr.dtype.itemsize}" in GOOD_KINDS
    finite = arr.dtype.kind != "f" or bool(np.isfinite(arr.astype(np.float64)).all())
    return shape_ok and arr.size > 0 and dtype_ok and finite


@FUZZ
@given(
    hnp.arrays(
        dtype=st.sampled_from(ARRAY_DTYPES).map(np.dtype),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6),
    )
)
def test_fuzz_arrays(arr: np.ndarray) -> None:
    try:
        out = load_image(arr)
    except ImageLoadError as err:
        assert err.source == "<array>" and "\n" not in str(err)
        assert not array_is_valid(arr), str(err)
    else:
        assert array_is_valid(arr)
        assert_rgb(out, (arr.shape[1], arr.shape[0]))


TENSOR_DTYPES = [
    torch.uint8, torch.uint16, torch.bool, torch.float16, torch.bfloat16,
    torch.float32, torch.float64, torch.int64, torch.int16, torch.complex64,
]


@FUZZ
@given(
    st.lists(st.integers(0, 5), min_size=0, max_size=5),
    st.sampled_from(TENSOR_DTYPES),
    st.one_of(st.floats(-2, 2), st.sampled_from([float("nan"), float("inf"), -float("inf")])),
    st.integers(0, 2**31),
)
def test_fuzz_tensors(shape: list[int], dtype: torch.dtype, special: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    t = torch.rand(shape, generator=gen, dtype=torch.float64) * 1.4 - 0.2
    if t.numel():
        t.view(-1)[0] = special
    if dtype in (torch.uint8, torch.uint16, torch.int16, torch.int64):
        t = torch.nan_to_num(t).clamp(0, 1).mul(255)
    t = t.to(dtype)

    dims = list(t.shape[1:]) if t.ndim == 4 and t.shape[0] == 1 else list(t.shape)
    if len(dims) == 3 and dims[0] in (1, 3, 4):
        hw = dims[1:]
    elif len(dims) == 3 and dims[2] in (1, 3, 4):
        hw = dims[:2]
    else:
        hw = None
    dtype_ok = dtype not in (torch.int64, torch.int16, torch.complex64)
    finite = not t.dtype.is_floating_point or bool(torch.isfinite(t).all())
    valid = hw is not None and min(hw) > 0 and dtype_ok and finite

    try:
        out = load_image(t)
    except ImageLoadError as err:
        assert err.source == "<tensor>" and "\n" not in str(err)
        assert not valid, str(err)
    else:
        assert valid
        assert_rgb(out, (hw[1], hw[0]))
