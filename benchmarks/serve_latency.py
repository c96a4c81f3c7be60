"""Serve latency of the SAM-Med3D endpoint (small CPU variant) over real HTTP.

Measures, in one run on one machine:
  * p50/p95 latency of a first request (one-shot ``/v1/segment`` on a new volume: encoder + decoder) and of a
    follow-up click in a session (decoder only), and their ratio;
  * throughput with 4 concurrent clients, ``@serve.batch`` on vs off (redeploy with the other user_config),
    for first requests and for follow-up clicks, with the mean batch size the model replica saw;
  * in process (no HTTP): encoder vs prompt encoder + decoder of the small and of the full 100.5 M model on CPU.

    python benchmarks/serve_latency.py [--n 20] [--preset small] [--out benchmarks/results/serve_latency.json]
"""

import argparse
import datetime as dt
import json
import os
import platform
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import SimpleITK as sitk

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "2")
HIPPO = Path(__file__).resolve().parents[2] / "shared" / "data" / "msd_hippocampus"


def _volume() -> tuple[sitk.Image, list[int], str]:
    """A real hippocampus MRI (when present) or a phantom; and a click at the label's/blob's centre."""
    labels = sorted((HIPPO / "labelsTr").glob("*.nii.gz")) if HIPPO.is_dir() else []
    if labels:
        img = sitk.ReadImage(str(HIPPO / "imagesTr" / labels[0].name), sitk.sitkFloat32)
        lab = sitk.GetArrayFromImage(sitk.ReadImage(str(labels[0])))
        return img, [int(v) for v in np.argwhere(lab == 1).mean(0).round()], f"msd_hippocampus/{labels[0].name}"
    z, y, x = np.indices((36, 48, 36))
    arr = 100.0 * (((z - 18) ** 2 + (y - 24) ** 2 + (x - 18) ** 2) < 64) + 10
    return sitk.GetImageFromArray(arr.astype(np.float32)), [18, 24, 18], "phantom 36x48x36"


def _variant(img: sitk.Image, seed: int, tmp: Path) -> bytes:
    """The volume with a tiny seeded perturbation: a new hash, so the server must run the encoder again."""
    arr = sitk.GetArrayFromImage(img) + np.random.default_rng(seed).normal(0, 1e-3, img.GetSize()[::-1])
    out = sitk.GetImageFromArray(arr.astype(np.float32))
    out.CopyInformation(img)
    path = tmp / f"v{seed}.nii.gz"
    sitk.WriteImage(out, str(path))
    return path.read_bytes()


def _pct(xs: list[float]) -> dict:
    a = np.asarray(xs) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)), "n": len(xs)}


