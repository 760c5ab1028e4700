"""The typed audit record (`rollout/audit.py`) and its one encoding (`rollout/audit_codec.py`).

Logs written before the record was typed must read back, as typed entries and to the
byte: tests/data holds a SQLite store and an etcd dump that the code of commit d026d5c
wrote (hack/make_audit_fixtures.py: one controller scenario on each store). They are
read here through today's `Store` and `EtcdStore` (the dump loaded into a real etcd).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from itertools import groupby
from pathlib import Path
from typing import Any

import pytest
from aetcd import rpc
from hypothesis import given, settings
from hypothesis import strategies as st

from xds_server.ha.etcd import SyncKV, parse_store_url, put_op
from xds_server.ha.store import VERSION_SCALE, EtcdStore
from xds_server.lab.etcd import EtcdCluster
from xds_server.rollout.audit import (
    AuditEntry,
    Measurements,
    PoolNumbers,
    RollbackCause,
    Weights,
    failed_metric,
    rollback_cause,
)
from xds_server.rollout.audit_codec import (
    COLUMNS,
    AuditDecodeError,
    entry_doc,
    from_document,
    from_row,
    measurements_from_json,
    measurements_json,
    to_document,
    to_row,
    verdict_from_json,
    verdict_json,
    weights_from_json,
    weights_json,
)
from xds_server.rollout.decision import EntryKind
from xds_server.rollout.evidence import Check, MetricClass, MetricResult, Outcome, Verdict
from xds_server.rollout.state import Phase
from xds_server.rollout.store import FILE_NAME, Store
from xds_server.spec import NoDataRule

DATA = Path(__file__).parent / "data"
SQLITE = DATA / "audit_v1.sqlite3"
ETCD_DUMP = DATA / "audit_v1_etcd.json"
SERVICE = "recommender"
REGIONS = ("us-east", "eu-west", "ap-south")
ENTRIES = 45
"""What the fixtures' scenario wrote: rollout v2 (ids 1-28), then v3 (29-45)."""


# ---- the logs written before the record was typed ----


@pytest.fixture
def old_sqlite(tmp_path: Path) -> Iterator[Store]:
    """The fixture's store, copied (reading must not touch tests/data)."""
    shutil.copyfile(SQLITE, tmp_path / FILE_NAME)
    store = Store.read_only(tmp_path)
    yield store
    store.close()


def one(
    audit: list[AuditEntry], time: float, region: str | None, kind: EntryKind, version: str = "v2"
) -> AuditEntry:
    """The entry of one decision for one region. (Which region's entry of a decision comes
    first varies: the regions are observed concurrently.)"""
    key = (version, time, region, kind)
    (entry,) = [e for e in audit if (e.canary_version, e.time, e.region, e.kind) == key]
    return entry


CHECK, TRANSITION = EntryKind.CHECK, EntryKind.TRANSITION


