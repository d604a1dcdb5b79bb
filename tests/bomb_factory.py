"""Real decompression bombs for tests and `benchmarks/bombs.py`: small files that inflate to gigabytes.

Each is a valid file of its format whose payload is zeros: a gzip NIfTI, a deflated DICOM, a PNG. A deflate
stream of zeros is built from one compressed block repeated (after a full flush the compressor's output for
the same input is the same bytes), so a 4 GB payload takes a fraction of a second to write.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
from dicom_factory import ct_dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian

CHUNK = 1 << 24
ZEROS = bytes(CHUNK)


def deflate_zeros(prefix: bytes, zeros: int, checksum: Callable[[bytes, int], int], start: int) -> tuple[bytes, int]:
    """A raw deflate stream of `prefix` followed by `zeros` zero bytes, and the running `checksum` over both."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = compressor.compress(prefix) + compressor.flush(zlib.Z_FULL_FLUSH)
    block = compressor.compress(ZEROS) + compressor.flush(zlib.Z_FULL_FLUSH)  # no back-references: repeatable
    full, rest = divmod(zeros, CHUNK)
    tail = compressor.compress(bytes(rest)) + compressor.flush()
    total = checksum(prefix, start)
    for _ in range(full):
        total = checksum(ZEROS, total)
    return head + block * full + tail, checksum(bytes(rest), total)


def gzip_nifti_bomb(path: Path, shape: tuple[int, ...]) -> Path:
    """A .nii.gz holding uint8 zeros of `shape` (1024^3 inflates to 1 GiB from about 1 MB)."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.uint8)
    header.set_data_shape(shape)
    header["vox_offset"] = 352
    raw = header.binaryblock + b"\x00" * 4
    stream, crc = deflate_zeros(raw, int(np.prod(shape)), zlib.crc32, 0)
    size = (len(raw) + int(np.prod(shape))) % 2**32
    path.write_bytes(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + stream + struct.pack("<II", crc, size))
    return path


def deflated_dicom_bomb(path: Path, rows: int, cols: int, bits: int = 8) -> Path:
    """A Deflated Explicit VR Little Endian CT file of rows x cols zero pixels (65535^2 at 8 bits: 4 GiB)."""
    ds = ct_dataset(np.zeros((1, 1), np.int16))
    del ds.PixelData
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit, ds.PixelRepresentation = bits - 1, 0
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    pixel_bytes = rows * cols * bits // 8
    pixel_header = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB" if bits == 8 else b"OW", 0, pixel_bytes)
    stream, _ = deflate_zeros(body.getvalue() + pixel_header, pixel_bytes, lambda data, value: 0, 0)
    path.write_bytes(b"\x00" * 128 + b"DICM" + meta.getvalue() + stream)
    return path


def png_bomb(path: Path, height: int, width: int) -> Path:
    """An 8-bit grayscale PNG of zeros (13000^2: 169 MB of pixels from about 0.2 MB)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = height * (width + 1)  # each row: filter byte 0, then the pixels
    stream, adler = deflate_zeros(b"", rows, zlib.adler32, 1)
    idat = b"\x78\xda" + stream + struct.pack(">I", adler)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path