def _model_only(preset: str, n: int) -> dict:
    """Encoder vs prompt encoder + mask decoder, in this process (no HTTP), random weights, CPU."""
    import torch

    from raylearn.models.sam_med3d import SamMed3D, SamMed3DConfig

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    m = SamMed3D(SamMed3DConfig(preset=preset, device="cpu"))
    s = m.image_size
    w = np.random.default_rng(0).normal(size=(1, s, s, s)).astype(np.float32)
    emb = m.encode(w)  # warm-up
    enc, dec = [], []
    for _ in range(n):
        t = time.perf_counter()
        emb = m.encode(w)
        enc.append(time.perf_counter() - t)
    low = None
    for i in range(max(n, 5)):
        t = time.perf_counter()
        low = m.decode(emb, [np.array([[s / 2, s / 2, s / 2 + i % 3]])], [np.array([1])], [low[0] if low is not None
                                                                                          else None])
        dec.append(time.perf_counter() - t)
    e, d = _pct(enc), _pct(dec)
    return {"parameters": m.num_parameters, "input_size": s, "encoder": e, "decoder": d,
            "ratio_p50": e["p50_ms"] / d["p50_ms"]}


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20, help="requests per latency figure")
    ap.add_argument("--throughput-requests", type=int, default=40, help="requests per throughput figure")
    ap.add_argument("--preset", default="small", choices=["small", "full"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"], help="device of the served model")
    ap.add_argument("--full-runs", type=int, default=3, help="in-process encoder runs of the full model (0: skip)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve_latency.json"))
    args = ap.parse_args()

    import httpx
    import ray
    from ray import serve

    from raylearn.models.sam_med3d import SamMed3DConfig
    from raylearn.serve.app import build_app
    from raylearn.serve.config import DeploymentOptions, IngressConfig, ModelDeploymentConfig, ServeConfig

    img, click, source = _volume()
    tmp = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=1024**3, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    def config(batching: bool) -> ServeConfig:
        model = ModelDeploymentConfig(model=SamMed3DConfig(preset=args.preset, device=args.device),
                                      batching={"enabled": batching, "max_batch_size": 4,
                                                "batch_wait_timeout_s": 0.01})
        return ServeConfig(name="bench", ingress=IngressConfig(classes={1: "anterior", 2: "posterior"},
                                                                 embedding_cache_size=4, max_sessions=64),
                           model=model, ingress_options=DeploymentOptions(ray_actor_options={"num_cpus": 0}),
                           model_options=DeploymentOptions(ray_actor_options={"num_cpus": 0,
                                                                             "num_gpus": int(args.device == "cuda")}))

    serve.run(build_app(config(True)), name="bench", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    clicks = json.dumps([{"label": 1, "voxel": click}])
    seed = iter(range(10**6))
    volumes = {}

    def vol() -> bytes:
        s = next(seed)
        volumes[s] = _variant(img, s, tmp)
        return volumes.pop(s)

    def first(c: httpx.Client) -> float:
        data = vol()
        t = time.perf_counter()
        r = c.post("/v1/segment", files={"file": ("v.nii.gz", data)}, data={"clicks": clicks})
        r.raise_for_status()
        return time.perf_counter() - t

    def session(c: httpx.Client) -> str:
        r = c.post("/v1/sessions", files={"file": ("v.nii.gz", vol())})
        r.raise_for_status()
        return r.json()["session_id"]

    def follow(c: httpx.Client, sid: str, i: int) -> float:
        body = {"clicks": [{"label": 1, "positive": bool(i % 2 == 0), "voxel": [v + (i % 3) for v in click]}]}
        t = time.perf_counter()
        c.post(f"/v1/sessions/{sid}/clicks", json=body).raise_for_status()
        return time.perf_counter() - t

    def info(c: httpx.Client) -> dict:
        return c.get("/v1/info").json()["model"]

    with httpx.Client(base_url=base, timeout=300) as c:
        for _ in range(3):  # warm-up
            first(c)
        lat_first = [first(c) for _ in range(args.n)]
        sid = session(c)
        lat_click = [follow(c, sid, i) for i in range(args.n)]

    def throughput(batching: bool, kind: str) -> dict:
        serve.run(build_app(config(batching)), name="bench", route_prefix="/")  # live reconfigure
        clients = [httpx.Client(base_url=base, timeout=300) for _ in range(4)]
        sids = [session(cl) for cl in clients] if kind == "click" else []
        before = info(clients[0])
        per = args.throughput_requests // 4

        def work(k: int) -> None:
            for i in range(per):
                first(clients[k]) if kind == "first" else follow(clients[k], sids[k], i)

        t = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(work, range(4)))
        wall = time.perf_counter() - t
        after = info(clients[0])
        for cl in clients:
            cl.close()
        calls = "encoder" if kind == "first" else "decoder"
        n_calls = after[f"{calls}_calls"] - before[f"{calls}_calls"]
        n_batches = after["batching"][f"{calls[:6]}_batches"] - before["batching"][f"{calls[:6]}_batches"]
        return {"requests": per * 4, "wall_s": wall, "requests_per_s": per * 4 / wall,
                f"mean_{calls}_batch": n_calls / max(n_batches, 1)}

    tp = {kind: {"batching_on": throughput(True, kind), "batching_off": throughput(False, kind)}
          for kind in ("first", "click")}
    for v in tp.values():
        v["speedup_on_vs_off"] = v["batching_on"]["requests_per_s"] / v["batching_off"]["requests_per_s"]
    with httpx.Client(base_url=base, timeout=60) as c:
        model = info(c)
    serve.shutdown()
    ray.shutdown()

    first_p, click_p = _pct(lat_first), _pct(lat_click)
    model_only = {p: _model_only(p, n) for p, n in (("small", args.n), ("full", args.full_runs)) if n > 0}
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "processor": platform.processor(),
                    "load_avg_1m_at_end": os.getloadavg()[0]},
        "model": {"preset": args.preset, "parameters": model["parameters"], "input_size": model["input_size"],
                  "architecture": model["architecture"], "device": model["device"]},
        "volume": {"source": source, "shape": list(img.GetSize()[::-1]), "spacing_xyz_mm": list(img.GetSpacing())},
        "latency": {"first_request_encoder_plus_decoder": first_p, "follow_up_click_decoder_only": click_p,
                    "ratio_first_over_click_p50": first_p["p50_ms"] / click_p["p50_ms"],
                    "ratio_first_over_click_p95": first_p["p95_ms"] / click_p["p95_ms"]},
        "throughput_4_clients": tp,
        "model_only_in_process": model_only,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    lat = result["latency"]
    print(f"SAM-Med3D serve latency ({args.preset}, {model['parameters']:,} params, {source})")
    print(f"  first request (encoder+decoder): p50 {first_p['p50_ms']:.1f} ms  p95 {first_p['p95_ms']:.1f} ms")
    print(f"  follow-up click (decoder only):  p50 {click_p['p50_ms']:.1f} ms  p95 {click_p['p95_ms']:.1f} ms")
    print(f"  ratio first/click: p50 {lat['ratio_first_over_click_p50']:.2f}x  "
          f"p95 {lat['ratio_first_over_click_p95']:.2f}x")
    for kind, v in tp.items():
        on, off = v["batching_on"], v["batching_off"]
        print(f"  4 clients, {kind:5s}: batching on {on['requests_per_s']:.2f} req/s vs off "
              f"{off['requests_per_s']:.2f} req/s ({v['speedup_on_vs_off']:.2f}x)")
    for p, m in model_only.items():
        print(f"  in-process {p} ({m['parameters']:,} params): encoder p50 {m['encoder']['p50_ms']:.1f} ms, "
              f"prompt encoder + decoder p50 {m['decoder']['p50_ms']:.1f} ms ({m['ratio_p50']:.2f}x)")
    print(f"written {args.out}")
    return result


if __name__ == "__main__":
    main()
