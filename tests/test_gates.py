"""Declarative gates, the bake window and `confirm_step`, in the decision function alone
(pure: a clock in the arguments), and the confirm hooks asked by the real controller of
a real HTTP receiver. End to end with Envoy and Prometheus: tests/test_gates_e2e.py."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.support import steps
from xds_server.rollout import decide as sm
from xds_server.rollout.decide import Observation
from xds_server.rollout.state import PAUSED, PROGRESSING, PROMOTED, ROLLED_BACK, RolloutState
from xds_server.spec import Gate, RolloutPlan, Webhook, parse_spec

from .test_controller import Rig, make_rig, make_spec
from .test_controller import run as run_async
from .test_decide import BASE, HEALTHY, PLAN, REGIONS, everywhere, obs, started

BAD = replace(HEALTHY, errors=50)
HOOK = (Webhook("ok", "http://127.0.0.1:9/confirm"),)


def run(
    plan: RolloutPlan,
    state: RolloutState,
    now: float,
    seconds: float,
    observe: Observation | None = None,
    confirmation: str | None = None,
) -> tuple[RolloutState, float, list[sm.Transition]]:
    """`seconds` of one-second intervals of healthy observations (or `observe`)."""
    seen: list[sm.Transition] = []
    for _ in range(int(seconds)):
        now += 1
        o = observe or obs(applied_at=now - 1)
        d = sm.decide(plan, state, everywhere(replace(o, confirmation=confirmation)), now)
        state = d.state
        seen.extend(d.transitions)
        if state.phase in (PROMOTED, ROLLED_BACK):
            break
    return state, now, seen


def test_a_timed_pause_holds_the_step_then_moves_on() -> None:
    plan = replace(PLAN, gates={1: Gate(100)})
    state, now, seen = run(plan, started(plan), 0, 40)
    assert steps(state) == {1}
    holding = [t for t in seen if t.reason.startswith("holding at 20%")]
    assert len(holding) == len(REGIONS)  # recorded once, when it began
    since = state.regions["us-east"].gate_since
    assert since is not None
    state, now, _ = run(plan, state, now, since + 99 - now)
    assert steps(state) == {1}, "left before the pause ran out"
    state, now, _ = run(plan, state, now, 3)
    assert steps(state) == {2}


def test_a_pause_until_promoted_holds_until_an_operator_promotes() -> None:
    plan = replace(PLAN, gates={0: Gate()})
    state, now, _ = run(plan, started(plan), 0, 600)
    assert state.phase == PROGRESSING and steps(state) == {0}
    assert all("pause until promoted" in rs.reason for rs in state.regions.values())
    state = sm.promote(plan, state, now, "looks good").state
    assert steps(state) == {1}
    state, now, _ = run(plan, state, now, 200)
    assert state.phase == PROMOTED


def test_nothing_holds_a_rollback_at_a_gate() -> None:
    plan = replace(PLAN, gates={0: Gate()}, failures_before_rollback=1)
    state, now, _ = run(plan, started(plan), 0, 40)
    assert steps(state) == {0} and state.regions["us-east"].gate_since is not None
    state, now, _ = run(plan, state, now, 3, observe=obs(canary=BAD, applied_at=0))
    assert state.phase == ROLLED_BACK


def test_the_bake_judges_at_100_and_a_breach_rolls_back() -> None:
    plan = replace(PLAN, bake=1000)
    state, now, seen = run(plan, started(plan), 0, 200)
    assert state.phase == PROGRESSING and steps(state) == {3}
    assert any(t.reason.startswith("baking at 100%") for t in seen)
    state, now, _ = run(plan, state, now, 3, observe=obs(canary=BAD, applied_at=0, step=None))
    assert state.phase == ROLLED_BACK
    assert all(rs.phase == ROLLED_BACK for rs in state.regions.values())


def test_after_the_bake_the_rollout_is_final_and_an_abort_during_it_rolls_back() -> None:
    plan = replace(PLAN, bake=1000)
    baking, now, _ = run(plan, started(plan), 0, 200)
    aborted = sm.abort(baking, now, "the dashboards look wrong").state
    assert aborted.phase == ROLLED_BACK
    done, _, _ = run(plan, baking, now, 1000, observe=obs(applied_at=0, step=None))
    assert done.phase == PROMOTED


def test_confirm_step_holds_until_the_hooks_say_yes() -> None:
    plan = replace(PLAN, confirm_step=HOOK)
    state = started(plan)
    assert not sm.awaiting_confirmation(plan, state, 0)
    state, now, seen = run(plan, state, 0, 40)
    assert steps(state) == {0}
    assert sm.awaiting_confirmation(plan, state, now)
    assert any("asking the confirm_step hooks before 20%" in t.reason for t in seen)
    state, now, seen = run(plan, state, now, 5, confirmation="HTTP 503: freeze window")
    assert steps(state) == {0}
    assert all(
        "held before 20% by confirm_step: HTTP 503" in rs.reason for rs in state.regions.values()
    )
    state, now, _ = run(plan, state, now, 1, confirmation="")
    assert steps(state) == {1}
    assert not sm.awaiting_confirmation(plan, state, now)


def test_a_pause_comes_before_the_hooks_and_promote_skips_both() -> None:
    plan = replace(PLAN, gates={0: Gate(30)}, confirm_step=HOOK)
    state, now, _ = run(plan, started(plan), 0, 20)
    assert steps(state) == {0} and not sm.awaiting_confirmation(plan, state, now)
    state, now, _ = run(plan, state, now, 40)
    assert sm.awaiting_confirmation(plan, state, now)
    assert sm.promote(plan, state, now, "go").state.regions["us-east"].step == 1


def test_an_operator_pause_at_a_gate_and_resume_keep_the_gate() -> None:
    plan = replace(PLAN, gates={0: Gate()})
    state, now, _ = run(plan, started(plan), 0, 40)
    since = state.regions["us-east"].gate_since
    state = sm.pause(state, now, "lunch").state
    assert state.phase == PAUSED
    state = sm.resume(state, now, "back").state
    state, now, _ = run(plan, state, now, 30)
    assert steps(state) == {0} and state.regions["us-east"].gate_since == since


def test_the_spec_says_gates_between_steps() -> None:
    spec = parse_spec(
        "regions: [us-east]\n"
        "rollout:\n"
        "  steps: [5, 20, {pause: until_promoted}, 75, {pause: 10m}, 100]\n"
        "  bake: 5m\n"
        "services:\n"
        "  - name: s\n"
        "    pools:\n"
        "      production: {version: v1, endpoints: {us-east: ['127.0.0.1:1']}}\n"
    )
    plan = spec.services[0].rollout
    assert plan.steps == (5, 20, 75, 100)
    assert plan.gates == {1: Gate(), 2: Gate(600)}
    assert plan.bake == 300


def test_base_plan_has_no_gates() -> None:
    state, _, seen = run(PLAN, started(), 0, 200)
    assert state.phase == PROMOTED
    assert not any("holding" in t.reason or "baking" in t.reason for t in seen)
    assert BASE.comparator_pool == "baseline"


# ---- confirm_step through the real controller, asking a real HTTP receiver ----


class ConfirmReceiver:
    """A local HTTP endpoint that answers `status` and keeps every body it was sent."""

    def __init__(self) -> None:
        self.status = 503
        self.bodies: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                receiver.bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(receiver.status)
                self.end_headers()
                self.wfile.write(b"change freeze until 17:00")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/confirm"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def tick_until(rig: Rig, done: Callable[[], bool], seconds: float = 20) -> None:
    """Tick (one fake interval each) until `done()`, polling real time: the hooks run in
    threads of their own."""
    deadline = time.monotonic() + seconds
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"not done within {seconds}s: {rig.state()}")
        await rig.tick()
        await asyncio.sleep(0.02)  # the poll period: let the hook's thread answer


def test_the_controller_asks_confirm_step_hooks_and_holds_on_their_answer(
    tmp_path: Path,
) -> None:
    hook = ConfirmReceiver()
    rig = make_rig(tmp_path, make_spec(confirm_step=[{"name": "change-freeze", "url": hook.url}]))

    def reason() -> str:
        return rig.state().regions["us-east"].reason

    async def body() -> None:
        await rig.start()
        await tick_until(rig, lambda: "by confirm_step" in reason())
        assert rig.state().regions["us-east"].step == 0
        assert "HTTP 503: change freeze until 17:00" in reason()
        hook.status = 200
        await tick_until(rig, lambda: rig.state().regions["us-east"].step == 1)

    try:
        run_async(body())
        held = [e for e in rig.store.audit(kind="check") if "by confirm_step" in e.reason]
        assert held, "the hold is in the audit log"
    finally:
        hook.close()
        rig.store.close()
    first = hook.bodies[0]
    assert first["phase"] == "confirm_step" and first["next_canary_percent"] == 20
    assert set(first["regions"]) == set(REGIONS)
