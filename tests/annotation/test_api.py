"""The annotation API over real HTTP (Ray Serve on 127.0.0.1, httpx): MONAI Label routes, roles, leases,
validation with nothing stored on failure, idempotent re-upload, inference, status and export."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import SimpleITK as sitk

from raylearn.annotation.labels import LabelStore
from raylearn.annotation.schedule import attach_run
from raylearn.experiment import ExperimentConfig
from raylearn.models.config import ModelConfig
from raylearn.models.unet import MonaiSegmenter
from raylearn.serve.app import build_app
from raylearn.serve.config import ServeConfig, UserConfig, annotation_serve_config
from tests.conftest import pick_free_ports

TOKENS = {"alice": "alice-token-0001", "bob": "bob-token-00002", "root": "admin-token-0003",
          "carol": "carol-token-0004"}


def make_run(run_dir: Path, store, n_queue: int = 4) -> SimpleNamespace:
    """A run's workspace as the driver leaves it after round 0: run.json, a model, a queue of suggestions."""
    pool = store.case_ids("pool")
    labels = LabelStore(run_dir / "labels", known_ids=set(pool))
    cfg = ExperimentConfig(name="api-test", output_dir=str(run_dir))
    ws = attach_run(run_dir, cfg, store, labels, pool)
    shape = list(store.manifest["shape"].iloc[0])
    seg = MonaiSegmenter(ModelConfig(channels=(4, 8), strides=(2,), num_res_units=0, dropout=0.0,
                                     patch_size=[int(s) for s in shape]), 1, store.num_classes, seed=0, device="cpu")
    ckpt = seg.save(run_dir / "checkpoints" / "round_00.pt")
    ws.publish(0, pool[:n_queue], str(ckpt), 0)
    return SimpleNamespace(pool=pool, labels=labels, ws=ws, checkpoint=ckpt)


def serve_config(run_dir: Path, **annotation) -> ServeConfig:
    users = [UserConfig(name="alice", token=TOKENS["alice"]), UserConfig(name="bob", token=TOKENS["bob"]),
             UserConfig(name="root", role="admin", token=TOKENS["root"]),
             UserConfig(name="carol", token_env="RAYLEARN_TEST_CAROL_TOKEN")]
    # carol's token reaches the replica through its environment (token_env)
    return annotation_serve_config(run_dir, users, name="raylearn-annotation-test",
                                   classes={1: "Anterior", 2: "Posterior"}, auth_token_env="RAYLEARN_TEST_UNSET_TOKEN",
                                   ingress_env_vars={"RAYLEARN_TEST_CAROL_TOKEN": TOKENS["carol"]}, **annotation)


@pytest.fixture(scope="module")
def api(ray_session, hippo_store, tmp_path_factory):
    from ray import serve

    run_dir = tmp_path_factory.mktemp("api_run")
    run = make_run(run_dir, hippo_store)
    cfg = serve_config(run_dir)
    port = pick_free_ports(1)[0]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name=cfg.name, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    clients = {u: httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {t}"})
               for u, t in TOKENS.items()}
    clients["nobody"] = httpx.Client(base_url=url, timeout=60)
    yield SimpleNamespace(url=url, c=clients, run=run, store=hippo_store, run_dir=run_dir, port=port)
    for c in clients.values():
        c.close()
    serve.delete(cfg.name)
    serve.shutdown()


def source_label(store, cid) -> bytes:
    return Path(store.manifest.set_index("case_id").loc[cid, "label_path"]).read_bytes()


def nifti(img: sitk.Image, tmp: Path, name: str = "x.nii.gz") -> bytes:
    sitk.WriteImage(img, str(tmp / name))
    return (tmp / name).read_bytes()


def put_label(client, cid, data: bytes, tag: str = "final"):
    return client.put("/datastore/label", params={"image": cid, "tag": tag},
                      files={"label": (f"{cid}.nii.gz", data, "application/gzip")}, data={"params": "{}"})


