"""The audit's hash chain (issue 30): each entry carries the hash of its rollout's entry
before it, computed under the store's write; `xdsctl audit verify` checks every chain
from the admin API's listing and names the first broken entry.

Tampering is done as an attacker with write access to the store would: SQLite's
append-only triggers dropped and a row updated (or deleted), an etcd document put again
modified. The old logs of tests/data (written before the chain) read as "unchained".
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from aetcd import rpc

from tests.conftest import make_spec_doc, write_spec
from tests.support import wait_for
from tests.test_audit_records import SQLITE, load_dump
from xds_server.admin.views import audit_message
from xds_server.ha.etcd import SyncKV, parse_store_url, put_op, range_end
from xds_server.ha.store import EtcdStore
from xds_server.lab.etcd import EtcdCluster
from xds_server.lab.procs import Process, free_port
from xds_server.rollout import decide as sm
from xds_server.rollout.audit import AuditEntry, Weights, transition_entry
from xds_server.rollout.audit_chain import Chained, ChainReport, genesis, link, verify
from xds_server.rollout.audit_codec import canonical
from xds_server.rollout.decision import EntryKind
from xds_server.rollout.state import PROGRESSING, RolloutState
from xds_server.rollout.store import FILE_NAME, Store
from xds_server.spec import RolloutPlan

CLI = [sys.executable, "-m", "xds_server.cli"]
CTL = [sys.executable, "-m", "xds_server.ctl"]
REGIONS = ("us-east", "eu-west")


# ---- helpers ----


def decisions(service: str, version: str, n: int, now: float = 10.0) -> Iterator[
    tuple[RolloutState, list[AuditEntry]]
]:  # fmt: skip
    """A rollout's start (3 entries), then n-1 later decisions (2 entries each)."""
    d = sm.start(RolloutPlan(), service, version, REGIONS, now=now)
    at5 = Weights(90.0, 5.0, 5.0)
    yield (
        d.state,
        [
            transition_entry(d.state, t, now, None, at5, None, 1 if t.region else None)
            for t in d.transitions
        ],
    )
    state = d.state
    for i in range(1, n):
        state = replace(state, updated_at=now + i, reason=f"decision {i}")
        entry = AuditEntry(
            time=now + i, service=service, canary_version=version, region="us-east",
            kind=EntryKind.TRANSITION, step=i, phase_from=PROGRESSING, phase_to=PROGRESSING,
            weights_before=at5, weights_after=Weights(80.0, 10.0, 10.0), measurements=None,
            verdict=None, reason=f"decision {i}", snapshot_version=i + 1, actor="controller",
        )  # fmt: skip
        note = replace(entry, region=None, kind=EntryKind.CHECK, snapshot_version=None)
        yield state, [entry, note]


def chains(entries: Iterable[AuditEntry]) -> dict[tuple[str, str], ChainReport]:
    """What `xdsctl audit verify` concludes, through the admin API's messages."""
    messages = [audit_message(e, with_canonical=True) for e in entries]
    reports = verify(
        Chained(m.id, m.service, m.canary_version, m.prev_hash, m.hash, m.canonical.encode())
        for m in messages
    )
    return {(r.service, r.version): r for r in reports}


def attacker(path: Path) -> sqlite3.Connection:
    """A raw connection to the store, its append-only triggers dropped."""
    db = sqlite3.connect(path, isolation_level=None)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("UPDATE audit SET reason = 'x' WHERE id = 1")
    db.execute("DROP TRIGGER audit_no_update")
    db.execute("DROP TRIGGER audit_no_delete")
    return db


# ---- the encoding the hash covers ----


def test_what_the_hash_covers_is_pinned() -> None:
    """Changing the canonical encoding (a field now always written, another key order)
    would break every chain written before: this entry's bytes and hash are fixed."""
    (_, entries), *_ = decisions("svc", "v2", 1)
    entry = entries[1]
    text = canonical(entry)
    assert text == (
        b'{"actor":"controller","canary_version":"v2","kind":"transition","measurements":null,'
        b'"phase_from":"pending","phase_to":"progressing","reason":"rollout started",'
        b'"region":"us-east","service":"svc","snapshot_version":1,"step":0,"time":10.0,'
        b'"verdict":null,"weights_after":{"baseline":5.0,"canary":5.0,"production":90.0},'
        b'"weights_before":null}'
    )
    assert canonical(entry, snapshot_mark=True) == text.replace(b":1,", b':"commit",')
    assert genesis("svc", "v2") == (
        "00234ffa4535e33d959233577593c7326ebb462f17f49f017fb39ae694e7aae7"
    )
    assert link(genesis("svc", "v2"), text) == (
        "cd59febc11be46ad9b7b4f5efae2956568cbb9e32c25d33def27ad9020814ced"
    )


