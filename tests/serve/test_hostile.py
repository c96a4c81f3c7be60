"""Issue 11's hostile requests, each over real HTTP against one shared Serve app (httpx / http.client).

Every test asserts the status, the message, and that the server still answers afterwards (liveness and a real
segmentation of a good volume, so a stuck read pool would show). Files are crafted here (``craft`` fixture).
"""

import asyncio
import gzip
import http.client
import json
import os
import socket
import time
from types import SimpleNamespace

import httpx
import pytest

from raylearn.models import sam_med3d as sm
from raylearn.serve.app import build_app
from raylearn.serve.config import DeploymentOptions, IngressConfig, ModelDeploymentConfig, ServeConfig

TOKEN = "hostile-test-token"
CLICK = json.dumps([{"label": 1, "voxel": [10, 12, 12]}])
SERVER_PATHS = ("/tmp", "/work", "/home", "raylearn-upload", ".hxx", ".cxx", ".py")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(**ingress) -> ServeConfig:
    base = dict(classes={1: "blob"}, max_upload_mb=4, max_clicks_per_request=16, max_clicks_per_session=24,
                auth_token_env="RAYLEARN_HOSTILE_UNSET")
    return ServeConfig(
        name="raylearn-hostile",
        ingress=IngressConfig(**{**base, **ingress}),
        model=ModelDeploymentConfig(model=sm.SamMed3DConfig(preset="small", device="cpu", init_seed=1)),
        ingress_options=DeploymentOptions(ray_actor_options={"num_cpus": 0}),
        model_options=DeploymentOptions(ray_actor_options={"num_cpus": 0}),
    )


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory, craft):
    from ray import serve

    from raylearn.models.config import ModelConfig
    from raylearn.models.unet import MonaiSegmenter

    tmp = tmp_path_factory.mktemp("hostile")
    cfg = ModelConfig(channels=(4, 8), strides=(2,), num_res_units=0, dropout=0.0, patch_size=(16, 16, 16))
    ckpt = MonaiSegmenter(cfg, in_channels=1, num_classes=2, seed=0, device="cpu").save(tmp / "seg.pt")
    port = _port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # the token as a build argument: what `raylearn serve` does with RAYLEARN_SERVE_TOKEN of its environment
    serve.run(build_app(_config(segmenter_checkpoint=str(ckpt)), token=TOKEN), name="raylearn-hostile",
              route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    good = gzip.compress(craft.phantom_nifti())
    yield SimpleNamespace(client=client, base=base, port=port, tmp=tmp, good=good, serve=serve)
    client.close()
    serve.delete("raylearn-hostile")
    serve.shutdown()


def _error(r: httpx.Response, status: int, *needles: str) -> str:
    """Assert a ``{"detail": str}`` error with ``status`` naming every needle and no server path."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], str), body
    assert all(n in body["detail"] for n in needles), body["detail"]
    assert not any(p in body["detail"] for p in SERVER_PATHS), body["detail"]
    return body["detail"]


def _alive(server) -> None:
    """Still serving: liveness, and a real one-shot segmentation of a good volume through the read pool."""
    assert server.client.get("/healthz").status_code == 200
    r = server.client.post("/v1/segment", files={"file": ("ok.nii.gz", server.good)}, data={"clicks": CLICK})
    assert r.status_code == 200, r.text


def _upload(server, endpoint: str, data: bytes, field: str = "file"):
    files = {"file": ("v.nii.gz", server.good if field == "label" else data)}
    form = {}
    if field == "label":
        files["label"] = ("gt.nii.gz", data)
    if endpoint == "/v1/segment":
        form["clicks"] = CLICK
    return server.client.post(endpoint, files=files, data=form)


# ----------------------------------------------------------------------------- 1. server-side file reads


@pytest.mark.parametrize(("kind", "status", "needle"), [
    ("mha_passwd", 422, "ElementDataFile"), ("nrrd_passwd", 422, "data file"), ("mha_list", 422, "ElementDataFile"),
    ("mha_respelt", 400, "ElementDataFile"), ("nifti_pair", 422, "detached NIfTI"), ("nrrd_bare_cr", 400, "carriage"),
])
def test_detached_data_is_refused(server, craft, kind, status, needle):
    data = {"mha_passwd": craft.metaimage("/etc/passwd"), "nrrd_passwd": craft.nrrd("data file: /etc/passwd\n"),
            "mha_list": craft.metaimage("LIST", body=b"/etc/passwd\n"),
            "mha_respelt": craft.metaimage("/etc/passwd", extra="elementdatafile = LOCAL\n"),
            "nifti_pair": craft.nifti1(magic=b"ni1\x00"),
            "nrrd_bare_cr": craft.nrrd("content: x\rdata file: /etc/passwd\n")}[kind]
    for endpoint in ("/v1/sessions", "/v1/segment"):
        _error(_upload(server, endpoint, data), status, needle, "file:")
    _alive(server)


def test_fifo_data_file_does_not_block_the_readers(server, craft):
    fifo = server.tmp / "fifo"
    os.mkfifo(fifo)
    data = craft.metaimage(str(fifo))
    t0 = time.perf_counter()
    for _ in range(7):  # the 7 uploads used up the ingress thread pool
        _error(_upload(server, "/v1/sessions", data), 422, "ElementDataFile")
    assert time.perf_counter() - t0 < 10
    _alive(server)


def test_preannotate_label_cannot_read_server_files(server, craft):
    for data, needle in ((craft.metaimage("/etc/passwd"), "ElementDataFile"),
                         (craft.nrrd("data file: /etc/passwd\n"), "data file")):
        _error(_upload(server, "/v1/preannotate", data, field="label"), 422, "label:", needle)
        _error(_upload(server, "/v1/preannotate", data), 422, "file:", needle)
    _error(server.client.post("/v1/preannotate", files={"file": ("v.nii.gz", server.good)}, data={"seed": "-1"}),
           422, "seed")
    _alive(server)


# ----------------------------------------------------------------------------- 2-4. bombs and broken headers


def test_decompression_bomb_is_refused_from_the_header(server, craft):
    bomb = craft.gzip_bomb(640)
    assert len(bomb) < 400_000
    t0 = time.perf_counter()
    _error(_upload(server, "/v1/sessions", bomb), 413, "640x640x640", "max_voxels")
    assert time.perf_counter() - t0 < 5  # the issue: accepted after 10.5 s, +2.8 GB
    _alive(server)


@pytest.mark.parametrize("mm", [150.0, 10000.0])
def test_resampling_bomb_is_refused(server, craft, mm):
    data = craft.nifti1((4, 4, 4), pixdim=(mm, mm, mm))
    for endpoint in ("/v1/sessions", "/v1/segment"):
        _error(_upload(server, endpoint, data), 413, "max_resampled_voxels")
    _alive(server)


@pytest.mark.parametrize(("kind", "status", "needle"), [
    ("vox_offset_nan", 400, "vox_offset"), ("vox_offset_inf", 400, "vox_offset"), ("complex64", 422, "complex64"),
    ("origin_nan_nifti", 400, "qoffset"), ("origin_nan_mha", 400, "Offset"), ("origin_inf_nrrd", 400, "space origin"),
    ("spacing_nan_mha", 400, "ElementSpacing"), ("not_3d", 422, "expected a 3D image"),
])
def test_ill_formed_headers_get_4xx_naming_the_field(server, craft, kind, status, needle):
    nan = float("nan")
    data = {"vox_offset_nan": craft.nifti1(vox_offset=nan), "vox_offset_inf": craft.nifti1(vox_offset=float("inf")),
            "complex64": craft.nifti1(datatype=32, bitpix=64), "origin_nan_nifti": craft.nifti1(qoffset=(nan, 0, 0)),
            "origin_nan_mha": craft.metaimage(extra="Offset = nan 0 0\n"),
            "origin_inf_nrrd": craft.nrrd("space dimension: 3\nspace origin: (inf,0,0)\n"),
            "spacing_nan_mha": craft.metaimage(extra="ElementSpacing = 1 nan 1\n"),
            "not_3d": craft.nifti1((8, 8))}[kind]
    for endpoint in ("/v1/sessions", "/v1/segment"):
        _error(_upload(server, endpoint, data), status, needle)
    _alive(server)


# ----------------------------------------------------------------------------- 5-6. auth and body size


def _raw_request(server, headers: dict[str, str], path: str = "/v1/sessions") -> tuple[int, dict, float]:
    """Send only the headers (a body of Content-Length bytes is promised, never sent); the answer and its time."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=20)
    t0 = time.perf_counter()
    try:
        conn.putrequest("POST", path)
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read()), time.perf_counter() - t0
    finally:
        conn.close()


