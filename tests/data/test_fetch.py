"""MSD fetch, offline: a small task archive served by a real local HTTP server (and a file:// URL)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import tarfile
import threading

import pytest

from raylearn.data.fetch import MSD_BASE_URL, MSD_TASKS, FetchError, fetch_msd, msd_task_name, msd_url
from raylearn.data.phantom import make_phantom_dataset
from raylearn.data.readers import discover_dataset


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base_url, folder, md5) of a local HTTP server holding Task04_Hippocampus.tar (3 phantom cases)."""
    root = tmp_path_factory.mktemp("msd_mirror")
    task = make_phantom_dataset(root / "src" / "Task04_Hippocampus", n_cases=3, shape=(12, 12, 12))
    (root / "srv").mkdir()
    archive = root / "srv" / "Task04_Hippocampus.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(task, arcname="Task04_Hippocampus")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    handler = functools.partial(_Quiet, directory=str(root / "srv"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root / "srv", md5
    server.shutdown()
    server.server_close()


def test_task_names():
    assert len(MSD_TASKS) == 10 and MSD_TASKS[3] == "Task04_Hippocampus"
    assert msd_task_name("task04") == msd_task_name("TASK04_HIPPOCAMPUS") == "Task04_Hippocampus"
    assert msd_url("Task09_Spleen") == f"{MSD_BASE_URL}/Task09_Spleen.tar"
    with pytest.raises(ValueError, match="unknown MSD task 'Task11_Brain'; expected one of: Task01_BrainTumour"):
        fetch_msd("Task11_Brain", "/nonexistent")


def test_fetch_over_http(served, tmp_path):
    url, _, md5 = served
    path = fetch_msd("Task04", tmp_path, base_url=url, md5=md5, progress=False)
    assert path == tmp_path / "Task04_Hippocampus"
    info = discover_dataset(path)
    assert info.layout == "msd" and len(info.cases) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Task04_Hippocampus"]  # archive and temp removed
    # present already: no network needed the second time
    assert fetch_msd("Task04_Hippocampus", tmp_path, base_url="http://127.0.0.1:9", progress=False) == path


def test_bad_checksum(served, tmp_path):
    url, _, _ = served
    with pytest.raises(FetchError, match=r"Task04_Hippocampus\.tar: fetch failed: .*md5"):
        fetch_msd("Task04_Hippocampus", tmp_path, base_url=url, md5="0" * 32, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_missing_archive(served, tmp_path):
    url, _, _ = served
    with pytest.raises(FetchError, match=r"Task02_Heart\.tar: fetch failed: .*404"):
        fetch_msd("Task02_Heart", tmp_path, base_url=url, progress=False)
    assert not (tmp_path / "Task02_Heart").exists()


def test_fetch_from_file_url(served, tmp_path):
    _, folder, md5 = served
    path = fetch_msd("Task04_Hippocampus", tmp_path, base_url=folder.as_uri(), md5=md5, progress=False)
    assert (path / "dataset.json").is_file() and len(list((path / "imagesTr").iterdir())) == 3


def test_archive_without_task_folder(tmp_path):
    (tmp_path / "srv").mkdir()
    (tmp_path / "junk.txt").write_text("x")
    with tarfile.open(tmp_path / "srv" / "Task05_Prostate.tar", "w") as tar:
        tar.add(tmp_path / "junk.txt", arcname="Task05_Prostate/junk.txt")
    with pytest.raises(FetchError, match=r"does not contain Task05_Prostate/dataset\.json"):
        fetch_msd("Task05", tmp_path / "dest", base_url=(tmp_path / "srv").as_uri(), progress=False)
    assert list((tmp_path / "dest").iterdir()) == []
