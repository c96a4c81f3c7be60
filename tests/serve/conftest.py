"""Fixtures of the serve tests: crafted (hostile) volume files written byte by byte (``craft``), and a SAM-Med3D
Serve app over real HTTP on 127.0.0.1 (``serve_app``)."""

from __future__ import annotations

import math
import struct
import zlib
from types import SimpleNamespace

import numpy as np
import pytest


def nifti1(dims=(8, 8, 8), datatype=16, bitpix=32, pixdim=(1.0, 1.0, 1.0), vox_offset=352.0,
           qoffset=(0.0, 0.0, 0.0), magic=b"n+1\x00", data: bytes | None = None) -> bytes:
    """A little-endian single-file NIfTI-1 (qform = identity at ``qoffset``); zero voxels unless ``data``."""
    h = bytearray(348)
    struct.pack_into("<i", h, 0, 348)
    struct.pack_into("<8h", h, 40, len(dims), *dims, *([1] * (7 - len(dims))))
    struct.pack_into("<2h", h, 70, datatype, bitpix)
    struct.pack_into("<8f", h, 76, 1.0, *pixdim, 0.0, 0.0, 0.0, 0.0)
    struct.pack_into("<f", h, 108, vox_offset)
    struct.pack_into("<f", h, 112, 1.0)  # scl_slope
    struct.pack_into("<2h", h, 252, 1, 0)  # qform_code scanner, no sform
    struct.pack_into("<6f", h, 256, 0.0, 0.0, 0.0, *qoffset)
    h[344:348] = magic
    n = math.prod(dims) * bitpix // 8
    return bytes(h) + bytes(4) + (data if data is not None else bytes(n))


def gzip_bomb(side: int = 640) -> bytes:
    """A ``.nii.gz`` of ``side^3`` uint8 zeros (about 255 KB for 640^3), compressed in 16 MB pieces."""
    co = zlib.compressobj(9, zlib.DEFLATED, 31, 9, zlib.Z_RLE)
    out = [co.compress(nifti1((side, side, side), 2, 8, data=b""))]
    left, zeros = side**3, bytes(16 << 20)
    while left > 0:
        out.append(co.compress(zeros[: min(left, len(zeros))]))
        left -= len(zeros)
    out.append(co.flush())
    return b"".join(out)


def metaimage(data_file: str = "LOCAL", extra: str = "", dims=(8, 8, 8), body: bytes | None = None) -> bytes:
    """A MetaImage header (uint8) naming ``data_file``; inline zero voxels when it is LOCAL."""
    head = (f"ObjectType = Image\nNDims = 3\nDimSize = {' '.join(map(str, dims))}\nElementType = MET_UCHAR\n"
            f"{extra}ElementDataFile = {data_file}\n").encode()
    if body is None:
        body = bytes(math.prod(dims)) if data_file == "LOCAL" else b""
    return head + body


def nrrd(extra: str = "", body: bytes | None = None, dims=(8, 8, 8)) -> bytes:
    """An NRRD header (uint8, raw) with ``extra`` fields; inline zero voxels by default."""
    head = (f"NRRD0004\ntype: uchar\ndimension: 3\nsizes: {' '.join(map(str, dims))}\nencoding: raw\n{extra}\n")
    return head.encode() + (bytes(math.prod(dims)) if body is None else body)


def phantom_nifti(shape=(20, 28, 24)) -> bytes:
    """A small float32 volume with a bright blob (array order [D,H,W]), as .nii bytes."""
    z, y, x = np.indices(shape)
    arr = (20 + 80 * (((z - 10) ** 2 + (y - 12) ** 2 + (x - 12) ** 2) < 25)).astype("<f4")
    return nifti1(shape[::-1], 16, 32, data=arr.tobytes())


@pytest.fixture(scope="session")
def craft():
    """The file makers of this module: ``craft.nifti1(...)``, ``craft.gzip_bomb()``, ``craft.metaimage(...)``..."""
    return SimpleNamespace(nifti1=nifti1, gzip_bomb=gzip_bomb, metaimage=metaimage, nrrd=nrrd,
                           phantom_nifti=phantom_nifti)


@pytest.fixture(scope="module")
def serve_app(ray_session):
    """Start this test module's Serve app: ``serve_app(name, ingress, sam)`` runs the app of ``IngressConfig``
    ``ingress`` and ``SamMed3DConfig`` ``sam`` (both deployments on 0 CPUs) on a free 127.0.0.1 port and returns
    ``SimpleNamespace(cfg, base, client)`` (an ``httpx.Client`` on ``base``). Torn down after the module."""
    import httpx
    from ray import serve

    from raylearn.serve.app import build_app
    from raylearn.serve.config import DeploymentOptions, ModelDeploymentConfig, ServeConfig
    from tests.conftest import pick_free_ports

    started = []

    def start(name: str, ingress, sam) -> SimpleNamespace:
        cfg = ServeConfig(name=name, ingress=ingress, model=ModelDeploymentConfig(model=sam),
                          ingress_options=DeploymentOptions(ray_actor_options={"num_cpus": 0}),
                          model_options=DeploymentOptions(ray_actor_options={"num_cpus": 0}))
        port = pick_free_ports(1)[0]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(cfg), name=cfg.name, route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        app = SimpleNamespace(cfg=cfg, base=base, client=httpx.Client(base_url=base, timeout=60))
        started.append(app)
        return app

    yield start
    for app in started:
        app.client.close()
        serve.delete(app.cfg.name)
    if started:
        serve.shutdown()
