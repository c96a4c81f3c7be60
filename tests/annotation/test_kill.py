"""kill -9 of the server while labels stream in: every label answered with 200 is in the store afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import SimpleITK as sitk

from raylearn.annotation.labels import LabelStore
from tests.annotation.test_api import make_run, put_label
from tests.conftest import pick_free_ports

TOKEN = "root-kill-token-01"


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the server and every process it started (Ray's GCS, raylet, workers, the Serve replicas) at once."""
    parent = psutil.Process(proc.pid)
    procs = [parent, *parent.children(recursive=True)]
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def test_kill_9_of_the_server_loses_no_acknowledged_label(hippo_store, tmp_path):
    run_dir = tmp_path / "run"
    run = make_run(run_dir, hippo_store)
    port = pick_free_ports(1)[0]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("serve_proc.py")), str(run_dir), str(port),
                             TOKEN], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    acked: list[tuple[str, int, str]] = []
    try:
        deadline = time.monotonic() + 240
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30,
                              headers={"Authorization": f"Bearer {TOKEN}"})
        while time.monotonic() < deadline:
            try:
                if client.get("/datastore/").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(1)
        else:
            raise AssertionError("the server did not come up in 240 s")
        # the labels to stream: each pool case's GT, then a correction (one voxel more) of each: versions 1 and 2
        uploads = []
        for cid in run.pool:
            good = sitk.ReadImage(str(hippo_store.manifest.set_index("case_id").loc[cid, "label_path"]))
            arr = sitk.GetArrayFromImage(good)
            fixed = arr.copy()
            fixed[tuple(int(n) // 2 for n in arr.shape)] = 1
            for a in (arr, fixed):
                img = sitk.GetImageFromArray(a)
                img.CopyInformation(good)
                path = tmp_path / f"{cid}_{len(uploads)}.nii.gz"
                sitk.WriteImage(img, str(path))
                uploads.append((cid, path.read_bytes()))
        stop = threading.Event()

        def stream() -> None:
            for cid, data in uploads:
                if stop.is_set():
                    return
                try:
                    r = put_label(client, cid, data)
                except httpx.HTTPError:
                    return  # the server died mid-request: not acknowledged
                if r.status_code == 200:
                    acked.append((cid, r.json()["version"], r.json()["sha256"]))

        t = threading.Thread(target=stream)
        t.start()
        while len(acked) < len(uploads) // 2 and t.is_alive():
            time.sleep(0.01)
        _kill_tree(proc)  # mid-stream
        stop.set()
        t.join(60)
    finally:
        if proc.poll() is None:
            _kill_tree(proc)
    assert len(acked) >= len(uploads) // 2
    store = LabelStore(run_dir / "labels")  # a fresh reader after the crash
    for cid, version, sha in acked:
        [rec] = [r for r in store.history(cid) if r.version == version]
        assert rec.sha256 == sha
        arr = store.read(cid, version=version)  # file present and matching its record
        assert arr.shape == hippo_store.get(cid).label.shape
    # what the store holds is exactly what was acknowledged, plus at most the one upload in flight at the kill
    assert len(store.records()) - len(acked) in (0, 1)
    assert np.array_equal(store.read(acked[0][0], version=1), hippo_store.get(acked[0][0]).label)
