"""When the controller looks next (rollout/scrapes.py): just after a fresh scrape lands."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.test_controller import SERVICE, make_spec
from xds_server.rollout import decide as sm
from xds_server.rollout.decide import Observation
from xds_server.rollout.evidence import Signals
from xds_server.rollout.observe import _step_read
from xds_server.rollout.scrapes import Scrapes, look_times, next_look
from xds_server.rollout.state import rollout_traffic


def test_the_next_look_moves_to_just_after_the_next_scrape() -> None:
    # Samples read at 10.0 were 0.3 s old: scrapes land at 9.7, 10.7, 11.7, ...
    s = Scrapes.of(Signals(age_s=0.3, scrape_interval=1.0), read_at=10.0)
    assert s is not None and s.newest == pytest.approx(9.7)
    # Due at 11.0 (a 1 s interval): the scrape of 10.7 is queryable at 10.9, not 11.7.
    assert next_look(11.0, 1.0, {"a": s}) == pytest.approx(10.9)
    # Never the scrape already read, however soon the look is due.
    assert s.landing_after(9.0) == pytest.approx(10.9)
    # Scrapes compare by when they land: taken at 10.4, queryable at 10.6, which is
    # within half an interval of 11.0, where the scrape of 11.4 would be 0.6 s late.
    early = Scrapes(newest=9.4, interval=1.0)
    assert next_look(11.0, 1.0, {"a": early}) == pytest.approx(10.6)
    # Several regions: each read just after its own scrape; the look starts with the
    # first of them (not after the last, which left a region's samples unread).
    other = Scrapes(newest=10.2, interval=1.0)
    assert look_times(11.0, 1.0, {"a": s, "b": other}) == {
        "a": pytest.approx(10.9),
        "b": pytest.approx(11.4),
    }
    assert next_look(11.0, 1.0, {"a": s, "b": other}) == pytest.approx(10.9)


def test_a_look_interval_longer_than_the_scrape_keeps_its_cadence() -> None:
    """A 10 s look at 1 s scrapes moves to the landing nearest its due time, not the
    first one in the half interval before it (which would look twice as often)."""
    s = Scrapes(newest=100.0, interval=1.0)
    assert next_look(110.0, 10.0, {"a": s}) == pytest.approx(110.2)
    assert next_look(110.5, 10.0, {"a": s}) == pytest.approx(110.2)


def test_the_look_keeps_its_own_cadence_without_a_usable_scrape() -> None:
    assert next_look(11.0, 1.0, {}) == 11.0
    # A scrape interval far longer than the look's: half an interval at most, else `due`.
    slow = Scrapes(newest=0.0, interval=30.0)
    assert next_look(10.0, 10.0, {"a": slow}) == 10.0
    # Stale or unread signals tell nothing of the scrapes.
    assert Scrapes.of(Signals(age_s=0.3, scrape_interval=1.0, problem="stale"), 1.0) is None
    assert Scrapes.of(Signals(age_s=None, scrape_interval=1.0), 1.0) is None
    assert Scrapes.of(Signals(age_s=0.3, scrape_interval=None), 1.0) is None
    assert Scrapes.of(None, 1.0) is None


def test_a_steps_first_look_never_reaches_back_past_the_rollouts_start() -> None:
    """Early in a step the guardrails' window reaches back a scrape before the step
    (two samples for increase()), but never before the rollout started: the canary
    cluster keeps its name across versions, and a fixed canary redeployed just after
    a rollback would otherwise be judged on the old one's errors."""
    spec = make_spec()
    svc = spec.service(SERVICE)
    state = sm.start(svc.rollout, SERVICE, "v2", spec.regions, now=100.0).state
    region = spec.regions[0]
    state = replace(
        state,
        regions={**state.regions, region: replace(state.regions[region], step_started=100.5)},
    )
    traffic = rollout_traffic(spec, {SERVICE: state})
    scrapes = Scrapes(newest=101.0, interval=1.0)
    obs = Observation(applied_at=100.5)
    early = _step_read(svc, state, traffic, region, obs, 101.2, scrapes)
    assert early is not None and early.window == pytest.approx(1.2)  # not 1.7
    # A step that began later reaches back a scrape before it, as before: 0.7 s + 1 s.
    later = replace(
        state,
        regions={**state.regions, region: replace(state.regions[region], step_started=110.0)},
    )
    late = _step_read(svc, later, traffic, region, obs, 110.7, scrapes)
    assert late is not None and late.window == pytest.approx(1.7)