def check_the_scenario(audit: list[AuditEntry]) -> None:
    """What the fixtures' scenario left, as typed entries (the same on either store)."""
    assert [e.id for e in audit] == list(range(1, ENTRIES + 1))

    started = audit[0]
    assert (started.kind, started.region, started.phase_from, started.phase_to) == (
        EntryKind.TRANSITION,
        None,
        Phase.PENDING,
        Phase.PROGRESSING,
    )
    assert started.reason == "rollout of recommender v2 started" and started.actor == "controller"
    assert started.weights_before is None and started.weights_after is None
    assert started.measurements is None and started.verdict is None
    assert (started.time, started.canary_version, started.step) == (1000.0, "v2", 0)

    # Warm-up: the pools are healthy, production's requests are mirrored (no weight).
    shadowing = one(audit, 1001.0, "us-east", CHECK)
    assert (shadowing.kind, shadowing.region, shadowing.step) == (EntryKind.CHECK, "us-east", -1)
    assert shadowing.phase_from == shadowing.phase_to == Phase.WARMING
    assert shadowing.weights_before == Weights(production=100.0, baseline=0.0, canary=0.0)
    assert shadowing.weights_after == Weights(100.0, 0.0, 0.0, shadow=20.0)
    assert shadowing.measurements is None and shadowing.verdict is None

    # A hold: ap-south had no data at all.
    hold = one(audit, 1005.0, "ap-south", CHECK)
    assert (hold.region, hold.kind, hold.step) == ("ap-south", EntryKind.CHECK, 0)
    assert hold.verdict is not None and hold.verdict.outcome == Outcome.NO_DATA
    assert hold.verdict.checks == () and hold.verdict.score is None
    assert [m.classification for m in hold.verdict.metrics] == [MetricClass.NO_DATA] * 3
    assert hold.measurements == Measurements(
        canary=PoolNumbers(), canary_step=PoolNumbers(), comparator_pool="baseline",
        comparator=PoolNumbers(),
    )  # fmt: skip
    assert failed_metric(hold.verdict) is None

    # A passed step: the step's numbers, and the baseline's.
    passed = one(audit, 1003.0, "us-east", CHECK)
    assert passed.measurements == Measurements(
        canary=PoolNumbers(1000.0, 0.0, 0.0, 50.0, None),
        canary_step=PoolNumbers(1000.0, 0.0, 0.0, None, None),
        comparator_pool="baseline",
        comparator=PoolNumbers(1000.0, 0.0, 0.0, 50.0, None),
    )
    assert passed.verdict is not None and passed.verdict.outcome == Outcome.PASS
    assert passed.verdict.score == 100.0 and not passed.verdict.conclusive
    assert one(audit, 1006.0, "eu-west", TRANSITION).weights_after == Weights(60.0, 20.0, 20.0)

    # An operator's pause and resume.
    pause, resume = audit[22:24]
    assert [(e.actor, e.phase_to, e.region) for e in (pause, resume)] == [
        ("alice", Phase.PAUSED, None),
        ("alice", Phase.PROGRESSING, None),
    ]
    assert pause.reason == "paused: looking at the latency graph"

    # The rollback: eu-west's canary failed the guardrail and the analysis.
    culprit = one(audit, 1008.0, "eu-west", TRANSITION)
    assert (culprit.region, culprit.phase_to, culprit.step) == ("eu-west", Phase.ROLLED_BACK, 1)
    assert culprit.weights_before == Weights(60.0, 20.0, 20.0)
    assert culprit.weights_after == Weights(100.0, 0.0, 0.0)
    assert culprit.measurements is not None
    assert culprit.measurements.canary == PoolNumbers(1000.0, 300.0, 0.3, 50.0, None)
    assert culprit.measurements.comparator_pool == "baseline"
    assert culprit.measurements.comparator == PoolNumbers(1000.0, 0.0, 0.0, 50.0, None)
    verdict = culprit.verdict
    assert verdict is not None
    assert (verdict.outcome, verdict.score, verdict.conclusive) == (Outcome.FAIL, 0.0, True)
    assert verdict.checks == (
        Check("error_rate", 0.3, 0.05, ok=False, floor=False),
        Check("p99_ms", 50.0, 500.0, ok=True, floor=False),
    )
    assert verdict.metrics[0] == MetricResult(
        name="error_rate",
        classification=MetricClass.HIGH,
        effect=601.0,
        p_value=5.9989819329949e-82,
        detail="canary 300/1000, baseline 0/1000",
        group="errors",
        critical=True,
        on_no_data=NoDataRule.PAUSE,
        alpha=0.0011111111111111122,
    )
    assert [m.name for m in verdict.metrics] == ["error_rate", "latency", "latency_p99"]
    assert one(audit, 1008.0, None, TRANSITION).verdict == verdict  # (the rollout's entry)
    bystander = one(audit, 1008.0, "us-east", TRANSITION)
    assert bystander.verdict is None and bystander.reason == culprit.reason

    v2 = [e for e in audit if e.canary_version == "v2"]
    assert rollback_cause(v2) == RollbackCause(
        region="eu-west",
        metric="error_rate",
        reason=culprit.reason,
        actor="controller",
        time=1008.0,
        entry_id=culprit.id,
    )
    # The second rollout, aborted by an operator: no metric.
    v3 = [e for e in audit if e.canary_version == "v3"]
    cause = rollback_cause(v3)
    assert cause is not None and (cause.metric, cause.actor) == (None, "bob")
    assert cause.reason == "aborted: wrong build" and cause.time == 1011.0
    first = min(e.id for e in v3 if e.phase_to == Phase.ROLLED_BACK)
    assert cause.region is not None and cause.entry_id == first


def test_a_sqlite_store_written_before_the_typed_record_reads_as_typed_entries(
    old_sqlite: Store,
) -> None:
    audit = old_sqlite.audit(service=SERVICE)
    check_the_scenario(audit)
    by_id = {e.id: e for e in audit}
    assert [e.snapshot_version for e in (by_id[1], by_id[5], by_id[15], by_id[26])] == [
        None,
        1,
        None,
        4,
    ]
    assert by_id[26] == one(audit, 1008.0, "eu-west", TRANSITION)
    latest = old_sqlite.latest_checks(SERVICE, "v2")
    assert {r: e.id for r, e in latest.items()} == {"ap-south": 18, "eu-west": 19, "us-east": 17}
    newest = old_sqlite.audit(kind=EntryKind.CHECK, region="eu-west", limit=2)
    assert [e.id for e in newest] == [33, 38]


