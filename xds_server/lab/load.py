"""A bounded load generator: a steady request rate through each Envoy, every result kept.

Each target gets its own thread and keep-alive connection. Load is bounded both in time
(`max_seconds`) and in count (`max_requests` per target); it also stops on `stop()`.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Result:
    time: float
    target: str
    status: int
    """HTTP status; 0 when the request failed before any response (connection error)."""
    pool: str
    latency_s: float


@dataclass
class LoadGenerator:
    targets: dict[str, str]
    """label -> HOST:PORT of an Envoy listener."""
    rate: float = 50.0
    """Requests per second per target."""
    max_seconds: float = 600.0
    max_requests: int = 100_000
    path: str = "/predict?a=1&b=2&c=3"
    results: list[Result] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> LoadGenerator:
        for label, address in self.targets.items():
            t = threading.Thread(
                target=self._run, args=(label, address), daemon=True, name=f"load-{label}"
            )
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)

    def _run(self, label: str, address: str) -> None:
        host, port = address.rsplit(":", 1)
        conn: http.client.HTTPConnection | None = None
        start = time.monotonic()
        period = 1.0 / self.rate
        for i in range(self.max_requests):
            if self._stop.is_set() or time.monotonic() - start > self.max_seconds:
                break
            delay = start + i * period - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                break
            t0 = time.monotonic()
            status, pool = 0, ""
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(host, int(port), timeout=5)
                conn.request("GET", self.path)
                resp = conn.getresponse()
                body = resp.read()
                status = resp.status
                if status == 200:
                    pool = json.loads(body).get("pool", "")
            except (OSError, http.client.HTTPException, ValueError):
                if conn is not None:
                    conn.close()
                conn = None
            with self._lock:
                self.results.append(Result(time.time(), label, status, pool, time.monotonic() - t0))
        if conn is not None:
            conn.close()

    def snapshot(self) -> list[Result]:
        with self._lock:
            return list(self.results)

    def statuses(self, since: float = 0.0) -> Counter[int]:
        return Counter(r.status for r in self.snapshot() if r.time >= since)

    def failures(self, since: float = 0.0) -> list[Result]:
        return [r for r in self.snapshot() if r.time >= since and r.status != 200]
