"""Notifications: the events a committed decision is, their Slack and CloudEvents bodies,
and their delivery by `outputs.notify.Notifier` to real HTTP receivers on 127.0.0.1.

The rendering is pure and tested on decisions built with the decision function; the
delivery runs the real controller (tests/test_controller.py's rig: in-memory data plane
and metrics, real SQLite) with the real `Notifier` subscribed, against a local
`http.server` that records every request and, when told to, holds each one unanswered.
The last test runs `xds-server lab run --notify` and receives the lab's CloudEvents.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from tests.support import wait_for
from tests.test_controller import (
    CANARY,
    LATENCY,
    REGIONS,
    SERVICE,
    RecordingSink,
    everywhere,
    make_rig,
    make_spec,
    run,
)
from xds_server.cli import main as cli_main
from xds_server.lab.layout import MeshOptions
from xds_server.lab.mesh import LocalMesh
from xds_server.outputs.notify import Notifier, NotifyMetrics
from xds_server.render.notifications import (
    CLOUDEVENTS_CONTENT_TYPE,
    JSON_CONTENT_TYPE,
    body,
    cloudevent,
    events,
    for_target,
    slack,
)
from xds_server.rollout import decide as sm
from xds_server.rollout.decide import Decision, EntryKind, Observation, Transition
from xds_server.rollout.evidence import Comparison, Measurement
from xds_server.rollout.ports import Committed
from xds_server.rollout.state import (
    PROGRESSING,
    ROLLED_BACK,
    RegionState,
    RolloutState,
    rollout_traffic,
)
from xds_server.spec import (
    NOTIFY_EVENTS,
    MeshSpec,
    Notifications,
    NotificationTarget,
    NotifyKind,
    load_spec,
)
from xds_server.traffic import PRODUCTION_ONLY

NOW = 1_700_000_000.25
GOOD = Measurement(requests=1000, errors=0, p99_ms=50)
BAD = Measurement(requests=1000, errors=300, p99_ms=50)
GOOD_STEP = Measurement(requests=1000, errors=0, latency_buckets=LATENCY)
BAD_STEP = Measurement(requests=1000, errors=300, latency_buckets=LATENCY)


def view(spec: MeshSpec, decision: Decision | None, actor: str = "controller") -> Committed:
    """What the controller tells its sinks after committing `decision`."""
    rollouts = {SERVICE: decision.state} if decision else {}
    return Committed(NOW, spec, rollouts, rollout_traffic(spec, rollouts), decision, actor)


def at_step(spec: MeshSpec, step: int, passed: bool = False) -> RolloutState:
    """A progressing rollout with every region at `step` (its clock started)."""
    state = sm.start(spec.service(SERVICE).rollout, SERVICE, CANARY, REGIONS, 0).state
    regions = {
        r: RegionState(PROGRESSING, step, step_started=10.0, step_passed=passed) for r in REGIONS
    }
    return replace(state, regions=regions)


def types(found: list[Any]) -> list[str]:
    return [e.type for e in found]


# ---- the rendering (pure) ----


def test_a_rollback_carries_its_evidence_in_cloudevents_and_slack() -> None:
    spec = make_spec()
    plan = spec.service(SERVICE).rollout
    observations = {
        r: Observation(
            applied_at=10.0, canary=GOOD, step=Comparison(GOOD_STEP, GOOD_STEP, "baseline")
        )
        for r in REGIONS
    }
    observations["eu-west"] = Observation(
        applied_at=10.0, canary=BAD, step=Comparison(BAD_STEP, GOOD_STEP, "baseline")
    )
    decision = sm.decide(plan, at_step(spec, 1), observations, 20.0)
    assert decision.rollback

    (event,) = events(view(spec, decision))
    assert event.type == "rollout.rolled_back"
    ce = cloudevent(event)
    assert ce["specversion"] == "1.0"
    assert uuid.UUID(ce["id"])
    assert ce["source"] == f"xds-server/{SERVICE}"
    assert ce["type"] == "io.xds-server.rollout.rolled_back"
    assert ce["time"] == "2023-11-14T22:13:20.250Z"
    assert datetime.fromisoformat(ce["time"]).timestamp() == NOW
    assert ce["datacontenttype"] == "application/json"
    assert ce["subject"] == SERVICE
    data = ce["data"]
    assert data["region"] == "eu-west"
    assert data["metric"] == "error_rate"
    assert data["canary"]["error_rate"] == 0.3
    assert data["canary_step"]["errors"] == 300
    assert data["comparator_pool"] == "baseline"
    assert data["comparator"]["errors"] == 0 and data["comparator"]["requests"] == 1000
    analysis = data["cause"]["analysis"]
    assert analysis["classification"] == "high"
    assert data["p_value"] == analysis["p_value"] < analysis["alpha"]
    assert data["cause"]["guardrail"] == {"value": 0.3, "limit": plan.guardrails.max_error_rate}
    assert data["weights_before"] == {
        r: {"production": 60.0, "baseline": 20.0, "canary": 20.0} for r in REGIONS
    }
    assert data["weights_after"] == {
        r: {"production": 100.0, "baseline": 0.0, "canary": 0.0} for r in REGIONS
    }
    assert data["verdict"]["outcome"] == "fail" and data["phase"] == "rolled_back"
    assert data["reason"].startswith("eu-west: step 1 (20%)")

    message = slack(event)
    assert message["text"].startswith(f"*{SERVICE} {CANARY}: rolled back*\neu-west: step 1 (20%)")
    for words in ("*Region:* eu-west", "*Metric:* error_rate", "*p-value:*", "20% → 0%"):
        assert words in message["text"]
    assert [b["type"] for b in message["blocks"]] == ["header", "section", "section", "context"]
    assert message["blocks"][0]["text"] == {
        "type": "plain_text",
        "text": f"{SERVICE} {CANARY}: rolled back",
    }
    fields = [f["text"] for f in message["blocks"][2]["fields"]]
    assert "*Region*\neu-west" in fields and "*Metric*\nerror_rate" in fields
    assert "*Baseline (step)*\n0/1000 errors (0%)" in fields
    assert "rollout.rolled_back · controller · 2023-11-14T22:13:20.250Z" in json.dumps(
        message["blocks"][3], ensure_ascii=False
    )

    ce_body, ce_type = body(event, NotifyKind.WEBHOOK)
    slack_body, slack_type = body(event, NotifyKind.SLACK)
    assert (ce_type, slack_type) == (CLOUDEVENTS_CONTENT_TYPE, JSON_CONTENT_TYPE)
    assert json.loads(ce_body) == ce and json.loads(slack_body) == message
    # The same event renders with the same id (a retry keeps it); another has its own.
    assert events(view(spec, decision))[0].id == event.id
    assert event.id != events(view(spec, sm.pause(at_step(spec, 1), 5.0, "x")))[0].id


def test_started_step_paused_resumed_and_promoted() -> None:
    spec = make_spec()
    plan = spec.service(SERVICE).rollout

    started = sm.start(plan, SERVICE, CANARY, REGIONS, 0)
    (e,) = events(view(spec, started))
    assert e.type == "rollout.started"  # not also a step: the start is the first step
    assert e.data["steps"] == [5, 20, 100] and e.data["first_regions"] == list(REGIONS)
    assert e.data["reason"] == f"rollout of {SERVICE} {CANARY} started"
    assert e.summary.startswith("canary v2 starts in us-east (step 0 (5%))")

    advanced = sm.decide(plan, at_step(spec, 0, passed=True), {}, 30.0)
    (e,) = events(view(spec, advanced))
    assert e.type == "rollout.step"
    assert e.title == f"{SERVICE} {CANARY}: canary at 20%"
    assert e.data["canary_percent"] == 20
    assert e.data["reason"].startswith("advance to 20%: every region of the wave passed")
    assert [(m["region"], m["step_from"], m["step_to"]) for m in e.data["advanced"]] == [
        (r, 0, 1) for r in REGIONS
    ]
    assert e.summary.startswith("us-east, eu-west, ap-south: step 1 (20%); advance to 20%")

    paused = sm.pause(advanced.state, 31.0, "looking at a dashboard")
    (e,) = events(view(spec, paused, actor="alice"))
    assert (e.type, e.summary, e.actor) == (
        "rollout.paused",
        "paused: looking at a dashboard",
        "alice",
    )
    assert e.data["phase"] == "paused" and e.data["actor"] == "alice"
    assert e.data["reason"] == "paused: looking at a dashboard"
    assert e.data["regions"]["eu-west"]["weights"]["canary"] == 20

    resumed = sm.resume(paused.state, 32.0, "all good")
    assert types(events(view(spec, resumed))) == ["rollout.resumed"]

    promoted = sm.promote(plan, resumed.state, 33.0, "ship it", all_the_way=True)
    (e,) = events(view(spec, promoted))
    assert e.type == "rollout.promoted" and e.data["phase"] == "promoted"
    assert e.data["regions"]["us-east"]["weights"]["canary"] == 100
    assert "rollout.promoted" in json.dumps(slack(e))

    # Checks moved nothing; a view without a decision (restore, spec change) is silent.
    check = Transition("us-east", PROGRESSING, PROGRESSING, 1, 1, "pass", kind=EntryKind.CHECK)
    assert events(view(spec, Decision(advanced.state, (check,)))) == []
    assert events(view(spec, None)) == []


def test_a_nack_is_an_apply_failure_then_a_rollback_without_a_metric() -> None:
    spec = make_spec()
    plan = spec.service(SERVICE).rollout
    error = "Envoy envoy-eu-west-1 rejected routes 3: route weights must sum to 10000"
    observations = {r: Observation(applied_at=10.0) for r in REGIONS}
    observations["eu-west"] = Observation(apply_error=error)
    decision = sm.decide(plan, at_step(spec, 1), observations, 20.0)

    failed, rolled_back = events(view(spec, decision))
    assert failed.type == "apply.failed"
    assert failed.data["region"] == "eu-west" and failed.data["error"] == error
    assert failed.data["step"] == 1 and failed.title.endswith("eu-west did not apply step 1 (20%)")
    assert rolled_back.type == "rollout.rolled_back"
    data = cloudevent(rolled_back)["data"]
    assert data["region"] == "eu-west"
    assert data["metric"] is None and data["p_value"] is None and data["verdict"] is None
    assert data["weights_before"]["eu-west"]["canary"] == 20
    assert data["weights_after"]["eu-west"]["canary"] == 0


def test_a_target_gets_only_the_events_it_chose() -> None:
    spec = make_spec()
    plan = spec.service(SERVICE).rollout
    decision = sm.start(plan, SERVICE, CANARY, REGIONS, 0)
    paused = sm.pause(decision.state, 1.0, "why not")
    found = events(view(spec, decision)) + events(view(spec, paused))
    assert types(found) == ["rollout.started", "rollout.paused"]
    team = NotificationTarget("team", NotifyKind.SLACK, "http://x", frozenset({"rollout.paused"}))
    bus = NotificationTarget("bus", NotifyKind.WEBHOOK, "http://y")
    assert types(for_target(found, team)) == ["rollout.paused"]
    assert for_target(found, bus) == found
    assert bus.on == frozenset(NOTIFY_EVENTS)


# ---- delivery to real receivers ----


@dataclass(frozen=True)
class Received:
    path: str
    content_type: str
    body: dict[str, Any]


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gave up before the answer: nothing to report


class Receiver:
    """An HTTP receiver on 127.0.0.1 (its own thread per request) that records every
    POST. With `hang`, each request is read, recorded and then held unanswered until
    `release()`."""

    def __init__(self, hang: bool = False) -> None:
        self.received: list[Received] = []
        self.waiting: dict[str, int] = {}
        self._lock = threading.Lock()
        self.released = threading.Event()
        if not hang:
            self.released.set()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                data = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver._hold(Received(self.path, self.headers["Content-Type"], json.loads(data)))
                try:
                    self.send_response(204)
                    self.end_headers()
                except OSError:
                    pass  # the client timed out meanwhile

            def log_message(self, *args: Any) -> None:
                pass

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_port}{path}"

    def _hold(self, got: Received) -> None:
        with self._lock:
            self.received.append(got)
            self.waiting[got.path] = self.waiting.get(got.path, 0) + 1
        self.released.wait(120)
        with self._lock:
            self.waiting[got.path] -= 1

    def at(self, path: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.path == path]

    def hanging(self, path: str) -> int:
        with self._lock:
            return self.waiting.get(path, 0)

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def hanging() -> Iterator[Receiver]:
    r = Receiver(hang=True)
    yield r
    r.close()


def with_targets(*targets: NotificationTarget, queue: int = 1000) -> MeshSpec:
    return replace(make_spec(), notifications=Notifications(targets, queue))


def sent_to(notifier: Notifier, target: str) -> int:
    st = notifier.stats().get(target)
    return st.sent if st else 0


def ce_types(got: list[Received]) -> list[str]:
    return [r.body["type"].removeprefix("io.xds-server.") for r in got]


def test_a_rollout_and_its_rollback_reach_a_real_receiver(
    tmp_path: Path, receiver: Receiver
) -> None:
    bus = NotificationTarget("bus", NotifyKind.WEBHOOK, receiver.url("/events"))
    team = NotificationTarget(
        "team", NotifyKind.SLACK, receiver.url("/slack"), frozenset({"rollout.rolled_back"})
    )
    rig = make_rig(tmp_path, with_targets(bus, team))
    notifier = Notifier(backoff=0.01)
    registry = CollectorRegistry()
    NotifyMetrics(registry).attach(notifier)
    rig.controller.subscribe(notifier)

    async def body() -> None:
        await rig.start()
        await rig.tick_until(lambda: rig.state().regions["eu-west"].step == 1)
        rig.metrics.bad.add("eu-west")
        await rig.tick_until(lambda: rig.state().phase == ROLLED_BACK)

    try:
        run(body())
        wait_for(lambda: sent_to(notifier, "bus") == 3, "three events sent to bus", timeout=10)
        wait_for(lambda: receiver.at("/slack"), "the rollback in the chat", timeout=10)
    finally:
        notifier.close()
        rig.store.close()
    got = receiver.at("/events")
    assert ce_types(got) == ["rollout.started", "rollout.step", "rollout.rolled_back"]
    assert {r.content_type for r in got} == {CLOUDEVENTS_CONTENT_TYPE}
    assert len({r.body["id"] for r in got}) == 3
    rolled_back = got[-1].body["data"]
    assert rolled_back["region"] == "eu-west" and rolled_back["metric"] == "error_rate"
    assert rolled_back["weights_before"]["eu-west"]["canary"] == 20
    assert rolled_back["weights_after"]["eu-west"]["canary"] == 0
    assert got[1].body["data"]["canary_percent"] == 20
    (chat,) = receiver.at("/slack")
    assert chat.content_type == JSON_CONTENT_TYPE
    assert chat.body["text"].startswith(f"*{SERVICE} {CANARY}: rolled back*")
    sent = registry.get_sample_value
    assert sent("xds_notifications_sent_total", {"target": "bus", "type": "rollout.step"}) == 1
    assert sent("xds_notifications_sent_total", {"target": "team", "type": "rollout.rolled_back"})
    assert sent("xds_notifications_failed_total", {"target": "bus", "type": "rollout.step"}) is None


def test_a_hanging_receiver_delays_no_rollback(
    tmp_path: Path, hanging: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    """`stuck` never answers within the test (timeout 60 s): its first POST hangs while
    the controller goes on deciding, rolls back and pushes; its queue (2) keeps the
    newest events and counts the rest as dropped. `slow` times out after 0.2 s: its
    retries and failures are counted and logged, a line each."""
    stuck = NotificationTarget("stuck", NotifyKind.WEBHOOK, hanging.url("/stuck"), timeout=60)
    slow = NotificationTarget(
        "slow", NotifyKind.WEBHOOK, hanging.url("/slow"), timeout=0.2, retries=2
    )
    rig = make_rig(tmp_path, with_targets(stuck, slow, queue=2))
    notifier = Notifier(backoff=0.05)
    registry = CollectorRegistry()
    NotifyMetrics(registry).attach(notifier)
    views = RecordingSink()
    rig.controller.subscribe(notifier)
    rig.controller.subscribe(views)
    caplog.set_level(logging.WARNING, logger="xds_server.notify")

    async def body() -> None:
        await rig.start()
        # The first POST is under way (and hangs) before anything else is queued.
        wait_for(lambda: hanging.hanging("/stuck") == 1, "stuck's first POST", timeout=10)
        for i in range(4):
            rig.controller.pause(SERVICE, f"look {i}", "alice")
            rig.controller.resume(SERVICE, f"go on {i}", "alice")
        await rig.tick()
        rig.metrics.bad.add("eu-west")
        await rig.tick_until(lambda: rig.state().phase == ROLLED_BACK)

    try:
        run(body())
        # Committed and pushed while stuck's first request is still unanswered.
        assert rig.dataplane.traffic == everywhere(PRODUCTION_ONLY)
        stored = rig.store.rollout(SERVICE, CANARY)
        assert stored is not None and stored.phase == ROLLED_BACK
        assert len(hanging.at("/stuck")) == 1 and hanging.hanging("/stuck") == 1
        total = sum(len(events(v)) for v in views.events)
        assert total == 10  # started, 4 x (paused, resumed), rolled_back
        st = notifier.stats()["stuck"]
        assert (st.queued, st.dropped, st.sent) == (2, total - 1 - 2, 0)
        dropped = registry.get_sample_value
        assert dropped("xds_notifications_dropped_total", {"target": "stuck"}) == total - 3
        assert dropped("xds_notifications_queued", {"target": "stuck"}) == 2
        wait_for(lambda: notifier.stats()["slow"].failed >= 1, "slow's first failure", timeout=10)
        slow_stats = notifier.stats()["slow"]
        assert slow_stats.retries >= 2 and "timed out" in slow_stats.last_error
        failures = [r for r in caplog.records if "to slow failed after 3 attempt(s)" in r.message]
        assert len(failures) >= 1 and all("\n" not in r.getMessage() for r in failures)
        count = registry.get_sample_value
        assert count("xds_notifications_retries_total", {"target": "slow"}) >= 2
        assert count(
            "xds_notifications_failed_total", {"target": "slow", "type": "rollout.started"}
        )
        # The receiver comes back: the in-flight event and the two newest are delivered.
        hanging.release()
        wait_for(lambda: sent_to(notifier, "stuck") == 3, "stuck's queue sent", timeout=10)
        assert ce_types(hanging.at("/stuck")) == [
            "rollout.started",
            "rollout.resumed",
            "rollout.rolled_back",
        ]
    finally:
        hanging.release()
        notifier.close()
        rig.store.close()


def test_a_target_removed_from_the_spec_stops_and_drops_what_it_held(
    tmp_path: Path, hanging: Receiver
) -> None:
    gone = NotificationTarget("gone", NotifyKind.WEBHOOK, hanging.url("/gone"), timeout=60)
    rig = make_rig(tmp_path, with_targets(gone))
    notifier = Notifier()
    rig.controller.subscribe(notifier)

    async def body() -> None:
        await rig.start()
        wait_for(lambda: hanging.hanging("/gone") == 1, "the first POST", timeout=10)
        rig.controller.pause(SERVICE, "a", "alice")
        rig.controller.resume(SERVICE, "b", "alice")
        assert notifier.stats()["gone"].queued == 2
        rig.spec = replace(rig.spec, notifications=Notifications())
        rig.controller.spec_changed()
        rig.controller.pause(SERVICE, "c", "alice")

    try:
        run(body())
        st = notifier.stats()["gone"]
        assert (st.dropped, st.queued) == (2, 0)
        hanging.release()
        wait_for(lambda: hanging.hanging("/gone") == 0, "the first POST to end", timeout=10)
        assert len(hanging.at("/gone")) == 1  # nothing after it left the spec
    finally:
        notifier.close()
        rig.store.close()


# ---- the lab ----


def test_the_lab_writes_a_webhook_target_for_notify(tmp_path: Path) -> None:
    url = "http://127.0.0.1:9/events"
    mesh = LocalMesh(tmp_path / "with", MeshOptions(notify_url=url))
    mesh.workdir.mkdir()
    mesh.spec.write(with_canary=True)
    spec = load_spec(mesh.spec.path)
    assert spec.notifications_for("recommender").targets == (
        NotificationTarget("lab", NotifyKind.WEBHOOK, url),
    )
    plain = LocalMesh(tmp_path / "without", MeshOptions())
    plain.workdir.mkdir()
    plain.spec.write(with_canary=False)
    assert "notifications" not in load_spec(plain.spec.path).raw
    assert cli_main(["lab", "run", "--notify", "ftp://example.com/x"]) == 2


def test_lab_run_notify_sends_the_rollback_as_a_cloudevent(
    tmp_path: Path, receiver: Receiver
) -> None:
    """The whole path: `serve` (the leader) with the lab's spec, a real rollout judged on
    real Envoy metrics, and the notifications it sends."""
    out = tmp_path / "lab"
    res = subprocess.run(
        [sys.executable, "-m", "xds_server.cli", "lab", "run", "--scenario", "bad-canary",
         "--fast", "--regions", "2", "--envoys-per-region", "1",
         "--notify", receiver.url("/lab"), "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"lab: notifications (CloudEvents) to {receiver.url('/lab')}" in res.stdout
    got = receiver.at("/lab")
    kinds = ce_types(got)
    assert kinds[0] == "rollout.started" and kinds[-1] == "rollout.rolled_back", kinds
    assert "rollout.step" in kinds
    assert {r.content_type for r in got} == {CLOUDEVENTS_CONTENT_TYPE}
    data = got[-1].body["data"]
    assert data["region"] == "eu-west" and data["metric"] == "error_rate"
    assert data["weights_before"]["eu-west"]["canary"] == 20
    assert data["weights_after"]["eu-west"]["canary"] == 0
