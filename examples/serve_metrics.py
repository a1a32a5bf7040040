"""Serve an engine's Prometheus metrics on 127.0.0.1 while it pushes an alert.

    pip install "geotarget[metrics]"
    python examples/serve_metrics.py --port 9464 --hold 30
    curl -s http://127.0.0.1:9464/metrics | grep ^geotarget_

It builds a small population around Hangzhou, reports a missing child, runs the
ticks of the radius schedule (acknowledging every push, as a dispatcher would)
and closes the alert, while ``prometheus_client.start_http_server`` serves the
engine's own registry.  It then reads its own endpoint back once and prints the
``geotarget_`` series.  ``docs/operations.md`` ("Metrics") lists them.
"""
from __future__ import annotations

import argparse
import datetime as dt
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from prometheus_client import start_http_server

import geotarget as gt
from geotarget.alerts.metrics import EngineMetrics

UTC = dt.timezone.utc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=9464, help="0: any free port")
    ap.add_argument("--devices", type=int, default=200_000)
    ap.add_argument("--hold", type=float, default=0.0, help="seconds to keep serving at the end")
    args = ap.parse_args()

    t0 = dt.datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
    rng = np.random.default_rng(0)
    n = args.devices
    store = gt.DeviceStore.from_arrays(np.arange(n, dtype=np.uint64) + 1, 30.27 + rng.uniform(-5, 5, n),
                                       120.15 + rng.uniform(-5, 5, n), app=rng.choice(["amap", "weibo"], n),
                                       last_seen=t0)
    officers = gt.Authority([gt.Officer("city-1", level="city", division="330100")])
    metrics = EngineMetrics()
    # Loopback only: the node's Prometheus agent or a reverse proxy reaches it there.
    server, _thread = start_http_server(args.port, addr="127.0.0.1", registry=metrics.registry)
    with tempfile.TemporaryDirectory() as tmp:
        engine = gt.AlertEngine(gt.SpatialIndex.build(store), log=gt.RecipientLog(Path(tmp) / "log"),
                                authority=officers, metrics=metrics)
        alert = engine.report("city-1", lat=30.27, lon=120.15, division="330100", missing_since=t0,
                              now=t0).id
        for minutes in (1, 90, 150, 200):
            for push in engine.tick(t0 + dt.timedelta(minutes=minutes)):
                metrics.batches(push)            # what a dispatcher sends, timed
                engine.ack(push.push_id)
        engine.ack(engine.close(alert, "city-1", "lost", now=t0 + dt.timedelta(hours=4)).push_id)
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10).read().decode()
        print("\n".join(line for line in body.splitlines() if line.startswith("geotarget_")
                        and "_bucket" not in line and "_created" not in line))
        time.sleep(args.hold)
        engine.shutdown()
    server.shutdown()


if __name__ == "__main__":
    main()
