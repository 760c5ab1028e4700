"""Audit retention and archives (issue 30), on a real SQLite store and a real etcd
cluster: a finished rollout past the retention moves to its archive (compressed, one
object per rollout) and still reads, in `xdsctl audit` and `audit verify` (the chain
kept; an entry edited inside an archive is named); an active rollout's audit is never
archived; a replica keeps no archived or old entries in memory; reads page.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from aetcd import rpc

from tests.conftest import make_spec_doc, write_spec
from tests.support import wait_for, wait_for_async
from tests.test_audit_chain import CLI, CTL, REGIONS, chains, decisions, leading
from tests.test_audit_records import SQLITE, load_dump
from xds_server.ha import store_audit
from xds_server.ha.etcd import SyncKV, async_client, parse_store_url, put_op, range_end
from xds_server.ha.store import EtcdStore
from xds_server.lab.etcd import EtcdCluster
from xds_server.lab.procs import Process, free_port
from xds_server.rollout import decide as sm
from xds_server.rollout.archive import Query, decode, due
from xds_server.rollout.audit import AuditEntry, Weights, transition_entry
from xds_server.rollout.audit_chain import ChainReport
from xds_server.rollout.decision import EntryKind
from xds_server.rollout.retention import AuditRetention
from xds_server.rollout.state import PROGRESSING, RolloutState
from xds_server.rollout.store import FILE_NAME, SCHEMA_VERSION, Store

NOW = 1_000_000.0
RETENTION = 60.0
Decisions = list[tuple[RolloutState, list[AuditEntry]]]


def rollout(service: str, version: str, n: int, now: float, end: str = "") -> Decisions:
    """A rollout's decisions (`decisions`: 1 + 2(n-1) entries), then with `end`
    ("abort"), its abort: a rolled-back rollout, finished at `now + n`."""
    out = list(decisions(service, version, n, now=now))
    if end:
        state = out[-1][0]
        d = sm.abort(state, now + n, "enough")
        at5 = Weights(90.0, 5.0, 5.0)
        prod = Weights(100.0, 0.0, 0.0)
        out.append((d.state, [transition_entry(d.state, t, now + n, at5, prod, None, None)
                              for t in d.transitions]))  # fmt: skip
    return out


def fill(store: Store | EtcdStore, *plans: Decisions) -> None:
    for plan in plans:
        for state, entries in plan:
            store.record(state, entries, regions=("us-east",))


def sweep(store: Store | EtcdStore, now: float = NOW) -> int:
    return asyncio.run(AuditRetention(store, RETENTION, clock=lambda: now).sweep())


def edited(blob: bytes, entry_id: int, store: str) -> bytes:
    """The archive with one entry's reason changed, as an attacker would."""
    lines = zlib.decompress(blob).decode().split("\n")
    for i, line in enumerate(lines[1:], start=1):
        record = json.loads(line)
        if record["id"] == entry_id:
            doc = record["row"] if store == "sqlite" else record["document"]
            doc["reason"] = "nothing to see here"
            lines[i] = json.dumps(record)
    return zlib.compress("\n".join(lines).encode())


# ---- the policy ----


def test_only_finished_rollouts_past_the_retention_are_due() -> None:
    (live, _), *_ = rollout("svc", "v1", 1, now=0.0)
    done = rollout("svc", "v2", 1, now=0.0, end="abort")[-1][0]
    assert done.phase == "rolled_back" and done.updated_at == 1.0
    assert not due(live, now=10**9, retention=1)  # never, however old
    assert not due(done, now=1.0 + RETENTION - 0.1, retention=RETENTION)
    assert due(done, now=1.0 + RETENTION, retention=RETENTION)


# ---- SQLite ----


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[Store]:
    store = Store.in_dir(tmp_path)
    yield store
    store.close()


