"""Notifications: POST each rollout event to the spec's `notifications:` targets.

`Notifier` is a `TrafficSink`. Its `follow` runs on the controller's loop after each
commit and never waits for a receiver: it renders the decision's events
(`render.notifications`), keeps those each target asked for (`on:`) and appends them to
that target's bounded queue (`notifications.queue`; when full, the oldest waiting event
is dropped and counted). Each target (by name and URL) has its own worker thread, made
when the target first gets an event, which POSTs one event at a time with urllib: the
target's `timeout` per connect and per read, then up to `retries` more attempts for a
failure worth retrying (no answer, a connection error, HTTP 408, 425, 429 or 5xx) after
a backoff that doubles from `backoff` up to `max_backoff` (a `Retry-After` is honoured
within that bound). A failure is one log line; a slow or hanging receiver holds up
only its own queue. Targets leave with the spec: a worker whose target no longer
appears anywhere in it stops, and what it still held is counted as dropped. `close()`
(at shutdown) gives the workers a bounded time to send what they hold, one attempt
each.

Results reach `/metrics` through `subscribe` (`NotifyMetrics`).
"""

from __future__ import annotations

import email.utils
import http.client
import logging
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

from prometheus_client import CollectorRegistry, Counter, Gauge

from xds_server.render.notifications import body, events, for_target
from xds_server.rollout.ports import Committed
from xds_server.spec import MeshSpec, NotificationTarget

log = logging.getLogger("xds_server.notify")

SENT, FAILED, RETRY, DROPPED, QUEUED = "sent", "failed", "retry", "dropped", "queued"
"""What a `NotifyResult` reports: delivered; given up on; about to be tried again;
pushed out of a full queue (or left when its target went); added to a queue."""
USER_AGENT = "xds-server-notify/1"
_READ_MAX = 64 * 1024
_RETRY_STATUS = frozenset({408, 425, 429})

TargetKey = tuple[str, str]
"""(name, url): a target's worker and queue."""


@dataclass(frozen=True)
class Delivery:
    """One event rendered for one target, as it waits in the target's queue."""

    target: NotificationTarget
    type: str
    id: str
    body: bytes
    content_type: str


@dataclass(frozen=True)
class NotifyResult:
    target: str
    type: str
    result: str
    """SENT, FAILED, RETRY, DROPPED or QUEUED."""
    queued: int
    """Events waiting in the target's queue afterwards."""
    error: str = ""


@dataclass(frozen=True)
class TargetStats:
    sent: int = 0
    failed: int = 0
    retries: int = 0
    dropped: int = 0
    queued: int = 0
    last_error: str = ""


@dataclass(frozen=True)
class PostFailure:
    error: str
    retryable: bool
    retry_after: float | None = None


