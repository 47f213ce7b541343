"""Reading a NIfTI file with a precise reason for each way it can be unreadable; atomic writes."""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.spatialimages import HeaderDataError
from nibabel.wrapstruct import WrapStructError

from nidl_dino.atomic import atomic_path
from nidl_dino.errors import ScanRejected

_GZIP_MAGIC = b"\x1f\x8b"
# Errors nibabel raises for malformed headers or voxel blocks; anything else is a bug.
_MALFORMED = (HeaderDataError, WrapStructError, ValueError, OSError, EOFError, struct.error)


def read_nifti(path: str | os.PathLike) -> nib.Nifti1Image | nib.Nifti2Image:
    """Read a single-file NIfTI-1/2 image (``.nii`` or ``.nii.gz``) fully into memory.

    The gzip stream is decompressed completely, so its CRC is checked: nibabel alone stops
    reading after the voxel bytes and would accept a corrupted stream as valid.

    Args:
        path: the image file.

    Returns:
        The image, its voxel data already read (``img.dataobj`` is an in-memory array proxy).

    Raises:
        ScanRejected: missing file, truncated or corrupt gzip, not NIfTI, header or voxel block
            malformed or truncated.
    """
    path = Path(path)
    if not path.is_file():
        raise ScanRejected("file not found", str(path))
    raw = path.read_bytes()
    if not raw:
        raise ScanRejected("empty file (0 bytes)", str(path))
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as err:
            raise ScanRejected(f"truncated or corrupt gzip ({_one_line(err)})", str(path)) from None
    klass = _nifti_class(raw)
    if klass is None:
        if len(raw) >= 348 and raw[344:348] in (b"ni1\x00", b"ni2\x00"):
            raise ScanRejected(
                "NIfTI header of a .hdr/.img pair; convert it to a single .nii.gz", str(path)
            )
        raise ScanRejected("not a NIfTI file (no NIfTI-1/NIfTI-2 header)", str(path))
    try:
        # The header as stored: the image built by from_bytes resets the voxel offset.
        header = klass.header_class.from_fileobj(io.BytesIO(raw))
        n_bytes = int(np.prod(header.get_data_shape(), dtype=np.int64))
        n_bytes *= header.get_data_dtype().itemsize
        offset = int(header.get_data_offset())
        if len(raw) < offset + n_bytes:
            present = max(len(raw) - offset, 0)
            raise ScanRejected(
                f"truncated file: {present} of {n_bytes} bytes of voxel data present", str(path)
            )
        img = klass.from_bytes(raw)
    except _MALFORMED as err:
        raise ScanRejected(f"malformed NIfTI header ({_one_line(err)})", str(path)) from None
    return img


def _nifti_class(raw: bytes) -> type | None:
    """NIfTI-1 or NIfTI-2 single-file image class from the header's size and magic, else None."""
    if len(raw) >= 348:
        for endian in "<>":
            (size,) = struct.unpack(f"{endian}i", raw[:4])
            if size == 348 and raw[344:348] == b"n+1\x00":
                return nib.Nifti1Image
            if size == 540 and len(raw) >= 540 and raw[4:8] == b"n+2\x00":
                return nib.Nifti2Image
    return None


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def save_nifti_atomic(img: nib.Nifti1Image, path: str | os.PathLike) -> None:
    """Write a NIfTI image atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


def write_json_atomic(record: dict[str, Any], path: str | os.PathLike) -> None:
    """Write a JSON record atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    # numpy scalars and arrays reach the record from the metrics.
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