def test_sqlite_a_finished_rollout_moves_to_its_archive_and_still_reads(
    sqlite_store: Store,
) -> None:
    store = sqlite_store
    old = rollout("svc", "v1", 3, now=NOW - 1000, end="abort")  # 7 + 3 entries
    live = rollout("svc", "v2", 3, now=NOW - 1000)  # older than the retention, but live
    recent = rollout("other", "v1", 2, now=NOW - 30, end="abort")  # inside the retention
    fill(store, old, live, recent)
    before = store.audit()
    assert store.archivable(NOW, RETENTION) == [("svc", "v1")]

    assert sweep(store) == 1
    rows = store.db.execute("SELECT COUNT(*) FROM audit WHERE canary_version = 'v1' "
                            "AND service = 'svc'").fetchone()  # fmt: skip
    assert rows == (0,)
    ((blob, first, last, n),) = store.db.execute(
        "SELECT data, first_id, last_id, entries FROM audit_archive"
    ).fetchall()
    header, archived = decode(blob, "test")
    assert (first, last, n) == (1, 10, 10) == (header.first_id, header.last_id, header.entries)
    assert header.last_hash == archived[-1].chain.hash if archived[-1].chain else False
    assert len(blob) < sum(len(json.dumps(r)) for r in _rows(store, "other")) * 10 / 4

    # One log: the same entries, ids and hashes, live and archived merged by id.
    assert store.audit() == before
    assert chains(store.audit())[("svc", "v1")] == ChainReport("svc", "v1", 10, 0)
    assert [e.id for e in store.audit(service="svc", version="v1", limit=3)] == [8, 9, 10]
    assert store.latest_checks("svc", "v1") == {}  # (its checks name no region)
    assert sweep(store) == 0  # archived once; the live rollout never
    assert sweep(store, now=NOW + 10**7) == 1  # ("other" once past the retention)
    assert {s for s, _ in store.db.execute("SELECT service, 1 FROM audit")} == {"svc"}


def _rows(store: Store, service: str) -> list[tuple[object, ...]]:
    return store.db.execute("SELECT * FROM audit WHERE service = ?", (service,)).fetchall()


def test_sqlite_live_entries_cannot_be_deleted_and_an_edited_archive_is_named(
    sqlite_store: Store,
) -> None:
    store = sqlite_store
    fill(
        store,
        rollout("svc", "v1", 3, now=NOW - 1000, end="abort"),
        rollout("svc", "v2", 2, now=NOW),
    )
    sweep(store)
    with pytest.raises(sqlite3.IntegrityError, match="only archived entries leave"):
        store.db.execute("DELETE FROM audit WHERE canary_version = 'v2'")
    db = sqlite3.connect(store.path, isolation_level=None)
    with pytest.raises(sqlite3.IntegrityError, match="archive is append-only"):
        db.execute("UPDATE audit_archive SET archived_at = 0")
    db.execute("DROP TRIGGER archive_no_update")  # (an attacker with write access)
    (blob,) = db.execute("SELECT data FROM audit_archive").fetchone()
    db.execute("UPDATE audit_archive SET data = ?", (edited(blob, 4, "sqlite"),))
    db.close()
    report = chains(store.audit())[("svc", "v1")]
    assert report.broken_at == 4 and "edited" in report.why
    assert chains(store.audit())[("svc", "v2")].intact


def test_sqlite_an_entry_that_does_not_decode_leaves_its_rollout_live(
    sqlite_store: Store,
) -> None:
    """An archive must read back: a rollout with an unreadable row stays live (logged
    once a term); the others are archived."""
    store = sqlite_store
    fill(store, rollout("bad", "v1", 2, now=NOW - 1000, end="abort"),
         rollout("good", "v1", 2, now=NOW - 1000, end="abort"))  # fmt: skip
    db = sqlite3.connect(store.path, isolation_level=None)
    db.execute("DROP TRIGGER audit_no_update")
    db.execute("UPDATE audit SET weights_after = 'not json' WHERE service = 'bad' AND id = 2")
    db.close()
    retention = AuditRetention(store, RETENTION, clock=lambda: NOW)
    assert asyncio.run(retention.sweep()) == 1
    assert retention.unreadable == {("bad", "v1")}
    assert asyncio.run(retention.sweep()) == 0  # (not tried again this term)
    assert [s for (s,) in store.db.execute("SELECT service FROM audit_archive")] == ["good"]
    assert store.db.execute("SELECT COUNT(*) FROM audit WHERE service = 'bad'").fetchone()[0]


