"""Audit retention and archives (issue 30), for both stores: the encoding, the policy,
and how a read merges the live log with the archives. Pure.

A finished rollout (promoted, or rolled back: an abort is a rollback) never gets another
entry (`decide`: every action on it is refused). Once its last change is older than the
retention (`serve --audit-retention`, DEFAULT_RETENTION), the leader moves its audit out
of the live log into one archive object, under its write (SQLite: one transaction;
etcd: one fenced transaction that also deletes the live keys), so the live log holds
only what is active or recent and the archive grows by one compressed object per
rollout.

An archive object is zlib over JSON lines: a header (`ArchiveHeader`: whose, which
ids, when, the chain's head), then each entry as its store kept it (`Record`: a SQLite
row's columns, or an etcd document with the version its commit gave). Entries keep
their ids and hashes, so a rollout's chain verifies from its archive as it did live
(`audit_chain.py`), and an entry edited inside an archive breaks it as anywhere else.

Reads (`StateStore.audit`) see one log: the live entries and the archived ones, merged
by id (`pick` over `Source`s: the live log's rollouts, the archives, which a `Query`
prunes by what each may hold), so `xdsctl audit`, `audit verify` and the dashboard's
history do not care where an entry lives.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from xds_server.rollout.audit import AuditEntry
from xds_server.rollout.audit_codec import AuditDecodeError, from_document, from_row
from xds_server.rollout.state import FINISHED, RolloutState

FORMAT = "xds-server audit archive"
FORMAT_VERSION = 1
DEFAULT_RETENTION = 30 * 86400.0
"""`--audit-retention`'s default: a finished rollout's audit stays live for 30 days."""
COMPRESSION_LEVEL = 9

StoreKind = Literal["sqlite", "etcd"]
Record = dict[str, Any]
"""One entry as its store kept it: {"id": N, "row": {column: value}} (SQLite), or
{"id": N, "version": V, "document": {...}} (etcd: V the snapshot version its commit gave,
or null)."""


class ArchiveError(ValueError):
    """An archive that cannot be read; the message says which and what."""


@dataclass(frozen=True)
class ArchiveHeader:
    """What an archive holds, readable without its entries (SQLite keeps it in columns,
    etcd in the rollout's index key): reads skip the archives that cannot match."""

    service: str
    canary_version: str
    store: StoreKind
    first_id: int
    last_id: int
    entries: int
    since: float
    """The oldest entry's time."""
    until: float
    """The newest entry's time (the latest of any: `since` reads skip by it)."""
    last_hash: str
    """The hash of the rollout's last entry ("" when unchained): its chain's head."""
    phase: str
    """The rollout's phase when it was archived (promoted, rolled_back)."""
    archived_at: float

    def doc(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_doc(cls, doc: object, where: str) -> ArchiveHeader:
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ArchiveError(f"{where}: not an audit archive (no {FORMAT!r} header)")
        if doc.get("format_version") != FORMAT_VERSION:
            raise ArchiveError(
                f"{where}: archive format {doc.get('format_version')!r}, this release "
                f"reads {FORMAT_VERSION}"
            )
        texts = {k: doc.get(k) for k in ("service", "canary_version", "last_hash", "phase")}
        ints = {k: doc.get(k) for k in ("first_id", "last_id", "entries")}
        reals = {k: doc.get(k) for k in ("since", "until", "archived_at")}
        store = doc.get("store")
        for name, value, ok in (
            *((k, v, isinstance(v, str)) for k, v in texts.items()),
            *((k, v, isinstance(v, int) and not isinstance(v, bool)) for k, v in ints.items()),
            *((k, v, isinstance(v, int | float)) for k, v in reals.items()),
            ("store", store, store in ("sqlite", "etcd")),
        ):
            if not ok:
                raise ArchiveError(f"{where}: header.{name}: {value!r} is not what it should be")
        return cls(store=store, **texts, **ints, **reals)  # type: ignore[arg-type]

    def may_hold(self, query: Query) -> bool:
        return query.may_hold(self.service, self.canary_version, self.first_id, self.last_id,
                              self.until)  # fmt: skip


def header_for(
    state: RolloutState, store: StoreKind, entries: Sequence[AuditEntry], now: float
) -> ArchiveHeader:
    """The header of `state`'s archive of `entries` (its whole live log, in id order)."""
    if not entries:
        raise ArchiveError(f"{state.service} {state.canary_version}: no entries to archive")
    last = entries[-1]
    return ArchiveHeader(
        service=state.service,
        canary_version=state.canary_version,
        store=store,
        first_id=entries[0].id,
        last_id=last.id,
        entries=len(entries),
        since=min(e.time for e in entries),
        until=max(e.time for e in entries),
        last_hash=last.chain.hash if last.chain else "",
        phase=str(state.phase),
        archived_at=now,
    )


def encode(header: ArchiveHeader, records: Sequence[Record]) -> bytes:
    """The archive object: zlib over the header and one record per line."""
    lines = [json.dumps(header.doc(), separators=(",", ":"))]
    lines += [json.dumps(r, separators=(",", ":")) for r in records]
    return zlib.compress("\n".join(lines).encode(), COMPRESSION_LEVEL)


def decode(blob: bytes, where: str) -> tuple[ArchiveHeader, list[AuditEntry]]:
    """An archive object -> its header and entries (in id order); ArchiveError naming
    `where` and the line for anything unreadable."""
    try:
        lines = zlib.decompress(blob).decode().split("\n")
    except (zlib.error, UnicodeDecodeError) as exc:
        raise ArchiveError(f"{where}: not a compressed archive: {exc}") from None
    header = ArchiveHeader.from_doc(_json(lines[0], f"{where} header"), where)
    entries = [_entry(_json(line, f"{where} line {i}"), header.store, f"{where} line {i}")
               for i, line in enumerate(lines[1:], start=2)]  # fmt: skip
    if len(entries) != header.entries:
        raise ArchiveError(f"{where}: {len(entries)} entries, its header says {header.entries}")
    return header, sorted(entries, key=lambda e: e.id)


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ArchiveError(f"{where}: not JSON: {exc}") from None


def _entry(record: object, store: StoreKind, where: str) -> AuditEntry:
    if not isinstance(record, dict) or not isinstance(record.get("id"), int):
        raise ArchiveError(f"{where}: expected a record with an integer id")
    try:
        if store == "sqlite":
            return from_row({**record["row"], "id": record["id"]})
        version = record.get("version")
        doc = json.dumps(record["document"])
        return from_document(doc, record["id"], version if isinstance(version, int) else 0)
    except (AuditDecodeError, KeyError, TypeError) as exc:
        raise ArchiveError(f"{where}: {exc}") from None


# ---- the policy ----


def due(state: RolloutState, now: float, retention: float) -> bool:
    """Is this rollout's audit due for the archive: finished, and unchanged for the
    retention? (A live rollout's audit is never archived: it still gets entries.)"""
    return state.phase in FINISHED and state.updated_at <= now - retention


@runtime_checkable
class Archiving(Protocol):
    """What a store offers the leader's retention (`rollout/retention.py`)."""

    def archivable(self, now: float, retention: float) -> list[tuple[str, str]]:
        """The rollouts (service, version) `due` whose audit is still live."""
        ...

    async def archive(self, service: str, version: str, now: float) -> bool:
        """Move that rollout's live audit into its archive, under the store's write;
        False when there was nothing to move (or another writer moved it first).
        StoreFenced when this process no longer leads; StoreWriteError otherwise."""
        ...


# ---- reads over the live log and the archives ----


@dataclass(frozen=True)
class Query:
    """What `StateStore.audit` was asked for: filters (None: any), and the ids' window
    (`after_id` < id < `before_id`)."""

    service: str | None = None
    canary_version: str | None = None
    region: str | None = None
    kind: str | None = None
    since: float | None = None
    after_id: int | None = None
    before_id: int | None = None

    def matches(self, e: AuditEntry) -> bool:
        return (
            (self.service is None or e.service == self.service)
            and (self.canary_version is None or e.canary_version == self.canary_version)
            and (self.region is None or e.region == self.region)
            and (self.kind is None or e.kind == self.kind)
            and (self.since is None or e.time >= self.since)
            and (self.after_id is None or e.id > self.after_id)
            and (self.before_id is None or e.id < self.before_id)
        )

    def may_hold(
        self, service: str, version: str, first_id: int, last_id: int, until: float | None
    ) -> bool:
        """Could a rollout's entries between these ids (the newest at `until`; None:
        unknown) match?"""
        return (
            self.service in (None, service)
            and self.canary_version in (None, version)
            and (self.after_id is None or last_id > self.after_id)
            and (self.before_id is None or first_id < self.before_id)
            and (self.since is None or until is None or until >= self.since)
        )

    @property
    def only_newest(self) -> bool:
        """Only filters an entry's kind and region can answer (no time, no window)."""
        return self.since is None and self.after_id is None and self.before_id is None


class Source(Protocol):
    """Entries from one place: a rollout's live log, an archive, an older layout."""

    @property
    def top(self) -> int:
        """No entry here has a higher id."""
        ...

    def entries(self, limit: int | None) -> Iterable[AuditEntry]:
        """The query's matches here: every one, or (`limit`) at least its newest
        `limit` when there are that many; any order."""
        ...


@dataclass(frozen=True)
class Loaded:
    """A source already in hand (an archive decoded, a list read at once)."""

    items: Sequence[AuditEntry]
    query: Query
    top: int

    def entries(self, limit: int | None) -> Iterable[AuditEntry]:
        return [e for e in self.items if self.query.matches(e)]


def pick(sources: Iterable[Source], limit: int | None) -> list[AuditEntry]:
    """Every source's matches in id order (an id in two sources counted once: an entry
    being moved); with `limit`, the newest `limit`. Sources are read newest first and
    those that cannot reach into the newest `limit` are not read at all."""
    ordered = sorted(sources, key=lambda s: s.top, reverse=True)
    chosen: dict[int, AuditEntry] = {}
    for source in ordered:
        if limit is not None and len(chosen) >= limit and source.top < min(chosen):
            break
        chosen.update((e.id, e) for e in source.entries(limit))
        if limit is not None and len(chosen) > limit:
            chosen = dict(sorted(chosen.items())[-limit:])
    return [chosen[i] for i in sorted(chosen)]


def newest_of(entries: Mapping[Any, AuditEntry], query: Query) -> list[AuditEntry]:
    """The newest of `entries` (a rollout's newest entry of each kind and region, as a
    replica keeps them) that matches `query`: the answer to a `limit` 1 read of that
    rollout when `query.only_newest`."""
    matching = [e for e in entries.values() if query.matches(e)]
    return [max(matching, key=lambda e: e.id)] if matching else []
