"""The audit on etcd (issue 30): where its entries live, what a replica keeps of them in
memory, and reads that page from the store.

Layout (schema 3), under the prefix:

    audit-log/SERVICE/VERSION/ID        one live entry (ID: the store-wide sequence, 16 digits)
    audit-seq                           the last ID given; every record writes it, and
                                        commits only while it is the one the view holds
    archive/SERVICE/VERSION/PART        a finished rollout's archive (`rollout/archive.py`),
                                        in parts of at most PART_BYTES (most have one)
    archive-index/SERVICE/VERSION       its header (ids, times, the chain's head) and parts
    audit/ID                            schemas 1-2's flat log, until the leader moves it

A rollout's live entries are one key range, so the transaction that archives it can
delete them with one operation (etcd allows 128 per transaction): that is why the log
is kept per rollout, and the ids come from `audit-seq`.

A replica keeps in memory (`AuditMemory`) what it decides from and serves without a
read: the sequence, each rollout's head (its newest entry's id and hash: the chain goes
on from it), each unfinished rollout's newest entry of each kind and region (the
latest checks, the dashboard's last decision), and the archives' headers. Never the
entries themselves: `read` pages them from etcd, live log and archives merged by id,
every page at the revision of the first (one consistent picture).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from aetcd import rpc

from xds_server.ha.etcd import (
    FAILOVER_CODES,
    SyncKV,
    range_end,
)
from xds_server.rollout.archive import (
    ArchiveError,
    ArchiveHeader,
    Loaded,
    Query,
    Record,
    Source,
    decode,
    newest_of,
    pick,
)
from xds_server.rollout.audit import AuditEntry
from xds_server.rollout.audit_codec import from_document
from xds_server.rollout.state import FINISHED, RolloutState

log = logging.getLogger("xds_server.ha.audit_log")

Rollout = tuple[str, str]
PAGE = 200
"""Keys per range read (an entry is 1-20 KB: a page stays well under gRPC's 4 MB)."""
PART_BYTES = 512 * 1024
"""An archive's part: etcd refuses requests over 1.5 MiB (`--max-request-bytes`)."""
VERSION_SCALE = 1000
"""A store revision R gives routes version R * 1000 (`ha/store.py`)."""


@dataclass(frozen=True)
class AuditKeys:
    prefix: str

    def log(self, service: str = "", version: str = "", seq: int = 0) -> str:
        """A live entry's key; fewer parts: the folder (a rollout's: its whole log)."""
        tail = "/".join(p for p in (service, version) if p)
        return (
            f"{self.prefix}/audit-log/"
            + (tail + "/" if tail else "")
            + (f"{seq:016d}" if seq else "")
        )

    @property
    def seq(self) -> str:
        return f"{self.prefix}/audit-seq"

    def archive(self, service: str, version: str, part: int | None = None) -> str:
        folder = f"{self.prefix}/archive/{service}/{version}/"
        return folder if part is None else f"{folder}{part:04d}"

    def index(self, service: str = "", version: str = "") -> str:
        tail = f"{service}/{version}" if service else ""
        return f"{self.prefix}/archive-index/{tail}"

    def legacy(self, seq: int = 0) -> str:
        """Schemas 1-2: `audit/ID` (`ha/etcd.py`'s `Keys.audit`)."""
        return f"{self.prefix}/audit/" + (f"{seq:016d}" if seq else "")


@dataclass(frozen=True)
class Indexed:
    """An archive as its index key tells it."""

    header: ArchiveHeader
    parts: int

    def doc(self) -> bytes:
        return json.dumps({**self.header.doc(), "parts": self.parts}).encode()

    @classmethod
    def parse(cls, value: bytes, where: str) -> Indexed:
        doc = json.loads(value)
        parts = doc.pop("parts", None) if isinstance(doc, dict) else None
        if not isinstance(parts, int) or parts < 1:
            raise ArchiveError(f"{where}: 'parts' is {parts!r}, not a count")
        return cls(ArchiveHeader.from_doc(doc, where), parts)


@dataclass
class AuditMemory:
    """What a replica holds of the audit (see the module's docstring)."""

    seq: int = 0
    seq_revision: int = 0
    """`audit-seq`'s mod revision (0: no key yet)."""
    heads: dict[Rollout, tuple[int, str | None]] = field(default_factory=dict)
    """Each rollout with live entries: its newest entry's id and hash (None: unchained)."""
    newest: dict[Rollout, dict[tuple[str, str | None], AuditEntry]] = field(default_factory=dict)
    """Each unfinished rollout's newest entry of each (kind, region)."""
    checks: dict[Rollout, dict[str, AuditEntry]] = field(default_factory=dict)
    """Each finished rollout's (until it is archived) newest check of each region: its
    latest checks, which `xdsctl rollout get` and the dashboard show."""
    archives: dict[Rollout, Indexed] = field(default_factory=dict)
    legacy: bool = False
    """Keys of the flat log (schemas 1-2) may be left: reads include it."""
    complete: bool = True
    """`newest` and `checks` hold what they say (False: loaded without them, as a
    reader's `EtcdStore.read` does: reads go to etcd instead)."""

    def note(self, entry: AuditEntry, finished: bool) -> None:
        """An entry committed (seen by the watch, or ours)."""
        rollout = (entry.service, entry.canary_version)
        if entry.id >= self.heads.get(rollout, (0, None))[0]:
            self.heads[rollout] = (entry.id, entry.chain.hash if entry.chain else None)
        self.seq = max(self.seq, entry.id)
        if finished:
            if entry.kind == "check" and entry.region:
                checks = self.checks.setdefault(rollout, {})
                if entry.region not in checks or checks[entry.region].id < entry.id:
                    checks[entry.region] = entry
            return
        newest = self.newest.setdefault(rollout, {})
        slot = (str(entry.kind), entry.region)
        if slot not in newest or newest[slot].id < entry.id:
            newest[slot] = entry

    def finished(self, rollout: Rollout) -> None:
        """Its rollout finished: nothing more is decided from its entries; its latest
        checks are kept until it is archived."""
        newest = self.newest.pop(rollout, {})
        checks = {r: e for (k, r), e in newest.items() if k == "check" and r}
        if checks:
            self.checks[rollout] = {**checks, **self.checks.get(rollout, {})}

    def archived(self, rollout: Rollout, indexed: Indexed) -> None:
        self.archives[rollout] = indexed
        self.heads.pop(rollout, None)
        self.newest.pop(rollout, None)
        self.checks.pop(rollout, None)

    def latest_checks(self, rollout: Rollout) -> dict[str, AuditEntry] | None:
        """Its newest check of each region, as held; None: not held (archived, unknown,
        or not loaded)."""
        if not self.complete:
            return None
        if rollout in self.newest:
            return {r: e for (k, r), e in self.newest[rollout].items() if k == "check" and r}
        if rollout in self.heads:
            return dict(self.checks.get(rollout, {}))
        return None

    def head_hash(self, rollout: Rollout) -> str | None:
        """The hash its next entry chains from: its head's, an archive's (a rollout is
        archived only when finished; this keeps a chain whole even so), or None."""
        if rollout in self.heads:
            return self.heads[rollout][1]
        indexed = self.archives.get(rollout)
        return indexed.header.last_hash or None if indexed else None

    def entries_held(self) -> int:
        """How many entries are held (the newest of each kind and region, the latest
        checks of finished rollouts)."""
        return sum(len(n) for n in self.newest.values()) + sum(map(len, self.checks.values()))


# ---- parsing what the watch and the loads bring ----


def rollout_of(name: str) -> tuple[Rollout, str]:
    """`SERVICE/VERSION/REST` -> ((service, version), rest); ValueError when malformed."""
    service, _, rest = name.partition("/")
    version, _, tail = rest.partition("/")
    if not service or not version:
        raise ValueError(f"{name!r} is not SERVICE/VERSION/...")
    return (service, version), tail


MOVED = "committed_revision"
"""An entry moved from the flat log keeps its commit's revision in this key (its own
key's mod revision is the move's)."""


def entry_of(kv: Any, seq: str) -> AuditEntry:
    """A live (or flat) log key's entry, its snapshot version its commit's."""
    revision = kv.mod_revision
    if MOVED.encode() in kv.value:
        revision = json.loads(kv.value).get(MOVED, revision)
    return from_document(kv.value, int(seq), revision * VERSION_SCALE)


def record_of(kv: Any, entry: AuditEntry) -> Record:
    """The archive's record of a live key (`rollout/archive.py`)."""
    document = json.loads(kv.value)
    document.pop(MOVED, None)
    return {"id": entry.id, "version": entry.snapshot_version, "document": document}


def apply(
    memory: AuditMemory, rollouts: Mapping[Rollout, RolloutState], rest: str, kv: Any
) -> str | None:
    """A key of the audit's (`rest`: its name under the prefix), put, into `memory`: an
    entry (the per-rollout log's, or the flat log's of schemas 1-2), `audit-seq`, an
    archive's index; "audit" when an entry or an archive came. (A live key's delete is
    its move to the archive, whose index comes in the same transaction, or the flat
    log's move: nothing to do.) ValueError for a key that does not read."""
    kind, _, name = rest.partition("/")
    if rest == "audit-seq":
        # The watch may bring a write the view already has after a later one of ours
        # (the migration's audit-seq at R, our commit's at R+1, then R's event): never
        # go back, or the next commit's condition names a revision long gone.
        if kv.mod_revision >= memory.seq_revision:
            memory.seq, memory.seq_revision = max(memory.seq, int(kv.value)), kv.mod_revision
        return None
    if kind == "archive-index":
        rollout, _ = rollout_of(name + "/")
        memory.archived(rollout, Indexed.parse(kv.value, rest))
        return "audit"
    if kind == "audit":
        memory.legacy, seq = True, name
    else:
        _, seq = rollout_of(name)
    entry = entry_of(kv, seq)
    state = rollouts.get((entry.service, entry.canary_version))
    memory.note(entry, finished=state is not None and state.phase in FINISHED)
    return "audit"


# ---- reading in pages ----


class Pages:
    """Range reads of one read, all at the revision of the first (0: not read yet)."""

    def __init__(self, kv: SyncKV, revision: int = 0) -> None:
        self.kv = kv
        self.revision = revision

    def range(
        self, start: str, end: bytes, limit: int = PAGE, descending: bool = False,
        keys_only: bool = False,
    ) -> list[Any]:  # fmt: skip
        request = rpc.RangeRequest(
            key=start.encode(),
            range_end=end,
            limit=limit,
            revision=self.revision,
            sort_order=rpc.RangeRequest.DESCEND if descending else rpc.RangeRequest.ASCEND,
            sort_target=rpc.RangeRequest.KEY,
            keys_only=keys_only,
        )
        reply = _range(self.kv, request)
        if not self.revision:
            self.revision = reply.header.revision
        return list(reply.kvs)

    def scan(
        self, start: str, end: bytes, descending: bool = False, first: int = PAGE
    ) -> Iterable[Any]:
        """Every key in [start, end), a page at a time: `first` keys, then each page
        four times the last, up to PAGE (a read that wants the newest few reads few)."""
        low, high, size = start.encode(), end, max(1, min(first, PAGE))
        while True:
            got = self.range(low.decode(), high, limit=size, descending=descending)
            yield from got
            if len(got) < size:
                return
            size = min(PAGE, size * 4)
            if descending:
                high = got[-1].key
            else:
                low = got[-1].key + b"\0"

    def get(self, key: str) -> Any | None:
        got = self.range(key, b"", limit=1)
        return got[0] if got else None


def _range(kv: SyncKV, request: Any, attempts: int = 3) -> Any:
    """One range read, tried again (reads are safe to repeat) on the next member while
    etcd answers UNAVAILABLE or not in time (as `SyncKV.range` does)."""
    for attempt in range(attempts):
        try:
            return kv._call("Range", request)
        except grpc.RpcError as exc:
            if attempt == attempts - 1 or exc.code() not in FAILOVER_CODES:
                raise
    raise AssertionError("unreachable")


@dataclass
class LiveLog:
    """One rollout's live entries, read newest first (a `limit`) or all in order."""

    pages: Pages
    keys: AuditKeys
    rollout: Rollout
    top: int
    query: Query
    newest: Mapping[tuple[str, str | None], AuditEntry] | None
    """Its newest entry of each kind and region (an unfinished rollout's), or None."""
    archived: Callable[[Rollout], Source | None]
    """Its archive, should it have been archived since the view was read."""

    def entries(self, limit: int | None) -> Iterable[AuditEntry]:
        if limit == 1 and self.query.only_newest and self.newest is not None:
            return newest_of(self.newest, self.query)
        folder = self.keys.log(*self.rollout)
        start = folder + f"{(self.query.after_id or 0) + 1:016d}"
        end = range_end(folder) if self.query.before_id is None else (
            (folder + f"{self.query.before_id:016d}").encode())  # fmt: skip
        out: list[AuditEntry] = []
        seen = False
        first = PAGE if limit is None else 2 * limit + 6
        for kv in self.pages.scan(start, end, descending=limit is not None, first=first):
            seen = True
            e = entry_of(kv, kv.key.decode().rpartition("/")[2])
            if self.query.matches(e):
                out.append(e)
                if limit is not None and len(out) >= limit:
                    break
        if not seen and self._head_in_window() and (moved := self.archived(self.rollout)):
            return moved.entries(limit)  # (archived after the view was read)
        return out

    def _head_in_window(self) -> bool:
        q = self.query
        return (q.after_id or 0) < self.top and (q.before_id is None or self.top < q.before_id)


@dataclass
class Archived:
    """One archive, read (all its parts) only when its entries are asked for."""

    pages: Pages
    keys: AuditKeys
    indexed: Indexed
    query: Query

    @property
    def top(self) -> int:
        return self.indexed.header.last_id

    def entries(self, limit: int | None) -> Iterable[AuditEntry]:
        h = self.indexed.header
        try:
            items = read_archive(self.pages, self.keys, h.service, h.canary_version)
        except ArchiveError as exc:
            log.error("%s", exc)  # (one unreadable archive must not hide the others)
            return []
        return Loaded(items, self.query, self.top).entries(limit)


def read_archive(pages: Pages, keys: AuditKeys, service: str, version: str) -> list[AuditEntry]:
    """A rollout's archive, its parts joined; ArchiveError naming the key."""
    folder = keys.archive(service, version)
    blob = b"".join(kv.value for kv in pages.scan(folder, range_end(folder)))
    if not blob:
        raise ArchiveError(f"{folder}: no archive there")
    return decode(blob, folder)[1]


@dataclass
class Legacy:
    """Schemas 1-2's flat log (left until the leader's migration moves it)."""

    pages: Pages
    keys: AuditKeys
    query: Query
    top: int = 2**63

    def entries(self, limit: int | None) -> Iterable[AuditEntry]:
        folder = self.keys.legacy()
        start = folder + f"{(self.query.after_id or 0) + 1:016d}"
        end = range_end(folder) if self.query.before_id is None else (
            (folder + f"{self.query.before_id:016d}").encode())  # fmt: skip
        out = []
        first = PAGE if limit is None else 2 * limit + 6
        for kv in self.pages.scan(start, end, descending=limit is not None, first=first):
            try:
                e = entry_of(kv, kv.key.decode().rpartition("/")[2])
            except ValueError:
                continue  # (not an entry: logged by the view when it read it)
            if self.query.matches(e):
                out.append(e)
                if limit is not None and len(out) >= limit:
                    break
        return out


def read(
    kv: SyncKV,
    keys: AuditKeys,
    memory: AuditMemory,
    query: Query,
    limit: int | None,
) -> list[AuditEntry]:
    """The matching entries of the live log and the archives, in id order (with
    `limit`: the newest `limit`), from the rollouts and archives `memory` knows."""
    pages = Pages(kv)
    # Copies, each made in one step (the caller may be a thread beside the watch's loop).
    heads, archives = dict(memory.heads), dict(memory.archives)
    newest = {r: dict(n) for r, n in list(memory.newest.items())} if memory.complete else {}

    def archived(rollout: Rollout) -> Source | None:
        got = pages.get(keys.index(*rollout))
        if got is None:
            return None
        return Archived(pages, keys, Indexed.parse(got.value, got.key.decode()), query)

    sources: list[Source] = [
        LiveLog(pages, keys, rollout, top, query, newest.get(rollout), archived)
        for rollout, (top, _) in heads.items()
        if query.may_hold(*rollout, 0, top, None)
    ]
    sources += [
        Archived(pages, keys, indexed, query)
        for rollout, indexed in archives.items()
        if rollout not in heads and indexed.header.may_hold(query)
    ]
    if memory.legacy:
        sources.append(Legacy(pages, keys, query))
    return pick(sources, limit)


# ---- what a replica loads ----

NEWEST_KINDS = ("check", "transition")


def load(
    pages: Pages, keys: AuditKeys, memory: AuditMemory, rollouts: Mapping[Rollout, RolloutState],
    newest: bool = True,
) -> None:  # fmt: skip
    """Fill `memory` from the store at `pages`' revision (its archives already in it):
    the flat log's entries folded in if any is left; each unarchived rollout's head (its
    log's last key); with `newest`, each unfinished rollout's newest entry of each kind
    and region, each finished one's latest check of each region (its log read back until
    every one is found, or to its start)."""
    memory.complete = newest
    folder = keys.legacy()
    if pages.range(folder, range_end(folder), limit=1, keys_only=True):
        memory.legacy = True
        for kv in pages.scan(folder, range_end(folder)):
            _fold(memory, rollouts, kv, kv.key.decode().rpartition("/")[2])
    for rollout, state in rollouts.items():
        if rollout in memory.archives:
            continue
        folder = keys.log(*rollout)
        finished = state.phase in FINISHED
        wanted = {(k, r) for k in NEWEST_KINDS for r in (*state.regions, None)}
        for kv in pages.scan(folder, range_end(folder), descending=True, first=1):
            _fold(memory, rollouts, kv, kv.key.decode().rpartition("/")[2])
            if not newest:
                break
            if finished and set(state.regions) <= memory.checks.get(rollout, {}).keys():
                break
            if not finished and wanted <= memory.newest.get(rollout, {}).keys():
                break


def _fold(memory: AuditMemory, rollouts: Mapping[Rollout, RolloutState], kv: Any, seq: str) -> None:
    try:
        e = entry_of(kv, seq)
    except ValueError as exc:
        log.error("ignoring unreadable store key %s: %s", kv.key.decode(), exc)
        return
    state = rollouts.get((e.service, e.canary_version))
    memory.note(e, finished=state is None or state.phase in FINISHED)
