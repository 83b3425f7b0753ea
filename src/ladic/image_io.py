"""Robust image loading: turn whatever the user hands us into an RGB PIL image.

Every bad input raises :class:`ImageLoadError` (and nothing else) with a one-line
message ``'<source>: <reason>'``, so batch callers can report it and carry on.

Policies:

* Huge images are **refused**, never downscaled: the pixel count is read from the
  header after ``Image.open`` and checked against ``max_pixels`` before any pixel
  data is decoded. This is cheap, works the same for every format and input type,
  and never hands the model a silently different picture. Pillow's own hard limit
  (``2 * PIL.Image.MAX_IMAGE_PIXELS``) still applies on top of ``max_pixels``; the
  global is never modified.
* Truncated files are errors (``ImageFile.LOAD_TRUNCATED_IMAGES`` is not touched).
* Only common raster formats are decoded (see ``_FORMATS``); e.g. EPS, which would
  run Ghostscript, is never opened.
* ``draft_size`` (optional) decodes JPEGs at a reduced scale (1/2, 1/4 or 1/8, Pillow's draft
  mode: the scaling happens inside the JPEG decoder) that keeps both sides at least ``draft_size``
  pixels; other formats decode at full size. Meant for callers that resize to ~224 px anyway.
* Transparency is composited onto white; EXIF orientation is applied; animated
  images give their first frame.
* Pillow's warnings (decompression bomb, corrupt EXIF, ...) are silenced while
  decoding; problems surface as ``ImageLoadError`` instead.
* 16-bit data (``I;16*``, ``I`` and uint16 arrays) is scaled from 0..65535 to
  0..255. Pillow ``F`` images follow Pillow's convention (0..255). Float arrays and
  tensors are taken to be in [0, 1] and clipped; NaN/inf is an error.
"""

from __future__ import annotations

import io
import os
import stat
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:
    import torch

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_BYTES_DEFAULT",
    "MAX_PIXELS_DEFAULT",
    "ImageInput",
    "ImageLoadError",
    "iter_image_files",
    "load_image",
    "load_images",
]

MAX_PIXELS_DEFAULT = 64_000_000
"""Largest accepted image, in pixels (~8000x8000; ~192 MB as decoded RGB)."""

MAX_BYTES_DEFAULT = 50 * 2**20
"""Largest accepted encoded input (file or bytes), in bytes."""

IMAGE_EXTENSIONS = frozenset(
    {
        ".avif", ".bmp", ".dib", ".gif", ".ico", ".jfif", ".jpe", ".jpeg", ".jpg",
        ".mpo", ".pbm", ".pgm", ".png", ".pnm", ".ppm", ".tga", ".tif", ".tiff",
        ".webp",
    }
)
"""Lower-case file extensions picked up when scanning a directory."""

ImageInput = Union[str, os.PathLike, bytes, Image.Image, np.ndarray, "torch.Tensor"]

_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "WEBP", "AVIF", "BMP", "DIB", "TIFF", "PPM", "TGA", "ICO")
_MAX_REASON_CHARS = 200
_WHITE = (255, 255, 255, 255)
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ARRAY_DTYPES = "uint8, uint16, bool or float in [0, 1]"
_CORRUPT = "truncated or corrupt image data"
_BOMB = "image too large (over Pillow's decompression bomb limit)"
_TENSOR_INT_DTYPES = frozenset({"torch.uint8", "torch.uint16", "torch.bool"})


