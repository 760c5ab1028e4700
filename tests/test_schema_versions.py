"""Schema versions (issue 30): both stores carry one (SQLite: `PRAGMA user_version`;
etcd: the `schema` key under the prefix). A store newer than this release understands is
refused in one line; an older one (today's stores: no version at all) is migrated once,
under the store's write lock (SQLite) or the leader's fence (etcd), and marked; of two
replicas racing to migrate, one does it."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from aetcd import rpc

from tests.conftest import make_spec_doc, write_spec
from tests.test_audit_chain import decisions, leading
from tests.test_audit_records import ENTRIES, SQLITE, load_dump
from xds_server.ha.etcd import SyncKV, parse_store_url, put_op
from xds_server.ha.store import EtcdStore
from xds_server.lab.etcd import EtcdCluster
from xds_server.lab.procs import free_port
from xds_server.rollout.ports import StoreFenced, StoreWriteError
from xds_server.rollout.store import (
    FILE_NAME,
    SCHEMA_VERSION,
    Store,
    StoreVersionError,
)

CLI = [sys.executable, "-m", "xds_server.cli"]
NEWER = SCHEMA_VERSION + 1
REFUSAL = f"the store's schema is version {NEWER}, newer than this xds-server understands"


def serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`xds-server serve` that should refuse to start."""
    argv = [*CLI, "serve", "--xds-address", f"127.0.0.1:{free_port()}",
            "--admin-address", f"127.0.0.1:{free_port()}", "--metrics-address", "127.0.0.1:0",
            "--ui-address", "", *args]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=tmp_path)


