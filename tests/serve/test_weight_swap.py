"""New promptable-model weights taken live by the running Serve app (real Serve, real HTTP): the version changes,
open sessions survive (ingress not restarted, model replica reconfigured in place), a stale embedding is redone."""

from __future__ import annotations

import socket

import httpx
import numpy as np
import pytest
import SimpleITK as sitk

from raylearn.models import sam_med3d as sm
from raylearn.models.promptable import PromptableConfig
from raylearn.models.promptable_train import PromptableTrainer
from raylearn.serve.app import build_app
from raylearn.serve.config import DeploymentOptions, IngressConfig, ServeConfig
from raylearn.serve.publish import publish_promptable, with_promptable


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _volume(path) -> bytes:
    z, y, x = np.indices((24, 24, 24))
    arr = (20 + 80 * (((z - 12) ** 2 + (y - 12) ** 2 + (x - 12) ** 2) < 25)).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.5, 1.5, 1.5))
    sitk.WriteImage(img, str(path))
    return path.read_bytes()


def _trained(tmp_path, steps: int, name: str) -> str:
    """A promptable checkpoint as the training service writes it (small variant, ``steps`` fine-tuning steps)."""
    tr = PromptableTrainer(PromptableConfig(enabled=True, batch_size=1, clicks=1, lr=5e-3), seed=0)
    z, y, x = np.indices((32, 32, 32))
    lab = (((z - 16) ** 2 + (y - 16) ** 2 + (x - 16) ** 2) < 36).astype(np.uint8)
    if steps:
        tr.fit([("s", (lab * 2.0).astype(np.float32), lab)], steps, seed=[0])
    path = tmp_path / name
    path.write_bytes(tr.checkpoint_bytes({"version": name}))
    return str(path)


def test_new_weights_are_taken_live_and_open_sessions_survive(ray_session, tmp_path):
    from ray import serve

    first, second = _trained(tmp_path, 0, "r00.pt"), _trained(tmp_path, 3, "r01.pt")
    base = ServeConfig(name="raylearn-swap", ingress=IngressConfig(classes={1: "blob"},
                                                                   auth_token_env="RAYLEARN_TEST_UNSET_TOKEN"),
                       ingress_options=DeploymentOptions(ray_actor_options={"num_cpus": 0}),
                       model_options=DeploymentOptions(ray_actor_options={"num_cpus": 0}))
    base = base.model_copy(update={"model": base.model.model_copy(update={"model": sm.SamMed3DConfig(device="cpu")})})
    with pytest.raises(RuntimeError, match="no Serve app named"):
        publish_promptable(second, "r01", base)  # nothing runs yet: refused, nothing started
    port = _port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(with_promptable(base, first, "r00")), name=base.name, route_prefix="/")
    c = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    try:
        info0 = c.get("/v1/info").json()
        assert info0["model"]["version"] == "r00" and info0["model"]["preset"] == "small"
        r = c.post("/v1/sessions", files={"file": ("v.nii.gz", _volume(tmp_path / "v.nii.gz"))})
        assert r.status_code == 201, r.text
        sid = r.json()["session_id"]
        assert c.post(f"/v1/sessions/{sid}/clicks", json={"clicks": [{"label": 1, "voxel": [12, 12, 12]}]}
                      ).status_code == 200
        batches0 = c.get("/v1/info").json()["model"]["batching"]["decode_batches"]

        served = publish_promptable(second, "r01-s3", base)

        info1 = c.get("/v1/info").json()
        assert served["version"] == info1["model"]["version"] == "r01-s3"
        assert info1["model"]["checkpoint_sha256"] == sm.file_sha256(second) != info0["model"]["checkpoint_sha256"]
        assert info1["model"]["encoder_digest"] != info0["model"]["encoder_digest"]
        # the same replicas: the ingress kept its session and counters, the model replica its batch counter
        assert info1["sessions"] == 1 and info1["encoder_requests"] == info0["encoder_requests"] + 1
        assert info1["model"]["batching"]["decode_batches"] == batches0
        s = c.get(f"/v1/sessions/{sid}")
        assert s.status_code == 200 and s.json()["clicks"] == 1 and s.json()["encoder_calls"] == 1
        r = c.post(f"/v1/sessions/{sid}/clicks", json={"clicks": [{"label": 1, "voxel": [13, 12, 12]}]})
        assert r.status_code == 200, r.text
        s = c.get(f"/v1/sessions/{sid}").json()
        assert s["clicks"] == 2 and s["encoder_calls"] == 2  # the window was encoded again by the new encoder
        info2 = c.get("/v1/info").json()
        assert info2["model"]["encoder_calls"] == 1 and info2["model"]["decoder_calls"] == 1  # the new weights
    finally:
        c.close()
        serve.delete(base.name)
        serve.shutdown()
