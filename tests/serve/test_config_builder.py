"""The annotation app's ServeConfig builder (no server)."""

from raylearn.serve.config import DEFAULT_TOKEN_ENV, UserConfig, annotation_serve_config


def test_annotation_serve_config_defaults_and_knobs():
    users = [UserConfig(name="root", role="admin", token="admin-token-0003")]
    cfg = annotation_serve_config("/tmp/run", users)
    assert cfg.name == "raylearn" and cfg.ingress.auth_token_env == DEFAULT_TOKEN_ENV
    assert cfg.ingress.classes == {1: "object"}
    assert cfg.ingress.annotation.run_dir == "/tmp/run" and cfg.ingress.annotation.users == users
    assert (cfg.model.model.preset, cfg.model.model.device) == ("small", "cpu")
    assert cfg.ingress_options.as_kwargs() == {"ray_actor_options": {"num_cpus": 0}}
    assert cfg.model_options.as_kwargs() == {"ray_actor_options": {"num_cpus": 0}}

    cfg = annotation_serve_config("/tmp/run", users, name="x", classes={2: "b"}, auth_token_env="UNSET",
                                  ingress_env_vars={"T": "v"}, lease_s=5.0, require_lease=False)
    assert (cfg.name, cfg.ingress.classes, cfg.ingress.auth_token_env) == ("x", {2: "b"}, "UNSET")
    assert (cfg.ingress.annotation.lease_s, cfg.ingress.annotation.require_lease) == (5.0, False)
    assert cfg.ingress_options.ray_actor_options == {"num_cpus": 0, "runtime_env": {"env_vars": {"T": "v"}}}
    assert cfg.model_options.ray_actor_options == {"num_cpus": 0}