def test_auth_info_and_roles(api):
    assert api.c["nobody"].get("/auth/").json()["enabled"] is True
    r = api.c["nobody"].get("/info/")
    assert r.status_code == 401 and "bearer token" in r.json()["detail"]
    assert httpx.get(f"{api.url}/info/", headers={"Authorization": "Bearer wrong-token-xyz"}).status_code == 401
    info = api.c["alice"].get("/info/").json()
    assert info["labels"] == {"Anterior": 1, "Posterior": 2}
    assert info["models"]["segmenter"]["dimension"] == 3 and set(info["strategies"]) == {"raylearn", "random"}
    tok = api.c["nobody"].post("/auth/token", data={"username": "alice", "password": TOKENS["alice"]})
    assert tok.json() == {"access_token": TOKENS["alice"], "token_type": "Bearer"}
    assert api.c["nobody"].post("/auth/token", data={"username": "bob", "password": TOKENS["alice"]}).status_code == 401
    r = api.c["alice"].put("/v1/annotation/strategy", json={"name": "entropy"})
    assert r.status_code == 403 and "role 'admin' is required (user 'alice' is 'annotator')" in r.json()["detail"]
    r = api.c["root"].put("/v1/annotation/strategy", json={"name": "no_such_strategy"})
    assert r.status_code == 422 and "no_such_strategy" in r.json()["detail"]
    assert api.c["root"].put("/v1/annotation/strategy", json={"name": "entropy"}).status_code == 200
    assert api.run.ws.read("control")["strategy"] == {"name": "entropy", "params": {}}


def test_next_sample_leases_image_and_upload(api, tmp_path):
    a, b, pool = api.c["alice"], api.c["bob"], api.run.pool
    first = a.post("/activelearning/raylearn", json={}).json()
    assert first["id"] == pool[0] and first["lease"]["user"] == "alice"
    assert a.post("/activelearning/raylearn", json={}).json()["id"] == pool[0]  # her open case again
    assert b.post("/activelearning/raylearn", json={}).json()["id"] == pool[1]  # nobody gets a leased case
    assert a.post("/activelearning/nope", json={}).status_code == 404
    img = a.get("/datastore/image", params={"image": pool[0]})
    src = Path(api.store.manifest.set_index("case_id").loc[pool[0], "image_paths"][0])
    assert img.status_code == 200 and img.content == src.read_bytes()
    assert a.head("/datastore/image", params={"image": pool[0]}).status_code == 200
    test_case = api.store.case_ids("test")[0]
    r = a.get("/datastore/image", params={"image": test_case})
    assert r.status_code == 404 and "test split" in r.json()["detail"]

    # bob may not upload for alice's case; alice may; a retry is idempotent
    gt = source_label(api.store, pool[0])
    r = put_label(b, pool[0], gt)
    assert r.status_code == 409 and "leased by 'alice'" in r.json()["detail"]
    assert api.run.labels.records() == []
    r = put_label(a, pool[0], gt)
    assert r.status_code == 200, r.text
    assert (r.json()["version"], r.json()["created"], r.json()["annotator"]) == (1, True, "alice")
    again = put_label(a, pool[0], gt)
    assert again.status_code == 200 and (again.json()["version"], again.json()["created"]) == (1, False)
    rec = api.run.labels.latest(pool[0])
    assert (rec.source, rec.annotator, rec.version) == ("human", "alice", 1)
    np.testing.assert_array_equal(api.run.labels.read(pool[0]), api.store.get(pool[0]).label)
    assert pool[0] not in api.run.ws.leases()  # a final label ends the lease
    # the next suggestion skips the labelled case and bob's
    assert a.post("/activelearning/raylearn", json={}).json()["id"] == pool[2]
    down = a.get("/datastore/label", params={"label": pool[0], "tag": "final"})
    (tmp_path / "d.nii.gz").write_bytes(down.content)
    # the stored label on the source grid (this store resamples, so it is the GT as the store holds it)
    got, want = sitk.ReadImage(str(tmp_path / "d.nii.gz")), api.store.restore(pool[0], api.store.get(pool[0]).label)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(want))
    assert got.GetOrigin() == pytest.approx(want.GetOrigin()) and got.GetDirection() == want.GetDirection()