def test_sqlite_pages_cross_the_live_log_and_the_archives(sqlite_store: Store) -> None:
    store = sqlite_store
    fill(
        store,
        rollout("a", "v1", 4, now=NOW - 5000, end="abort"),
        rollout("b", "v1", 3, now=NOW - 4000, end="abort"),
        rollout("a", "v2", 5, now=NOW),
    )
    every = store.audit()
    sweep(store)
    assert store.db.execute("SELECT COUNT(*) FROM audit_archive").fetchone() == (2,)
    pages, before = [], None
    while page := store.audit(limit=4, before_id=before):
        pages[:0] = page
        before = page[0].id
    assert pages == every == store.audit()
    assert (
        store.audit(service="a", kind="check", region=None, limit=2)
        == [e for e in every if e.service == "a" and e.kind == "check"][-2:]
    )
    assert store.audit(after_id=5, before_id=12) == [e for e in every if 5 < e.id < 12]
    assert store.audit(since=NOW - 3999) == [e for e in every if e.time >= NOW - 3999]


def test_sqlite_a_store_of_schema_2_is_migrated_and_its_unchained_log_archives(
    tmp_path: Path,
) -> None:
    """The log written before the chain (and before versions): migrated to the archive's
    schema; its finished rollout archives, entries read as before, unchained (not broken)."""
    path = tmp_path / FILE_NAME
    path.write_bytes(SQLITE.read_bytes())
    store = Store(path)
    try:
        assert store.migrated_from == 1
        assert store.db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        before = store.audit()
        finished = [(s.service, s.canary_version, s.phase) for s in store.load_rollouts()]
        assert ("recommender", "v2", "rolled_back") in finished
        assert store.archivable(10**10, RETENTION)
        assert sweep(store, now=10**10) >= 1
        assert store.audit() == before
        reports = chains(store.audit())
        assert all(r.intact and r.unchained == r.entries for r in reports.values())
    finally:
        store.close()


# ---- etcd ----


