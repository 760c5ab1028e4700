"""The SQLite `StateStore`: rollout state and the append-only audit log, under `--state-dir`.

A decision is committed here (fsync'd: synchronous=FULL) before its weights are pushed,
so a server killed at any moment restarts at the step it had announced, never earlier.
The audit table refuses UPDATE by trigger, and DELETE of any entry that is not in an
archive; each entry carries the hash of its rollout's entry before it
(`audit_chain.py`), computed inside the write transaction: whoever drops the triggers
and edits a row breaks the chain. The schema's version is `PRAGMA user_version`
(`SCHEMA_VERSION`): older stores are migrated once, newer ones refused
(`StoreVersionError`, one line).

Retention (issue 30, `rollout/archive.py`): a finished rollout past the retention has
its audit moved, in one write transaction, into one row of `audit_archive` (the
entries' rows, compressed, with the chain's head), which is append-only too. `audit`
reads both, merged by id; reads use a connection of their own (WAL: they see committed
writes only), so they may run off the event loop's thread.

A full disk must not keep a rollback from being written: the store keeps a reserve file
(`STATE_DIR/reserve`, RESERVE_BYTES) that it deletes to make room for a critical write
(a rollback) that failed for want of space, and puts back once writes succeed again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import sqlite3
import threading
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xds_server.rollout.archive import (
    ArchiveError,
    ArchiveHeader,
    Loaded,
    Query,
    Source,
    decode,
    due,
    encode,
    header_for,
    pick,
)
from xds_server.rollout.audit import AuditEntry
from xds_server.rollout.audit_chain import genesis
from xds_server.rollout.audit_codec import (
    CHAIN_COLUMNS,
    GROUP_COLUMN,
    AuditDecodeError,
    chained,
    from_row,
    to_row,
)
from xds_server.rollout.ports import StoreWriteError
from xds_server.rollout.state import FINISHED, RolloutState, state_from_json, state_to_json

log = logging.getLogger("xds_server.store")

FILE_NAME = "rollouts.sqlite3"
RESERVE_NAME = "reserve"
RESERVE_BYTES = 4 * 1024 * 1024
"""Room kept for rollbacks: a rollback's commit writes a few pages (tens of KB), so this
holds many even when every other byte of the disk is taken."""

SCHEMA_VERSION = 3
"""The store's layout, kept in `PRAGMA user_version`: 2, the audit's hash chain
(`CHAIN_COLUMNS`, `audit_by_rollout`); 3, the archive (`audit_archive`; `audit_no_delete`
lets archived entries leave). A store made before schema versions reads 0 there and is
version 1 (`UNVERSIONED`): migrated once, on opening, in one write transaction. (etcd's
layout shares the number: `ha/store.py`.)"""
UNVERSIONED = 1

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS rollouts (
    service TEXT NOT NULL,
    canary_version TEXT NOT NULL,
    state TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (service, canary_version)
)""",
    """CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    service TEXT NOT NULL,
    canary_version TEXT NOT NULL,
    region TEXT,
    kind TEXT NOT NULL,
    step INTEGER,
    phase_from TEXT,
    phase_to TEXT,
    weights_before TEXT,
    weights_after TEXT,
    measurements TEXT,
    verdict TEXT,
    reason TEXT NOT NULL,
    snapshot_version INTEGER,
    actor TEXT NOT NULL,
    rollout_group TEXT,
    prev_hash TEXT,
    hash TEXT
)""",
    "CREATE INDEX IF NOT EXISTS audit_by_service ON audit (service, time)",
    "CREATE INDEX IF NOT EXISTS audit_by_rollout ON audit (service, canary_version, id)",
    """CREATE TABLE IF NOT EXISTS audit_archive (
    service TEXT NOT NULL,
    canary_version TEXT NOT NULL,
    first_id INTEGER NOT NULL,
    last_id INTEGER NOT NULL,
    entries INTEGER NOT NULL,
    since REAL NOT NULL,
    until REAL NOT NULL,
    last_hash TEXT NOT NULL,
    archived_at REAL NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (service, canary_version)
)""",
    "CREATE INDEX IF NOT EXISTS archive_by_last ON audit_archive (last_id)",
    """CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END""",
    "DROP TRIGGER IF EXISTS audit_no_delete",  # (schema 2's refused every delete)
    """CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
    WHEN NOT EXISTS (SELECT 1 FROM audit_archive a WHERE a.service = OLD.service
        AND a.canary_version = OLD.canary_version AND OLD.id BETWEEN a.first_id AND a.last_id)
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only: only archived entries leave'); END""",
    """CREATE TRIGGER IF NOT EXISTS archive_no_update BEFORE UPDATE ON audit_archive
    BEGIN SELECT RAISE(ABORT, 'the audit archive is append-only'); END""",
    """CREATE TRIGGER IF NOT EXISTS archive_no_delete BEFORE DELETE ON audit_archive
    BEGIN SELECT RAISE(ABORT, 'the audit archive is append-only'); END""",
)
"""Every statement is idempotent: run on a store of any older version, they bring it up
to this one (with the columns `_add_columns` adds to tables made before)."""


