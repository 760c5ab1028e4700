"""A tiny model server: answers with its region, pool and version, with fault knobs.

The "model" is a fixed linear scorer whose weights depend on the version, so v1 and v2
really answer differently. Fault knobs can be changed while it runs, with `POST /fault` and any of
`{"error_rate": 0.2, "latency_ms": 300, "healthy": false, "shadow_error_rate": 1.0}`:
`healthy: false` fails its health check; `shadow_error_rate` applies only to requests
that Envoy mirrored (their Host carries Envoy's `-shadow` suffix). `GET /stats` counts
user and shadow requests apart, so a test can tell which ones reached it.
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

MODEL_WEIGHTS = {"v1": (0.4, 0.3, 0.3), "v2": (0.5, 0.2, 0.3)}


def score(version: str, features: tuple[float, float, float]) -> float:
    weights = MODEL_WEIGHTS.get(version, (1 / 3, 1 / 3, 1 / 3))
    return round(sum(w * x for w, x in zip(weights, features, strict=True)), 6)


@dataclass
class Faults:
    error_rate: float = 0.0
    latency_ms: float = 0.0
    healthy: bool = True
    shadow_error_rate: float = 0.0


class ModelServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], region: str, pool: str, version: str) -> None:
        super().__init__(address, _Handler)
        self.region, self.pool, self.version = region, pool, version
        self.faults = Faults()
        self.requests = 0
        self.shadow_requests = 0
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def count(self, shadow: bool) -> None:
        with self._lock:
            if shadow:
                self.shadow_requests += 1
            else:
                self.requests += 1

    def start_in_thread(self) -> ModelServer:
        threading.Thread(
            target=self.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"upstream-{self.port}",
            daemon=True,
        ).start()
        return self


class _Handler(BaseHTTPRequestHandler):
    server: ModelServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as two writes

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.send_header("x-pool", self.server.pool)
        self.send_header("x-region", self.server.region)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        url = urlparse(self.path)
        faults = self.server.faults
        if url.path == "/healthz":
            self._reply(200 if faults.healthy else 503, {"ok": faults.healthy})
            return
        if url.path == "/stats":
            s = self.server
            self._reply(200, {"user_requests": s.requests, "shadow_requests": s.shadow_requests})
            return
        shadow = "-shadow" in (self.headers.get("host") or "")
        self.server.count(shadow)
        if faults.latency_ms:
            time.sleep(faults.latency_ms / 1000)
        ident = {
            "region": self.server.region,
            "pool": self.server.pool,
            "version": self.server.version,
        }
        error_rate = faults.shadow_error_rate if shadow else faults.error_rate
        if error_rate and random.random() < error_rate:
            self._reply(503, {**ident, "error": "injected fault"})
            return
        q = parse_qs(url.query)
        x = tuple(float(q.get(k, ["1"])[0]) for k in ("a", "b", "c"))
        self._reply(200, {**ident, "score": score(self.server.version, x)})  # type: ignore[arg-type]

    def do_POST(self) -> None:
        if urlparse(self.path).path != "/fault":
            self._reply(404, {"error": "not found"})
            return
        length = int(self.headers.get("content-length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
            faults = self.server.faults
            faults.error_rate = float(body.get("error_rate", faults.error_rate))
            faults.latency_ms = float(body.get("latency_ms", faults.latency_ms))
            faults.healthy = bool(body.get("healthy", faults.healthy))
            faults.shadow_error_rate = float(
                body.get("shadow_error_rate", faults.shadow_error_rate)
            )
        except (ValueError, TypeError, AttributeError) as exc:
            self._reply(400, {"error": f"bad fault request: {exc}"})
            return
        self._reply(200, asdict(faults))


def main() -> None:
    p = argparse.ArgumentParser(description="a tiny model server for the lab")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--region", required=True)
    p.add_argument("--pool", required=True)
    p.add_argument("--version", required=True)
    a = p.parse_args()
    ModelServer((a.host, a.port), a.region, a.pool, a.version).serve_forever()


if __name__ == "__main__":
    main()
