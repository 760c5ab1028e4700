"""A lab model server's view of the call graph (issue 31): the arm each request says it
belongs to, and the call it makes to the next service.

Arms. With a `consistent` rollout group, Envoy marks every request it routes to a
member's pool with `ARM_HEADER` (`production`, `baseline`, `canary`), and a caller that
propagates it reaches the same arm of the next member. Each server counts, from its own
view, the user requests it served by the header they carried (`ArmCounts`): the same arm
as its pool, another one (a crossing), or none at all (counted apart: a request without
the header is split by weight and crosses nothing by definition).

Calls. A server given a `Downstream` (the recommender's, in the lab's `features` option)
calls the next service through its region's Envoy for each inference it answers,
propagating the arm it was reached on, and fails its own answer (502) when that call
fails: a broken dependency shows in its caller's traffic, as it would in production.
It counts those calls, and among them the ones answered by another arm than its own
(the caller's end-to-end view of a crossing: Envoy rewrites the header on a weighted
route, so a request the next hop splits by weight arrives marked with the arm it got,
and only the caller sees that it left another arm). It also keeps when each of the last
`CROSSINGS_KEPT` crossings was answered (`GET /crossings`): with consistent routing a
call crosses only where the next member's routes have no arm routes, which a group's
members lose together in one push per region (a rollback); the times tell a crossing
by a request in flight across that push (answered after it was committed) from one
while the group's canaries had weight (before it), which would be a fault.
"""

from __future__ import annotations

import http.client
import itertools
import json
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from xds_server.lab.oip.model import FP32, INPUT_NAME
from xds_server.spec.model import ARM_HEADER

ARMS = ("production", "baseline", "canary")
NO_ARM = "none"
"""The label of a request that carried no `ARM_HEADER`."""
OTHER_ARM = "other"
"""The label of a header that names no arm (bounded cardinality)."""
DOWNSTREAM_TIMEOUT_S = 5.0
CROSSINGS_KEPT = 1_000
"""The crossed calls a server remembers (the latest): a lab run crosses a handful, at
its rollback's push, or all the time without consistent routing (then their count is
what matters, not each one)."""


def arm_label(header: str | None) -> str:
    """The arm a request's `ARM_HEADER` names, as a metric label."""
    if not header:
        return NO_ARM
    return header if header in ARMS else OTHER_ARM


@dataclass(frozen=True)
class Crossing:
    """One call to the next service answered by another arm than the caller's pool."""

    at: float
    """When the answer came (wall clock, as the audit's times): after Envoy routed the
    call, so after any push whose routes it followed was committed."""
    arm: str
    """The arm the call carried (`arm_label`: the header the caller was reached with)."""
    answered: str
    """The pool of the next service that answered."""


class ArmCounts:
    """User requests by the arm they carried, against the pool this server serves
    (shadow requests are left out: Envoy's mirror copies them whatever their arm)."""

    def __init__(self, pool: str) -> None:
        self.pool = pool
        self.matched = 0
        self.crossed = 0
        self.missing = 0
        self.calls = 0
        self.calls_failed = 0
        self.calls_crossed = 0
        self._crossings: deque[Crossing] = deque(maxlen=CROSSINGS_KEPT)
        self._lock = threading.Lock()

    def seen(self, arm: str) -> None:
        """One user request that carried `arm` (an `arm_label`)."""
        with self._lock:
            if arm == NO_ARM:
                self.missing += 1
            elif arm == self.pool:
                self.matched += 1
            else:
                self.crossed += 1

    def called(self, answer: DownstreamAnswer, arm: str = NO_ARM) -> None:
        """One call to the next service, which carried `arm` (an `arm_label`), answered."""
        at = time.time()
        with self._lock:
            self.calls += 1
            if answer.code != 200:
                self.calls_failed += 1
            elif answer.pool != self.pool:
                self.calls_crossed += 1
                self._crossings.append(Crossing(at, arm, answer.pool))

    def crossings(self) -> list[dict[str, Any]]:
        """The latest crossed calls (`CROSSINGS_KEPT`), oldest first."""
        with self._lock:
            return [asdict(c) for c in self._crossings]

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "arm_matched": self.matched,
                "arm_crossed": self.crossed,
                "arm_missing": self.missing,
                "downstream_calls": self.calls,
                "downstream_failed": self.calls_failed,
                "downstream_crossed": self.calls_crossed,
            }


@dataclass(frozen=True)
class DownstreamAnswer:
    code: int
    """The HTTP status the next service answered (0: no answer at all)."""
    pool: str = ""
    """The pool that answered (its `parameters.pool`), when one did."""
    error: str = ""


class Downstream:
    """Calls to the next service's OIP REST inference through the region's Envoys (in
    turn), with the service's Host so Envoy routes them to its virtual host; one
    keep-alive connection per server thread and Envoy."""

    def __init__(
        self, envoys: Sequence[str], host: str, model: str, timeout_s: float = DOWNSTREAM_TIMEOUT_S
    ) -> None:
        if not envoys:
            raise ValueError("a downstream needs at least one Envoy HOST:PORT")
        self.envoys = tuple(envoys)
        self.host, self.model, self.timeout_s = host, model, timeout_s
        self._turn = itertools.count()
        self._local = threading.local()

    def _connection(self) -> http.client.HTTPConnection:
        conns: dict[str, http.client.HTTPConnection] | None = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        address = self.envoys[next(self._turn) % len(self.envoys)]
        conn = conns.get(address)
        if conn is None:
            host, port = address.rsplit(":", 1)
            conn = conns[address] = http.client.HTTPConnection(
                host, int(port), timeout=self.timeout_s
            )
        return conn

    def call(
        self, arm: str | None, ident: str, rows: Sequence[Sequence[float]]
    ) -> DownstreamAnswer:
        """One inference of the next service on these rows, carrying `arm` (the header
        this server was reached with) when there is one."""
        body = json.dumps(
            {
                "id": ident,
                "inputs": [
                    {
                        "name": INPUT_NAME,
                        "shape": [len(rows), len(rows[0]) if rows else 0],
                        "datatype": FP32,
                        "data": [x for row in rows for x in row],
                    }
                ],
            }
        ).encode()
        headers = {"host": self.host, "content-type": "application/json"}
        if arm:
            headers[ARM_HEADER] = arm
        conn = self._connection()
        try:
            conn.request("POST", f"/v2/models/{self.model}/infer", body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            return DownstreamAnswer(0, error=f"{self.host}: {exc or type(exc).__name__}")
        if resp.status != 200:
            return DownstreamAnswer(resp.status, error=f"{self.host} answered {resp.status}")
        try:
            pool = str((json.loads(data).get("parameters") or {}).get("pool", ""))
        except (ValueError, AttributeError):
            pool = ""
        return DownstreamAnswer(200, pool or resp.getheader("x-pool") or "")
