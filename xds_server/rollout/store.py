"""Rollout state and the append-only audit log, in SQLite under `--state-dir`.

A decision is committed here (fsync'd: synchronous=FULL) before its weights are pushed,
so a server killed at any moment restarts at the step it had announced, never earlier.
The audit table refuses UPDATE and DELETE by trigger.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from xds_server.rollout.decide import RegionState, RolloutState, Transition

SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
    service TEXT NOT NULL,
    canary_version TEXT NOT NULL,
    state TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (service, canary_version)
);
CREATE TABLE IF NOT EXISTS audit (
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
    actor TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_by_service ON audit (service, time);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""


@dataclass(frozen=True)
class AuditEntry:
    id: int
    time: float
    service: str
    canary_version: str
    region: str | None
    kind: str
    step: int | None
    phase_from: str | None
    phase_to: str | None
    weights_before: dict[str, Any] | None
    weights_after: dict[str, Any] | None
    measurements: dict[str, Any] | None
    verdict: dict[str, Any] | None
    reason: str
    snapshot_version: int | None
    actor: str


class Store:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)

    @classmethod
    def in_dir(cls, state_dir: str | Path) -> Store:
        return cls(Path(state_dir) / "rollouts.sqlite3")

    def close(self) -> None:
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

    def record(self, state: RolloutState, entries: Iterable[dict[str, Any]]) -> None:
        """Save the state and its audit entries in one transaction."""
        with self._transaction():
            self.db.execute(
                "INSERT INTO rollouts (service, canary_version, state, updated_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (service, canary_version) "
                "DO UPDATE SET state=excluded.state, updated_at=excluded.updated_at",
                (state.service, state.canary_version, state_to_json(state), state.updated_at),
            )
            for e in entries:
                self.db.execute(
                    "INSERT INTO audit (time, service, canary_version, region, kind, step, "
                    "phase_from, phase_to, weights_before, weights_after, measurements, verdict, "
                    "reason, snapshot_version, actor) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        e.get("time", time.time()),
                        state.service,
                        state.canary_version,
                        e.get("region"),
                        e.get("kind", "transition"),
                        e.get("step"),
                        e.get("phase_from"),
                        e.get("phase_to"),
                        _dump(e.get("weights_before")),
                        _dump(e.get("weights_after")),
                        _dump(e.get("measurements")),
                        _dump(e.get("verdict")),
                        e["reason"],
                        e.get("snapshot_version"),
                        e.get("actor", "controller"),
                    ),
                )

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # ---- audit ----

    def latest_checks(self, service: str, version: str) -> dict[str, AuditEntry]:
        """The newest judgement of each region for one rollout."""
        entries = self._select(
            "id IN (SELECT MAX(id) FROM audit WHERE service = ? AND canary_version = ? "
            "AND kind = 'check' GROUP BY region)",
            [service, version],
        )
        return {e.region: e for e in entries if e.region}

    def audit(
        self,
        service: str | None = None,
        region: str | None = None,
        since: float | None = None,
        kind: str | None = None,
        limit: int | None = None,
        after_id: int | None = None,
    ) -> list[AuditEntry]:
        where: list[str] = ["1=1"]
        args: list[Any] = []
        for column, value in (("service", service), ("region", region), ("kind", kind)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if since is not None:
            where.append("time >= ?")
            args.append(since)
        if after_id is not None:  # for followers: only what is new since the last read
            where.append("id > ?")
            args.append(after_id)
        return self._select(" AND ".join(where), args, limit)

    def _select(self, where: str, args: list[Any], limit: int | None = None) -> list[AuditEntry]:
        sql = f"SELECT * FROM audit WHERE {where} ORDER BY id"
        if limit is not None:
            sql += " LIMIT ?"
            args = [*args, limit]
        cur = self.db.execute(sql, args)
        names = [d[0] for d in cur.description]
        out = []
        for row in cur.fetchall():
            rec = dict(zip(names, row, strict=True))
            for key in ("weights_before", "weights_after", "measurements", "verdict"):
                rec[key] = json.loads(rec[key]) if rec[key] else None
            out.append(AuditEntry(**rec))
        return out


def state_to_json(state: RolloutState) -> str:
    doc = asdict(state)
    doc["regions"] = {r: asdict(s) for r, s in state.regions.items()}
    return json.dumps(doc)


def state_from_json(text: str) -> RolloutState:
    doc = json.loads(text)
    doc["regions"] = {r: RegionState(**s) for r, s in doc["regions"].items()}
    return RolloutState(**doc)


def transition_entry(
    t: Transition,
    now: float,
    weights_before: Mapping[str, Any] | None,
    weights_after: Mapping[str, Any] | None,
    measurements: Mapping[str, Any] | None,
    snapshot_version: int | None,
    actor: str = "controller",
) -> dict[str, Any]:
    verdict = None
    if t.verdict is not None:
        verdict = {
            "outcome": t.verdict.outcome,
            "reason": t.verdict.reason,
            "checks": [asdict(c) for c in t.verdict.checks],
            "score": t.verdict.score,
            "conclusive": t.verdict.conclusive,
            "metrics": [m.as_dict() for m in t.verdict.metrics],
        }
    return {
        "time": now,
        "region": t.region,
        "kind": t.kind,
        "step": t.step_to,
        "phase_from": t.phase_from,
        "phase_to": t.phase_to,
        "weights_before": weights_before,
        "weights_after": weights_after,
        "measurements": measurements,
        "verdict": verdict,
        "reason": t.reason,
        "snapshot_version": snapshot_version,
        "actor": actor,
    }


def _dump(value: Any) -> str | None:
    return None if value is None else json.dumps(value)
