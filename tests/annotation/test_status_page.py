"""The status page at ``/`` in a real browser: headless Chromium (Debian's ``chromium``; ``make chromium`` installs
it) loads the page from a live Ray Serve app, runs its JavaScript (plotly.js from the plotly wheel, the status and
thumbnails fetched with the token), and the rendered DOM is checked against ``/v1/annotation/status``; a screenshot
is saved in the test's temp folder. Plus the page's HTTP side: open shell, token-guarded data, thumbnails."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from html.parser import HTMLParser
from types import SimpleNamespace

import httpx
import pytest

from raylearn.ledger import Ledger
from raylearn.serve.app import build_app
from tests.annotation.test_api import TOKENS, make_run, serve_config
from tests.conftest import pick_free_ports

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (`make chromium` installs it)")


def _round(r: int, n: int, pool: int) -> dict:
    return {"round": r, "selected": [], "n_labeled": n, "fraction_labelled": n / pool, "fg_labelled_voxels": 400 * n,
            "fraction_fg_labelled": 0.9 * n / pool, "timings": {"train_s": 1.0},
            "metrics": {"dice_mean": 0.42 + 0.2 * r, "dice_Anterior": 0.40 + 0.2 * r, "dice_Posterior": 0.44 + 0.2 * r}}


@pytest.fixture(scope="module")
def page(ray_session, hippo_store, tmp_path_factory):
    """A run after two rounds: 2 simulated labels and one by alice, a queue of 4 scored suggestions of which alice
    and bob hold one each, a cached full-pool reference; served on a free port."""
    from ray import serve

    run_dir = tmp_path_factory.mktemp("status_run")
    run = make_run(run_dir, hippo_store)
    pool = run.pool
    for cid in pool[4:6]:
        run.labels.put(cid, hippo_store.get(cid).label, "simulated", "simulated")
    led = Ledger(run_dir / "ledger.jsonl")
    led.append("selected", round=0, ids=pool[4:6], scores=None, strategy="random")
    led.append("round", **_round(0, 2, len(pool)))
    led.append("round", **_round(1, 3, len(pool)))
    led.append("selected", round=2, ids=pool[:4], scores={"entropy": [0.91, 0.82, 0.73, 0.64]}, strategy="entropy")
    run.ws.publish(2, pool[:4], str(run.checkpoint), 1)
    run.ws.acquire(pool[3], "alice", 600)
    run.labels.put(pool[3], hippo_store.get(pool[3]).label, "human", "alice",
                   info={"lease_acquired": time.time() - 90})
    run.ws.release(pool[3])
    run.ws.acquire(pool[1], "alice", 600)
    run.ws.acquire(pool[2], "bob", 600)
    (run_dir / "reference").mkdir()
    (run_dir / "reference" / "reference.json").write_text(json.dumps({"metrics": {"dice_mean": 0.83}}))

    cfg = serve_config(run_dir)
    port = pick_free_ports(1)[0]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name=cfg.name, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    alice = httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {TOKENS['alice']}"})
    yield SimpleNamespace(url=url, run=run, run_dir=run_dir, alice=alice, pool=pool)
    alice.close()
    serve.delete(cfg.name)
    serve.shutdown()


class _Dom(HTMLParser):
    """Text by element id, attributes by id, and counts of tags/classes, from ``--dump-dom`` output."""

    def __init__(self) -> None:
        super().__init__()
        self.text: dict[str, str] = {}
        self.attrs: dict[str, dict[str, str]] = {}
        self.classes: dict[str, int] = {}
        self.imgs: list[dict[str, str]] = []
        self._open: list[str | None] = []

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        for c in a.get("class", "").split():
            self.classes[c] = self.classes.get(c, 0) + 1
        if tag == "img":
            self.imgs.append(a)
        if tag in ("img", "br", "meta", "input", "link", "path", "rect", "line", "circle"):
            if "id" in a:
                self.attrs[a["id"]] = a
            return
        self._open.append(a.get("id"))
        if "id" in a:
            self.attrs[a["id"]] = a
            self.text[a["id"]] = ""

    def handle_endtag(self, tag):
        if self._open and tag not in ("img", "br", "meta", "input", "link", "path", "rect", "line", "circle"):
            self._open.pop()

    def handle_data(self, data):
        for i in self._open:
            if i is not None:
                self.text[i] += data


def _chromium(url: str, *args: str, budget_ms: int = 20000) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
           f"--virtual-time-budget={budget_ms}", *args, url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": "/tmp"})
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_page_shell_is_open_and_its_data_needs_the_token(page):
    html = httpx.get(page.url + "/")
    assert html.status_code == 200 and 'src="ui/plotly.min.js"' in html.text and "v1/annotation/status" in html.text
    js = httpx.get(page.url + "/ui/plotly.min.js")
    assert js.status_code == 200 and len(js.content) > 1_000_000 and b"plotly" in js.content[:2000].lower()
    for path in ("/v1/annotation/status", f"/v1/annotation/thumbnail/{page.pool[0]}"):
        assert httpx.get(page.url + path).status_code == 401
    s = page.alice.get("/v1/annotation/status").json()
    assert (s["state"], s["round"], s["model_version"], s["labelled"], s["reference_dice"]) == \
        ("running", 1, 1, 3, 0.83)
    assert [g["case_id"] for g in s["suggestions"]] == page.pool[:3]  # pool[3] is labelled
    assert s["suggestions"][0]["scores"] == {"entropy": 0.91} and s["suggestions"][1]["leased_by"] == "alice"
    assert {u: [c["case_id"] for c in cs] for u, cs in s["leases_by_user"].items()} == \
        {"alice": [page.pool[1]], "bob": [page.pool[2]]}
    assert [h["case_id"] for h in s["history"]] == [page.pool[3], page.pool[5], page.pool[4]]
    assert s["cost"]["timed_labels"] == 1 and 80 < s["cost"]["annotation_s"] < 200
    assert s["cost"]["fg_labelled_pct"] == pytest.approx(100 * 0.9 * 3 / len(page.pool))
    assert set(s["curve_classes"]) == {"dice_Anterior", "dice_Posterior"}
    png = page.alice.get(f"/v1/annotation/thumbnail/{page.pool[0]}")
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG" and png.headers["x-model-version"] == "1"
    assert page.alice.get("/v1/annotation/thumbnail/hippocampus_999").status_code == 404


@needs_chromium
def test_page_in_headless_chromium_matches_status(page, tmp_path):
    status = page.alice.get("/v1/annotation/status").json()
    url = f"{page.url}/#token={TOKENS['alice']}"
    dom = _Dom()
    html = _chromium(url, "--dump-dom")
    dom.feed(html)
    assert dom.attrs["state"] and "running" in dom.text["state"], dom.text.get("message")
    assert dom.text["round"] == str(status["round"]) and dom.text["model-version"] == str(status["model_version"])
    assert dom.text["labelled"] == str(status["labelled"]) and dom.text["pool"] == str(status["pool"])
    assert dom.text["labelled-pct"] == f"{status['cost']['labelled_pct']:.1f}"
    assert dom.text["fg-pct"] == f"{status['cost']['fg_labelled_pct']:.1f}%"
    # the curve: plotly drew one marker per round on the mean-Dice trace, 3 traces, and the full-pool line
    assert dom.attrs["curve"]["data-points"] == str(len(status["learning_curve"])) == "2"
    assert dom.classes.get("main-svg", 0) >= 1 and dom.classes.get("scatterlayer") == 1
    assert dom.classes.get("trace", 0) >= 3 and dom.classes.get("point", 0) == 2
    assert "full pool 0.830" in dom.text["curve"]
    thumbs = [i for i in dom.imgs if "thumb" in i.get("class", "")]
    assert [i["data-case"] for i in thumbs] == [g["case_id"] for g in status["suggestions"]]
    assert all(i.get("data-loaded") == "1" and i.get("src", "").startswith("blob:") for i in thumbs)
    assert "entropy 0.910" in dom.text["suggestions"] and "bob" in dom.text["suggestions"]
    assert "alice" in dom.text["leases"] and page.pool[2] in dom.text["leases"]
    assert dom.text["history"].count("hippocampus_") == len(status["history"])
    assert TOKENS["alice"] not in html  # the fragment is dropped from the address once read

    shot = tmp_path / "status_page.png"
    _chromium(url, f"--screenshot={shot}", "--window-size=1280,1100")
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 20_000


@needs_chromium
def test_page_shows_nothing_running_and_asks_for_a_token(page):
    run_json = page.run_dir / "annotation" / "run.json"
    run_json.rename(run_json.with_suffix(".away"))
    try:
        dom = _Dom()
        dom.feed(_chromium(f"{page.url}/#token={TOKENS['bob']}", "--dump-dom", budget_ms=8000))
        assert dom.text["state"] == "nothing running" and "Nothing is running" in dom.text["message"]
        assert "raylearn run" in dom.text["message"] and "hidden" in dom.attrs["cards"]
    finally:
        run_json.with_suffix(".away").rename(run_json)
    dom = _Dom()
    dom.feed(_chromium(f"{page.url}/#token=not-a-valid-token", "--dump-dom", budget_ms=8000))
    assert dom.text["state"] == "token needed" and "refused (401)" in dom.text["message"]
    assert "hidden" not in dom.attrs["login"] and "hidden" in dom.attrs["cards"]


def test_thumbnail_overlays_the_prediction_on_the_middle_slice():
    import io

    import numpy as np
    from PIL import Image

    from raylearn.serve.status_page import CLASS_COLOURS, thumbnail_png

    image = np.zeros((1, 9, 20, 10), np.float32)
    image[0, 4, :, :5] = 100.0  # the middle slice: left half bright
    pred = np.zeros((9, 20, 10), np.uint8)
    pred[4, :4, :] = 2
    img = np.asarray(Image.open(io.BytesIO(thumbnail_png(image, pred, size=160))))
    assert img.shape == (160, 80, 3)  # nearest upscale x8 of 20 x 10
    want = 0.55 * 255 + 0.45 * np.array(CLASS_COLOURS[1])  # class 2 over the bright half
    np.testing.assert_allclose(img[0, 0], want, atol=1.5)
    np.testing.assert_array_equal(img[100, 0], [255, 255, 255])
    np.testing.assert_array_equal(img[100, 79], [0, 0, 0])
    plain = np.asarray(Image.open(io.BytesIO(thumbnail_png(image, None, size=160))))
    np.testing.assert_array_equal(plain[0, 0], [255, 255, 255])


def test_status_details_from_workspace_state(tmp_path):
    from raylearn.serve.status_page import status_details

    out = tmp_path / "cmp" / "entropy" / "seed_0"
    out.mkdir(parents=True)
    (tmp_path / "cmp" / "reference").mkdir()
    (tmp_path / "cmp" / "reference" / "reference.json").write_text(json.dumps({"metrics": {"dice_mean": 0.7}}))
    now = time.time()
    run = {"output_dir": str(out), "ledger": str(out / "ledger.jsonl"), "pool_ids": ["a", "b", "c", "d"],
           "started": now - 10}
    lease = SimpleNamespace(user="bob", expires=now + 60)
    rec = [SimpleNamespace(case_id="a", version=1, tag="final", annotator="sim", source="simulated", time=now - 5,
                           foreground_voxels=10, info={}),
           SimpleNamespace(case_id="b", version=1, tag="final", annotator="al", source="human", time=now,
                           foreground_voxels=12, info={"lease_acquired": now - 30})]
    ledger = [{"kind": "selected", "round": 1, "ids": ["b", "c", "d"], "scores": {"margin": [0.1, 0.2, 0.3]}},
              {"kind": "round", **_round(0, 2, 4)}]
    d = status_details(run, {"round": 1, "candidates": ["b", "c", "d"], "updated": now}, {"c": lease}, rec, ledger)
    assert d["state"] == "running" and d["reference_dice"] == 0.7
    assert [(g["case_id"], g["scores"], g["leased_by"]) for g in d["suggestions"]] == \
        [("c", {"margin": 0.2}, "bob"), ("d", {"margin": 0.3}, None)]
    assert d["cost"]["labelled"] == 2 and d["cost"]["labelled_pct"] == 50.0 and d["cost"]["annotation_s"] == 30.0
    assert [h["case_id"] for h in d["history"]] == ["b", "a"] and list(d["leases_by_user"]) == ["bob"]
    (out / "summary.json").write_text(json.dumps({"full_data_dice": 0.75}))
    d = status_details(run, {}, {}, [], ledger)
    assert (d["state"], d["reference_dice"], d["suggestions"]) == ("finished", 0.75, [])
