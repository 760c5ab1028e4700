"""The workers' board: what the workers of `serve --workers N` on one state directory
share, in `STATE_DIR/workers.sqlite3` (SQLite, WAL).

- **What is served.** One row, written only by the worker that decides (it holds
  `controller.lock`): the spec's text, the weights (`TrafficState`) and a *generation*
  per region. A region's routes carry version `generation * VERSION_SCALE` on every
  worker, so "node X ACKed routes V" means one thing whichever worker X is connected to
  (the leader's ACK gate compares versions). The row is written in one transaction
  *before* the leader's own push, and a follower takes the spec, the weights and the
  generations from the same row: a version never names two contents. A generation moves
  when its region's weights change; a new spec text moves every region's (a new base).
- **Who serves whom.** One row per worker (its document and heartbeat) and one per
  connected stream (its node's route standing, `ha.replicas.node_document`), rewritten
  when they change, so the leader's gate counts every worker's nodes and `xdsctl status`
  lists them (`app.workers.BoardPeers`).

The board is not the record of decisions (that is the rollout store, `rollouts.sqlite3`,
fsync'd): it may lose its last writes on a power cut (synchronous=NORMAL), and the next
leader rewrites it from the store. Generations start from the wall clock in seconds, one
second ahead (the versions look like the one-process versions, milliseconds, and are
above any a worker gave before the first row), and only grow.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xds_server.traffic import Split, TrafficState

FILE_NAME = "workers.sqlite3"
VERSION_SCALE = 1000
"""A region's routes version is its generation times this; the lower digits are left to
each worker's own make-before-break rebuilds (clusters and endpoints, never routes), as
replicas on etcd do with the store's revisions."""

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS served (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL,
    spec TEXT NOT NULL,
    traffic TEXT NOT NULL,
    generations TEXT NOT NULL,
    base INTEGER NOT NULL,
    leader TEXT NOT NULL,
    updated REAL NOT NULL
)""",
    """CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    doc TEXT NOT NULL,
    beat REAL NOT NULL,
    gone REAL
)""",
    """CREATE TABLE IF NOT EXISTS nodes (
    worker TEXT NOT NULL,
    stream INTEGER NOT NULL,
    region TEXT NOT NULL,
    doc TEXT NOT NULL,
    PRIMARY KEY (worker, stream)
)""",
    "CREATE INDEX IF NOT EXISTS nodes_by_region ON nodes (region, worker)",
)


@dataclass(frozen=True)
class Served:
    """What the leader serves: every worker serves exactly this."""

    seq: int
    spec_text: str
    traffic: TrafficState
    generations: dict[str, int] = field(default_factory=dict)
    base: int = 0
    """The generation of a region not in `generations` (a new spec text moves it)."""
    leader: str = ""

    def generation(self, region: str) -> int:
        return self.generations.get(region, self.base)

    def version(self, region: str) -> int:
        """The routes version every worker gives the region's routes."""
        return self.generation(region) * VERSION_SCALE


@dataclass(frozen=True)
class WorkerRow:
    """One worker as the board has it: its document, its last heartbeat (wall clock),
    when it went away (None: running), and its nodes' documents as written (JSON; of one
    region, when asked for one): the leader's ACK gate reads them at every look, and
    decodes only the ones that changed (`app.workers.NodeTexts`)."""

    worker: str
    doc: dict[str, Any]
    beat: float
    gone: float | None
    node_texts: list[str]

    @property
    def nodes(self) -> list[dict[str, Any]]:
        return [json.loads(text) for text in self.node_texts]


def traffic_json(traffic: TrafficState) -> str:
    rows = [
        [service, region, s.production, s.baseline, s.canary, s.shadow]
        for (service, region), s in sorted(traffic.splits.items())
    ]
    return json.dumps(rows, separators=(",", ":"))


def traffic_from_json(text: str) -> TrafficState:
    return TrafficState(
        {(row[0], row[1]): Split(row[2], row[3], row[4], row[5]) for row in json.loads(text)}
    )


