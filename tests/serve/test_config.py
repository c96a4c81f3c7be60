"""Serve config file, volume I/O and sessions, without a running server."""

import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from raylearn.config import ConfigError
from raylearn.serve.config import MODEL_NAME, load_serve_config
from raylearn.serve.volumes import VolumeError, decode_mask, encode_mask, nifti_bytes, read_volume

SERVE_YAML = Path(__file__).resolve().parents[2] / "deployments" / "serve.yaml"


def test_shipped_serve_yaml_is_valid_for_ray_and_raylearn():
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(SERVE_YAML.read_text())
    ServeDeploySchema.model_validate(raw)
    assert raw["applications"][0]["import_path"] == "raylearn.serve.app:app"
    cfg = load_serve_config(SERVE_YAML)
    assert (cfg.host, cfg.port, cfg.route_prefix) == ("127.0.0.1", 8000, "/")
    assert cfg.model.model.preset == "full" and cfg.model.batching.enabled
    assert cfg.model_options.autoscaling_config["max_replicas"] == 2
    assert "num_gpus" in cfg.model_options.ray_actor_options


def test_module_level_app_is_a_bound_application(monkeypatch):
    """``serve run`` imports it: built from defaults, nothing read from the environment at import time."""
    import importlib

    from ray.serve.deployment import Application

    import raylearn.serve.app as module

    monkeypatch.setenv("RAYLEARN_SERVE_TOKEN", "must-not-be-baked-in")
    app = importlib.reload(module).app
    assert isinstance(app, Application)
    assert app._bound_deployment.init_args[1] is None  # the token argument: only run_server / build_app pass one


def test_bad_serve_yaml_names_the_key(tmp_path):
    raw = yaml.safe_load(SERVE_YAML.read_text())
    deps = raw["applications"][0]["deployments"]
    next(d for d in deps if d["name"] == MODEL_NAME)["user_config"]["batching"]["max_batch_sise"] = 8
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"bad.yaml: deployments\[SamMed3DModel\].user_config.batching."
                                          r"max_batch_sise: unknown key"):
        load_serve_config(bad)
    deps[0]["name"] = "Other"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="expected SamMed3DIngress or SamMed3DModel"):
        load_serve_config(bad)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_read_volume_formats_and_truncation(tmp_path, suffix):
    img = sitk.GetImageFromArray(np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7))
    img.SetSpacing((0.5, 1.0, 2.0))
    sitk.WriteImage(img, str(tmp_path / f"a{suffix}"))
    data = (tmp_path / f"a{suffix}").read_bytes()
    out = read_volume(data, "file")
    assert out.GetSize() == (7, 6, 5) and out.GetSpacing() == (0.5, 1.0, 2.0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(img))
    with pytest.raises(VolumeError, match="corrupt"):
        read_volume(data[: len(data) // 2], "file")


def test_read_volume_rejections(tmp_path):
    with pytest.raises(VolumeError, match="empty"):
        read_volume(b"", "e.nii")
    with pytest.raises(VolumeError, match="not a NIfTI"):
        read_volume(b"hello world" * 40, "h.nii.gz")
    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4), np.float32)), str(flat))
    with pytest.raises(VolumeError, match="expected a 3D image") as err:
        read_volume(flat.read_bytes(), "flat.nii.gz")
    assert err.value.status == 422
    vec = tmp_path / "vec.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4, 4, 3), np.float32), isVector=True), str(vec))
    with pytest.raises(VolumeError, match="scalar"):
        read_volume(vec.read_bytes(), "vec.mha")


def test_mask_encodings_round_trip(tmp_path):
    lab = np.random.default_rng(0).integers(0, 3, (4, 5, 6)).astype(np.uint8)
    np.testing.assert_array_equal(decode_mask(encode_mask(lab), lab.shape), lab)
    ref = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.float32))
    ref.SetSpacing((1.0, 2.0, 3.0))
    ref.SetOrigin((5.0, 6.0, 7.0))
    back = read_volume(nifti_bytes(lab, ref), "m.nii.gz")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), lab)
    assert back.GetSpacing() == (1.0, 2.0, 3.0) and np.allclose(back.GetOrigin(), (5.0, 6.0, 7.0))


def test_session_store_ttl_and_cap():
    from raylearn.serve.sessions import Session, SessionNotFound, SessionStore

    store = SessionStore(ttl_s=0.2, max_sessions=2)
    mk = lambda: Session(volume=None, start=(0, 0, 0), size=32, embedding=np.zeros(1))  # noqa: E731
    a, b, c = store.add(mk()), store.add(mk()), store.add(mk())
    with pytest.raises(SessionNotFound):
        store.get(a.session_id)  # evicted by the cap (least recently used)
    assert store.get(c.session_id) is c and len(store) == 2
    time.sleep(0.3)
    with pytest.raises(SessionNotFound):
        store.get(b.session_id)  # expired while idle
    assert store.expired == 2 and len(store) == 0
