"""A proxyless gRPC client: Open Inference Protocol calls routed by xDS, with no Envoy.

    GRPC_XDS_BOOTSTRAP=bootstrap.json python -m xds_server.lab.proxyless \\
        --target xds:///recommender --model recommender --rate 20 --duration 60 \\
        --out counts.json [--tenant-share gold=1,free=9]

gRPC's own xDS resolver and balancer read the bootstrap, ask the control plane for the
target's listener, routes, clusters and endpoints, and pick the pool of each call by
the route's weights, as an Envoy would. (Any other target, `127.0.0.1:PORT`, is dialled
directly: the tests use that.) The client sends `ModelInfer` calls of one row of
features, drawn as the load generator draws them, at `--rate` per second for
`--duration` seconds, at most `--max-in-flight` outstanding, each with a deadline of
`--timeout` seconds, and the tenant of `--tenant-share` as `x-tenant` metadata (shares
spread deterministically: smooth weighted round robin).

It counts answers per `model_version` and failures per gRPC status name (`Tally`, which
a test can use in-process through `ProxylessCaller`), and writes the counts to `--out`
as JSON every second and at the end (atomically: a parent reads a whole file). The file
holds counts (numbers and maps of numbers, so several clients' files add up key by
key), the target and model, and `done` (true in the last write). SIGTERM or SIGINT ends
the run early, cleanly: no new calls, the outstanding ones are awaited (bounded by
their deadline), the last counts are written, exit status 0.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import grpc

from xds_server.lab.load import (
    CLIENT_TIMEOUT_S,
    MAX_BURST_S,
    TENANT_HEADER,
    Answer,
    answer_of,
    draw_features,
    failure_of,
    infer_request,
)
from xds_server.lab.oip.v2 import grpc_predict_v2_pb2_grpc as oip_grpc

DEFAULT_TENANT_SHARES = "gold=1,free=9"
"""As the load generator's default: every 10th call is gold."""
WRITE_PERIOD_S = 1.0
READY_TIMEOUT_S = 30.0
"""How long to wait for the channel (xDS resources, a first connection) before sending:
calls that fail only because the client is still starting are not counted."""


def parse_shares(text: str) -> dict[str, float]:
    """`gold=1,free=9` -> {"gold": 1.0, "free": 9.0}; "" -> {} (no tenant)."""
    shares: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, weight = part.partition("=")
        if not sep or not name or float(weight) < 0:
            raise ValueError(f"tenant share {part!r}: expected NAME=WEIGHT, WEIGHT >= 0")
        shares[name] = float(weight)
    if shares and sum(shares.values()) <= 0:
        raise ValueError("tenant shares: at least one weight must be positive")
    return shares


class TenantCycle:
    """Tenants in proportion to their shares, deterministically and evenly spread
    (smooth weighted round robin, as nginx balances): gold=1,free=9 gives gold once in
    every 10 calls."""

    def __init__(self, shares: dict[str, float]) -> None:
        total = sum(shares.values())
        self._weights = {t: w / total for t, w in shares.items()} if total > 0 else {}
        self._credit = dict.fromkeys(self._weights, 0.0)

    def next(self) -> str:
        if not self._weights:
            return ""
        for tenant, weight in self._weights.items():
            self._credit[tenant] += weight
        tenant = max(self._credit, key=lambda t: self._credit[t])
        self._credit[tenant] -= 1.0
        return tenant


@dataclass
class Tally:
    """What a client sent and what came back, safe to update from gRPC's callbacks."""

    target: str
    model: str
    sent: int = 0
    ok: int = 0
    failed: int = 0
    by_version: Counter[str] = field(default_factory=Counter)
    """Answers per `model_version`."""
    failures: Counter[str] = field(default_factory=Counter)
    """Failures per gRPC status name ("UNAVAILABLE", "DEADLINE_EXCEEDED", ...)."""
    by_tenant: Counter[str] = field(default_factory=Counter)
    done: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def sending(self, tenant: str) -> None:
        with self._lock:
            self.sent += 1
            self.by_tenant[tenant or "none"] += 1

    def record(self, answer: Answer) -> None:
        with self._lock:
            if answer.status == 200:
                self.ok += 1
                self.by_version[answer.version] += 1
            else:
                self.failed += 1
                self.failures[answer.grpc_code or "UNKNOWN"] += 1

    def finish(self) -> None:
        with self._lock:
            self.done = True

    def summary(self) -> dict[str, Any]:
        with self._lock:
            return {
                "target": self.target,
                "model": self.model,
                "sent": self.sent,
                "ok": self.ok,
                "failed": self.failed,
                "in_flight": self.sent - self.ok - self.failed,
                "by_version": dict(self.by_version),
                "failures": dict(self.failures),
                "by_tenant": dict(self.by_tenant),
                "done": self.done,
            }

    def write(self, path: Path) -> None:
        """The summary as JSON, atomically (a reader never sees half a file)."""
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.summary(), indent=1, sort_keys=True))
        tmp.replace(path)