class StoreUnreadable(Exception):
    """A state directory whose store cannot be read; the message says which and why."""


class StoreVersionError(OSError):
    """A store of a schema newer than this release understands: refused, never read or
    written. An OSError, so every command line prints it as the one line it is."""


def newer_schema(where: str, version: int) -> StoreVersionError:
    return StoreVersionError(
        f"{where}: the store's schema is version {version}, newer than this xds-server "
        f"understands ({SCHEMA_VERSION}): run a release that knows it"
    )


class Store:
    def __init__(self, path: str | Path, *, read_only: bool = False) -> None:
        self.path = Path(path)
        self.migrated_from: int | None = None
        """The schema version this process migrated the store from; None: it did not."""
        if read_only:
            # A running server may own it: reading must never change it.
            self.db = sqlite3.connect(
                f"{self.path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False
            )
            self._refuse_newer()
            self.reads = self.db
            self._read_lock = threading.Lock()
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=10
        )
        self._refuse_newer()
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        if self._version() < SCHEMA_VERSION:
            self._migrate()
        self.reserve = self.path.parent / RESERVE_NAME
        self._keep_reserve()
        self.reads = sqlite3.connect(self.path, check_same_thread=False, timeout=10)
        """The audit's reads (any thread, one at a time): committed writes only."""
        self._read_lock = threading.Lock()

    def _version(self) -> int:
        stored = int(self.db.execute("PRAGMA user_version").fetchone()[0])
        return stored or UNVERSIONED

    def _refuse_newer(self) -> None:
        try:
            version = self._version()
        except sqlite3.Error as exc:
            self.db.close()
            raise StoreUnreadable(f"cannot read {self.path}: {exc}") from None
        if version > SCHEMA_VERSION:
            self.db.close()
            raise newer_schema(str(self.path), version)

    def _migrate(self) -> None:
        """Bring a store of an older version (or none yet) up to SCHEMA_VERSION, in one
        write transaction that reads the version again first: of several processes
        opening it at once, one migrates and the others find it done."""
        with self._transaction():
            version = self._version()
            if version > SCHEMA_VERSION:
                raise newer_schema(str(self.path), version)
            if version == SCHEMA_VERSION:
                return
            made = self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'audit'").fetchone()
            for statement in SCHEMA:
                self.db.execute(statement)
            self._add_columns()
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        if made:
            self.migrated_from = version
            log.info("migrated %s from schema %d to %d", self.path, version, SCHEMA_VERSION)

    def _add_columns(self) -> None:
        """A store made before rollout groups, or before the chain, gets their columns
        (NULL: no group; an unchained entry)."""
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(audit)")}
        for column in (GROUP_COLUMN, *CHAIN_COLUMNS):
            if column not in columns:
                self.db.execute(f"ALTER TABLE audit ADD COLUMN {column} TEXT")

    @classmethod
    def in_dir(cls, state_dir: str | Path) -> Store:
        return cls(Path(state_dir) / FILE_NAME)

    @classmethod
    def read_only(cls, state_dir: str | Path) -> Store:
        """Open an existing state dir's store for reading; StoreUnreadable if it cannot."""
        path = Path(state_dir) / FILE_NAME
        if not path.is_file():
            raise StoreUnreadable(f"{path} does not exist (is it serve's --state-dir?)")
        try:
            store = cls(path, read_only=True)
            store.db.execute("SELECT 1 FROM rollouts LIMIT 1").fetchall()
        except sqlite3.Error as exc:
            raise StoreUnreadable(f"cannot read {path}: {exc}") from None
        return store

    def close(self) -> None:
        if self.reads is not self.db:
            self.reads.close()
        self.db.close()

    # ---- rollout state ----

    def load_rollouts(self) -> list[RolloutState]:
        rows = self.db.execute("SELECT state FROM rollouts ORDER BY updated_at").fetchall()
        return [state_from_json(r[0]) for r in rows]

    def rollout(self, service: str, version: str) -> RolloutState | None:
        row = self.db.execute(
            "SELECT state FROM rollouts WHERE service=? AND canary_version=?", (service, version)
        ).fetchone()
        return state_from_json(row[0]) if row else None

    def record(
        self,
        state: RolloutState,
        entries: Sequence[AuditEntry],
        *,
        critical: bool = False,
        regions: Collection[str] = (),
    ) -> None:
        """Save the state and its audit entries in one transaction, or raise
        StoreWriteError with nothing saved. `critical` (a rollback): if the disk is full,
        spend the reserve and try once more. (`regions`: one process has one version
        counter; nothing to mark.)"""
        try:
            self._record(state, entries)
        except sqlite3.Error as exc:
            if not (critical and _out_of_space(exc) and self._release_reserve()):
                raise StoreWriteError(f"cannot write {self.path}: {exc}") from None
            try:
                self._record(state, entries)
            except sqlite3.Error as again:
                raise StoreWriteError(f"cannot write {self.path}: {again}") from None
            log.warning("wrote a rollback with the space reserved for it; disk still full")
            return
        self._keep_reserve()

    def _record(self, state: RolloutState, entries: Sequence[AuditEntry]) -> None:
        with self._transaction():
            self.db.execute(
                "INSERT INTO rollouts (service, canary_version, state, updated_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (service, canary_version) "
                "DO UPDATE SET state=excluded.state, updated_at=excluded.updated_at",
                (state.service, state.canary_version, state_to_json(state), state.updated_at),
            )
            heads: dict[tuple[str, str], str] = {}
            for e in entries:
                rollout = (e.service, e.canary_version)
                prev = heads.get(rollout) or self._head(*rollout)
                e = chained(e, prev, snapshot_mark=False)
                assert e.chain is not None
                heads[rollout] = e.chain.hash
                row = to_row(e)  # (its group's and chain's columns only when it has them)
                self.db.execute(
                    f"INSERT INTO audit ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                    tuple(row.values()),
                )

    def _head(self, service: str, version: str) -> str:
        """The hash the rollout's next entry chains from, read inside the write
        transaction (BEGIN IMMEDIATE: no other writer in between): its newest entry's,
        or its genesis when it has none, or only entries written before the chain."""
        row = self.db.execute(
            "SELECT hash FROM audit WHERE service = ? AND canary_version = ? "
            "ORDER BY id DESC LIMIT 1",
            (service, version),
        ).fetchone()
        if row is None:  # (none live: archived, whose chain goes on from its head)
            row = self.db.execute(
                "SELECT last_hash FROM audit_archive WHERE service = ? AND canary_version = ?",
                (service, version),
            ).fetchone()
        return str(row[0]) if row and row[0] else genesis(service, version)

    def _keep_reserve(self) -> None:
        """Make sure the reserve exists (cheap when it does); quietly later if no room."""
        try:
            if self.reserve.stat().st_size >= RESERVE_BYTES:
                return
        except FileNotFoundError:
            pass
        try:
            with open(self.reserve, "wb") as f:
                os.posix_fallocate(f.fileno(), 0, RESERVE_BYTES)
        except OSError as exc:
            with contextlib.suppress(OSError):
                self.reserve.unlink()
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise

    def _release_reserve(self) -> bool:
        try:
            self.reserve.unlink()
        except FileNotFoundError:
            return False
        log.warning("state disk full: released %s to write a rollback", self.reserve)
        return True

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException:
            # SQLite may have rolled back already (a full disk does that).
            if self.db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("ROLLBACK")
            raise

    # ---- audit ----

    def latest_checks(self, service: str, version: str) -> dict[str, AuditEntry]:
        """The newest judgement of each region for one rollout (from its archive once
        its audit was archived)."""
        with self._read_lock:
            entries = self._select(
                "id IN (SELECT MAX(id) FROM audit WHERE service = ? AND canary_version = ? "
                "AND kind = 'check' GROUP BY region)",
                [service, version],
            )
            if not entries:
                query = Query(service=service, canary_version=version, kind="check")
                entries = [e for s in self._archives(query) for e in s.entries(None)]
        return {e.region: e for e in sorted(entries, key=lambda e: e.id) if e.region}

    def audit(
        self,
        service: str | None = None,
        region: str | None = None,
        since: float | None = None,
        kind: str | None = None,
        limit: int | None = None,
        after_id: int | None = None,
        before_id: int | None = None,
        version: str | None = None,
    ) -> list[AuditEntry]:
        """The live log's entries and the archived ones that match, in id order; with
        `limit`, the newest `limit`. Thread-safe (the reads' own connection)."""
        query = Query(service, version, region, kind, since, after_id, before_id)
        with self._read_lock:
            return pick([_LiveRows(self, query), *self._archives(query)], limit)

    def _select(
        self, where: str, args: list[str | float], limit: int | None = None
    ) -> list[AuditEntry]:
        sql = f"SELECT * FROM audit WHERE {where} ORDER BY id"
        if limit is not None:  # the newest `limit` entries, oldest first, as `tail` does
            sql = f"SELECT * FROM (SELECT * FROM audit WHERE {where} ORDER BY id DESC LIMIT ?)"
            sql += " ORDER BY id"
            args = [*args, limit]
        cur = self.reads.execute(sql, args)
        names = [d[0] for d in cur.description]
        return [from_row(dict(zip(names, row, strict=True))) for row in cur.fetchall()]

    def _archives(self, query: Query) -> list[Source]:
        """The archives that may hold matches (none in a store older than archives)."""
        if not self._has_table("audit_archive"):
            return []
        where: list[str] = ["last_id > ?"]
        args: list[Any] = [query.after_id or 0]
        for column, value in (("service", query.service), ("canary_version", query.canary_version)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if query.before_id is not None:
            where.append("first_id < ?")
            args.append(query.before_id)
        if query.since is not None:
            where.append("until >= ?")
            args.append(query.since)
        rows = self.reads.execute(
            "SELECT service, canary_version, last_id FROM audit_archive WHERE "
            + " AND ".join(where),
            args,
        ).fetchall()
        return [_ArchiveRow(self, query, s, v, last) for s, v, last in rows]

    def _has_table(self, name: str) -> bool:
        row = self.reads.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (name,))
        return row.fetchone() is not None

    def archived(self, service: str, version: str) -> list[AuditEntry]:
        """One rollout's archived entries ([] when it has no archive)."""
        row = self.reads.execute(
            "SELECT data FROM audit_archive WHERE service = ? AND canary_version = ?",
            (service, version),
        ).fetchone()
        return decode(row[0], f"{self.path} archive {service} {version}")[1] if row else []

    # ---- retention (rollout/archive.py) ----

    def archivable(self, now: float, retention: float) -> list[tuple[str, str]]:
        """Finished rollouts past the retention with live audit, oldest change first."""
        rows = self.db.execute(
            "SELECT state FROM rollouts r WHERE updated_at <= ? AND EXISTS (SELECT 1 FROM "
            "audit a WHERE a.service = r.service AND a.canary_version = r.canary_version) "
            "ORDER BY updated_at",
            (now - retention,),
        ).fetchall()
        states = [state_from_json(r[0]) for r in rows]
        return [(s.service, s.canary_version) for s in states if due(s, now, retention)]

    async def archive(self, service: str, version: str, now: float) -> bool:
        """Move a finished rollout's live audit into its archive row: read, checked and
        encoded off the loop (a connection of its own: committed rows; a finished
        rollout's do not change), then one write transaction inserts it and deletes the
        rows, only while they are the ones read. False: nothing to move. ArchiveError:
        an entry does not decode (its rollout is left live)."""
        staged = await asyncio.to_thread(_stage, self.path, service, version, now)
        if staged is None:
            return False
        header, blob = staged
        try:
            with self._transaction():
                return self._commit_archive(header, blob)
        except sqlite3.Error as exc:
            raise StoreWriteError(f"cannot archive in {self.path}: {exc}") from None

    def _commit_archive(self, header: ArchiveHeader, blob: bytes) -> bool:
        key = (header.service, header.canary_version)
        live = self.db.execute(
            "SELECT COUNT(*), MAX(id) FROM audit WHERE service = ? AND canary_version = ?", key
        ).fetchone()
        if tuple(live) != (header.entries, header.last_id):
            return False  # (archived meanwhile, or written since: the next sweep)
        h = header
        self.db.execute(
            "INSERT INTO audit_archive (service, canary_version, first_id, last_id, entries, "
            "since, until, last_hash, archived_at, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (*key, h.first_id, h.last_id, h.entries, h.since, h.until, h.last_hash,
             h.archived_at, blob),
        )  # fmt: skip
        self.db.execute("DELETE FROM audit WHERE service = ? AND canary_version = ?", key)
        log.info("archived the audit of %s %s (%d entries, %d bytes)", *key, h.entries, len(blob))
        return True


