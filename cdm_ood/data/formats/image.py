"""PNG and JPEG: recognised by their signature, the voxel budget from the header (Pillow's decompression-bomb
limit also refuses), decoded by MONAI's `PILReader` into one slice as stored (grey stays one channel, palette,
alpha and CMYK become RGB). Derived files are PNGs of the input's size and depth.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...utils.io import atomic_path
from ..errors import TooLargeError, UnreadableFileError
from ..guards import quiet_libraries, reading, redact, require_budget
from ..records import Slice, SourceFile
from .base import FormatReader, SliceKey, register_reader, slice_of


@register_reader
class ImageReader(FormatReader):
    """2D PNG and JPEG images: one slice each."""

    name = "image"
    title = "PNG or JPEG"
    suffix = ".png"

    def detect(self, path: Path, head: bytes) -> bool:
        return head[:8] == b"\x89PNG\r\n\x1a\n" or head[:3] == b"\xff\xd8\xff"

    def source(self, path: Path, max_voxels: int) -> SourceFile:
        require_budget(path, _shape(path), max_voxels)
        return SourceFile(str(path), self.name, str(path))

    def slices(self, source: SourceFile) -> list[Slice]:
        from monai.data import PILReader

        path = Path(source.path)
        reader = PILReader(converter=_single_or_rgb, reverse_indexing=False)
        with reading(path, "cannot decode image (truncated or corrupt)"):
            data, _ = reader.get_data(reader.read(str(path)))
        image = data[None] if data.ndim == 2 else np.moveaxis(data, -1, 0)
        return [slice_of(image, source, 0)]

    def write_like(self, source: Path, slices: dict[SliceKey, np.ndarray], out: Path, series_uid: str) -> None:
        """8-bit PNG (16-bit when the input is 16-bit), grayscale or RGB like the model's channels."""
        from PIL import Image

        ((_, image),) = slices.items()
        deep = Image.open(source).mode in ("I", "I;16", "I;16B")
        pixels = np.clip(np.rint(image), 0, 65535 if deep else 255).astype(np.uint16 if deep else np.uint8)
        picture = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else np.moveaxis(pixels, 0, -1))
        with atomic_path(out) as tmp:
            picture.save(tmp, format="PNG")


def _single_or_rgb(image):
    """Keep grayscale modes (8/16/32-bit, float) as one channel; turn palette, alpha and CMYK images into RGB."""
    return image if image.mode in ("L", "I", "I;16", "I;16B", "F", "RGB") else image.convert("RGB")


def _shape(path: Path) -> tuple[int, ...]:
    """(bands, height, width) from a PNG/JPEG header, without decoding the pixels."""
    from PIL import Image

    try:
        with quiet_libraries(), Image.open(path) as image:
            return len(image.getbands()), image.height, image.width
    except Image.DecompressionBombError:
        raise TooLargeError(path, "declares more pixels than Pillow's decompression-bomb limit: refused without "
                            "decoding") from None  # fmt: skip
    except MemoryError:
        raise
    except Exception as err:  # PIL raises OSError / SyntaxError / ValueError on broken headers
        raise UnreadableFileError(path, f"cannot decode image (truncated or corrupt): {redact(err)}") from None