def _escape(text: str) -> str:
    """Escape non-printable characters (newlines, tabs, lone surrogates, ...)."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _one_line(text: str) -> str:
    """Collapse whitespace, then escape what is left unprintable."""
    return _escape(" ".join(text.split()))


class ImageLoadError(ValueError):
    """One image could not be used; str(err) is a one-line message '<source>: <reason>'."""

    source: str
    reason: str

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(source, reason)
        self.source = _escape(source) or "''"
        self.reason = _one_line(reason)[:_MAX_REASON_CHARS]

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


def _exc_detail(exc: BaseException) -> str:
    return _one_line(str(exc)) or type(exc).__name__


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} MP"


def _megabytes(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def _check_size(width: int, height: int, max_pixels: int, source: str) -> None:
    if width <= 0 or height <= 0:
        raise ImageLoadError(source, f"empty image ({width}x{height} pixels)")
    pixels = width * height
    if pixels > max_pixels:
        raise ImageLoadError(
            source,
            f"image too large ({width}x{height} = {_megapixels(pixels)}"
            f" > {_megapixels(max_pixels)} limit)",
        )


def _os_error(exc: OSError | ValueError, source: str) -> ImageLoadError:
    if isinstance(exc, FileNotFoundError):
        return ImageLoadError(source, "file not found")
    if isinstance(exc, PermissionError):
        return ImageLoadError(source, "permission denied")
    return ImageLoadError(source, f"cannot read file ({_exc_detail(exc)})")


def _read_file(path: str | bytes, source: str, max_bytes: int) -> bytes:
    """Read a regular file of at most ``max_bytes`` bytes."""
    try:
        st = os.stat(path)
    except (OSError, ValueError) as exc:
        raise _os_error(exc, source) from exc
    if stat.S_ISDIR(st.st_mode):
        raise ImageLoadError(source, "is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise ImageLoadError(source, "not a regular file")
    if st.st_size > max_bytes:
        raise ImageLoadError(
            source, f"file too large ({_megabytes(st.st_size)} > {_megabytes(max_bytes)} limit)"
        )
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except (OSError, ValueError) as exc:
        raise _os_error(exc, source) from exc
    if not data:
        raise ImageLoadError(source, "empty file (0 bytes)")
    if len(data) > max_bytes:
        raise ImageLoadError(source, f"file too large (> {_megabytes(max_bytes)} limit)")
    return data


_DRAFT_FORMATS = frozenset({"JPEG", "MPO"})


def _decode(img: Image.Image, source: str, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    """Check the header size, then decode pixels (JPEG at a reduced scale with ``draft_size``) and apply
    EXIF orientation.

    Unreadable EXIF metadata is ignored rather than failing a decodable image.
    """
    _check_size(img.width, img.height, max_pixels, source)
    if draft_size and img.format in _DRAFT_FORMATS:
        img.draft(None, (draft_size, draft_size))
    try:
        img.load()
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(source, _BOMB) from exc
    except Exception as exc:
        raise ImageLoadError(source, _CORRUPT) from exc
    _check_size(img.width, img.height, max_pixels, source)
    try:
        return ImageOps.exif_transpose(img)
    except Exception:
        return img.copy()


@contextmanager
def _quiet_pillow() -> Iterator[None]:
    """Locally silence Pillow's warnings (bomb, corrupt EXIF, ...); errors are raised instead.

    ``max_pixels`` is checked explicitly, so the bomb warning is redundant here.
    Note ``catch_warnings`` swaps process-global state (before Python 3.14).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def _open_bytes(data: bytes, source: str, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    """Identify, size-check and decode encoded image bytes."""
    Image.init()
    formats = tuple(f for f in _FORMATS if f in Image.OPEN)
    with _quiet_pillow():
        try:
            img = Image.open(io.BytesIO(data), formats=formats)
        except Image.UnidentifiedImageError as exc:
            raise ImageLoadError(source, "not an image (cannot identify image file)") from exc
        except Image.DecompressionBombError as exc:
            raise ImageLoadError(source, _BOMB) from exc
        except Exception as exc:
            raise ImageLoadError(source, _CORRUPT) from exc
        with img:
            return _decode(img, source, max_pixels, draft_size)


def _scale_16bit(a: np.ndarray) -> np.ndarray:
    """Map 0..65535 (clipped) to 0..255 with rounding."""
    a = np.clip(a.astype(np.int64), 0, 65535)
    return ((a * 255 + 32767) // 65535).astype(np.uint8)


def _float_to_uint8(a: np.ndarray, source: str, scale: float) -> np.ndarray:
    """Map floats in [0, scale] (clipped) to 0..255; NaN/inf is an error."""
    a = a.astype(np.float64 if a.dtype.itemsize > 4 else np.float32)
    if not np.isfinite(a).all():
        raise ImageLoadError(source, "contains NaN or infinite values")
    return np.rint(np.clip(a, 0.0, scale) * (255.0 / scale)).astype(np.uint8)


def _pil_to_rgb(img: Image.Image, source: str) -> Image.Image:
    """Convert a decoded image of any mode to RGB; transparency goes on white."""
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT_MODES:
        return Image.fromarray(_scale_16bit(np.asarray(img))).convert("RGB")
    if img.mode == "F":
        return Image.fromarray(_float_to_uint8(np.asarray(img), source, 255.0)).convert("RGB")
    try:
        if img.has_transparency_data:
            rgba = img.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", img.size, _WHITE), rgba).convert("RGB")
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageLoadError(source, f"unsupported image mode {img.mode!r} ({_exc_detail(exc)})") from exc


def _array_to_rgb(a: np.ndarray, source: str, max_pixels: int) -> Image.Image:
    """HxW, HxWx1, HxWx3 or HxWx4 array (uint8/uint16/bool/float in [0, 1]) to RGB."""
    a = np.asarray(a)
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)):
        raise ImageLoadError(
            source, f"unsupported array shape {tuple(a.shape)} (expected HxW, HxWx1, HxWx3 or HxWx4)"
        )
    height, width = int(a.shape[0]), int(a.shape[1])
    if a.size == 0:
        raise ImageLoadError(source, f"empty array (shape {tuple(a.shape)})")
    _check_size(width, height, max_pixels, source)
    kind, itemsize = a.dtype.kind, a.dtype.itemsize
    if kind == "b":
        a = a.astype(np.uint8) * 255
    elif kind == "u" and itemsize == 1:
        a = a.astype(np.uint8)
    elif kind == "u" and itemsize == 2:
        a = _scale_16bit(a)
    elif kind == "f" and itemsize <= 8:
        a = _float_to_uint8(a, source, 1.0)
    else:
        raise ImageLoadError(source, f"unsupported dtype {a.dtype} (expected {_ARRAY_DTYPES})")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    img = Image.fromarray(np.ascontiguousarray(a))
    if img.mode == "RGBA":
        return Image.alpha_composite(Image.new("RGBA", img.size, _WHITE), img).convert("RGB")
    return img.convert("RGB")