def test_auth_and_declared_size_are_checked_before_the_body(server):
    twelve_mb = {"Content-Type": "multipart/form-data; boundary=x", "Content-Length": str(12 << 20)}
    status, body, took = _raw_request(server, twelve_mb)  # no token: 401 without waiting for 12 MB
    assert status == 401 and "bearer token" in body["detail"] and took < 5
    status, body, took = _raw_request(server, {**twelve_mb, "Authorization": f"Bearer {TOKEN}"})
    assert status == 413 and "max_upload_mb = 4" in body["detail"] and took < 5
    _alive(server)


def test_chunked_bodies_are_counted(server):
    def chunks():
        for _ in range(40):
            yield b" " * 65536  # 2.5 MB of JSON whitespace, no Content-Length

    r = server.client.post("/v1/sessions/x/clicks", content=chunks(), headers={"Content-Type": "application/json"})
    _error(r, 413, "1 MiB")
    _alive(server)


def test_auth_fails_closed(server):
    anon = httpx.Client(base_url=server.base, timeout=30)
    for r in (anon.get("/v1/info"), anon.post("/v1/segment", files={"file": ("v.nii.gz", server.good)}),
              anon.get("/v1/info", headers={"Authorization": "Bearer wrong-token"}),
              anon.get("/v1/info", headers={"Authorization": f"Basic {TOKEN}"}), anon.get("/anything")):
        _error(r, 401, "bearer token")
        assert r.headers["www-authenticate"] == "Bearer"
    assert anon.get("/healthz").status_code == 200
    info = server.client.get("/v1/info").json()
    assert info["auth"] is True and info["warnings"] == []
    _alive(server)


