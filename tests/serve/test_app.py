"""The SAM-Med3D Serve app over real HTTP (Ray Serve on 127.0.0.1, httpx), small model variant, tiny volumes."""

import json
import time
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from raylearn.data.preprocess import PreprocessConfig, preprocess_case
from raylearn.models import sam_med3d as sm
from raylearn.models.config import ModelConfig
from raylearn.models.unet import MonaiSegmenter
from raylearn.serve.app import build_app
from raylearn.serve.config import IngressConfig
from raylearn.serve.volumes import decode_mask

CLASSES = {1: "big", 2: "small"}


def _phantom(shape=(20, 28, 24), spacing=(1.0, 1.0, 1.2), seed=0):
    """Image (two bright blobs on noise) and label (1 big, 2 small) with spacing (x, y, z) mm."""
    z, y, x = np.indices(shape)
    lab = np.zeros(shape, np.uint8)
    lab[((z - 10) ** 2 + (y - 9) ** 2 + (x - 12) ** 2) < 25] = 1
    lab[((z - 10) ** 2 + (y - 20) ** 2 + (x - 12) ** 2) < 9] = 2
    rng = np.random.default_rng(seed)
    arr = (rng.normal(20, 3, shape) + 80 * (lab == 1) + 40 * (lab == 2)).astype(np.float32)
    img, lbl = sitk.GetImageFromArray(arr), sitk.GetImageFromArray(lab)
    for im in (img, lbl):
        im.SetSpacing(spacing)
        im.SetOrigin((-12.0, 4.0, 30.0))
    return img, lbl


def _bytes(img: sitk.Image, path) -> bytes:
    sitk.WriteImage(img, str(path))
    return path.read_bytes()


def _tiny_segmenter(img, lbl, path):
    """A 2-level MONAI UNet fitted for a few steps on the phantom, so its prediction has both classes."""
    case = preprocess_case([img], lbl, PreprocessConfig())
    cfg = ModelConfig(channels=(8, 16), strides=(2,), num_res_units=0, dropout=0.0, patch_size=case.image.shape[1:])
    seg = MonaiSegmenter(cfg, in_channels=1, num_classes=3, seed=0, device="cpu")
    x, y = torch.from_numpy(case.image[None]), torch.from_numpy(case.label[None].astype(np.int64))
    opt = torch.optim.Adam(seg.network.parameters(), lr=0.05)
    seg.network.train()
    for _ in range(100):  # until the prediction holds both structures (typically 10-20 steps)
        opt.zero_grad()
        logits = seg.network(x)
        loss = torch.nn.functional.cross_entropy(logits, y, weight=torch.tensor([0.2, 1.0, 3.0]))
        loss.backward()
        opt.step()
        pred = logits.argmax(1)
        if all(((pred == k) & (y == k)).sum() > 0.5 * (y == k).sum() for k in (1, 2)):
            break
    seg.network.eval()
    assert set(np.unique(seg.predict_label(case.image))) >= {1, 2}
    return seg.save(path)


@pytest.fixture(scope="module")
def server(serve_app, tmp_path_factory):
    from ray import serve

    tmp = tmp_path_factory.mktemp("serve")
    img, lbl = _phantom()
    sam_cfg = sm.SamMed3DConfig(preset="small", device="cpu", init_seed=3)
    sam_path = sm.save_checkpoint(sm.build_sam_med3d(sam_cfg), tmp / "sam_small.pth", sam_cfg)
    seg_path = _tiny_segmenter(img, lbl, tmp / "segmenter.pt")
    app = serve_app("raylearn-test",
                    IngressConfig(classes=CLASSES, segmenter_checkpoint=str(seg_path), max_upload_mb=0.5,
                                  auth_token_env="RAYLEARN_TEST_UNSET_TOKEN"),
                    sm.SamMed3DConfig(preset="small", device="cpu", checkpoint=str(sam_path)))
    return SimpleNamespace(client=app.client, cfg=app.cfg, img=img, lbl=lbl, sam_path=sam_path, seg_path=seg_path,
                           nii=_bytes(img, tmp / "img.nii.gz"), mha=_bytes(img, tmp / "img.mha"),
                           gt=_bytes(lbl, tmp / "gt.nii.gz"), tmp=tmp, serve=serve)