@dataclass(frozen=True)
class _LiveRows:
    """The live table as one `Source`: SQL filters, orders and limits."""

    store: Store
    query: Query
    top: int = 2**63

    def entries(self, limit: int | None) -> Iterable[AuditEntry]:
        q = self.query
        where: list[str] = ["1=1"]
        args: list[Any] = []
        for column, value in (
            ("service", q.service),
            ("canary_version", q.canary_version),
            ("region", q.region),
            ("kind", q.kind),
        ):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        for clause, bound in (("time >= ?", q.since), ("id > ?", q.after_id),
                              ("id < ?", q.before_id)):  # fmt: skip
            if bound is not None:
                where.append(clause)
                args.append(bound)
        return self.store._select(" AND ".join(where), args, limit)


@dataclass(frozen=True)
class _ArchiveRow:
    """One archived rollout, decoded only when read."""

    store: Store
    query: Query
    service: str
    version: str
    top: int

    def entries(self, limit: int | None) -> Iterable[AuditEntry]:
        try:
            items = self.store.archived(self.service, self.version)
        except ArchiveError as exc:
            log.error("%s", exc)  # (one unreadable archive must not hide the others)
            return []
        return Loaded(items, self.query, self.top).entries(limit)


def _stage(
    path: Path, service: str, version: str, now: float
) -> tuple[ArchiveHeader, bytes] | None:
    """A finished rollout's archive, from its committed rows (a connection of its own)."""
    db = sqlite3.connect(path, timeout=10)
    try:
        row = db.execute(
            "SELECT state FROM rollouts WHERE service = ? AND canary_version = ?",
            (service, version),
        ).fetchone()
        state = state_from_json(row[0]) if row else None
        if state is None or state.phase not in FINISHED:
            return None  # (a live rollout's audit is never archived)
        cur = db.execute(
            "SELECT * FROM audit WHERE service = ? AND canary_version = ? ORDER BY id",
            (service, version),
        )
        names = [d[0] for d in cur.description]
        rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    finally:
        db.close()
    if not rows:
        return None
    try:
        entries = [from_row(r) for r in rows]  # (an archive must read back)
    except AuditDecodeError as exc:
        raise ArchiveError(f"{path}: {service} {version} left live: {exc}") from None
    header = header_for(state, "sqlite", entries, now)
    return header, encode(header, [{"id": r.pop("id"), "row": r} for r in rows])


def _out_of_space(exc: sqlite3.Error) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and "full" in str(exc)