def _tensor_to_array(t: torch.Tensor, source: str) -> np.ndarray:
    """CxHxW or HxWxC tensor (optionally with batch 1) to an HxWxC numpy array.

    A 3-D tensor whose first dimension is 1, 3 or 4 is taken as channels-first.
    """
    import torch

    try:
        shape = tuple(t.shape)
        t = t.detach().to("cpu")
    except Exception as exc:
        raise ImageLoadError(source, f"cannot read tensor ({_exc_detail(exc)})") from exc
    if t.ndim == 4 and shape[0] == 1:
        t = t[0]
    if t.ndim != 3:
        raise ImageLoadError(
            source, f"unsupported tensor shape {shape} (expected CxHxW or HxWxC, optionally with batch 1)"
        )
    if not (t.dtype.is_floating_point or str(t.dtype) in _TENSOR_INT_DTYPES):
        raise ImageLoadError(source, f"unsupported dtype {t.dtype} (expected {_ARRAY_DTYPES})")
    if t.shape[0] in (1, 3, 4):
        t = t.permute(1, 2, 0)
    elif t.shape[-1] not in (1, 3, 4):
        raise ImageLoadError(source, f"unsupported tensor shape {shape} (expected 1, 3 or 4 channels)")
    try:
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.contiguous().numpy()
    except Exception as exc:
        raise ImageLoadError(source, f"cannot read tensor ({_exc_detail(exc)})") from exc


def _describe(src: object, index: int | None = None) -> str:
    """Name a non-path input for error messages, e.g. ``<bytes>`` or ``<array #3>``."""
    if isinstance(src, Image.Image) and getattr(src, "filename", ""):
        return os.fsdecode(src.filename)
    torch = sys.modules.get("torch")
    if isinstance(src, (bytes, bytearray, memoryview)):
        kind = "bytes"
    elif isinstance(src, Image.Image):
        kind = "PIL image"
    elif isinstance(src, np.ndarray):
        kind = "array"
    elif torch is not None and isinstance(src, torch.Tensor):
        kind = "tensor"
    else:
        kind = type(src).__name__
    return f"<{kind}>" if index is None else f"<{kind} #{index}>"