@pytest.mark.parametrize("damage, status, message", [
    (lambda im: sitk.GetImageFromArray(sitk.GetArrayFromImage(im)[:-2]), 422, "size"),
    (lambda im: (im.SetOrigin([o + 5 for o in im.GetOrigin()]), im)[1], 422, "origin"),
    (lambda im: sitk.Add(im, 4), 422, r"value(s) [4, 5, 6] are not classes"),
    (lambda im: sitk.Multiply(im, 0), 422, "empty"),
    (None, 400, "label"),
])
def test_bad_labels_get_4xx_and_nothing_is_stored(api, tmp_path, damage, status, message):
    b, cid = api.c["bob"], api.run.pool[1]  # bob holds the lease on pool[1]
    assert api.c["bob"].post(f"/v1/annotation/leases/{cid}").status_code == 200
    before = len(api.run.labels.records())
    good = sitk.ReadImage(str(api.store.manifest.set_index("case_id").loc[cid, "label_path"]))
    data = b"\x1f\x8b not a nifti at all" if damage is None else nifti(damage(sitk.Image(good)), tmp_path)
    r = put_label(b, cid, data)
    assert r.status_code == status and message in r.json()["detail"], r.text
    assert len(api.run.labels.records()) == before and api.run.labels.latest(cid) is None
    r = put_label(b, "hippocampus_999", source_label(api.store, cid))
    assert r.status_code == 404 and "hippocampus_999" in r.json()["detail"]


def test_expired_lease_is_refused_then_renewed(api):
    cid = api.run.pool[3]
    api.run.ws.acquire(cid, "bob", ttl_s=0.05)
    time.sleep(0.2)
    r = put_label(api.c["bob"], cid, source_label(api.store, cid))
    assert r.status_code == 410 and "expired" in r.json()["detail"]
    assert api.run.labels.latest(cid) is None
    assert api.c["bob"].post(f"/v1/annotation/leases/{cid}").json()["user"] == "bob"
    assert api.c["alice"].post(f"/v1/annotation/leases/{cid}").status_code == 409
    assert put_label(api.c["bob"], cid, source_label(api.store, cid)).status_code == 200


def test_datastore_infer_status_and_export(api, tmp_path):
    a = api.c["alice"]
    labelled = set(api.run.labels.labelled_ids())
    assert labelled
    ds = a.get("/datastore/", params={"output": "all"}).json()
    assert set(ds["objects"]) == set(api.run.pool)
    assert {c for c, o in ds["objects"].items() if "final" in o["labels"]} == labelled
    assert a.get("/datastore/").json()["completed"] == len(labelled)
    assert sorted(x["image"] for x in a.get("/datastore/", params={"output": "train"}).json()) == sorted(labelled)

    cid = api.run.pool[5]
    r = a.post("/infer/segmenter", params={"image": cid, "output": "image"}, data={"params": "{}"})
    assert r.status_code == 200
    (tmp_path / "p.nii.gz").write_bytes(r.content)
    pred = sitk.ReadImage(str(tmp_path / "p.nii.gz"))
    src = sitk.ReadImage(str(api.store.manifest.set_index("case_id").loc[cid, "image_paths"][0]))
    assert pred.GetSize() == src.GetSize() and pred.GetSpacing() == pytest.approx(src.GetSpacing())
    multi = a.post("/infer/segmenter", params={"image": cid}, data={"params": "{}"})
    assert multi.headers["content-type"].startswith("multipart/form-data") and b'name="params"' in multi.content
    assert a.post("/infer/other", params={"image": cid}).status_code == 404

    st = a.get("/v1/annotation/status").json()
    assert st["labelled"] == len(labelled) and st["model_version"] == 0 and st["checkpoint"] == "round_00.pt"
    assert not set(st["queue"]) & labelled and st["mode"] == "sync"
    assert a.get("/v1/annotation/export").status_code == 403
    z = zipfile.ZipFile(io.BytesIO(api.c["root"].get("/v1/annotation/export").content))
    assert {f"labels/{c}.nii.gz" for c in labelled} <= set(z.namelist())
    assert len(z.read("labels.jsonl").decode().splitlines()) == len(api.run.labels.records())
    assert json.loads(z.read("labels.jsonl").decode().splitlines()[0])["source"] == "human"
    # pause: no suggestions handed out
    assert api.c["root"].post("/v1/annotation/pause").json()["paused"] is True
    assert a.post("/activelearning/raylearn", json={}).json() == {}
    api.c["root"].post("/v1/annotation/resume")