def _mask(resp) -> np.ndarray:
    assert resp.status_code == 200, resp.text
    body = resp.json()
    return decode_mask(body["data"], tuple(body["shape"]))


def _counters(server) -> tuple[int, int, int, int]:
    i = server.client.get("/v1/info").json()
    return i["encoder_requests"], i["decoder_requests"], i["model"]["encoder_calls"], i["model"]["decoder_calls"]


def test_health_docs_and_info(server):
    c = server.client
    assert c.get("/healthz").json() == {"status": "ok"}
    assert "swagger" in c.get("/docs").text.lower()
    paths = c.get("/openapi.json").json()["paths"]
    assert {"/v1/sessions", "/v1/sessions/{session_id}/clicks", "/v1/segment", "/v1/preannotate"} <= set(paths)
    info = c.get("/v1/info").json()
    assert info["model"]["preset"] == "small" and info["model"]["input_size"] == 32
    assert info["model"]["checkpoint_sha256"] == sm.file_sha256(server.sam_path)
    assert info["segmenter_checkpoint_sha256"] == sm.file_sha256(server.seg_path)
    assert info["classes"] == {"1": "big", "2": "small"} and info["auth"] is False
    assert "auth is OFF" in info["warnings"][0]  # no token anywhere: said loudly
    assert info["limits"]["max_clicks_per_request"] == 64


def test_session_refined_over_three_clicks(server):
    """Embedding once, then decoder only; the masks equal the library's own cached/iterative inference."""
    c = server.client
    e0, d0, me0, md0 = _counters(server)
    r = c.post("/v1/sessions", files={"file": ("img.nii.gz", server.nii)})
    assert r.status_code == 201, r.text
    sid = r.json()["session_id"]
    clicks = [{"label": 1, "voxel": [10, 9, 12]}, {"label": 1, "positive": False, "voxel": [2, 2, 2]},
              {"label": 2, "voxel": [10, 20, 12]}]
    masks = [_mask(c.post(f"/v1/sessions/{sid}/clicks", json={"clicks": [ck]})) for ck in clicks]
    e1, d1, me1, md1 = _counters(server)
    assert (e1 - e0, me1 - me0) == (1, 1)  # one encoder pass for the whole session
    assert (d1 - d0, md1 - md0) == (3, 3)  # one decoder pass per click
    s = c.get(f"/v1/sessions/{sid}").json()
    assert (s["clicks"], s["encoder_calls"], s["decoder_calls"], s["classes_clicked"]) == (3, 1, 3, [1, 2])
    assert all(m.shape == (20, 28, 24) for m in masks) and set(np.unique(masks[2])) <= {0, 1, 2}

    model = sm.SamMed3D(sm.SamMed3DConfig(preset="small", device="cpu", checkpoint=str(server.sam_path)))
    vol = sm.prepare_volume(server.img, 1.5)
    start = tuple(s["window_start"])
    ck = [sm.Click(d["label"], d.get("positive", True), voxel=tuple(d["voxel"])) for d in clicks]
    r1 = model.segment(vol, ck[:1], start=start)
    r3 = model.segment(vol, ck, prev_low_res={1: r1.low_res[1]}, start=start)
    assert (r1.label_map == masks[0]).mean() > 0.999
    assert (r3.label_map == masks[2]).mean() > 0.999

    assert c.delete(f"/v1/sessions/{sid}").status_code == 204
    assert c.get(f"/v1/sessions/{sid}").status_code == 404
    assert c.delete(f"/v1/sessions/{sid}").status_code == 404


