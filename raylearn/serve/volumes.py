"""The one safe volume reader of the HTTP API, and label-map encodings (NIfTI bytes, compressed JSON).

:func:`read_volume` is the only path from uploaded bytes to a ``sitk.Image``. In order:

1. sniff the format from the magic bytes (NIfTI ``.nii``/``.nii.gz``, MetaImage ``.mha``, NRRD);
2. parse the header ourselves (:mod:`raylearn.serve.headers`): detached data refused, fields finite;
3. check the caps from the header (voxels, and voxels after resampling to the model's spacing) before
   anything is decompressed: a ``.nii.gz`` is inflated only up to the size its header declares;
4. SimpleITK with the format's ImageIO pinned: ``ReadImageInformation`` (header only), the same checks on ITK's
   own reading of the geometry and pixel type, then the pixels; non-finite voxel values are refused.

Messages name the form field and the header field, never a server path. The timeout is the caller's
(:class:`raylearn.serve.ingress.SamMed3DIngress` runs reads in a bounded thread pool under ``read_timeout_s``).
"""

from __future__ import annotations

import base64
import math
import re
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from raylearn.serve.headers import (
    VolumeError,
    is_metaimage,
    is_nifti,
    is_nrrd,
    metaimage_header,
    nifti_header,
    nrrd_header,
)

__all__ = ["VolumeError", "VolumeLimits", "read_volume", "label_image", "nifti_bytes", "encode_mask", "decode_mask"]

_IO = {"nifti": ("NiftiImageIO", ".nii", "NIfTI"), "metaimage": ("MetaImageIO", ".mha", "MetaImage"),
       "nrrd": ("NrrdImageIO", ".nrrd", "NRRD")}


@dataclass(frozen=True)
class VolumeLimits:
    """Caps on an uploaded volume, checked from its header before decompression or allocation.

    Attributes:
        max_voxels: voxels of the image as stored (512^3 by default).
        max_resampled_voxels: voxels after resampling to ``target_spacing_mm`` (322^3 by default).
        target_spacing_mm: the isotropic spacing the model resamples to (mm).
    """

    max_voxels: int = 1 << 27
    max_resampled_voxels: int = 1 << 25
    target_spacing_mm: float = 1.5


def check_grid(field: str, size, spacing, limits: VolumeLimits, source: str = "header") -> None:
    """Raise 413 when ``size`` (ITK order) or its resampled size exceeds ``limits``."""
    n = math.prod(int(s) for s in size)
    shape = "x".join(str(int(s)) for s in size)
    if n > limits.max_voxels:
        raise VolumeError(f"{field}: the {source} declares {shape} = {n:,} voxels, above max_voxels = "
                          f"{limits.max_voxels:,}", status=413)
    m = math.prod(max(1, round(int(s) * float(sp) / limits.target_spacing_mm)) for s, sp in zip(size, spacing,
                                                                                                  strict=True))
    if m > limits.max_resampled_voxels:
        mm = ", ".join(f"{float(sp):g}" for sp in spacing)
        raise VolumeError(f"{field}: resampled to {limits.target_spacing_mm:g} mm, the volume of {shape} voxels "
                          f"at ({mm}) mm spacing would have {m:,} voxels, above max_resampled_voxels = "
                          f"{limits.max_resampled_voxels:,}", status=413)


def _gunzip_prefix(data: bytes, n: int) -> bytes:
    """The first ``n`` bytes of the inflated gzip stream (every member), fewer when the stream is shorter."""
    out = bytearray()
    while data[:2] == b"\x1f\x8b" and len(out) < n:
        d = zlib.decompressobj(wbits=31)
        out += d.decompress(data, n - len(out))
        while len(out) < n and d.unconsumed_tail:
            out += d.decompress(d.unconsumed_tail, n - len(out))
        if not d.eof:
            break
        data = d.unused_data
    return bytes(out)


def _sniff(data: bytes, field: str, limits: VolumeLimits) -> tuple[bytes, str]:
    """The bytes SimpleITK will read (``.nii.gz`` inflated) and the format; header checked, caps enforced.

    A ``.nii.gz`` is inflated twice: its first 544 bytes (the header, checked), then only the bytes that header
    declares, so a decompression bomb costs at most the caps.
    """
    raw_gz, gz = data, data[:2] == b"\x1f\x8b"
    if gz:
        try:
            data = _gunzip_prefix(data, 544)
        except zlib.error:
            raise VolumeError(f"{field}: corrupt gzip file (damaged or not gzip)") from None
        if not is_nifti(data.ljust(348, b"\x00")):
            raise VolumeError(f"{field}: the gzip file does not hold a NIfTI image (only NIfTI may be gzipped)")
    if is_nifti(data):
        header = nifti_header(data, field)
        check_grid(field, header.size, header.spacing, limits)
        if gz:
            try:
                data = _gunzip_prefix(raw_gz, header.data_bytes)
            except zlib.error:
                raise VolumeError(f"{field}: corrupt gzip file (damaged)") from None
        if len(data) < header.data_bytes:
            raise VolumeError(f"{field}: corrupt NIfTI file: truncated ({len(data)} bytes, the header needs "
                              f"{header.data_bytes})")
        return data[: header.data_bytes], "nifti"
    for kind, test, parse in (("metaimage", is_metaimage, metaimage_header), ("nrrd", is_nrrd, nrrd_header)):
        if test(data):
            header = parse(data, field)
            check_grid(field, header.size, header.spacing, limits)
            return data, kind
    raise VolumeError(f"{field}: not a NIfTI (.nii/.nii.gz), MetaImage (.mha) or NRRD (.nrrd) file")