# ----------------------------------------------------------------------------- 7-8. clicks and schemas


def _session(server) -> str:
    r = server.client.post("/v1/sessions", files={"file": ("v.nii.gz", server.good)})
    assert r.status_code == 201, r.text
    return r.json()["session_id"]


def test_click_caps(server):
    sid = _session(server)
    one = {"label": 1, "voxel": [10, 12, 12]}
    t0 = time.perf_counter()
    _error(server.client.post(f"/v1/sessions/{sid}/clicks", json={"clicks": [one] * 4000}), 422, "at most 1024")
    assert time.perf_counter() - t0 < 5
    _error(server.client.post(f"/v1/sessions/{sid}/clicks", json={"clicks": [one] * 17}), 422,
           "max_clicks_per_request = 16")
    _error(server.client.post("/v1/segment", files={"file": ("v.nii.gz", server.good)},
                              data={"clicks": json.dumps([one] * 17)}), 422, "max_clicks_per_request")
    assert server.client.post(f"/v1/sessions/{sid}/clicks", json={"clicks": [one] * 12}).status_code == 200
    _error(server.client.post(f"/v1/sessions/{sid}/clicks", json={"clicks": [one] * 13}), 422,
           "max_clicks_per_session = 24")
    assert server.client.get(f"/v1/sessions/{sid}").json()["clicks"] == 12
    assert server.client.post(f"/v1/sessions/{sid}/clicks", json={"clicks": [one], "reset": True}).status_code == 200
    _alive(server)


@pytest.mark.parametrize(("click", "needle"), [
    ({"label": True, "voxel": [1, 1, 1]}, "label"), ({"label": 1, "positive": "yes", "voxel": [1, 1, 1]}, "positive"),
    ({"label": 1, "voxel": ["1", 1, 1]}, "voxel.0"), ({"label": 1, "voxel": [1, 1]}, "voxel"),
    ({"label": 1, "world": [float("nan"), 0, 0]}, "finite"), ({"label": 1, "voxel": [1, 1, 1], "x": 1}, "x"),
])
def test_strict_click_schema(server, click, needle):
    sid = _session(server)
    body = json.dumps({"clicks": [click]})  # NaN as JSON's common extension, which json.loads accepts
    detail = _error(server.client.post(f"/v1/sessions/{sid}/clicks", content=body,
                                       headers={"Content-Type": "application/json"}), 422, needle)
    assert "clicks.0" in detail
    _error(server.client.post("/v1/segment", files={"file": ("v.nii.gz", server.good)},
                              data={"clicks": json.dumps([click])}), 422, "clicks:", needle)
    _error(server.client.post(f"/v1/sessions/{sid}/clicks", json={"clicks": [], "reset": "no"}), 422, "reset")
    _alive(server)


def test_one_error_shape_everywhere(server):
    openapi = server.client.get("/openapi.json").json()
    for path in openapi["paths"].values():
        for op in path.values():
            if "422" in op["responses"]:
                ref = op["responses"]["422"]["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/ErrorResponse")
    _error(server.client.post("/v1/sessions/x/clicks", content=b"{not json", headers={"Content-Type":
                                                                                      "application/json"}), 422, "JSON")
    _error(server.client.post("/v1/sessions"), 422, "file")
    _error(server.client.get("/v1/nowhere"), 404, "Not Found")
    _error(server.client.put("/v1/info"), 405)
    _error(server.client.get("/v1/segment", params={"format": "png"}), 405)
    _error(_upload(server, "/v1/segment", b"NRRD0004\ntype: float\ndimension: 3\nsizes: 4 4 4\nencoding: raw\n\n"
                   + bytes(10)), 400, "NRRD")  # ITK's own message, its paths removed
    _alive(server)


