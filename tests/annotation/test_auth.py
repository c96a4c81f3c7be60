"""Users, tokens and roles of the annotation API (no Ray): config validation and the guard's identification."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from raylearn.serve.annotation import users_from_config
from raylearn.serve.config import AnnotationConfig, UserConfig
from raylearn.serve.guard import Guard, User, token_digest


def test_user_config_needs_exactly_one_token_source():
    with pytest.raises(ValidationError, match="exactly one of token, token_env, token_sha256"):
        UserConfig(name="a", token="secret-token-1", token_env="X")
    with pytest.raises(ValidationError, match="exactly one"):
        UserConfig(name="a")
    with pytest.raises(ValidationError, match="role"):
        UserConfig(name="a", role="superuser", token="secret-token-1")
    with pytest.raises(ValidationError, match="token_sha256"):
        UserConfig(name="a", token_sha256="not-hex")


def test_users_from_config_and_identification(monkeypatch):
    monkeypatch.setenv("RAYLEARN_TEST_TOKEN_B", "bee-token-0002")
    cfg = AnnotationConfig(run_dir="/x", users=[
        UserConfig(name="ann", token="ann-token-0001"),
        UserConfig(name="bee", token_env="RAYLEARN_TEST_TOKEN_B"),
        UserConfig(name="boss", role="admin", token_sha256=token_digest("boss-token-0003"))])
    guard = Guard()
    guard.users = users_from_config(cfg)
    guard.configure(None, None, "RAYLEARN_TEST_UNSET", False, 1.0, announce=False)
    assert guard.enabled and not guard.warnings
    assert guard.identify("Bearer ann-token-0001") == User("ann", "annotator")
    assert guard.identify("Bearer bee-token-0002") == User("bee", "annotator")
    boss = guard.identify("bearer boss-token-0003")
    assert boss == User("boss", "admin") and boss.has("annotator") and boss.has("admin")
    assert not guard.identify("Bearer ann-token-0001").has("admin")
    assert guard.identify("Bearer nope-token-000") is None and guard.identify(None) is None
    assert guard.identify("Basic ann-token-0001") is None
    # the service token is an admin; with neither token nor users, everybody is the anonymous admin
    guard.configure("service-token-9", None, "RAYLEARN_TEST_UNSET", False, 1.0, announce=False)
    assert guard.identify("Bearer service-token-9") == User("service", "admin")
    open_guard = Guard()
    open_guard.configure(None, None, "RAYLEARN_TEST_UNSET", False, 1.0, announce=False)
    assert open_guard.identify(None) == User("anonymous", "admin") and open_guard.warnings


def test_missing_token_env_and_shared_tokens_are_errors():
    with pytest.raises(ValueError, match="RAYLEARN_TEST_NOT_SET is unset"):
        users_from_config(AnnotationConfig(run_dir="/x",
                                           users=[UserConfig(name="a", token_env="RAYLEARN_TEST_NOT_SET")]))
    with pytest.raises(ValueError, match="the same token as user 'a'"):
        users_from_config(AnnotationConfig(run_dir="/x", users=[UserConfig(name="a", token="same-token-1"),
                                                                UserConfig(name="b", token="same-token-1")]))