def post(url: str, data: bytes, content_type: str, timeout: float) -> PostFailure | None:
    """POST once; None when the receiver answered 2xx."""
    request = urllib.request.Request(
        url,
        data=data,
        method="POST",
        headers={"Content-Type": content_type, "User-Agent": USER_AGENT},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read(_READ_MAX)
        return None
    except urllib.error.HTTPError as exc:
        retryable = exc.code in _RETRY_STATUS or exc.code >= 500
        after = _retry_after(exc.headers.get("Retry-After") if exc.headers else None)
        exc.close()
        return PostFailure(f"HTTP {exc.code} {exc.reason}", retryable, after)
    except urllib.error.URLError as exc:
        return PostFailure(_one_line(exc.reason), True)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        return PostFailure(_one_line(exc), True)


def _one_line(error: object) -> str:
    text = " ".join(str(error).split())
    name = type(error).__name__
    return f"{name}: {text}"[:300] if text else name


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


Report = Callable[[Delivery, str, int, str], None]


class _Worker:
    """One target's queue and thread."""

    def __init__(
        self, key: TargetKey, size: int, report: Report, backoff: float, max_backoff: float
    ) -> None:
        self.key = key
        self.size = size
        self._report = report
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._items: deque[Delivery] = deque()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._draining = threading.Event()
        self._wake = threading.Event()
        """Set by `drain` and `stop`: ends a backoff wait."""
        self.thread = threading.Thread(target=self._run, name=f"notify-{key[0]}", daemon=True)
        self.thread.start()

    @property
    def depth(self) -> int:
        return len(self._items)

    def put(self, item: Delivery, size: int) -> None:
        """Queue `item`, dropping the oldest waiting past `size`; never waits on I/O."""
        with self._cond:
            self.size = size
            self._items.append(item)
            dropped = [self._items.popleft() for _ in range(len(self._items) - size)]
            depth = len(self._items)
            self._cond.notify()
        self._report(item, QUEUED, depth, "")
        for old in dropped:
            log.warning(
                "notification %s to %s dropped: its queue is full (%d)", old.type, self.key[0], size
            )
            self._report(old, DROPPED, depth, "queue full")

    def drain(self) -> None:
        """Send what is queued (one attempt each), then end."""
        with self._cond:
            self._draining.set()
            self._wake.set()
            self._cond.notify_all()

    def stop(self) -> list[Delivery]:
        """Stop after the current attempt; what was still waiting (never sent)."""
        with self._cond:
            self._stop.set()
            self._wake.set()
            left = list(self._items)
            self._items.clear()
            self._cond.notify_all()
        return left

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._stop.is_set() and not self._draining.is_set():
                    self._cond.wait()
                if self._stop.is_set() or not self._items:
                    return
                item = self._items.popleft()
            try:
                self._deliver(item)
            except Exception as exc:  # a bug here must not end the target's worker
                log.exception("notification %s to %s: unexpected error", item.type, self.key[0])
                self._report(item, FAILED, self.depth, _one_line(exc))

    def _deliver(self, item: Delivery) -> None:
        target = item.target
        attempts = target.retries + 1
        failure: PostFailure | None = None
        for attempt in range(1, attempts + 1):
            failure = post(target.url, item.body, item.content_type, target.timeout)
            if failure is None:
                self._report(item, SENT, self.depth, "")
                return
            if not failure.retryable or attempt == attempts or self._draining.is_set():
                break
            delay = min(self._max_backoff, self._backoff * 2 ** (attempt - 1))
            if failure.retry_after is not None:
                delay = min(self._max_backoff, max(delay, failure.retry_after))
            log.info(
                "notification %s to %s: attempt %d of %d failed (%s); again in %.3gs",
                item.type,
                target.name,
                attempt,
                attempts,
                failure.error,
                delay,
            )
            self._report(item, RETRY, self.depth, failure.error)
            self._wake.wait(delay)
            if self._stop.is_set():
                self._report(item, DROPPED, self.depth, "stopped before it was sent")
                return
            if self._draining.is_set():
                break  # shutting down: no more retries
        assert failure is not None
        log.warning(
            "notification %s (%s) to %s failed after %d attempt(s): %s",
            item.type,
            item.id,
            target.name,
            attempt,
            failure.error,
        )
        self._report(item, FAILED, self.depth, failure.error)


class Notifier:
    """The notifications `TrafficSink`; `close()` stops its workers."""

    def __init__(self, backoff: float = 1.0, max_backoff: float = 30.0) -> None:
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._workers: dict[TargetKey, _Worker] = {}
        self._lock = threading.Lock()
        self._stats: dict[str, TargetStats] = {}
        self._counts: dict[tuple[str, str, str], int] = {}
        self._listeners: list[Callable[[NotifyResult], None]] = []
        self._spec: MeshSpec | None = None
        self._closed = False

    def subscribe(self, listener: Callable[[NotifyResult], None]) -> None:
        """Call `listener` on every result (from the workers' threads, and from
        `follow` for QUEUED and DROPPED)."""
        with self._lock:
            self._listeners.append(listener)

    # ---- the sink ----

    def follow(self, event: Committed) -> None:
        if self._closed:
            return
        try:
            self._follow(event)
        except Exception:
            log.exception("notifications: the events of a decision were not queued")

    def _follow(self, event: Committed) -> None:
        if event.spec is not self._spec:
            self._retire(event.spec)
            self._spec = event.spec
        state = event.state
        if state is None:
            return
        try:
            notifications = event.spec.notifications_for(state.service)
        except KeyError:
            return
        if not notifications.targets:
            return
        found = events(event)
        for target in notifications.targets:
            for e in for_target(found, target):
                data, content_type = body(e, target.kind)
                worker = self._worker(target, notifications.queue)
                worker.put(Delivery(target, e.type, e.id, data, content_type), notifications.queue)

    def _worker(self, target: NotificationTarget, size: int) -> _Worker:
        key = (target.name, target.url)
        worker = self._workers.get(key)
        if worker is None:
            worker = _Worker(key, size, self._report, self.backoff, self.max_backoff)
            self._workers[key] = worker
        return worker

    def _retire(self, spec: MeshSpec) -> None:
        """Stop the workers of targets the spec no longer has anywhere."""
        if not self._workers:
            return
        sections = [spec.notifications, *(s.notifications for s in spec.services)]
        live = {(t.name, t.url) for n in sections if n is not None for t in n.targets}
        for key in [k for k in self._workers if k not in live]:
            worker = self._workers.pop(key)
            for left in worker.stop():
                self._report(left, DROPPED, 0, "target removed from the spec")
            log.info("notifications: target %s (%s) left the spec", key[0], key[1])

    # ---- results ----

    def _report(self, item: Delivery, result: str, queued: int, error: str) -> None:
        name = item.target.name
        with self._lock:
            st = self._stats.get(name, TargetStats())
            st = replace(
                st,
                sent=st.sent + (result == SENT),
                failed=st.failed + (result == FAILED),
                retries=st.retries + (result == RETRY),
                dropped=st.dropped + (result == DROPPED),
                queued=queued,
                last_error=error if result in (FAILED, RETRY) else st.last_error,
            )
            self._stats[name] = st
            key = (name, item.type, result)
            self._counts[key] = self._counts.get(key, 0) + 1
            listeners = list(self._listeners)
        out = NotifyResult(name, item.type, result, queued, error)
        for listener in listeners:
            try:
                listener(out)
            except Exception:
                log.exception("a notification listener failed; continuing")

    def stats(self) -> dict[str, TargetStats]:
        """Per target name: what was sent, failed, retried, dropped, and waits now."""
        with self._lock:
            return dict(self._stats)

    def count(self, target: str, type_: str, result: str) -> int:
        with self._lock:
            return self._counts.get((target, type_, result), 0)

    async def run(self) -> None:
        """The workers are threads of their own: nothing to run on the loop."""

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking events; give the workers up to `timeout` in all to send what they
        hold (one attempt each, no more retries), then stop them: what is still queued
        is dropped (counted), and an attempt under way ends within its target's timeout
        in its own daemon thread."""
        self._closed = True
        workers = list(self._workers.values())
        self._workers.clear()
        for w in workers:
            w.drain()
        deadline = time.monotonic() + timeout
        for w in workers:
            w.thread.join(max(0.0, deadline - time.monotonic()))
        for w in workers:
            for left in w.stop():
                self._report(left, DROPPED, 0, "not sent before shutdown")


class NotifyMetrics:
    """Sent, failed, retried, dropped and waiting notifications per target."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.sent = Counter(
            "xds_notifications_sent",
            "Notifications a target accepted (2xx), by target name and event type",
            ["target", "type"],
            registry=r,
        )
        self.failed = Counter(
            "xds_notifications_failed",
            "Notifications given up on after their retries, by target name and event type",
            ["target", "type"],
            registry=r,
        )
        self.retries = Counter(
            "xds_notifications_retries",
            "Failed attempts to send a notification that were tried again",
            ["target"],
            registry=r,
        )
        self.dropped = Counter(
            "xds_notifications_dropped",
            "Notifications dropped unsent: the target's queue was full, or it left the spec",
            ["target"],
            registry=r,
        )
        self.queued = Gauge(
            "xds_notifications_queued",
            "Notifications waiting in a target's queue",
            ["target"],
            registry=r,
        )

    def attach(self, notifier: Notifier) -> None:
        notifier.subscribe(self._on_result)

    def _on_result(self, r: NotifyResult) -> None:
        if r.result == SENT:
            self.sent.labels(r.target, r.type).inc()
        elif r.result == FAILED:
            self.failed.labels(r.target, r.type).inc()
        elif r.result == RETRY:
            self.retries.labels(r.target).inc()
        elif r.result == DROPPED:
            self.dropped.labels(r.target).inc()
        self.queued.labels(r.target).set(r.queued)


def notification_sinks(registry: CollectorRegistry) -> Callable[[MeshSpec], Notifier]:
    """Notifications as a leader sink: the leader sends them, followers none. Cheap
    without targets (nothing is rendered); targets come and go with the spec."""
    metrics = NotifyMetrics(registry)

    def build(spec: MeshSpec) -> Notifier:
        del spec
        notifier = Notifier()
        metrics.attach(notifier)
        return notifier

    return build


__all__ = [
    "DROPPED",
    "FAILED",
    "QUEUED",
    "RETRY",
    "SENT",
    "Delivery",
    "Notifier",
    "NotifyMetrics",
    "NotifyResult",
    "PostFailure",
    "TargetStats",
    "notification_sinks",
    "post",
]