def load_image(
    src: ImageInput,
    *,
    max_pixels: int = MAX_PIXELS_DEFAULT,
    max_bytes: int = MAX_BYTES_DEFAULT,
    name: str | None = None,
    draft_size: int | None = None,
) -> Image.Image:
    """Return an RGB PIL image. Raises ImageLoadError only (never anything else) for bad input.

    ``src`` is a path, encoded image bytes, a PIL image, a numpy array or a torch
    tensor; ``name`` overrides the source shown in error messages. With ``draft_size``,
    encoded JPEGs (paths, bytes) decode at the smallest 1/2, 1/4 or 1/8 scale whose
    sides are all >= ``draft_size`` (much faster and smaller for large photos).
    """
    if isinstance(src, (str, os.PathLike)):
        try:
            path = os.fspath(src)
        except TypeError as exc:
            raise ImageLoadError(name or _describe(src), "invalid path") from exc
        source = name if name is not None else os.fsdecode(path)
        data = _read_file(path, source, max_bytes)
        return _pil_to_rgb(_open_bytes(data, source, max_pixels, draft_size), source)
    source = name if name is not None else _describe(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if not data:
            raise ImageLoadError(source, "empty input (0 bytes)")
        if len(data) > max_bytes:
            raise ImageLoadError(
                source, f"input too large ({_megabytes(len(data))} > {_megabytes(max_bytes)} limit)"
            )
        return _pil_to_rgb(_open_bytes(data, source, max_pixels, draft_size), source)
    if isinstance(src, Image.Image):
        with _quiet_pillow():
            return _pil_to_rgb(_decode(src, source, max_pixels), source)
    if isinstance(src, np.ndarray):
        return _array_to_rgb(src, source, max_pixels)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(src, torch.Tensor):
        return _array_to_rgb(_tensor_to_array(src, source), source, max_pixels)
    raise ImageLoadError(source, f"unsupported input type {type(src).__name__}")


def load_images(
    srcs: Sequence[ImageInput],
    *,
    max_pixels: int = MAX_PIXELS_DEFAULT,
    max_bytes: int = MAX_BYTES_DEFAULT,
) -> list[Image.Image | ImageLoadError]:
    """Load each input; a bad one yields its ImageLoadError in place of an image.

    Non-path inputs are named ``<kind #index>`` in error messages.
    """
    results: list[Image.Image | ImageLoadError] = []
    for i, src in enumerate(srcs):
        name = None if isinstance(src, (str, os.PathLike)) else _describe(src, i)
        try:
            results.append(load_image(src, max_pixels=max_pixels, max_bytes=max_bytes, name=name))
        except ImageLoadError as err:
            results.append(err)
    return results


def iter_image_files(
    path: str | os.PathLike, recursive: bool = False
) -> tuple[list[Path], list[ImageLoadError]]:
    """Expand a file or directory into image files (by extension, sorted), plus errors.

    Errors cover missing paths and directories without images; non-image files in
    a directory are reported as ``skipped: ...`` errors. A file given directly is
    always returned, whatever its extension (its content decides later). Hidden
    entries (names starting with ``.``) are ignored; symlinked directories are
    reported, not followed.
    """
    root = Path(path)
    source = os.fsdecode(os.fspath(path))
    try:
        if root.is_file():
            return [root], []
        if not root.exists():
            return [], [ImageLoadError(source, "file not found")]
        if not root.is_dir():
            return [], [ImageLoadError(source, "not a regular file or directory")]
    except (OSError, ValueError) as exc:
        return [], [ImageLoadError(source, f"cannot access path ({_exc_detail(exc)})")]

    files: list[Path] = []
    errors: list[ImageLoadError] = []

    def on_error(exc: OSError) -> None:
        where = os.fsdecode(exc.filename) if exc.filename else source
        reason = "permission denied" if isinstance(exc, PermissionError) else _exc_detail(exc)
        errors.append(ImageLoadError(where, f"cannot list directory ({reason})"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error):
        base = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for d in dirnames:
            if not recursive:
                errors.append(ImageLoadError(str(base / d), "skipped: directory (not recursive)"))
            elif (base / d).is_symlink():
                errors.append(ImageLoadError(str(base / d), "skipped: symlinked directory"))
        if not recursive:
            dirnames.clear()
        for fname in sorted(filenames):
            if fname.startswith("."):
                continue
            file = base / fname
            suffix = file.suffix.lower()
            if suffix not in IMAGE_EXTENSIONS:
                what = f"extension {suffix!r}" if suffix else "no extension"
                errors.append(ImageLoadError(str(file), f"skipped: not an image file ({what})"))
            elif not file.is_file():
                errors.append(ImageLoadError(str(file), "skipped: broken link or not a regular file"))
            else:
                files.append(file)
    files.sort()
    if not files:
        errors.append(ImageLoadError(source, "no image files found"))
    return files, errors