@dataclass
class ProxylessCaller:
    """Sends ModelInfer to `target` at `rate` per second for `duration_s` seconds."""

    target: str
    model: str
    rate: float
    duration_s: float
    tenant_shares: dict[str, float] = field(default_factory=dict)
    """Tenant -> weight (`parse_shares`); empty: no x-tenant metadata."""
    timeout_s: float = CLIENT_TIMEOUT_S
    max_in_flight: int = 64
    ready_timeout_s: float = READY_TIMEOUT_S
    seed: int = 0

    def run(self, stop: threading.Event, out: Path | None = None) -> Tally:
        """Send until the duration ends or `stop` is set; the counts are written to
        `out` (if given) every second and at the end. Returns them."""
        tally = Tally(self.target, self.model)
        writer_done = threading.Event()
        writer = threading.Thread(
            target=_write_every, args=(tally, out, writer_done), daemon=True, name="tally-writer"
        )
        if out is not None:
            writer.start()
        channel = grpc.insecure_channel(self.target)
        try:
            self._wait_ready(channel, stop)
            self._send_all(oip_grpc.GRPCInferenceServiceStub(channel), tally, stop)
        finally:
            writer_done.set()
            if out is not None:
                writer.join(WRITE_PERIOD_S + 5)
            channel.close()
            tally.finish()
            if out is not None:
                tally.write(out)
        return tally

    def _wait_ready(self, channel: grpc.Channel, stop: threading.Event) -> None:
        ready = grpc.channel_ready_future(channel)
        deadline = time.monotonic() + min(self.ready_timeout_s, self.duration_s)
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                ready.result(timeout=0.1)
                return
            except grpc.FutureTimeoutError:
                continue
        ready.cancel()

    def _send_all(self, stub: Any, tally: Tally, stop: threading.Event) -> None:
        """The schedule: a call every 1/rate s (catching up at most MAX_BURST_S after
        falling behind), at most max_in_flight outstanding; then the outstanding ones
        are awaited, each bounded by its deadline."""
        rng = random.Random(self.seed)
        tenants = TenantCycle(self.tenant_shares)
        slots = threading.Semaphore(self.max_in_flight)
        start = time.monotonic()
        end, next_at, i = start + self.duration_s, start, 0
        while not stop.is_set() and time.monotonic() < end:
            wait = min(next_at, end) - time.monotonic()
            if wait > 0 and stop.wait(wait):
                break
            if time.monotonic() >= end or not slots.acquire(timeout=0.1):
                continue
            tenant = tenants.next()
            request = infer_request(self.model, [draw_features(rng)], f"{self.target}-{i}")
            metadata = [(TENANT_HEADER, tenant)] if tenant else []
            tally.sending(tenant)
            future = stub.ModelInfer.future(request, timeout=self.timeout_s, metadata=metadata)
            future.add_done_callback(lambda f: _done(f, tally, slots))
            next_at = max(next_at + 1.0 / self.rate, time.monotonic() - MAX_BURST_S)
            i += 1
        until = time.monotonic() + self.timeout_s + 2
        for _ in range(self.max_in_flight):  # every slot back: no call outstanding
            if not slots.acquire(timeout=max(0.0, until - time.monotonic())):
                break


def _done(future: Any, tally: Tally, slots: threading.Semaphore) -> None:
    """A call ended (in one of gRPC's threads): count it, free its slot."""
    try:
        tally.record(answer_of(future.result()))
    except grpc.RpcError as exc:
        tally.record(failure_of(exc))
    except grpc.FutureCancelledError:
        tally.record(Answer(499, grpc_code=grpc.StatusCode.CANCELLED.name))
    finally:
        slots.release()


def _write_every(tally: Tally, out: Path | None, done: threading.Event) -> None:
    while out is not None and not done.wait(WRITE_PERIOD_S):
        tally.write(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="a proxyless gRPC (xDS) inference client")
    p.add_argument("--target", required=True, help="xds:///SERVICE, or HOST:PORT directly")
    p.add_argument("--model", required=True, help="the model name each call names")
    p.add_argument("--rate", type=float, required=True, help="calls per second")
    p.add_argument("--duration", type=float, required=True, help="seconds to send for")
    p.add_argument("--out", type=Path, required=True, help="the JSON counts file")
    p.add_argument("--tenant-share", default=DEFAULT_TENANT_SHARES, help="NAME=WEIGHT,...")
    p.add_argument("--timeout", type=float, default=CLIENT_TIMEOUT_S, help="each call's deadline")
    p.add_argument("--max-in-flight", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.rate <= 0 or a.duration < 0 or a.max_in_flight < 1:
        p.error("--rate must be > 0, --duration >= 0, --max-in-flight >= 1")
    try:
        shares = parse_shares(a.tenant_share)
    except ValueError as exc:
        p.error(str(exc))
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    caller = ProxylessCaller(
        a.target, a.model, a.rate, a.duration, shares, a.timeout, a.max_in_flight, seed=a.seed
    )
    caller.run(stop, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
