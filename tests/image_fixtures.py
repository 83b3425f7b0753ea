"""Image bytes shared by the bad-input tests (made on the fly, nothing binary is committed)."""

import io
import zlib

from PIL import Image


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def png_with_header_size(width: int, height: int) -> bytes:
    """An 8x8 PNG whose IHDR claims ``width`` x ``height``: a cheap decompression bomb, refused from the header."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    b = bytearray(buf.getvalue())
    b[16:20], b[20:24] = width.to_bytes(4, "big"), height.to_bytes(4, "big")
    b[29:33] = zlib.crc32(bytes(b[12:29])).to_bytes(4, "big")
    return bytes(b)
