"""A real annotation server process for the kill -9 test: its own Ray, Serve on 127.0.0.1:PORT.

Usage: ``python serve_proc.py RUN_DIR PORT ADMIN_TOKEN``; prints ``READY`` once the app answers.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def main() -> None:
    import ray
    from ray import serve

    from raylearn.serve.app import build_app
    from raylearn.serve.config import UserConfig, annotation_serve_config

    run_dir, port, token = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    ray.init(address="local", num_cpus=1, include_dashboard=False, object_store_memory=200 * 1024**2,
             log_to_driver=False)
    cfg = annotation_serve_config(run_dir, [UserConfig(name="root", role="admin", token=token)], name="kill-test",
                                  auth_token_env="RAYLEARN_TEST_UNSET_TOKEN")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name=cfg.name, route_prefix="/")
    print("READY", flush=True)
    while True:
        time.sleep(60)


if __name__ == "__main__":
    main()