def test_segment_one_shot_formats_world_clicks_and_cache(server):
    c = server.client
    clicks = json.dumps([{"label": 1, "voxel": [10, 9, 12]}, {"label": 2, "voxel": [10, 20, 12]}])
    e0 = _counters(server)[0]
    js = _mask(c.post("/v1/segment", files={"file": ("img.nii.gz", server.nii)}, data={"clicks": clicks}))
    nii = c.post("/v1/segment", files={"file": ("img.nii.gz", server.nii)}, data={"clicks": clicks},
                 params={"format": "nifti"})
    assert nii.status_code == 200 and nii.headers["content-type"] == "application/gzip"
    assert _counters(server)[0] - e0 == 1  # same volume, same window: the embedding came from the cache
    path = server.tmp / "mask.nii.gz"
    path.write_bytes(nii.content)
    out = sitk.ReadImage(str(path))
    assert out.GetSize() == server.img.GetSize() and np.allclose(out.GetSpacing(), server.img.GetSpacing())
    assert np.allclose(out.GetOrigin(), server.img.GetOrigin())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), js)
    # the same clicks as world (mm) points, on an MHA upload, via the Accept header
    world = [{"label": 1, "world": list(server.img.TransformIndexToPhysicalPoint((12, 9, 10)))},
             {"label": 2, "world": list(server.img.TransformIndexToPhysicalPoint((12, 20, 10)))}]
    r = c.post("/v1/segment", files={"file": ("img.mha", server.mha)}, data={"clicks": json.dumps(world)},
               headers={"Accept": "application/json"})
    assert (_mask(r) == js).mean() > 0.999


def test_preannotate_with_symdiff_pct(server):
    c = server.client
    r = c.post("/v1/preannotate", files={"file": ("img.nii.gz", server.nii), "label": ("gt.nii.gz", server.gt)},
               data={"n_clicks": "3", "seed": "0"})
    mask = _mask(r)
    body = r.json()
    assert mask.shape == (20, 28, 24)
    # per class, 3 clicks added one at a time from the error region; the first one is positive, in the prediction
    assert [k["label"] for k in body["clicks"]] == [1, 1, 1, 2, 2, 2]
    assert body["clicks"][0]["positive"] and body["clicks"][3]["positive"]
    assert set(body["timing_ms"]) == {"segmenter", "sam_med3d"}
    lab = sitk.GetArrayFromImage(server.lbl)
    assert set(body["symdiff_pct"]) == {"1", "2"}
    for k, v in body["symdiff_pct"].items():
        assert set(v) == {"symdiff_pct_sam", "symdiff_pct_segmenter", "gain"} and 0 <= v["symdiff_pct_sam"] <= 100
        assert v["gain"] == pytest.approx(v["symdiff_pct_segmenter"] - v["symdiff_pct_sam"])
        sam = 100 * ((mask == int(k)) ^ (lab == int(k))).sum() / ((mask == int(k)) | (lab == int(k))).sum()
        assert v["symdiff_pct_sam"] == pytest.approx(sam)
    again = c.post("/v1/preannotate", files={"file": ("img.nii.gz", server.nii)},
                   data={"n_clicks": "3", "seed": "0"}).json()
    assert again["clicks"] == body["clicks"] and again["symdiff_pct"] is None  # seeded
    # the authors' script: clicks simulated against the ground truth; the first click of a class lies in it
    expert = c.post("/v1/preannotate", files={"file": ("img.nii.gz", server.nii), "label": ("gt.nii.gz", server.gt)},
                    data={"n_clicks": "2", "reference": "label", "click_method": "center"}).json()
    first = expert["clicks"][0]
    assert first["positive"] and lab[tuple(int(round(v)) for v in first["voxel"])] == first["label"]


def test_preannotate_bad_input(server):
    c = server.client
    r = c.post("/v1/preannotate", files={"file": ("img.nii.gz", server.nii)}, data={"reference": "label"})
    assert r.status_code == 422 and "reference=label needs the ground truth" in r.json()["detail"]
    r = c.post("/v1/preannotate", files={"file": ("img.nii.gz", server.nii)}, data={"reference": "expert"})
    assert r.status_code == 422 and "reference" in r.json()["detail"]
    bad = sitk.GetArrayFromImage(server.lbl).astype(np.uint8)
    bad[0, 0, 0] = 9
    img = sitk.GetImageFromArray(bad)
    img.CopyInformation(server.lbl)
    r = c.post("/v1/preannotate", files={"file": ("img.nii.gz", server.nii),
                                         "label": ("gt.nii.gz", _bytes(img, server.tmp / "bad.nii.gz"))})
    assert r.status_code == 422 and "unknown class(es) [9]" in r.json()["detail"]


