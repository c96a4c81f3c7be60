"""The safe volume reader, header parsers and request guard without a server (milliseconds each)."""

import gzip
import struct

import numpy as np
import pytest
import SimpleITK as sitk

from raylearn.serve.guard import Guard
from raylearn.serve.headers import VolumeError, metaimage_header, nifti_header, nrrd_header
from raylearn.serve.volumes import VolumeLimits, read_volume


def _refused(data: bytes, status: int, match: str, **kw) -> None:
    with pytest.raises(VolumeError, match=match) as err:
        read_volume(data, "file", **kw)
    assert err.value.status == status


def test_nifti_variants_read(craft, tmp_path):
    arr = np.arange(4 * 5 * 6, dtype="<f4").reshape(4, 5, 6)
    plain = craft.nifti1((6, 5, 4), data=arr.tobytes())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_volume(plain)), arr)
    members = gzip.compress(plain[:1000]) + gzip.compress(plain[1000:])  # multi-member gzip (pigz, cat)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_volume(members)), arr)
    img = sitk.GetImageFromArray(arr.astype(np.int16))
    sitk.WriteImage(img, str(tmp_path / "a.nii"))
    raw = bytearray((tmp_path / "a.nii").read_bytes())
    assert nifti_header(bytes(raw), "file").size == (6, 5, 4)
    be = bytearray(raw[:352])  # the same header big-endian
    for off, fmt in ((0, "i"), (40, "8h"), (70, "2h"), (76, "8f"), (108, "f"), (252, "2h"), (256, "6f"),
                     (280, "12f")):
        struct.pack_into(">" + fmt, be, off, *struct.unpack_from("<" + fmt, raw, off))
    assert nifti_header(bytes(be), "file").size == (6, 5, 4)


def test_nifti_header_refusals(craft):
    _refused(craft.nifti1(vox_offset=1e9), 400, "vox_offset")  # 1 GB of 'extensions' would be a gzip bomb
    _refused(craft.nifti1(datatype=16, bitpix=8), 400, "bitpix")
    _refused(craft.nifti1(datatype=2304, bitpix=32), 422, "RGBA32")
    _refused(craft.nifti1(datatype=77, bitpix=8), 400, "datatype")
    _refused(craft.nifti1((8, 8, 0)), 400, "dim")
    _refused(craft.nifti1((8, 8, 8, 2)), 422, "expected a 3D image")
    _refused(craft.nifti1(pixdim=(1.0, float("nan"), 1.0)), 400, "pixdim")
    _refused(craft.nifti1()[:360], 400, "truncated")
    _refused(gzip.compress(craft.nifti1())[:60], 400, "truncated|corrupt")
    _refused(gzip.compress(b"hello" * 100), 400, "does not hold a NIfTI")


def test_non_finite_voxel_values_are_refused(tmp_path):
    arr = np.ones((4, 4, 4), np.float32)
    arr[1, 2, 3] = np.inf
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / "inf.mha"))
    _refused((tmp_path / "inf.mha").read_bytes(), 422, "1 voxel values are NaN or infinite")


def test_caps_are_configurable(craft):
    data = craft.nifti1((16, 16, 16))
    assert read_volume(data).GetSize() == (16, 16, 16)
    _refused(data, 413, "max_voxels = 4,000", limits=VolumeLimits(max_voxels=4000))
    _refused(data, 413, "max_resampled_voxels", limits=VolumeLimits(max_resampled_voxels=100))
    fine = craft.nifti1((16, 16, 16), pixdim=(3.0, 3.0, 3.0))  # 32^3 voxels at 1.5 mm
    _refused(fine, 413, "32,768 voxels", limits=VolumeLimits(max_resampled_voxels=30000))


