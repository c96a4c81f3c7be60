"""Header-only checks of uploaded volumes (NIfTI-1/2, MetaImage ``.mha``, NRRD) before SimpleITK sees the bytes.

SimpleITK follows a MetaImage ``ElementDataFile`` or an NRRD ``data file`` to any path on the server, and
allocates whatever a header declares. Each parser here reads only the header (at most :data:`MAX_HEADER_BYTES`),
refuses detached data and non-finite or ill-formed fields (naming the field), and returns the declared grid so
that :mod:`raylearn.serve.volumes` can enforce its voxel caps before anything is decompressed or allocated.
Sizes and spacings are in ITK order ``(x, y, z)``.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass

MAX_HEADER_BYTES = 64 << 10  # text headers (MetaImage, NRRD) must end within this many bytes
MAX_NIFTI_EXTENSION_BYTES = 1 << 20  # vox_offset beyond the fixed header (extensions): a gzip bomb otherwise


class VolumeError(ValueError):
    """An uploaded volume cannot be used. ``status`` is the HTTP status to answer with (400, 413 or 422)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Header:
    """What a header declares: voxels per axis and spacing (mm), ITK order; NIfTI: bytes the file must hold."""

    kind: str  # "nifti" | "metaimage" | "nrrd"
    size: tuple[int, ...]
    spacing: tuple[float, ...]
    data_bytes: int | None = None


def _finite(field: str, name: str, values) -> tuple[float, ...]:
    out = tuple(float(v) for v in values)
    if not all(math.isfinite(v) for v in out):
        raise VolumeError(f"{field}: header field {name} is not finite ({', '.join(map(str, out))})")
    return out


def _grid(field: str, name: str, dims: tuple[int, ...]) -> tuple[int, ...]:
    """The 3 spatial sizes; extra axes must have size 1 (a 3D volume stored as 4D), fewer axes are refused."""
    if any(d < 1 for d in dims):
        raise VolumeError(f"{field}: header field {name} has a size below 1 ({tuple(dims)})")
    if len(dims) < 3 or any(d != 1 for d in dims[3:]):
        raise VolumeError(f"{field}: expected a 3D image, got a {len(dims)}D image of size {tuple(dims)} "
                          f"(header field {name})", status=422)
    return tuple(int(d) for d in dims[:3])


# ----------------------------------------------------------------------------------------------------- NIfTI

#: datatype code -> (name, bits) of the real scalar types SimpleITK reads
NIFTI_TYPES = {2: ("uint8", 8), 4: ("int16", 16), 8: ("int32", 32), 16: ("float32", 32), 64: ("float64", 64),
               256: ("int8", 8), 512: ("uint16", 16), 768: ("uint32", 32), 1024: ("int64", 64), 1280: ("uint64", 64)}
NIFTI_REFUSED = {1: "binary", 32: "complex64", 128: "RGB24", 1536: "float128", 1792: "complex128",
                 2048: "complex256", 2304: "RGBA32"}


def is_nifti(raw: bytes) -> bool:
    """NIfTI-1 or -2 magic (single file or a detached ``.hdr``)."""
    return raw[344:348] in (b"n+1\x00", b"ni1\x00") or raw[4:8] in (b"n+2\x00", b"ni2\x00")


