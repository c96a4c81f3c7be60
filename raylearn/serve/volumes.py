"""Volume I/O for the HTTP API: uploaded NIfTI/MHA bytes -> ``sitk.Image``; label maps -> NIfTI bytes / JSON."""

from __future__ import annotations

import base64
import gzip
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk


class VolumeError(ValueError):
    """An uploaded volume cannot be used. ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _nifti_check(raw: bytes, name: str) -> None:
    """Raise when a NIfTI-1/2 file holds fewer voxel bytes than its header promises (a truncated upload)."""
    for order in ("<", ">"):
        (hdr,) = struct.unpack(order + "i", raw[:4])
        if hdr == 348:  # NIfTI-1: dim int16[8] @40, bitpix int16 @72, vox_offset float32 @108
            dims = struct.unpack(order + "8h", raw[40:56])
            bitpix = struct.unpack(order + "h", raw[72:74])[0]
            offset = int(struct.unpack(order + "f", raw[108:112])[0])
            break
        if hdr == 540:  # NIfTI-2: bitpix int16 @14, dim int64[8] @16, vox_offset int64 @168
            bitpix = struct.unpack(order + "h", raw[14:16])[0]
            dims = struct.unpack(order + "8q", raw[16:80])
            offset = struct.unpack(order + "q", raw[168:176])[0]
            break
    else:
        raise VolumeError(f"{name}: corrupt NIfTI header (sizeof_hdr is neither 348 nor 540)")
    n = int(np.prod([max(int(d), 1) for d in dims[1 : 1 + max(0, min(int(dims[0]), 7))]]))
    need = max(int(offset), 352 if hdr == 348 else 544) + n * max(int(bitpix), 8) // 8
    if len(raw) < need:
        raise VolumeError(f"{name}: corrupt NIfTI file: truncated ({len(raw)} bytes, the header needs {need})")


def _normalise(data: bytes, filename: str | None) -> tuple[bytes, str]:
    """Validated file bytes and the suffix SimpleITK needs, from the magic bytes (gzip is inflated here)."""
    name = filename or "upload"
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as err:
            raise VolumeError(f"{name}: corrupt gzip file (truncated or damaged: {err})") from None
        if not _is_nifti(data):
            raise VolumeError(f"{name}: the gzip file does not hold a NIfTI image")
    if _is_nifti(data):
        _nifti_check(data, name)
        return data, ".nii"
    if data.lstrip()[:10].lower().startswith((b"objecttype", b"ndims")):
        return data, ".mha"
    if data[:4] == b"NRRD":
        return data, ".nrrd"
    raise VolumeError(f"{name}: not a NIfTI (.nii/.nii.gz) or MetaImage (.mha) file")


def _is_nifti(raw: bytes) -> bool:
    return raw[344:348] in (b"n+1\x00", b"ni1\x00") or raw[4:8] == b"n+2\x00"


def read_volume(data: bytes, filename: str | None = None) -> sitk.Image:
    """Decode an uploaded 3D scalar image (NIfTI ``.nii``/``.nii.gz`` or MetaImage ``.mha``).

    Raises:
        VolumeError: empty/corrupt/unsupported file (400) or not a 3D scalar image (422).
    """
    if not data:
        raise VolumeError(f"{filename or 'upload'}: the uploaded file is empty")
    data, suffix = _normalise(data, filename)
    with tempfile.TemporaryDirectory(prefix="raylearn-upload-") as tmp:
        path = Path(tmp) / f"volume{suffix}"
        path.write_bytes(data)
        try:
            img = sitk.ReadImage(str(path))
        except RuntimeError as err:
            first = str(err).strip().splitlines()
            why = next((ln for ln in first if "rror" in ln or "annot" in ln), first[-1] if first else "unreadable")
            raise VolumeError(f"{filename or 'upload'}: corrupt or unreadable {suffix} image ({why.strip()[:200]})") \
                from None
    size = img.GetSize()
    if img.GetDimension() == 4 and size[3] == 1:
        img = img[:, :, :, 0]
        size = img.GetSize()
    if img.GetDimension() != 3:
        raise VolumeError(f"{filename or 'upload'}: expected a 3D image, got a {img.GetDimension()}D image of size "
                          f"{tuple(size)}", status=422)
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeError(f"{filename or 'upload'}: expected a scalar image, got "
                          f"{img.GetNumberOfComponentsPerPixel()} components per voxel", status=422)
    if min(size) < 2:
        raise VolumeError(f"{filename or 'upload'}: expected a 3D volume, got size {tuple(size)} (a single slice)",
                          status=422)
    return img


def label_image(label_map: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """``uint8 [D,H,W]`` label map as a ``sitk.Image`` with the reference's geometry."""
    out = sitk.GetImageFromArray(np.ascontiguousarray(label_map, dtype=np.uint8))
    out.CopyInformation(reference)
    return out


def nifti_bytes(label_map: np.ndarray, reference: sitk.Image) -> bytes:
    """Encode a label map on the reference grid as ``.nii.gz`` bytes."""
    with tempfile.TemporaryDirectory(prefix="raylearn-mask-") as tmp:
        path = Path(tmp) / "mask.nii.gz"
        sitk.WriteImage(label_image(label_map, reference), str(path), useCompression=True)
        return path.read_bytes()


def encode_mask(label_map: np.ndarray) -> str:
    """``uint8 [D,H,W]`` -> base64 of zlib-compressed C-order bytes (see :func:`decode_mask`)."""
    return base64.b64encode(zlib.compress(np.ascontiguousarray(label_map, np.uint8).tobytes(), 6)).decode("ascii")


def decode_mask(data: str, shape: tuple[int, int, int]) -> np.ndarray:
    """Inverse of :func:`encode_mask`: the ``uint8 [D,H,W]`` label map."""
    return np.frombuffer(zlib.decompress(base64.b64decode(data)), dtype=np.uint8).reshape(shape)