def test_every_old_sqlite_row_is_written_again_to_the_byte(tmp_path: Path) -> None:
    db = sqlite3.connect(f"{SQLITE.resolve().as_uri()}?mode=ro&immutable=1", uri=True)
    db.row_factory = sqlite3.Row
    rows = [dict(r) for r in db.execute("SELECT * FROM audit ORDER BY id")]
    db.close()
    assert len(rows) == ENTRIES
    for row in rows:
        again = to_row(from_row(row))
        assert again == {c: row[c] for c in COLUMNS}, row["id"]
        # The admin API's *_json fields are the columns as they were.
        entry = from_row(row)
        assert weights_json(entry.weights_after) == row["weights_after"]
        assert measurements_json(entry.measurements) == row["measurements"]
        assert verdict_json(entry.verdict) == row["verdict"]


def load_dump(cluster: EtcdCluster, prefix: str) -> dict[str, int]:
    """The dump's keys (not its leader's, which was on a lease) into etcd under `prefix`,
    each of the old commits again as one transaction; each key's new mod revision."""
    dump = json.loads(ETCD_DUMP.read_text())
    old = dump["prefix"]
    keys = [k for k in dump["keys"] if k["key"] != f"{old}/leader"]
    kv = SyncKV(parse_store_url(cluster.url, prefix))
    revisions = {}
    try:
        for _, commit in groupby(keys, key=lambda k: k["mod_revision"]):
            puts = [(prefix + k["key"][len(old) :], k["value"].encode()) for k in commit]
            reply = kv.txn(rpc.TxnRequest(success=[put_op(key, value) for key, value in puts]))
            revisions.update({key: reply.header.revision for key, _ in puts})
    finally:
        kv.close()
    return revisions


def test_an_etcd_dump_written_before_the_typed_record_reads_as_typed_entries(
    shared_etcd: EtcdCluster, old_sqlite: Store
) -> None:
    prefix = "/test/audit-v1"
    revisions = load_dump(shared_etcd, prefix)
    store = EtcdStore(parse_store_url(shared_etcd.url, prefix))
    try:
        store.read()
        audit = store.audit(service=SERVICE)
        check_the_scenario(audit)
        # The same scenario on the other store: the same entries, but for the snapshot
        # versions, which etcd derives from each commit's revision.
        sqlite = old_sqlite.audit(service=SERVICE)
        assert sorted(map(unnumbered, audit), key=repr) == sorted(map(unnumbered, sqlite), key=repr)
        for e in audit:
            (versioned,) = {s.snapshot_version is not None for s in sqlite if same(s, e)}
            revision = revisions[store.keys.audit(e.id)]
            assert e.snapshot_version == (revision * VERSION_SCALE if versioned else None), e.id
        latest = store.latest_checks(SERVICE, "v2")
        assert {r: e.time for r, e in latest.items()} == dict.fromkeys(REGIONS, 1006.0)
        assert [s.phase for s in store.load_rollouts()] == [Phase.ROLLED_BACK] * 2
    finally:
        store.close()


def unnumbered(e: AuditEntry) -> AuditEntry:
    """An entry but for what each store numbers its own way."""
    return replace(e, id=0, snapshot_version=None)


def same(a: AuditEntry, b: AuditEntry) -> bool:
    return unnumbered(a) == unnumbered(b)


def test_every_old_etcd_document_is_written_again_to_the_byte() -> None:
    dump = json.loads(ETCD_DUMP.read_text())
    audit = [k for k in dump["keys"] if "/audit/" in k["key"]]
    assert len(audit) == ENTRIES
    for k in audit:
        seq = int(k["key"].rpartition("/")[2])
        entry = from_document(k["value"], seq, k["mod_revision"] * VERSION_SCALE)
        assert entry.id == seq
        assert to_document(entry) == k["value"], seq


# ---- the codec's own promises ----


def test_the_dashboard_row_is_every_field_with_its_parts_as_the_log_keeps_them(
    old_sqlite: Store,
) -> None:
    (culprit,) = [e for e in old_sqlite.audit(region="eu-west") if e.id == 26]
    doc = entry_doc(culprit)
    assert list(doc) == [*COLUMNS, "id"]
    assert doc["kind"] == "transition" and doc["phase_to"] == "rolled_back"
    assert doc["weights_after"] == {"production": 100.0, "baseline": 0.0, "canary": 0.0}
    assert json.dumps(doc["verdict"]) == verdict_json(culprit.verdict)
    measured = doc["measurements"]
    assert isinstance(measured, dict) and measured["comparator"] == "baseline"
    assert measured["baseline"] == {
        "requests": 1000.0,
        "errors": 0.0,
        "error_rate": 0.0,
        "p99_ms": 50.0,
        "problem": None,
    }


