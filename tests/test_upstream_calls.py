"""The lab's record of calls that crossed arms (`lab/upstream_calls.py`): what the
rollout groups' end-to-end test reads to tell a request in flight across a rollback's
push from a crossing while the group's canaries had weight."""

from __future__ import annotations

import time

from xds_server.lab.upstream_calls import CROSSINGS_KEPT, ArmCounts, DownstreamAnswer


def test_a_call_answered_by_another_arm_is_counted_and_kept_with_when_it_was_answered() -> None:
    counts = ArmCounts("canary")
    before = time.time()
    counts.called(DownstreamAnswer(200, "canary"), "canary")
    counts.called(DownstreamAnswer(502, error="features answered 502"), "canary")
    counts.called(DownstreamAnswer(200, "production"), "canary")
    after = time.time()
    assert counts.stats()["downstream_calls"] == 3
    assert counts.stats()["downstream_failed"] == 1
    assert counts.stats()["downstream_crossed"] == 1
    (crossed,) = counts.crossings()
    assert crossed["arm"] == "canary" and crossed["answered"] == "production"
    assert before <= crossed["at"] <= after


def test_the_latest_crossings_are_kept_oldest_first() -> None:
    counts = ArmCounts("baseline")
    for _ in range(CROSSINGS_KEPT + 5):
        counts.called(DownstreamAnswer(200, "production"), "baseline")
    kept = counts.crossings()
    assert counts.stats()["downstream_crossed"] == CROSSINGS_KEPT + 5
    assert len(kept) == CROSSINGS_KEPT
    assert [c["at"] for c in kept] == sorted(c["at"] for c in kept)