# ---- SQLite ----


def test_sqlite_an_intact_log_verifies_and_an_edited_row_is_named(tmp_path: Path) -> None:
    store = Store(tmp_path / FILE_NAME)
    for state, entries in decisions("svc", "v2", 4):
        store.record(state, entries)
    for state, entries in decisions("other", "v7", 2):
        store.record(state, entries)
    audit = store.audit()
    assert all(e.chain is not None for e in audit)
    assert audit[0].chain is not None and audit[0].chain.prev == genesis("svc", "v2")
    reports = chains(audit)
    assert reports[("svc", "v2")] == ChainReport("svc", "v2", 9, 0)
    assert reports[("other", "v7")] == ChainReport("other", "v7", 5, 0)

    svc = [e.id for e in audit if e.service == "svc"]
    db = attacker(store.path)
    db.execute("UPDATE audit SET reason = 'nothing to see' WHERE id = ?", (svc[4],))
    report = chains(store.audit())[("svc", "v2")]
    assert (report.broken_at, report.why) == (svc[4], "its content does not match its hash "
                                                       "(it was edited)")  # fmt: skip
    assert chains(store.audit())[("other", "v7")].intact

    # An attacker who recomputes the edited entry's hash breaks the next entry's link.
    row = store.audit()[svc[4] - 1]
    assert row.chain is not None and row.id == svc[4]
    forged = link(row.chain.prev, canonical(row))
    db.execute("UPDATE audit SET hash = ? WHERE id = ?", (forged, svc[4]))
    report = chains(store.audit())[("svc", "v2")]
    assert report.broken_at == svc[5] and f"does not chain from entry {svc[4]}" in report.why

    # An entry removed: the next one is named.
    db.execute("DELETE FROM audit WHERE id BETWEEN ? AND ?", (svc[3], svc[4]))
    assert chains(store.audit())[("svc", "v2")].broken_at == svc[5]
    db.close()
    store.close()


def test_sqlite_old_log_reads_unchained_and_chains_on_after_it(tmp_path: Path) -> None:
    """The log written before the chain: every entry unchained, reported as such (not
    broken); a rollout written on after the upgrade chains from its genesis; hashes
    stripped from a chained entry are found."""
    shutil.copyfile(SQLITE, tmp_path / FILE_NAME)
    old = Store.read_only(tmp_path)
    reports = chains(old.audit())
    old.close()
    assert reports == {
        ("recommender", "v2"): ChainReport("recommender", "v2", 28, 28),
        ("recommender", "v3"): ChainReport("recommender", "v3", 17, 17),
    }
    store = Store.in_dir(tmp_path)  # (migrated: the chain's columns)
    v3 = store.rollout("recommender", "v3")
    assert v3 is not None
    for _, entries in decisions("recommender", "v3", 3, now=2000.0):
        store.record(v3, entries)
    report = chains(store.audit())[("recommender", "v3")]
    assert report == ChainReport("recommender", "v3", 24, 17)
    assert chains(store.audit())[("recommender", "v2")].unchained == 28

    db = attacker(store.path)
    last = store.audit()[-1].id
    db.execute("UPDATE audit SET prev_hash = NULL, hash = NULL WHERE id = ?", (last,))
    report = chains(store.audit())[("recommender", "v3")]
    assert report.broken_at == last and "carries no hash" in report.why
    db.close()
    store.close()


# ---- xdsctl against a running server ----