# -- MONAI Label's own client ------------------------------------------------------------------------------
MONAILABEL = "monailabel==0.8.5"
CLIENT_SCRIPT = r"""
import json, sys
from monailabel.client import MONAILabelClient
url, token, labels_json, tmp = sys.argv[1:5]
labels = json.loads(labels_json)
c = MONAILabelClient(url, tmpdir=tmp)
out = {"auth_enabled": c.auth_enabled()}
c.update_auth(c.auth_token("carol", token))
out["valid"] = c.auth_valid_token()
out["info"] = c.info()
s = c.next_sample("random", {})
out["sample"] = s
out["save"] = c.save_label(s["id"], labels[s["id"]], tag="final")
out["save_again"] = c.save_label(s["id"], labels[s["id"]], tag="final")
out["datastore"] = c.datastore()
image_out, params = c.infer("segmenter", s["id"], {})
out["infer"] = {"file": image_out, "params": params}
out["download"] = c.download_label(s["id"], "final")
try:
    c.save_label(s["id"], labels["__bad__"], tag="final")
except Exception as err:
    out["bad"] = {"status": getattr(err, "status_code", None), "msg": getattr(err, "msg", str(err))}
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="session")
def monailabel_python(tmp_path_factory) -> Path:
    """A separate venv holding MONAI Label's client: ``pip install --no-deps monailabel`` + requests.

    monailabel 0.8.5 does not install beside this project's pins (its dependencies would replace numpy 2,
    pandas and pyarrow: ``pip install --dry-run monailabel``), and ``monailabel.client`` imports only requests and
    the standard library, so its wheel alone (no dependencies) in a venv of its own is the client as shipped.
    The venv is cached in ``$RAYLEARN_TEST_CACHE`` (default ``~/.cache/raylearn-tests``).
    """
    cache = Path(os.environ.get("RAYLEARN_TEST_CACHE", Path.home() / ".cache" / "raylearn-tests"))
    venv = cache / "monailabel-0.8.5-client"
    py = venv / "bin" / "python"
    if not (venv / ".complete").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        steps = [[sys.executable, "-m", "venv", "--clear", str(venv)],
                 [str(py), "-m", "pip", "install", "-q", "requests"],
                 [str(py), "-m", "pip", "install", "-q", "--no-deps", MONAILABEL]]
        for cmd in steps:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if r.returncode:
                pytest.skip(f"cannot install MONAI Label's client ({' '.join(cmd[-2:])}): {r.stderr[-400:]}")
        (venv / ".complete").write_text(MONAILABEL)
    return py


def test_monailabel_client_against_the_api(api, monailabel_python, tmp_path):
    """MONAI Label's ``MONAILabelClient`` (its own code, in its own venv) over HTTP: auth, info, next sample,
    label upload (twice: idempotent), datastore, inference (multipart), label download, a refused label."""
    labels = {c: str(api.store.manifest.set_index("case_id").loc[c, "label_path"]) for c in api.run.pool}
    bad = sitk.Image(5, 5, 5, sitk.sitkUInt8)
    sitk.WriteImage(bad, str(tmp_path / "bad.nii.gz"))
    labels["__bad__"] = str(tmp_path / "bad.nii.gz")
    r = subprocess.run([str(monailabel_python), "-c", CLIENT_SCRIPT, api.url, TOKENS["carol"], json.dumps(labels),
                        str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.split("RESULT ", 1)[1])
    assert out["auth_enabled"] is True and out["valid"] is True
    assert out["info"]["labels"] == {"Anterior": 1, "Posterior": 2} and "segmenter" in out["info"]["models"]
    cid = out["sample"]["id"]
    assert cid in api.run.pool and out["sample"]["lease"]["user"] == "carol"
    assert out["save"]["label"] == cid and out["save"]["created"] is True
    assert out["save_again"]["version"] == out["save"]["version"] and out["save_again"]["created"] is False
    rec = api.run.labels.latest(cid)
    assert (rec.annotator, rec.source) == ("carol", "human")
    np.testing.assert_array_equal(api.run.labels.read(cid), api.store.get(cid).label)
    assert "final" in out["datastore"]["objects"][cid]["labels"]
    assert out["infer"]["params"]["model"] == "segmenter"
    assert sitk.ReadImage(out["infer"]["file"]).GetSize() == sitk.ReadImage(labels[cid]).GetSize()
    assert sitk.ReadImage(out["download"]).GetSize() == sitk.ReadImage(labels[cid]).GetSize()
    assert "Status: 422" in out["bad"]["msg"] and "size 5x5x5" in out["bad"]["msg"]