def nifti_header(raw: bytes, field: str) -> Header:
    """Parse a NIfTI-1 (348-byte) or NIfTI-2 (540-byte) header, either byte order. ``raw`` may be just the header."""
    for order in "<>":
        sizeof_hdr = struct.unpack_from(order + "i", raw, 0)[0] if len(raw) >= 4 else 0
        if sizeof_hdr in (348, 540):
            break
    else:
        raise VolumeError(f"{field}: corrupt NIfTI header (sizeof_hdr is neither 348 nor 540)")
    if len(raw) < sizeof_hdr:
        raise VolumeError(f"{field}: corrupt NIfTI file: truncated header ({len(raw)} of {sizeof_hdr} bytes)")
    if sizeof_hdr == 348:
        magic, first = raw[344:348], 352
        dims = struct.unpack_from(order + "8h", raw, 40)
        datatype, bitpix = struct.unpack_from(order + "2h", raw, 70)
        pixdim = struct.unpack_from(order + "8f", raw, 76)
        vox_offset = struct.unpack_from(order + "f", raw, 108)[0]
        qform_code, sform_code = struct.unpack_from(order + "2h", raw, 252)
        quatern = struct.unpack_from(order + "6f", raw, 256)
        srow = struct.unpack_from(order + "12f", raw, 280)
    else:
        magic, first = raw[4:8], 544
        datatype, bitpix = struct.unpack_from(order + "2h", raw, 12)
        dims = struct.unpack_from(order + "8q", raw, 16)
        pixdim = struct.unpack_from(order + "8d", raw, 104)
        vox_offset = struct.unpack_from(order + "q", raw, 168)[0]
        qform_code, sform_code = struct.unpack_from(order + "2i", raw, 344)
        quatern = struct.unpack_from(order + "6d", raw, 352)
        srow = struct.unpack_from(order + "12d", raw, 400)
    if magic in (b"ni1\x00", b"ni2\x00"):
        raise VolumeError(f"{field}: header field magic: a detached NIfTI header (.hdr/.img pair) is refused; "
                          "upload one .nii or .nii.gz file", status=422)
    if magic not in (b"n+1\x00", b"n+2\x00"):
        raise VolumeError(f"{field}: corrupt NIfTI header (header field magic)")
    ndim = int(dims[0])
    if not 1 <= ndim <= 7:
        raise VolumeError(f"{field}: header field dim[0] is {ndim}, not a number of dimensions in 1..7")
    size = _grid(field, "dim", tuple(int(d) for d in dims[1 : 1 + ndim]))
    if datatype in NIFTI_REFUSED:
        raise VolumeError(f"{field}: header field datatype: {NIFTI_REFUSED[datatype]} voxels are not supported "
                          "(real scalar images only)", status=422)
    if datatype not in NIFTI_TYPES:
        raise VolumeError(f"{field}: header field datatype: unknown NIfTI datatype code {datatype}")
    name, bits = NIFTI_TYPES[datatype]
    if bitpix != bits:
        raise VolumeError(f"{field}: header field bitpix is {bitpix}, but datatype {name} has {bits} bits")
    spacing = _finite(field, "pixdim", pixdim[1:4])
    if not math.isfinite(vox_offset):
        raise VolumeError(f"{field}: header field vox_offset is not finite ({vox_offset})")
    if not 0 <= vox_offset <= first + MAX_NIFTI_EXTENSION_BYTES:
        raise VolumeError(f"{field}: header field vox_offset ({vox_offset:.0f}) lies outside 0..{first} + "
                          f"{MAX_NIFTI_EXTENSION_BYTES} bytes of extensions")
    if qform_code > 0:
        _finite(field, "quatern_b/c/d, qoffset_x/y/z", quatern)
    if sform_code > 0:
        _finite(field, "srow_x/y/z", srow)
    data_bytes = max(int(vox_offset), first) + math.prod(size) * bits // 8
    # nifti1_io reads a zero pixdim as 1 mm and uses the magnitude
    return Header("nifti", size, tuple(abs(s) or 1.0 for s in spacing), data_bytes)


# ----------------------------------------------------------------------------------------- text-header helpers


def _header_lines(data: bytes, field: str, kind: str, stop) -> tuple[list[tuple[int, str]], int]:
    """Lines ``(number, text)`` of a text header until ``stop(line)`` is true; returns them and the data offset.

    Only ``\\n`` (optionally ``\\r\\n``) ends a line; a bare ``\\r`` is refused so that this parser and the ITK
    readers cannot disagree on where the header ends.
    """
    head = data[:MAX_HEADER_BYTES]
    lines, pos, number = [], 0, 0
    while True:
        nl = head.find(b"\n", pos)
        if nl < 0:
            raise VolumeError(f"{field}: {kind} header does not end within {MAX_HEADER_BYTES // 1024} KiB")
        raw = head[pos:nl].removesuffix(b"\r")
        pos, number = nl + 1, number + 1
        if b"\r" in raw or b"\x00" in raw:
            raise VolumeError(f"{field}: {kind} header line {number} holds a bare carriage return or NUL byte")
        line = raw.decode("latin-1")
        lines.append((number, line))
        if stop(line):
            return lines, pos