def test_xdsctl_audit_verify_exits_non_zero_naming_the_broken_entry(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    store = Store.in_dir(state_dir)
    for state, entries in decisions("elsewhere", "v2", 3):
        store.record(state, entries)
    for state, entries in decisions("elsewhere", "v3", 2):
        store.record(state, entries)
    store.close()
    ports = {(r, p): free_port() for r in REGIONS for p in ("production", "canary")}
    spec = tmp_path / "mesh.yaml"
    write_spec(spec, make_spec_doc(ports, regions=REGIONS))
    admin = f"127.0.0.1:{free_port()}"
    server = Process(
        "server",
        [*CLI, "serve", "--spec", str(spec), "--state-dir", str(state_dir),
         "--xds-address", f"127.0.0.1:{free_port()}", "--admin-address", admin,
         "--metrics-address", "127.0.0.1:0", "--ui-address", "",
         "--prometheus-url", f"http://127.0.0.1:{free_port()}"],
        tmp_path / "server.log",
    )  # fmt: skip

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [*CTL, "--server", admin, *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=30)

    try:

        def answers() -> subprocess.CompletedProcess[str] | None:
            assert server.alive(), server.tail()
            res = ctl("audit", "verify", "-o", "json")
            return res if res.returncode == 0 else None

        res = wait_for(answers, "the admin API to answer audit verify", timeout=20)
        # Ours, and the rollout the server itself started for the spec's canary (its
        # controller's own writes chain too).
        reports = {(r["service"], r["version"]): r for r in json.loads(res.stdout)}
        assert all(r["intact"] and r["unchained"] == 0 for r in reports.values())
        assert [reports[("elsewhere", v)]["entries"] for v in ("v2", "v3")] == [7, 5]
        assert ("recommender", "v2") in reports

        db = attacker(state_dir / FILE_NAME)
        db.execute("UPDATE audit SET actor = 'mallory' WHERE id = 4")
        db.close()
        res = ctl("audit", "verify", "elsewhere")
        assert res.returncode == 1, res.stdout + res.stderr
        assert "BROKEN at entry 4: its content does not match its hash" in res.stdout
        assert res.stderr.strip() == "xdsctl: audit chain broken: elsewhere v2 at entry 4"
        res = ctl("audit", "verify", "elsewhere", "--version", "v3")
        assert res.returncode == 0 and "intact" in res.stdout and "v2" not in res.stdout
        # The listing itself is unchanged (with the hashes added).
        listed = json.loads(ctl("audit", "--service", "elsewhere", "-o", "json").stdout)
        assert len(listed) == 12 and all(len(e["hash"]) == 64 for e in listed)
    finally:
        server.stop()


# ---- etcd ----


def leading(cluster: EtcdCluster, prefix: str) -> EtcdStore:
    """A store that leads: the leader key written (again) by hand, its fence the key's
    create revision (a replica still holding an older fence is deposed)."""
    address = parse_store_url(cluster.url, prefix)
    kv = SyncKV(address)
    key = f"{prefix}/leader".encode()
    kv.txn(
        rpc.TxnRequest(
            success=[rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key))]
        )
    )
    reply = kv.txn(rpc.TxnRequest(success=[put_op(key.decode(), b"test-leader")]))
    kv.close()
    store = EtcdStore(address)
    store.read()
    store.fence = reply.header.revision
    return store


def test_etcd_an_edited_document_is_named_on_every_replica(shared_etcd: EtcdCluster) -> None:
    prefix = "/test/chain"
    leader = leading(shared_etcd, prefix)
    follower = EtcdStore(parse_store_url(shared_etcd.url, prefix))
    try:
        for state, entries in decisions("svc", "v2", 3):
            leader.record(state, entries, regions=("us-east",))
        for state, entries in decisions("svc", "v3", 2):
            leader.record(state, entries)
        follower.read()
        assert chains(leader.audit()) == chains(follower.audit())
        assert chains(follower.audit())[("svc", "v2")] == ChainReport("svc", "v2", 7, 0)
        assert all(e.snapshot_version != 1 for e in follower.audit() if e.snapshot_version)

        # A raw put of a modified document (the weights it claims).
        key = leader.log_keys.log("svc", "v2", 5)
        got = leader.kv.range(key)
        doc = json.loads(got.kvs[0].value)
        assert doc["service"] == "svc" and doc["canary_version"] == "v2"
        doc["weights_after"]["canary"] = 1.0
        leader.kv.txn(rpc.TxnRequest(success=[put_op(key, json.dumps(doc).encode())]))
        follower.read()
        report = chains(follower.audit())[("svc", "v2")]
        assert report.broken_at == 5 and "edited" in report.why
        assert chains(follower.audit())[("svc", "v3")].intact
    finally:
        leader.close()
        follower.close()


def test_etcd_old_dump_reads_unchained(shared_etcd: EtcdCluster) -> None:
    prefix = "/test/chain-old"
    load_dump(shared_etcd, prefix)
    store = EtcdStore(parse_store_url(shared_etcd.url, prefix))
    try:
        store.read()
        reports = chains(store.audit())
        assert reports[("recommender", "v2")] == ChainReport("recommender", "v2", 28, 28)
        assert reports[("recommender", "v3")] == ChainReport("recommender", "v3", 17, 17)
        every = store.kv.range(store.keys.everything, range_end(store.keys.everything))
        assert not [kv for kv in every.kvs if kv.key.endswith(b"/schema")]
    finally:
        store.close()
