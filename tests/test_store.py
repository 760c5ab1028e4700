"""The state store and audit log, on a real SQLite file."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from xds_server.rollout import decide as sm
from xds_server.rollout.audit import Weights, transition_entry
from xds_server.rollout.ports import StoreWriteError
from xds_server.rollout.store import Store
from xds_server.spec import RolloutPlan


def test_state_round_trips_and_audit_is_append_only(tmp_path: Path) -> None:
    store = Store.in_dir(tmp_path)
    d = sm.start(RolloutPlan(), "svc", "v2", ("a", "b"), now=10.0)
    at_5 = Weights(production=90.0, baseline=5.0, canary=5.0)
    entries = [transition_entry(d.state, t, 10.0, None, at_5, None, 7) for t in d.transitions]
    store.record(d.state, entries)
    store.close()

    again = Store.in_dir(tmp_path)  # as after a restart
    assert again.rollout("svc", "v2") == d.state
    assert again.load_rollouts() == [d.state]
    audit = again.audit(service="svc")
    assert [e.region for e in audit] == [None, "a", "b"]
    assert audit[1].weights_after == at_5 and audit[1].snapshot_version == 7
    assert [e.region for e in again.audit(region="b")] == ["b"]
    assert again.audit(since=11.0) == []
    assert [e.region for e in again.audit(limit=2)] == ["a", "b"]  # the newest, in order
    for sql in ("UPDATE audit SET reason = 'x'", "DELETE FROM audit"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            again.db.execute(sql)
    assert len(again.audit()) == 3


def test_a_failed_write_records_nothing(tmp_path: Path) -> None:
    store = Store.in_dir(tmp_path)
    d = sm.start(RolloutPlan(), "svc", "v2", ("a",), now=1.0)
    entry = transition_entry(d.state, d.transitions[0], 1.0, None, None, None, 1)
    with pytest.raises(StoreWriteError, match="NOT NULL"):
        store.record(d.state, [entry, replace(entry, reason=None)])  # type: ignore[arg-type]
    assert store.load_rollouts() == [] and store.audit() == []