def one_line(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode != 0, res.stdout
    assert "Traceback" not in res.stderr, res.stderr
    (line,) = [ln for ln in res.stderr.splitlines() if ln.startswith("xds-server:")]
    return line


# ---- SQLite ----


def user_version(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("PRAGMA user_version").fetchone()[0])
    finally:
        db.close()


def test_sqlite_a_newer_store_is_refused_in_one_line(tmp_path: Path) -> None:
    state = tmp_path / "state"
    Store.in_dir(state).close()
    db = sqlite3.connect(state / FILE_NAME)
    db.execute(f"PRAGMA user_version = {NEWER}")
    db.close()
    with pytest.raises(StoreVersionError, match=REFUSAL):
        Store.in_dir(state)
    with pytest.raises(StoreVersionError, match=REFUSAL):
        Store.read_only(state)
    ports = {(r, p): free_port() for r in ("us-east",) for p in ("production", "canary")}
    spec = tmp_path / "mesh.yaml"
    write_spec(spec, make_spec_doc(ports, regions=("us-east",)))
    line = one_line(serve(tmp_path, "--spec", str(spec), "--state-dir", str(state)))
    assert line == f"xds-server: {state / FILE_NAME}: {REFUSAL} ({SCHEMA_VERSION}): run a " \
        "release that knows it"  # fmt: skip
    assert user_version(state / FILE_NAME) == NEWER  # untouched


def test_sqlite_todays_store_is_migrated_once_and_marked(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    shutil.copyfile(SQLITE, path)
    assert user_version(path) == 0  # (written before schema versions)
    store = Store(path)
    assert store.migrated_from == 1
    columns = [row[1] for row in store.db.execute("PRAGMA table_info(audit)")]
    assert columns[-2:] == ["prev_hash", "hash"]
    assert len(store.audit()) == ENTRIES
    store.close()
    assert user_version(path) == SCHEMA_VERSION
    again = Store(path)
    assert again.migrated_from is None
    again.close()
    made = Store(tmp_path / "new" / FILE_NAME)  # a new store is made at the version
    assert made.migrated_from is None
    made.close()
    assert user_version(tmp_path / "new" / FILE_NAME) == SCHEMA_VERSION


def open_at_once(path: Path) -> list[int | None]:
    """Two connections open the store at the same moment; what each migrated from."""
    start = threading.Barrier(2)
    migrated: list[int | None] = []
    errors: list[BaseException] = []

    def open_it() -> None:
        start.wait()
        try:
            store = Store(path)  # (a connection of its own: SQLite's own locking)
            migrated.append(store.migrated_from)
            store.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    return migrated


def test_sqlite_two_openers_racing_to_migrate_one_does_it(tmp_path: Path) -> None:
    for attempt in range(3):
        path = tmp_path / str(attempt) / FILE_NAME
        path.parent.mkdir()
        shutil.copyfile(SQLITE, path)
        assert sorted(open_at_once(path), key=str) == [1, None]
        assert user_version(path) == SCHEMA_VERSION


# ---- etcd ----


def schema_key(store: EtcdStore) -> tuple[dict[str, object], int] | None:
    """The schema key's document and etcd's count of its writes (None: no key)."""
    got = store.kv.range(store.keys.schema)
    if not got.kvs:
        return None
    return json.loads(got.kvs[0].value), got.kvs[0].version


def test_etcd_a_newer_store_is_refused_in_one_line(
    shared_etcd: EtcdCluster, tmp_path: Path
) -> None:
    prefix = "/test/schema-newer"
    address = parse_store_url(shared_etcd.url, prefix)
    kv = SyncKV(address)
    doc = json.dumps({"version": NEWER}).encode()
    kv.txn(rpc.TxnRequest(success=[put_op(f"{prefix}/schema", doc)]))
    kv.close()
    line = one_line(serve(tmp_path, "--store", shared_etcd.url, "--store-prefix", prefix))
    assert line == f"xds-server: {address}{prefix}/schema: {REFUSAL} ({SCHEMA_VERSION}): " \
        "run a release that knows it"  # fmt: skip

    # A leader that meets it (its view read after another replica migrated) writes nothing.
    leader = leading(shared_etcd, prefix)
    try:
        (state, entries), *_ = decisions("svc", "v2", 1)
        with pytest.raises(StoreWriteError, match=REFUSAL):
            leader.record(state, entries)
        assert leader.rollout("svc", "v2") is None
        assert schema_key(leader) == ({"version": NEWER}, 1)
    finally:
        leader.close()


def test_etcd_todays_store_is_migrated_once_under_the_fence(shared_etcd: EtcdCluster) -> None:
    prefix = "/test/schema-old"
    load_dump(shared_etcd, prefix)  # the store as today's code leaves it: no schema key
    leader = leading(shared_etcd, prefix)
    try:
        assert schema_key(leader) is None and leader.view.schema == 1
        for state, entries in decisions("svc", "v2", 2):
            leader.record(state, entries)  # (the first write migrates first)
        key = schema_key(leader)
        assert key is not None
        doc, writes = key
        assert (doc["version"], doc["migrated_from"], writes) == (SCHEMA_VERSION, 1, 1)
        reader = EtcdStore(parse_store_url(shared_etcd.url, prefix))
        reader.read()
        assert reader.view.schema == SCHEMA_VERSION
        assert len(reader.audit()) == 45 + 5
        reader.close()
    finally:
        leader.close()


def test_etcd_two_replicas_racing_to_migrate_one_does_it(shared_etcd: EtcdCluster) -> None:
    """A (the leader) and B (deposed, not knowing it yet: its fence is the key before
    A's) migrate at the same moment: the fence lets A's transaction only. B, elected next
    with the view it read before A migrated, finds it done (the transaction's condition on
    the schema key) and writes nothing."""
    prefix = "/test/schema-race"
    load_dump(shared_etcd, prefix)
    b = leading(shared_etcd, prefix)
    a = leading(shared_etcd, prefix)  # (the leader key written again: a new fence)
    b.read()  # B's view, fenced on the older key, is current
    assert b.fence is not None and a.fence is not None
    assert b.fence < a.fence and b.view.schema == a.view.schema == 1
    start = threading.Barrier(2)
    outcome: dict[str, object] = {}

    def migrate(name: str, store: EtcdStore) -> None:
        start.wait()
        try:
            outcome[name] = store.migrate()
        except StoreFenced as exc:
            outcome[name] = exc

    try:
        threads = [threading.Thread(target=migrate, args=p) for p in (("a", a), ("b", b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert outcome["a"] is True
        assert isinstance(outcome["b"], StoreFenced) and b.fence is None
        b.fence = a.fence  # B leads next, its view still at version 1
        assert b.view.schema == 1
        assert b.migrate() is False and b.view.schema == SCHEMA_VERSION
        key = schema_key(a)
        assert key is not None and key[1] == 1  # written once
    finally:
        a.close()
        b.close()