def test_etcd_a_finished_rollout_moves_to_its_archive_and_leaves_memory(
    shared_etcd: EtcdCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = "/test/archive"
    monkeypatch.setattr(store_audit, "PART_BYTES", 700)  # (several parts: a large archive)
    leader = leading(shared_etcd, prefix)
    follower = EtcdStore(parse_store_url(shared_etcd.url, prefix))
    try:
        fill(
            leader,
            rollout("svc", "v1", 6, now=NOW - 1000, end="abort"),
            rollout("svc", "v2", 4, now=NOW - 1000),  # live: never archived
        )
        follower.read()
        before = follower.audit()
        assert sweep(leader) == 1
        got = leader.kv.range(f"{prefix}/", range_end(f"{prefix}/"))
        keys = {kv.key.decode(): kv for kv in got.kvs}
        assert not [k for k in keys if "/audit-log/svc/v1/" in k]
        assert len([k for k in keys if "/audit-log/svc/v2/" in k]) == 9
        parts = sorted(k for k in keys if "/archive/svc/v1/" in k)
        assert len(parts) > 1 and f"{prefix}/archive-index/svc/v1" in keys

        follower.read()
        assert follower.audit() == before == leader.audit()
        assert chains(follower.audit())[("svc", "v1")] == ChainReport("svc", "v1", 16, 0)
        assert [e.id for e in follower.audit(version="v1", service="svc", limit=2)] == [15, 16]
        # Memory: the live rollout's newest entries only; of the archived one, its header.
        for store in (leader, follower):
            memory = store.view.log
            assert ("svc", "v1") not in memory.heads and ("svc", "v1") not in memory.newest
            assert not memory.checks  # (a finished rollout's latest checks: until archived)
            assert set(memory.newest) == {("svc", "v2")}
            held = [e for n in memory.newest.values() for e in n.values()]
            assert {e.canary_version for e in held} == {"v2"} and len(held) <= 6
            assert memory.archives[("svc", "v1")].header.entries == 16

        # An entry edited inside the archive: its part decompressed, changed, put again.
        blob = b"".join(keys[k].value for k in parts)
        changed = edited(blob, 9, "etcd")
        ops = [put_op(k, changed[i * 700 : (i + 1) * 700]) for i, k in enumerate(parts)]
        leader.kv.txn(rpc.TxnRequest(success=ops))
        report = chains(follower.audit())[("svc", "v1")]
        assert report.broken_at == 9 and "edited" in report.why
        assert chains(follower.audit())[("svc", "v2")].intact
    finally:
        leader.close()
        follower.close()


def test_etcd_reads_page_and_the_watch_follows_an_archive(shared_etcd: EtcdCluster) -> None:
    async def scenario() -> None:
        prefix = "/test/archive-pages"
        leader = leading(shared_etcd, prefix)
        address = parse_store_url(shared_etcd.url, prefix)
        follower = EtcdStore(address, async_client(address))
        await follower.start()
        watch = asyncio.get_running_loop().create_task(follower.watch())
        try:
            fill(
                leader,
                rollout("a", "v1", 4, now=NOW - 5000, end="abort"),
                rollout("b", "v1", 3, now=NOW - 4000, end="abort"),
                rollout("a", "v2", 5, now=NOW),
            )
            every = leader.audit()
            await wait_for_async(
                lambda: follower.view.log.seq == every[-1].id, "the watch", timeout=5
            )
            assert ("a", "v2") in follower.view.log.newest
            assert await AuditRetention(leader, RETENTION, clock=lambda: NOW).sweep() == 2
            await wait_for_async(
                lambda: len(follower.view.log.archives) == 2, "the watch", timeout=5
            )
            assert set(follower.view.log.heads) == {("a", "v2")}
            pages, before = [], None
            while page := follower.audit(limit=4, before_id=before):
                pages[:0] = page
                before = page[0].id
            assert pages == every == follower.audit()
            assert (
                follower.audit(service="a", kind="transition", limit=1)
                == [e for e in every if e.service == "a" and e.kind == "transition"][-1:]
            )
            assert follower.audit(after_id=5, before_id=12) == [e for e in every if 5 < e.id < 12]
            checks = follower.latest_checks("a", "v2")
            assert checks == leader.latest_checks("a", "v2")
            q = Query(service="b")
            assert follower.audit(service="b") == [e for e in every if q.matches(e)]
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
            follower.close()
            await follower.client.close()
            leader.close()

    asyncio.run(scenario())


def test_etcd_latest_checks_from_memory_then_from_the_archive(shared_etcd: EtcdCluster) -> None:
    prefix = "/test/archive-checks"
    leader = leading(shared_etcd, prefix)
    follower = EtcdStore(parse_store_url(shared_etcd.url, prefix))
    try:
        plan = rollout("svc", "v1", 2, now=NOW - 1000, end="abort")
        state = plan[-2][0]
        looked = AuditEntry(
            time=NOW - 999, service="svc", canary_version="v1", region="eu-west",
            kind=EntryKind.CHECK, step=0, phase_from=PROGRESSING, phase_to=PROGRESSING,
            weights_before=None, weights_after=None, measurements=None, verdict=None,
            reason="looked", snapshot_version=None, actor="controller",
        )  # fmt: skip
        fill(leader, [*plan[:-1], (state, [looked]), plan[-1]])
        follower.read()  # (a reader's view: what it does not hold, it reads back)
        (held,) = leader.view.log.checks[("svc", "v1")].values()
        assert held.reason == "looked" and leader.view.log.entries_held() == 1
        assert follower.latest_checks("svc", "v1") == {"eu-west": held}
        assert leader.latest_checks("svc", "v1") == {"eu-west": held}
        asyncio.run(follower.start())  # (a replica's view: held)
        assert follower.view.log.checks == leader.view.log.checks
        assert sweep(leader) == 1
        asyncio.run(follower.start())
        assert follower.view.log.entries_held() == 0
        assert follower.latest_checks("svc", "v1") == {"eu-west": held}  # (its archive)
        assert ("svc", "v1") in follower._archived_checks
    finally:
        leader.close()
        follower.close()


def test_etcd_a_store_of_schema_1_is_migrated_under_the_fence(shared_etcd: EtcdCluster) -> None:
    """The flat log (today's `audit/ID`) moves to the per-rollout log before the leader's
    first write (here, an archive), each entry keeping its commit's version; the old
    rollout archives, and the next ids follow the flat log's."""
    prefix = "/test/archive-migrate"
    load_dump(shared_etcd, prefix)
    leader = leading(shared_etcd, prefix)
    reader = EtcdStore(parse_store_url(shared_etcd.url, prefix))
    try:
        before = leader.audit()
        assert leader.view.log.legacy and len(before) == 45
        assert sweep(leader, now=10**10) >= 1
        kv = SyncKV(parse_store_url(shared_etcd.url, prefix))
        got = kv.range(f"{prefix}/", range_end(f"{prefix}/")).kvs
        kv.close()
        assert not [k for k in got if k.key.decode().startswith(f"{prefix}/audit/")]
        assert [k for k in got if k.key.decode().startswith(f"{prefix}/archive-index/")]
        reader.read()
        assert reader.audit() == before
        assert reader.view.schema == SCHEMA_VERSION and not reader.view.log.legacy
        (state, entries), *_ = decisions("svc", "v9", 1, now=NOW)
        leader.record(state, entries)
        reader.read()
        assert [e.id for e in reader.audit()[45:]] == [46, 47, 48]
    finally:
        reader.close()
        leader.close()


# ---- xdsctl, against a running server ----


def _serve(tmp_path: Path, *args: str) -> tuple[Process, str]:
    ports = {(r, p): free_port() for r in REGIONS for p in ("production", "canary")}
    spec = tmp_path / "mesh.yaml"
    write_spec(spec, make_spec_doc(ports, regions=REGIONS))
    admin = f"127.0.0.1:{free_port()}"
    server = Process(
        "server",
        [*CLI, "serve", "--spec", str(spec), "--audit-retention", "1", "--xds-address",
         f"127.0.0.1:{free_port()}", "--admin-address", admin, "--metrics-address",
         "127.0.0.1:0", "--ui-address", "", "--prometheus-url",
         f"http://127.0.0.1:{free_port()}", *args],
        tmp_path / "server.log",
    )  # fmt: skip
    return server, admin


def _ctl(admin: str, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [*CTL, "--server", admin, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def test_xdsctl_reads_and_verifies_what_the_leader_archived(tmp_path: Path) -> None:
    """SQLite: `serve --audit-retention 1` archives a finished rollout within a sweep;
    `xdsctl audit` lists it as before (in pages of 200: the live rollout beside it has
    241 entries), `audit verify` passes (pages of 100), then names an entry edited
    inside the archive."""
    state_dir = tmp_path / "state"
    store = Store.in_dir(state_dir)
    fill(store, rollout("elsewhere", "v1", 3, now=NOW, end="abort"))
    fill(store, rollout("elsewhere", "v2", 120, now=NOW))  # (live: 3 + 2 * 119 entries)
    listed_before = [(e.id, e.reason) for e in store.audit()]
    assert len(listed_before) == 251
    store.close()
    server, admin = _serve(tmp_path, "--state-dir", str(state_dir))
    try:
        db = sqlite3.connect(state_dir / FILE_NAME, isolation_level=None)

        def archived() -> bool:
            assert server.alive(), server.tail()
            return db.execute("SELECT COUNT(*) FROM audit_archive").fetchone() == (1,)

        wait_for(archived, "the leader to archive the finished rollout", timeout=20)
        res = _ctl(admin, "audit", "--service", "elsewhere", "-o", "json")
        assert res.returncode == 0, res.stderr
        assert [(int(e["id"]), e["reason"]) for e in json.loads(res.stdout)] == listed_before
        res = _ctl(admin, "audit", "verify", "elsewhere", "-o", "json")
        assert res.returncode == 0, res.stdout + res.stderr
        assert {(r["version"], r["intact"], r["entries"]) for r in json.loads(res.stdout)} == {
            ("v1", True, 10),
            ("v2", True, 241),
        }
        res = _ctl(admin, "audit", "--service", "elsewhere", "--limit", "3", "-o", "json")
        assert [(int(e["id"]), e["reason"]) for e in json.loads(res.stdout)] == listed_before[-3:]

        db.execute("DROP TRIGGER archive_no_update")
        (blob,) = db.execute("SELECT data FROM audit_archive").fetchone()
        db.execute("UPDATE audit_archive SET data = ?", (edited(blob, 5, "sqlite"),))
        db.close()
        res = _ctl(admin, "audit", "verify", "elsewhere", "--version", "v1")
        assert res.returncode == 1, res.stdout + res.stderr
        assert res.stderr.strip() == "xdsctl: audit chain broken: elsewhere v1 at entry 5"
    finally:
        server.stop()


def test_a_replica_archives_under_its_fence_and_xdsctl_still_reads_it(
    shared_etcd: EtcdCluster, tmp_path: Path
) -> None:
    prefix = "/test/archive-replica"
    store = leading(shared_etcd, prefix)
    plan = rollout("elsewhere", "v1", 3, now=NOW, end="abort")
    fill(store, plan)
    listed_before = [(e.id, e.reason) for e in store.audit()]
    gone = rpc.DeleteRangeRequest(key=f"{prefix}/leader".encode())  # (the replica may lead)
    store.kv.txn(rpc.TxnRequest(success=[rpc.RequestOp(request_delete_range=gone)]))
    store.close()
    server, admin = _serve(tmp_path, "--store", shared_etcd.url, "--store-prefix", prefix,
                           "--leader-ttl", "2")  # fmt: skip
    reader = EtcdStore(parse_store_url(shared_etcd.url, prefix))
    try:

        def archived() -> bool:
            assert server.alive(), server.tail()
            reader.read()
            return ("elsewhere", "v1") in reader.view.log.archives

        wait_for(archived, "the leader replica to archive the finished rollout", timeout=30)
        res = _ctl(admin, "audit", "--service", "elsewhere", "-o", "json")
        assert res.returncode == 0, res.stderr
        assert [(int(e["id"]), e["reason"]) for e in json.loads(res.stdout)] == listed_before
        res = _ctl(admin, "audit", "verify", "elsewhere", "-o", "json")
        assert res.returncode == 0, res.stdout + res.stderr
        assert [(r["version"], r["intact"], r["entries"]) for r in json.loads(res.stdout)] == [
            ("v1", True, len(listed_before))
        ]
    finally:
        server.stop()
        reader.close()


def test_audit_seq_never_goes_back_to_a_write_the_view_already_has() -> None:
    """The migration writes audit-seq at R and the leader's first commit at R+1 (both in
    the view at once); the watch then brings R's event. The view must keep R+1, or the
    next commit, conditioned on audit-seq's revision, fails for ever (it did: found by
    tests/test_registry.py's warm-up test, every commit after the first refused)."""
    from types import SimpleNamespace

    from xds_server.ha.audit_log import AuditMemory, apply

    memory = AuditMemory(seq=4, seq_revision=6)
    apply(memory, {}, "audit-seq", SimpleNamespace(value=b"0", mod_revision=5))
    assert (memory.seq, memory.seq_revision) == (4, 6)
    apply(memory, {}, "audit-seq", SimpleNamespace(value=b"9", mod_revision=7))
    assert (memory.seq, memory.seq_revision) == (9, 7)
