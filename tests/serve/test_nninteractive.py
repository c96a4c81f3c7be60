"""nnInteractive's protocols on the Serve app, over real HTTP (Ray Serve on 127.0.0.1, small SAM-Med3D).

``/nninteractive`` is driven by the real client, ``nninteractive-client``'s ``nnInteractiveRemoteInferenceSession``
(what the current nnInteractive 3D Slicer extension uses). ``/nninteractive-slicer`` (``nninteractive-slicer-server``'s
protocol) is driven by replaying the requests the extension made before it switched to the remote client (its
``upload_image``, ``upload_segment``, ``point_prompt``, ``bbox_prompt``, ``lasso_or_scribble_prompt``). Each result is
checked against ``/v1/segment`` with the same click on the same volume: the same SAM-Med3D call must give the same mask.
"""

import gzip
import io
import json
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import SimpleITK as sitk

from raylearn.models import sam_med3d as sm
from raylearn.serve.config import IngressConfig
from raylearn.serve.volumes import decode_mask

remote = pytest.importorskip("nnInteractive.inference.remote", reason="nninteractive-client (dev extra) not installed")

SPACING = (1.0, 1.5, 0.75)  # per array axis [x, y, z] as nnInteractive sends it (float32-exact, as NIfTI keeps it)


def _array(shape=(24, 30, 28)):
    i, j, k = np.indices(shape)
    rng = np.random.default_rng(0)
    return (rng.normal(20, 3, shape) + 80 * (((i - 12) ** 2 + (j - 14) ** 2 + (k - 13) ** 2) < 30)).astype(np.float32)


def _nifti(arr, spacing, path) -> bytes:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    sitk.WriteImage(img, str(path))
    return path.read_bytes()