def test_metaimage_header_rules(craft):
    head = metaimage_header(craft.metaimage(extra="ElementSpacing = 0.5 1 2\n"), "file")
    assert head.size == (8, 8, 8) and head.spacing == (0.5, 1.0, 2.0)
    for data, status, match in [
        (craft.metaimage("../../etc/passwd"), 422, "ElementDataFile"),
        (craft.metaimage("img_%03d.raw 1 8 1"), 422, "ElementDataFile"),
        (craft.metaimage("/etc/passwd", extra="ElementDataFile  = LOCAL\r\n"), 200, ""),  # spaces, CRLF: still exact
        (craft.metaimage(extra="Comment\n"), 400, "not 'Key = Value'"),
        (craft.metaimage(extra="Comment = a\rElementDataFile = /etc/passwd\n"), 400, "carriage"),
        (craft.metaimage(extra="ElementNumberOfChannels = 3\n"), 422, "components"),
        (craft.metaimage(extra="TransformMatrix = 1 0 0 0 1 0 0 0 inf\n"), 400, "TransformMatrix"),
        (b"ObjectType = Image\nNDims = 3\n" + b"X = y\n" * 20000, 400, "does not end within"),
    ]:
        if status == 200:
            metaimage_header(data, "file")
            continue
        with pytest.raises(VolumeError, match=match) as err:
            metaimage_header(data, "file")
        assert err.value.status == status


def test_nrrd_header_rules(craft):
    head = nrrd_header(craft.nrrd("space dimension: 3\nspace directions: (0.5,0,0) (0,2,0) (0,0,3)\n"), "file")
    assert head.spacing == (0.5, 2.0, 3.0)
    for extra, status, match in [("DataFile: /etc/passwd\n", 422, "data file"),
                                 ("data  file:=/etc/passwd\n", 422, "data file"),
                                 ("spacings: 1 -inf 1\n", 400, "spacings"),
                                 ("space directions: (1,0,0) (0,1,0)\n", 400, "space directions")]:
        with pytest.raises(VolumeError, match=match) as err:
            nrrd_header(craft.nrrd(extra), "file")
        assert err.value.status == status
    assert read_volume(craft.nrrd("# a comment\nkey:=value\n")).GetSize() == (8, 8, 8)
    _refused(b"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 8 8 8\nencoding: zip\n\n", 400, "encoding")


def test_guard_token_sources_and_require_auth(monkeypatch):
    g = Guard()
    monkeypatch.setenv("RL_TEST_TOKEN", "from-env-1")
    g.configure(None, None, "RL_TEST_TOKEN", False, 1.0)
    assert (g.token, g.source, g.warnings) == ("from-env-1", "env RL_TEST_TOKEN of the replica", [])
    g.configure(None, "from-build", "RL_TEST_TOKEN", False, 1.0)
    assert g.source == "build_app token"
    g.configure("from-config", "from-build", "RL_TEST_TOKEN", True, 1.0)
    assert g.token == "from-config" and g.authorised("Bearer from-config") and g.authorised("bearer  from-config")
    assert not g.authorised(None) and not g.authorised("Bearer from-build") and not g.authorised("from-config")
    monkeypatch.delenv("RL_TEST_TOKEN")
    g.configure(None, None, "RL_TEST_TOKEN", False, 2.0)
    assert g.token is None and g.authorised(None) and "auth is OFF" in g.warnings[0] and g.max_upload_bytes == 2 << 20
    with pytest.raises(ValueError, match="require_auth is true but no token reached the replica.*runtime_env"):
        g.configure(None, None, "RL_TEST_TOKEN", True, 1.0)


@pytest.mark.filterwarnings("ignore:coroutine .*__del__.* was never awaited:RuntimeWarning")  # Serve's async __del__
def test_ingress_refuses_to_start_without_a_token_when_required(monkeypatch):
    """The explicit error of ``require_auth`` (a failing reconfigure fails the replica), without Ray."""
    import asyncio

    from raylearn.config import ConfigError
    from raylearn.serve.ingress import SamMed3DIngress

    monkeypatch.delenv("RAYLEARN_SERVE_TOKEN", raising=False)
    cls = SamMed3DIngress.func_or_class
    ingress = cls.__new__(cls)
    asyncio.run(ingress.__init__(None))  # Serve's ingress wrapper has an async constructor
    with pytest.raises(ConfigError, match="require_auth is true but no token reached the replica"):
        ingress.reconfigure({"require_auth": True})
    ingress.reconfigure({"require_auth": True, "auth_token": "config-token"})
    assert ingress.guard.token == "config-token" and ingress.guard.source == "user_config auth_token"
    ingress._readers.shutdown()