@pytest.mark.parametrize(
    ("upload", "clicks", "status", "message"),
    [
        ("corrupt", [{"label": 1, "voxel": [1, 1, 1]}], 400, "not a NIfTI"),
        ("truncated", [{"label": 1, "voxel": [1, 1, 1]}], 400, "corrupt"),
        ("2d", [{"label": 1, "voxel": [1, 1, 1]}], 422, "expected a 3D image"),
        ("ok", [{"label": 1, "voxel": [100, 1, 1]}], 422, "outside the volume"),
        ("ok", [], 422, "click list is empty"),
        ("ok", [{"label": 7, "voxel": [1, 1, 1]}], 422, "unknown class 7"),
        ("ok", "not json", 422, "clicks:"),
        ("big", [{"label": 1, "voxel": [1, 1, 1]}], 413, "exceeds the limit"),
    ],
)
def test_bad_inputs_get_clear_4xx(server, upload, clicks, status, message):
    tmp = server.tmp
    data = {"ok": server.nii, "corrupt": b"\x00garbage" * 50, "truncated": server.nii[: len(server.nii) // 2],
            "2d": _bytes(sitk.GetImageFromArray(np.ones((8, 8), np.float32)), tmp / "flat.nii.gz"),
            "big": np.random.default_rng(0).bytes(600_000)}[upload]
    form = {"clicks": clicks if isinstance(clicks, str) else json.dumps(clicks)}
    r = server.client.post("/v1/segment", files={"file": ("x.nii.gz", data)}, data=form)
    assert r.status_code == status and message in r.json()["detail"], r.text
    assert server.client.get("/healthz").status_code == 200  # still serving


def test_bad_session_requests(server):
    c = server.client
    r = c.post("/v1/sessions/nope/clicks", json={"clicks": [{"label": 1, "voxel": [1, 1, 1]}]})
    assert r.status_code == 404 and "unknown or expired session" in r.json()["detail"]
    sid = c.post("/v1/sessions", files={"file": ("img.nii.gz", server.nii)}).json()["session_id"]
    for body, msg in [({"clicks": []}, "empty"), ({"clicks": [{"label": 9, "voxel": [1, 1, 1]}]}, "unknown class"),
                      ({"clicks": [{"label": 1, "voxel": [1, 1, 99]}]}, "outside the volume"),
                      ({"clicks": [{"label": 1}]}, "exactly one")]:
        r = c.post(f"/v1/sessions/{sid}/clicks", json=body)
        assert r.status_code == 422 and msg in r.json()["detail"], r.text
    assert c.get(f"/v1/sessions/{sid}").json()["clicks"] == 0  # bad requests left the session untouched
    assert c.post("/v1/sessions", files={"file": ("x.nii.gz", b"junk")}).status_code == 400


def test_auth_and_session_expiry_after_reconfigure(server):
    """Redeploy with bearer auth on and a short TTL (auth off = every test above). Keep this test last."""
    c, cfg = server.client, server.cfg
    on = cfg.model_copy(update={"ingress": cfg.ingress.model_copy(update={"auth_token": "s3cret-token",
                                                                          "session_ttl_s": 4.0})})
    server.serve.run(build_app(on), name=cfg.name, route_prefix="/")
    assert c.get("/healthz").status_code == 200  # liveness stays open
    r = c.get("/v1/info")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert c.get("/v1/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
    auth = {"Authorization": "Bearer s3cret-token"}
    assert c.get("/v1/info", headers=auth).json()["auth"] is True
    assert c.post("/v1/sessions", files={"file": ("img.nii.gz", server.nii)}).status_code == 401
    assert c.get("/openapi.json").status_code == 200 and c.get("/v1/nope").status_code == 401  # closed by default
    sid = c.post("/v1/sessions", files={"file": ("img.nii.gz", server.nii)}, headers=auth).json()["session_id"]
    assert c.get(f"/v1/sessions/{sid}", headers=auth).status_code == 200
    time.sleep(4.5)
    r = c.post(f"/v1/sessions/{sid}/clicks", json={"clicks": [{"label": 1, "voxel": [1, 1, 1]}]}, headers=auth)
    assert r.status_code == 404  # expired while idle
    assert c.get("/v1/info", headers=auth).json()["sessions"] == 0