def test_none_reads_as_none_and_garbage_is_refused_with_where() -> None:
    for text in (None, "", "null"):
        assert weights_from_json(text) is None
        assert measurements_from_json(text) is None
        assert verdict_from_json(text) is None
    with pytest.raises(AuditDecodeError, match=r"weights\.canary: expected a number"):
        weights_from_json('{"production": 100.0, "baseline": 0.0, "canary": "5"}')
    with pytest.raises(AuditDecodeError, match=r"verdict\.outcome: 'maybe' is not one of"):
        verdict_from_json('{"outcome": "maybe", "reason": ""}')
    with pytest.raises(AuditDecodeError, match="not JSON"):
        measurements_from_json("{")
    with pytest.raises(AuditDecodeError, match=r"measurements\.canary: expected an object"):
        measurements_from_json('{"canary_step": null}')
    # A key added after an entry was written reads as its default.
    verdict = verdict_from_json(
        '{"outcome": "fail", "reason": "r", "checks": [{"metric": "p99_ms", "value": 9,'
        ' "limit": 5, "ok": false}], "score": null, "conclusive": true, "metrics": []}'
    )
    assert verdict is not None and verdict.checks == (Check("p99_ms", 9, 5, ok=False),)


# ---- round trips ----

numbers = st.floats(allow_nan=False)
maybe = st.none() | numbers
words = st.text(max_size=20)
pools = st.builds(PoolNumbers, maybe, maybe, maybe, maybe, st.none() | words)
checks = st.builds(Check, words, numbers, numbers, st.booleans(), st.booleans())
metrics = st.builds(
    MetricResult,
    words,
    st.sampled_from(MetricClass),
    maybe,
    maybe,
    words,
    words,
    st.booleans(),
    st.sampled_from(NoDataRule),
    numbers,
)
comparators = st.none() | st.sampled_from(("baseline", "production"))
weights = st.builds(Weights, numbers, numbers, numbers, maybe)
measurements = st.builds(Measurements, pools, st.none() | pools, comparators, st.none() | pools)
verdicts = st.builds(
    Verdict,
    st.sampled_from(Outcome),
    words,
    checks=st.lists(checks, max_size=3).map(tuple),
    metrics=st.lists(metrics, max_size=3).map(tuple),
    score=maybe,
    conclusive=st.booleans(),
)
entries = st.builds(
    AuditEntry,
    time=numbers,
    service=words,
    canary_version=words,
    region=st.none() | words,
    kind=st.sampled_from(EntryKind),
    step=st.none() | st.integers(),
    phase_from=st.none() | st.sampled_from(Phase),
    phase_to=st.none() | st.sampled_from(Phase),
    weights_before=st.none() | weights,
    weights_after=st.none() | weights,
    measurements=st.none() | measurements,
    verdict=st.none() | verdicts,
    reason=words,
    snapshot_version=st.none() | st.integers(min_value=0),
    actor=words,
    id=st.integers(min_value=1, max_value=2**62),
)


@settings(max_examples=200, deadline=None)
@given(entries)
def test_an_entry_decodes_to_what_was_encoded(entry: AuditEntry) -> None:
    row: dict[str, Any] = {**to_row(entry), "id": entry.id}
    assert from_row(row) == entry
    committed = 7 * VERSION_SCALE
    expected = replace(
        entry, snapshot_version=None if entry.snapshot_version is None else committed
    )
    assert from_document(to_document(entry), entry.id, committed) == expected
    assert weights_from_json(weights_json(entry.weights_after)) == entry.weights_after
    assert measurements_from_json(measurements_json(entry.measurements)) == entry.measurements
    assert verdict_from_json(verdict_json(entry.verdict)) == entry.verdict


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_nan_encodes_the_same_once_decoded(data: st.DataObject) -> None:
    """NaN is not equal to itself, so its round trip is checked on the text."""
    nan = st.floats(allow_nan=True) | st.just(float("nan"))
    verdict = data.draw(verdicts)
    verdict = replace(
        verdict, score=data.draw(nan), checks=(Check("m", data.draw(nan), 1.0, False),)
    )
    text = verdict_json(verdict)
    assert verdict_json(verdict_from_json(text)) == text