def _numbers(field: str, name: str, text: str, count: int | None = None, kind=float) -> tuple:
    try:
        values = tuple(kind(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise VolumeError(f"{field}: header field {name} is not a list of numbers") from None
    if count is not None and len(values) != count:
        raise VolumeError(f"{field}: header field {name} has {len(values)} values, expected {count}")
    if kind is float:
        _finite(field, name, values)
    return values


# ------------------------------------------------------------------------------------------------- MetaImage

MET_TYPES = {"MET_CHAR", "MET_UCHAR", "MET_SHORT", "MET_USHORT", "MET_INT", "MET_UINT", "MET_LONG", "MET_ULONG",
             "MET_LONG_LONG", "MET_ULONG_LONG", "MET_FLOAT", "MET_DOUBLE"}


def is_metaimage(raw: bytes) -> bool:
    return raw.lstrip()[:10].lower().startswith((b"objecttype", b"ndims"))


def metaimage_header(data: bytes, field: str) -> Header:
    """Parse a MetaImage header; the data must be inline (``ElementDataFile = LOCAL``)."""
    # MetaIO ends the header at the key ElementDataFile; a differently spelt variant could be skipped by MetaIO
    # and let a later line name a file, so any spelling of it ends the header here and must be exact.
    lines, _ = _header_lines(data, field, "MetaImage",
                             lambda ln: ln.partition("=")[0].strip().lower() == "elementdatafile")
    fields: dict[str, str] = {}
    for number, line in lines:
        key, sep, value = line.partition("=")
        if not sep:
            raise VolumeError(f"{field}: MetaImage header line {number} is not 'Key = Value'")
        fields[key.strip()] = value.strip()
    if "ElementDataFile" not in fields:
        raise VolumeError(f"{field}: MetaImage header: the key ElementDataFile must be spelt exactly so")
    if fields["ElementDataFile"].lower() != "local":
        raise VolumeError(f"{field}: header field ElementDataFile names a separate data file; only inline data "
                          "is accepted (one .mha file with ElementDataFile = LOCAL)", status=422)
    if "NDims" not in fields or "DimSize" not in fields:
        raise VolumeError(f"{field}: MetaImage header lacks NDims or DimSize")
    (ndims,) = _numbers(field, "NDims", fields["NDims"], 1, int)
    if not 1 <= ndims <= 8:
        raise VolumeError(f"{field}: header field NDims is {ndims}, not a number of dimensions in 1..8")
    dims = _numbers(field, "DimSize", fields["DimSize"], ndims, int)
    size = _grid(field, "DimSize", dims)
    etype = fields.get("ElementType", "")
    if etype not in MET_TYPES:
        status = 422 if etype.startswith("MET_") else 400
        raise VolumeError(f"{field}: header field ElementType {etype[:32]!r} is not a real scalar type "
                          f"({', '.join(sorted(MET_TYPES))})", status=status)
    channels = _numbers(field, "ElementNumberOfChannels", fields.get("ElementNumberOfChannels", "1"), 1, int)[0]
    if channels != 1:
        raise VolumeError(f"{field}: expected a scalar image, got {channels} components per voxel "
                          "(header field ElementNumberOfChannels)", status=422)
    for name in ("Offset", "Origin", "Position", "CenterOfRotation"):
        if name in fields:
            _numbers(field, name, fields[name], ndims)
    for name in ("TransformMatrix", "Rotation", "Orientation"):
        if name in fields:
            _numbers(field, name, fields[name], ndims * ndims)
    if "HeaderSize" in fields and _numbers(field, "HeaderSize", fields["HeaderSize"], 1, int)[0] < -1:
        raise VolumeError(f"{field}: header field HeaderSize is below -1")
    name = "ElementSpacing" if "ElementSpacing" in fields else "ElementSize" if "ElementSize" in fields else None
    spacing = _numbers(field, name, fields[name], ndims)[:3] if name else (1.0, 1.0, 1.0)
    return Header("metaimage", size, tuple(abs(s) for s in spacing))


# ------------------------------------------------------------------------------------------------------ NRRD

NRRD_TYPES = {"signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t", "short", "short int",
              "signed short", "signed short int", "int16", "int16_t", "ushort", "unsigned short",
              "unsigned short int", "uint16", "uint16_t", "int", "signed int", "int32", "int32_t", "uint",
              "unsigned int", "uint32", "uint32_t", "longlong", "long long", "long long int", "signed long long",
              "signed long long int", "int64", "int64_t", "ulonglong", "unsigned long long",
              "unsigned long long int", "uint64", "uint64_t", "float", "double"}
NRRD_ENCODINGS = {"raw", "txt", "text", "ascii", "hex", "gz", "gzip", "bz2", "bzip2"}
_VECTOR = re.compile(r"\(([^)]*)\)|none")


def is_nrrd(raw: bytes) -> bool:
    return raw[:7] == b"NRRD000"


def nrrd_header(data: bytes, field: str) -> Header:
    """Parse an NRRD header (up to the first empty line); the data must follow it (no ``data file``)."""
    lines, _ = _header_lines(data, field, "NRRD", lambda ln: ln.strip() == "")
    fields: dict[str, str] = {}
    for number, line in lines[1:-1]:
        if line.startswith("#"):
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise VolumeError(f"{field}: NRRD header line {number} is not 'field: value'")
        norm = re.sub(r"\s+", "", key).lower()
        if norm == "datafile":
            raise VolumeError(f"{field}: header field 'data file' names a separate data file; only inline data "
                              "is accepted (one .nrrd file, data after the header)", status=422)
        if not value.startswith("="):  # "key:=value" pairs are free text
            fields[re.sub(r"\s+", " ", key.strip()).lower()] = value.strip()
    if "dimension" not in fields or "sizes" not in fields:
        raise VolumeError(f"{field}: NRRD header lacks dimension or sizes")
    (ndim,) = _numbers(field, "dimension", fields["dimension"], 1, int)
    if ndim != 3:
        raise VolumeError(f"{field}: expected a 3D scalar image, got an NRRD of dimension {ndim} "
                          "(header field dimension)", status=422)
    size = _grid(field, "sizes", _numbers(field, "sizes", fields["sizes"], ndim, int))
    ntype = fields.get("type", "").lower()
    if ntype not in NRRD_TYPES:
        raise VolumeError(f"{field}: header field type {ntype[:32]!r} is not a real scalar type",
                          status=422 if ntype == "block" else 400)
    if fields.get("encoding", "").lower() not in NRRD_ENCODINGS:
        raise VolumeError(f"{field}: header field encoding {fields.get('encoding', '')[:32]!r} is not one of "
                          f"{', '.join(sorted(NRRD_ENCODINGS))}")
    spacing = (1.0, 1.0, 1.0)
    if "space origin" in fields:
        vecs = re.findall(r"\(([^)]*)\)", fields["space origin"])
        if len(vecs) != 1:
            raise VolumeError(f"{field}: header field space origin must be one vector (x,y,z)")
        _numbers(field, "space origin", vecs[0], ndim)
    if "space directions" in fields:
        vecs = [m.group(1) for m in _VECTOR.finditer(fields["space directions"])]
        if len(vecs) != ndim or any(v is None for v in vecs):
            raise VolumeError(f"{field}: header field space directions must hold {ndim} vectors")
        spacing = tuple(math.hypot(*_numbers(field, "space directions", v)) for v in vecs)
    elif "spacings" in fields:
        spacing = tuple(abs(s) for s in _numbers(field, "spacings", fields["spacings"], ndim))
    return Header("nrrd", size, spacing)
