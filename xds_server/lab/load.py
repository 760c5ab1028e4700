"""A bounded load generator: a steady request rate through each Envoy, every result kept.

Each target gets a scheduler thread that sends at `rate` requests per second through a
pool of at most `max_in_flight` worker threads, each with its own keep-alive connection,
so a stalled request does not hold up the next ones. Load is bounded in time
(`max_seconds`), in count (`max_requests` per target) and in concurrency; every request
has a client timeout (`timeout_s`); it also stops on `stop()`.

Each request carries model inputs and a tenant, both deterministic: the features
`?a=..&b=..&c=..` are drawn from N(0, 1) by a generator seeded with `seed` (so every
target gets the same sequence), and request i of a target carries the header
`x-tenant: tenants[i % len(tenants)]` (by default "gold" on every 10th request from
the first, "free" on the rest; no header when `tenants` is empty).
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlencode

TENANT_HEADER = "x-tenant"
DEFAULT_TENANTS: tuple[str, ...] = ("gold", *("free",) * 9)
CLIENT_TIMEOUT_S = 2.0
"""Shorter than Envoy's route timeout (15 s: the builder sets none), so a request that an
upstream stalls is cancelled by its caller, as a user's client would, and Envoy never
answers it: it shows in the cluster's `upstream_rq_total` but neither in its 5xx count
nor in its request-time histogram."""
MAX_BURST_S = 1.0
"""After falling behind (every worker busy), catch up on at most this much of the schedule."""


@dataclass(frozen=True)
class Result:
    time: float
    target: str
    status: int
    """HTTP status; 0 when the request failed before any response (see `error`)."""
    pool: str
    latency_s: float
    tenant: str = ""
    error: str = ""
    """"timeout" (no answer within the client timeout: the caller gave up and closed the
    connection), "connection" (refused, reset, malformed); "" with a response."""


def draw_features(rng: random.Random) -> tuple[float, float, float]:
    """One request's model inputs."""
    return (round(rng.gauss(0, 1), 4), round(rng.gauss(0, 1), 4), round(rng.gauss(0, 1), 4))


@dataclass
class LoadGenerator:
    targets: dict[str, str]
    """label -> HOST:PORT of an Envoy listener (or of a model server, directly)."""
    rate: float = 50.0
    """Requests per second per target."""
    max_seconds: float = 600.0
    max_requests: int = 100_000
    path: str = "/predict"
    timeout_s: float = CLIENT_TIMEOUT_S
    """Each request's client timeout (connecting, and waiting for each read)."""
    max_in_flight: int = 64
    """Requests outstanding at once per target; when all are, the schedule waits."""
    tenants: tuple[str, ...] = DEFAULT_TENANTS
    seed: int = 0
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
            t.join(self.timeout_s + 10)

    def _run(self, label: str, address: str) -> None:
        """The schedule of one target: a slot and a worker per request."""
        rng = random.Random(self.seed)
        slots = threading.Semaphore(self.max_in_flight)
        conns = _Connections(address, self.timeout_s)
        start = time.monotonic()
        next_at = start
        with ThreadPoolExecutor(self.max_in_flight, thread_name_prefix=f"load-{label}") as pool:
            for i in range(self.max_requests):
                features = draw_features(rng)
                if not self._wait_until(next_at, start) or not self._take(slots, start):
                    break
                next_at = max(next_at + 1.0 / self.rate, time.monotonic() - MAX_BURST_S)
                tenant = self.tenants[i % len(self.tenants)] if self.tenants else ""
                pool.submit(self._send, label, conns, features, tenant, slots)
        conns.close_all()

    def _running(self, start: float) -> bool:
        return not self._stop.is_set() and time.monotonic() - start <= self.max_seconds

    def _wait_until(self, at: float, start: float) -> bool:
        delay = at - time.monotonic()
        if delay > 0 and self._stop.wait(delay):
            return False
        return self._running(start)

    def _take(self, slots: threading.Semaphore, start: float) -> bool:
        while not slots.acquire(timeout=0.1):
            if not self._running(start):
                return False
        return True

    def _send(
        self,
        label: str,
        conns: _Connections,
        features: tuple[float, float, float],
        tenant: str,
        slots: threading.Semaphore,
    ) -> None:
        t0 = time.monotonic()
        status, pool, error = 0, "", ""
        conn = conns.mine()
        query = urlencode(dict(zip(("a", "b", "c"), features, strict=True)))
        headers = {TENANT_HEADER: tenant} if tenant else {}
        try:
            conn.request("GET", f"{self.path}?{query}", headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            status = resp.status
            if status == 200:
                pool = json.loads(body).get("pool", "")
        except TimeoutError:
            error = "timeout"
        except (OSError, http.client.HTTPException, ValueError):
            error = "connection"
        finally:
            if error:
                conn.close()  # the caller hangs up: Envoy resets the upstream request
            slots.release()
        result = Result(time.time(), label, status, pool, time.monotonic() - t0, tenant, error)
        with self._lock:
            self.results.append(result)

    def snapshot(self) -> list[Result]:
        with self._lock:
            return list(self.results)

    def statuses(self, since: float = 0.0) -> Counter[int]:
        return Counter(r.status for r in self.snapshot() if r.time >= since)

    def failures(self, since: float = 0.0) -> list[Result]:
        return [r for r in self.snapshot() if r.time >= since and r.status != 200]


class _Connections:
    """One keep-alive connection per worker thread, all closed at the end."""

    def __init__(self, address: str, timeout_s: float) -> None:
        self.host, port = address.rsplit(":", 1)
        self.port = int(port)
        self.timeout_s = timeout_s
        self._local = threading.local()
        self._all: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def mine(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def close_all(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