class Board:
    """The board's file, opened by each worker (and by the supervisor, to mark a dead
    worker gone). Its calls are short transactions; a lock held by another worker is
    waited for (`timeout`). One connection per thread (a worker writes its nodes from a
    thread of its own)."""

    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout
        self._local = threading.local()
        self._served: Served | None = None
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._transaction() as db:
            for statement in SCHEMA:
                db.execute(statement)

    @classmethod
    def in_dir(cls, state_dir: Path) -> Board:
        return cls(state_dir / FILE_NAME)

    @property
    def db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, isolation_level=None, timeout=self.timeout)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # ---- what is served ----

    def served(self) -> Served | None:
        """The newest row (re-read only when its sequence number moved); None before any
        leader wrote one."""
        row = self.db.execute("SELECT seq FROM served WHERE id = 1").fetchone()
        if row is None:
            return None
        if self._served is not None and self._served.seq == row[0]:
            return self._served
        full = self.db.execute(
            "SELECT seq, spec, traffic, generations, base, leader FROM served WHERE id = 1"
        ).fetchone()
        self._served = _served_from_row(full)
        return self._served

    def publish(self, spec_text: str, traffic: TrafficState, leader: str) -> Served:
        """The leader serves `spec_text` and `traffic` now: written before its own push.
        A region whose weights differ from the row's gets the next generation; a new
        spec text gives every region a new one (one above every generation so far). An
        unchanged row is not written."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT seq, spec, traffic, generations, base, leader FROM served WHERE id = 1"
            ).fetchone()
            old = _served_from_row(row) if row is not None else None
            new = _next(old, spec_text, traffic, leader)
            if new is not old:
                db.execute(
                    "INSERT OR REPLACE INTO served VALUES (1, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        new.seq,
                        new.spec_text,
                        traffic_json(new.traffic),
                        json.dumps(new.generations, sort_keys=True),
                        new.base,
                        new.leader,
                        time.time(),
                    ),
                )
        self._served = new
        return new

    # ---- who serves whom ----

    def join(self, worker: str, doc: dict[str, Any], members: Collection[str]) -> None:
        """A worker (re)starts: its row, without the nodes of a worker of that name
        before it; workers not among `members` (of a run with more workers) are
        dropped with their nodes (listed nowhere now: the leader holds for them
        `VANISHED_GRACE`, time to reconnect)."""
        with self._transaction() as db:
            marks = ",".join("?" * len(members))
            db.execute(f"DELETE FROM nodes WHERE worker NOT IN ({marks})", tuple(members))
            db.execute(f"DELETE FROM workers WHERE id NOT IN ({marks})", tuple(members))
            db.execute("DELETE FROM nodes WHERE worker = ?", (worker,))
            db.execute(
                "INSERT OR REPLACE INTO workers VALUES (?, ?, ?, NULL)",
                (worker, json.dumps(doc), time.time()),
            )

    def beat(self, worker: str, doc: dict[str, Any]) -> None:
        """The worker's heartbeat (and its document, which may have changed)."""
        with self._transaction() as db:
            db.execute(
                "UPDATE workers SET doc = ?, beat = ?, gone = NULL WHERE id = ?",
                (json.dumps(doc), time.time(), worker),
            )

    def write_nodes(
        self, worker: str, changed: Sequence[tuple[int, str, str]], removed: Iterable[int]
    ) -> None:
        """Rewrite the worker's changed streams ((stream, region, document JSON)) and
        drop its ended ones, in one transaction."""
        with self._transaction() as db:
            db.executemany(
                "DELETE FROM nodes WHERE worker = ? AND stream = ?",
                [(worker, s) for s in removed],
            )
            db.executemany(
                "INSERT OR REPLACE INTO nodes VALUES (?, ?, ?, ?)",
                [(worker, s, region, doc) for s, region, doc in changed],
            )

    def gone(self, worker: str) -> None:
        """The worker died (its supervisor saw it): its nodes are unknown from now, not
        once its heartbeat is missed."""
        with self._transaction() as db:
            db.execute("UPDATE workers SET gone = ? WHERE id = ?", (time.time(), worker))

    def workers(self, region: str | None = None, but: str = "") -> list[WorkerRow]:
        """Every worker but `but`, with its nodes (of `region`: None for every node)."""
        rows = self.db.execute(
            "SELECT id, doc, beat, gone FROM workers WHERE id != ? ORDER BY id", (but,)
        ).fetchall()
        if region is None:
            found = self.db.execute("SELECT worker, doc FROM nodes WHERE worker != ?", (but,))
        else:
            found = self.db.execute(
                "SELECT worker, doc FROM nodes WHERE region = ? AND worker != ?", (region, but)
            )
        nodes: dict[str, list[str]] = {}
        for worker, doc in found.fetchall():
            nodes.setdefault(worker, []).append(doc)
        return [
            WorkerRow(worker, json.loads(doc), beat, gone, nodes.get(worker, []))
            for worker, doc, beat, gone in rows
        ]


def _served_from_row(row: tuple[Any, ...]) -> Served:
    seq, spec, traffic, generations, base, leader = row
    return Served(seq, spec, traffic_from_json(traffic), json.loads(generations), base, leader)


def _next(old: Served | None, spec_text: str, traffic: TrafficState, leader: str) -> Served:
    """The row after `old` for this spec and these weights (`old` itself if the same)."""
    if old is None:  # (above every worker's versions so far: `workers.Generations`)
        return Served(1, spec_text, traffic, {}, int(time.time()) + 1, leader)
    if old.spec_text != spec_text:
        top = max([old.base, *old.generations.values()])
        return Served(old.seq + 1, spec_text, traffic, {}, top + 1, leader)
    changed = old.traffic.regions_changed(traffic)
    if not changed and old.leader == leader:
        return old
    generations = dict(old.generations)
    for region in changed:
        generations[region] = old.generation(region) + 1
    return Served(old.seq + 1, spec_text, traffic, generations, old.base, leader)
