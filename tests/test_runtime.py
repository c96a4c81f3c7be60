"""Local Ray start-up: a start-up that timed out is retried once, and what it left running is stopped."""

from __future__ import annotations

import subprocess

import psutil
import pytest
import ray

from raylearn import runtime


class _FakeInit:
    """``ray.init`` whose first calls start a child (a raylet stand-in) and then fail like Ray's start-up."""

    def __init__(self, errors: list[str]) -> None:
        self.errors, self.calls, self.children = list(errors), 0, []

    def __call__(self, **kwargs) -> None:
        self.calls += 1
        self.kwargs = kwargs
        if self.errors:
            self.children.append(subprocess.Popen(["sleep", "300"]))
            raise RuntimeError(self.errors.pop(0))


@pytest.fixture
def fake_ray(monkeypatch):
    def install(errors: list[str]) -> _FakeInit:
        fake = _FakeInit(errors)
        monkeypatch.setattr(ray, "init", fake)
        monkeypatch.setattr(ray, "shutdown", lambda: None)  # never the session's real Ray
        return fake

    return install


def _gone(proc: subprocess.Popen) -> bool:
    return proc.poll() is not None or not psutil.pid_exists(proc.pid)


def test_a_timed_out_start_is_retried_and_its_processes_stopped(fake_ray):
    fake = fake_ray(["The current node timed out during startup. This could happen because ..."])
    runtime.start_local_ray(2, runtime_env={"env_vars": {"X": "1"}})
    assert fake.calls == 2
    assert fake.kwargs["address"] == "local" and fake.kwargs["num_cpus"] == 2
    assert fake.kwargs["runtime_env"] == {"env_vars": {"X": "1"}}
    assert all(_gone(p) for p in fake.children)


def test_another_start_error_is_raised_at_once_and_cleaned_up(fake_ray):
    fake = fake_ray(["Failed to bind port 6379"])
    with pytest.raises(RuntimeError, match="bind port"):
        runtime.start_local_ray(2)
    assert fake.calls == 1
    assert all(_gone(p) for p in fake.children)


def test_two_timeouts_give_up_with_rays_error(fake_ray):
    fake = fake_ray(["timed out during startup (1)", "timed out during startup (2)"])
    with pytest.raises(RuntimeError, match=r"\(2\)"):
        runtime.start_local_ray(1)
    assert fake.calls == 2
    assert all(_gone(p) for p in fake.children)
