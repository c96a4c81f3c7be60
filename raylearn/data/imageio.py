"""Reading one image file with SimpleITK, with the checks ITK itself skips, and geometry comparison.

ITK reads a truncated ``.nii.gz`` or ``.nii`` without complaint (the missing voxels become zeros), so
:func:`read_image` decompresses gzip streams to their end and compares uncompressed NIfTI file sizes with
the header before handing the file to SimpleITK.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

__all__ = [
    "DIRECTION_ATOL", "ORIGIN_ATOL_MM", "SPACING_RTOL", "DatasetError", "check_geometry", "file_sha256", "read_image",
]

#: tolerances used to call two geometries equal (relative for spacing, mm for origin)
SPACING_RTOL = 1e-4
ORIGIN_ATOL_MM = 1e-3
DIRECTION_ATOL = 1e-4


class DatasetError(ValueError):
    """A dataset folder, file or case is invalid; the message names the file and the problem."""


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, streamed (``hashlib.file_digest``): the project's one file hash
    (dataset fingerprints, nnU-Net plans, checkpoint identity)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _check_gzip(path: Path, what: str) -> None:
    """Decompress a ``.gz`` file to its end: ITK silently zero-fills truncated gzip streams."""
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 22):
                pass
    except (OSError, EOFError, zlib.error) as err:
        raise DatasetError(
            f"{path}: unreadable or corrupt {what} file: truncated or damaged gzip data ({err})"
        ) from None


def _read(path: Path, what: str) -> sitk.Image:
    if not path.is_file():
        raise DatasetError(f"{path}: {what} file missing")
    if path.name.lower().endswith(".gz"):
        _check_gzip(path, what)
    if path.name.lower().endswith(".nii"):
        _check_nii_size(path, what)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise DatasetError(f"{path}: unreadable or corrupt {what} file: {_itk_detail(err)}") from None


def _itk_detail(err: RuntimeError) -> str:
    """The informative tail of an ITK exception message (last two lines, prefixes stripped)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip() and not ln.startswith("Exception thrown")]
    lines = [re.sub(r"^(ITK ERROR: \w+\(0x[0-9a-f]+\): |\[\w+\] )", "", ln) for ln in lines]
    return " / ".join(lines[-2:])[:300] or "unknown error"


def _check_nii_size(path: Path, what: str) -> None:
    """ITK zero-fills truncated uncompressed NIfTI data: compare the file size with the header's data size."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise DatasetError(f"{path}: unreadable or corrupt {what} file: {_itk_detail(err)}") from None
    bytes_per = np.dtype(sitk.GetArrayViewFromImage(sitk.Image([1] * reader.GetDimension(), reader.GetPixelID())).dtype)
    need = 352 + int(np.prod(reader.GetSize())) * reader.GetNumberOfComponents() * bytes_per.itemsize
    have = path.stat().st_size
    if have < need:
        raise DatasetError(f"{path}: unreadable or corrupt {what} file: truncated ({have} bytes, header needs {need})")


def read_image(path: str | Path, what: str = "image") -> sitk.Image:
    """Read one file with SimpleITK; :class:`DatasetError` naming the file if missing or corrupt."""
    return _read(Path(path), what)


def _geometry(img: sitk.Image) -> tuple:
    return img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()


def check_geometry(ref: sitk.Image, other: sitk.Image, path: Path, what: str, ref_path: Path) -> None:
    """Raise :class:`DatasetError` unless ``other`` has the size, spacing, origin and direction of ``ref``."""
    (s0, sp0, o0, d0), (s1, sp1, o1, d1) = _geometry(ref), _geometry(other)
    if s0 != s1:
        raise DatasetError(f"{path}: {what} size {s1} (x,y,z) does not match image size {s0} of {ref_path.name}")
    if not np.allclose(sp0, sp1, rtol=SPACING_RTOL, atol=0):
        raise DatasetError(f"{path}: {what} spacing {sp1} does not match image spacing {sp0} of {ref_path.name}")
    if not np.allclose(o0, o1, atol=ORIGIN_ATOL_MM, rtol=0):
        raise DatasetError(f"{path}: {what} origin {o1} does not match image origin {o0} of {ref_path.name}")
    if not np.allclose(d0, d1, atol=DIRECTION_ATOL, rtol=0):
        raise DatasetError(f"{path}: {what} direction {d1} does not match image direction {d0} of {ref_path.name}")