@pytest.fixture(scope="module")
def server(serve_app, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nninteractive")
    app = serve_app("raylearn-nninteractive-test",
                    IngressConfig(auth_token_env="RAYLEARN_TEST_UNSET_TOKEN", max_sessions=3),
                    sm.SamMed3DConfig(preset="small", device="cpu", init_seed=5))
    arr = _array()
    return SimpleNamespace(base=app.base, client=app.client, arr=arr, tmp=tmp,
                           nii=_nifti(arr, SPACING, tmp / "img.nii"),
                           nii_1mm=_nifti(arr, (1.0, 1.0, 1.0), tmp / "i1.nii"))


def _v1(server, clicks, nii=None) -> np.ndarray:
    """The mask ``/v1/segment`` gives for ``clicks`` [(voxel, positive), ...] on the test volume."""
    body = [{"label": 1, "voxel": list(map(float, v)), "positive": p} for v, p in clicks]
    r = server.client.post("/v1/segment", files={"file": ("img.nii", nii or server.nii)},
                           data={"clicks": json.dumps(body)})
    assert r.status_code == 200, r.text
    return decode_mask(r.json()["data"], tuple(r.json()["shape"]))


def _session(server):
    s = remote.nnInteractiveRemoteInferenceSession(server.base + "/nninteractive")
    s.set_image(server.arr[None], {"spacing": list(SPACING)})
    s.set_target_buffer(np.zeros(server.arr.shape, np.uint8))
    return s


def test_remote_client_points_undo_reset_match_v1(server):
    with _session(server) as s:
        assert s.supports_undo and s.supported_interactions["points"] and s.supports_initial_label
        assert s.original_image_shape == (1, 24, 30, 28) and s.lease_status()["remaining_seconds"] > 0
        s.add_point_interaction([12, 14, 13], include_interaction=True)
        one = s.target_buffer.copy()
        assert np.array_equal(one, _v1(server, [((12, 14, 13), True)]))
        s.add_point_interaction([12, 18, 13], include_interaction=False, run_prediction=False)
        assert np.array_equal(s.target_buffer, one)  # queued, not predicted
        s._predict()
        two = s.target_buffer.copy()
        # the second call also feeds the first call's low-res mask back, so compare with a session, not one-shot
        assert s.undo() and np.array_equal(s.target_buffer, one)
        s.add_point_interaction([12, 18, 13], include_interaction=False)
        assert np.array_equal(s.target_buffer, two)  # the same state gives the same mask
        s.reset_interactions()
        assert not s.target_buffer.any()
        s.add_point_interaction([12, 14, 13], include_interaction=True)
        assert np.array_equal(s.target_buffer, one)


def test_remote_client_box_scribble_lasso_and_initial_seg(server):
    with _session(server) as s:
        s.add_bbox_interaction([[10, 15], [12, 17], [13, 14]], include_interaction=True)  # 2D box: click at the centre
        assert np.array_equal(s.target_buffer, _v1(server, [((12, 14, 13), True)]))
        s.reset_interactions()
        scribble = np.zeros(server.arr.shape, np.uint8)
        scribble[12, 10:19, 13] = 1  # a line: its most interior voxel is its middle, (12, 14, 13)
        s.add_scribble_interaction(scribble, include_interaction=True)
        assert np.array_equal(s.target_buffer, _v1(server, [((12, 14, 13), True)]))
        s.reset_interactions()
        lasso = np.zeros(server.arr.shape, np.uint8)
        lasso[10:15, 12:17, 13] = 1
        s.add_lasso_interaction(lasso, include_interaction=True)
        assert np.array_equal(s.target_buffer, _v1(server, [((12, 14, 13), True)]))
        seg = np.zeros(server.arr.shape, np.uint8)
        seg[9:16, 11:18, 10:17] = 1
        s.add_initial_seg_interaction(seg)
        assert np.array_equal(s.target_buffer, seg)  # mirrored by the client; the server keeps it as mask prompt
        s.add_point_interaction([12, 14, 13], include_interaction=True)
        assert s.target_buffer.shape == seg.shape and set(np.unique(s.target_buffer)) <= {0, 1}


def test_remote_client_errors(server):
    with _session(server) as s:
        with pytest.raises(httpx.HTTPStatusError) as err:
            s.add_point_interaction([99, 1, 1], include_interaction=True)
        assert err.value.response.status_code == 400 and "outside the volume" in err.value.response.json()["detail"]
        with pytest.raises(httpx.HTTPStatusError) as err:
            s.add_bbox_interaction([[3, 3], [1, 4], [1, 4]], include_interaction=True)
        assert "zero size" in err.value.response.json()["detail"]
        with pytest.raises(httpx.HTTPStatusError) as err:
            s.set_target_buffer(np.zeros((3, 3, 3), np.uint8))
        assert "!= image shape" in err.value.response.json()["detail"]
    r = server.client.post("/nninteractive/add_point_interaction", headers={"X-Lease-Token": "nope"},
                           json={"coordinates": [1, 1, 1], "include_interaction": True})
    assert r.status_code == 410 and "lease" in r.json()["detail"]  # the client raises SessionExpiredError on 410
    held = [remote.nnInteractiveRemoteInferenceSession(server.base + "/nninteractive") for _ in range(3)]
    try:
        with pytest.raises(remote.ServerAtCapacityError):
            remote.nnInteractiveRemoteInferenceSession(server.base + "/nninteractive")
    finally:
        for h in held:
            h.close()


def _npy(arr, gz=False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return gzip.compress(buf.getvalue()) if gz else buf.getvalue()


def _bits(resp, shape) -> np.ndarray:
    assert resp.status_code == 200, resp.text
    assert resp.headers.get("content-encoding") == "gzip"  # httpx (like requests) has decompressed it
    return np.unpackbits(np.frombuffer(resp.content, np.uint8))[: int(np.prod(shape))].reshape(shape)


def test_slicer_server_protocol_replayed(server):
    c, url, shape = server.client, "/nninteractive-slicer", server.arr.shape
    assert c.get(url).status_code == 200  # the extension's "test connection"
    early = c.post(f"{url}/add_point_interaction", json={"voxel_coord": [1, 1, 1], "positive_click": True})
    assert early.json() == {"status": "error", "message": "No image uploaded"}  # the extension re-uploads on this
    r = c.post(f"{url}/upload_image", files={"file": ("volume.npy", _npy(server.arr), "application/octet-stream")})
    assert r.json() == {"status": "ok"}
    point = c.post(f"{url}/add_point_interaction", json={"voxel_coord": [12, 14, 13], "positive_click": True})
    expected = _v1(server, [((12, 14, 13), True)], nii=server.nii_1mm)  # this protocol sends no spacing: 1 mm
    assert np.array_equal(_bits(point, shape), expected)
    seg = np.zeros(shape, np.uint8)
    r = c.post(f"{url}/upload_segment", files={"file": ("volume.npy.gz", _npy(seg, gz=True))},
               headers={"Content-Encoding": "gzip"})
    assert r.json() == {"status": "ok"}  # an empty segment resets the interactions
    box = c.post(f"{url}/add_bbox_interaction", json={"outer_point_one": [10, 12, 13], "outer_point_two": [14, 16, 13],
                                                      "positive_click": True})
    assert np.array_equal(_bits(box, shape), expected)  # inclusive corners: centre (12, 14, 13)
    c.post(f"{url}/upload_segment", files={"file": ("volume.npy.gz", _npy(seg, gz=True))})
    lasso = np.zeros(shape, np.uint8)
    lasso[10:15, 12:17, 13] = 1
    r = c.post(f"{url}/add_lasso_interaction", files={"file": ("volume.npy.gz", _npy(lasso, gz=True),
                                                               "application/octet-stream")},
               data={"positive_click": "True"})
    assert np.array_equal(_bits(r, shape), expected)
    bad = c.post(f"{url}/add_point_interaction", json={"voxel_coord": [12, 99, 13], "positive_click": True})
    assert bad.status_code == 400 and "outside the volume" in bad.json()["detail"]
    r = c.post(f"{url}/upload_image", files={"file": ("volume.npy", b"not an array")})
    assert r.status_code == 400 and "not a .npy array" in r.json()["detail"]


def test_octet_stream_bodies_count_as_uploads_only_on_the_nninteractive_protocol(server):
    big, octet = bytes(2 << 20), {"Content-Type": "application/octet-stream"}  # 2 MiB: over 1 MiB, under the cap
    r = server.client.post("/nninteractive/set_image", content=big, headers=octet)
    assert r.status_code == 410  # past the guard: the route asks for a lease
    r = server.client.post("/v1/sessions/x/clicks", content=big, headers=octet)
    assert r.status_code == 413 and "1 MiB" in r.json()["detail"]