def _itk_reason(err: RuntimeError) -> str:
    """A short reason from an ITK exception, with every path (temporary files, ITK sources) removed."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    why = next((ln for ln in reversed(lines) if "rror" in ln or "annot" in ln or "ail" in ln), "unreadable")
    why = re.sub(r"(?:[A-Za-z]:)?[\\/]?(?:[\w.+~-]+[\\/])+[\w.+~-]*(?::\d+)?:?", "", why)
    why = re.sub(r"ITK ERROR:|\b\w+\(0x[0-9a-fA-F]+\):?|^(?:itk::)?(?:ERROR|Description)\W*", "", why)
    why = re.sub(r"\s+", " ", why).strip(" :")
    return why[:160] or "unreadable"


def _check_image_info(field: str, reader: sitk.ImageFileReader, limits: VolumeLimits) -> None:
    """ITK's own view of the header: pixel type, dimension, geometry (finite, invertible) and the caps."""
    pixel = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    if "complex" in pixel.lower():
        raise VolumeError(f"{field}: {pixel} voxels are not supported (real scalar images only)", status=422)
    if reader.GetNumberOfComponents() != 1:
        raise VolumeError(f"{field}: expected a scalar image, got {reader.GetNumberOfComponents()} components "
                          "per voxel", status=422)
    size = tuple(reader.GetSize())
    if len(size) < 3 or any(s != 1 for s in size[3:]):
        raise VolumeError(f"{field}: expected a 3D image, got a {len(size)}D image of size {size}", status=422)
    dim = len(size)
    spacing, origin, direction = reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection()
    for name, values in (("spacing", spacing), ("origin", origin), ("direction", direction)):
        if not all(math.isfinite(v) for v in values):
            raise VolumeError(f"{field}: the image {name} is not finite ({', '.join(f'{v:g}' for v in values)})")
    if any(s <= 0 for s in spacing):
        raise VolumeError(f"{field}: the image spacing must be positive ({', '.join(f'{v:g}' for v in spacing)})")
    if abs(np.linalg.det(np.asarray(direction, float).reshape(dim, dim))) < 1e-6:
        raise VolumeError(f"{field}: the image direction matrix is singular")
    check_grid(field, size[:3], spacing[:3], limits, source="image")


def read_volume(data: bytes, field: str = "file", limits: VolumeLimits | None = None) -> sitk.Image:
    """Decode one uploaded 3D scalar image safely (see the module docstring for the order of checks).

    Args:
        data: the uploaded bytes (NIfTI ``.nii``/``.nii.gz``, MetaImage ``.mha`` with inline data, NRRD).
        field: the form field, for messages.
        limits: voxel caps (defaults: :class:`VolumeLimits`).

    Returns:
        A 3D ``sitk.Image`` with finite geometry and finite voxel values.

    Raises:
        VolumeError: 400 empty/corrupt/ill-formed, 413 over a voxel cap, 422 valid but unsupported
            (detached data, complex or vector voxels, not 3D, a single slice, non-finite voxel values).
    """
    limits = limits or VolumeLimits()
    if not data:
        raise VolumeError(f"{field}: the uploaded file is empty")
    raw, kind = _sniff(data, field, limits)
    io, suffix, name = _IO[kind]
    with tempfile.TemporaryDirectory(prefix="raylearn-upload-") as tmp:
        path = Path(tmp) / f"volume{suffix}"
        path.write_bytes(raw)
        del raw
        reader = sitk.ImageFileReader()
        reader.SetImageIO(io)
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
            _check_image_info(field, reader, limits)
            img = reader.Execute()
        except RuntimeError as err:
            raise VolumeError(f"{field}: corrupt or unreadable {name} image ({_itk_reason(err)})") from None
    if img.GetDimension() > 3:
        img = sitk.Extract(img, [*img.GetSize()[:3], *([0] * (img.GetDimension() - 3))], [0] * img.GetDimension())
    if min(img.GetSize()) < 2:
        raise VolumeError(f"{field}: expected a 3D volume, got size {tuple(img.GetSize())} (a single slice)",
                          status=422)
    arr = sitk.GetArrayViewFromImage(img)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise VolumeError(f"{field}: {int((~np.isfinite(arr)).sum()):,} voxel values are NaN or infinite",
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