def test_session_ids_and_roi_center_in_messages(server):
    long_id = "A" * 8192
    click = {"clicks": [{"label": 1, "voxel": [1, 1, 1]}]}
    for r in (server.client.get(f"/v1/sessions/{long_id}"), server.client.delete(f"/v1/sessions/{long_id}"),
              server.client.post(f"/v1/sessions/{long_id}/clicks", json=click)):
        assert len(_error(r, 404, "unknown or expired session")) < 100
    form = {"roi_center": json.dumps([999, 0, 0])}
    detail = _error(server.client.post("/v1/sessions", files={"file": ("v.nii.gz", server.good)}, data=form), 422,
                    "roi_center", "outside the volume")
    assert detail.count("roi_center") == 1
    form = {"roi_center": json.dumps([1, "a", 2])}
    _error(server.client.post("/v1/sessions", files={"file": ("v.nii.gz", server.good)}, data=form), 422,
           "roi_center")
    _alive(server)


def test_delete_waits_for_a_click_in_progress(server):
    sid = _session(server)
    many = {"clicks": [{"label": 1, "positive": i % 2 == 0, "voxel": [10, 12 + i % 5, 12]} for i in range(16)]}

    async def race():
        async with httpx.AsyncClient(base_url=server.base, headers=server.client.headers, timeout=30) as c:
            async def timed(coro):
                r = await coro
                return r, time.perf_counter()

            click = asyncio.create_task(timed(c.post(f"/v1/sessions/{sid}/clicks", json=many)))
            await asyncio.sleep(0.02)
            delete = asyncio.create_task(timed(c.delete(f"/v1/sessions/{sid}")))
            await asyncio.sleep(0.02)
            late = asyncio.create_task(timed(c.post(f"/v1/sessions/{sid}/clicks", json=many)))
            return await click, await delete, await late

    (r_click, t_click), (r_delete, t_delete), (r_late, _) = asyncio.run(race())
    assert r_delete.status_code == 204
    assert r_click.status_code in (200, 404) and r_late.status_code == 404
    if r_click.status_code == 200:  # processed before the DELETE, which waited for it
        assert t_click <= t_delete + 0.05
    assert server.client.get(f"/v1/sessions/{sid}").status_code == 404
    _alive(server)


def test_config_token_slow_reads_and_no_segmenter(server):
    """Redeploy: the token from user_config (wins over none given at build), a tiny read_timeout_s, no segmenter."""
    cfg = _config(auth_token="config-token-1", read_timeout_s=0.0005)
    server.serve.run(build_app(cfg), name="raylearn-hostile", route_prefix="/")
    _error(server.client.get("/v1/info"), 401, "bearer token")  # the build token of the fixture is gone
    c = httpx.Client(base_url=server.base, headers={"Authorization": "Bearer config-token-1"}, timeout=30)
    r = _upload(SimpleNamespace(client=c, good=server.good), "/v1/sessions", server.good)
    _error(r, 503, "read_timeout_s")
    assert r.headers["retry-after"] == "5"
    _error(c.post("/v1/preannotate", files={"file": ("v.nii.gz", server.good)}), 503, "segmenter_checkpoint")
    assert c.get("/healthz").status_code == 200 and c.get("/v1/info").json()["auth"] is True


def test_token_from_the_replica_environment(server):
    """The token as an env var of the replica (the application's runtime_env). Keep this last."""
    cfg = _config(auth_token_env="RAYLEARN_HOSTILE_TOKEN")
    cfg.ingress_options.ray_actor_options["runtime_env"] = {"env_vars": {"RAYLEARN_HOSTILE_TOKEN": "env-token-22"}}
    server.serve.run(build_app(cfg), name="raylearn-hostile", route_prefix="/")
    anon = httpx.Client(base_url=server.base, timeout=30)
    _error(anon.get("/v1/info"), 401, "bearer token")
    c = httpx.Client(base_url=server.base, headers={"Authorization": "Bearer env-token-22"}, timeout=30)
    assert c.get("/v1/info").json()["auth"] is True
    _alive(SimpleNamespace(client=c, good=server.good))
