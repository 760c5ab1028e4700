"""`EtcdStore`'s audit side (kept apart for size): its reads that page from etcd
(`ha/audit_log.py`), the latest checks, and the leader's writes of the audit: a
finished rollout archived (`rollout/archive.py`), the flat log of schemas 1-2 moved,
the schema's last step. `AuditSide` is a mixin: what it uses of the store (its view's
`AuditMemory` and rollouts, its clients, its fence) the store provides; see
`ha/store.py` for the whole."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from aetcd import rpc

from xds_server.ha import audit_log
from xds_server.ha.audit_log import (
    MOVED,
    PART_BYTES,
    AuditKeys,
    AuditMemory,
    Indexed,
    Pages,
    Rollout,
    entry_of,
    record_of,
)
from xds_server.ha.etcd import (
    Keys,
    SyncKV,
    compare_create_revision,
    compare_mod_revision,
    put_op,
    range_end,
)
from xds_server.rollout.archive import ArchiveError, Query, due, encode, header_for
from xds_server.rollout.audit import AuditEntry
from xds_server.rollout.ports import StoreWriteError
from xds_server.rollout.state import FINISHED, RolloutState, state_from_json

log = logging.getLogger("xds_server.ha.store")


class StoreReadError(Exception):
    """The store could not be read; the message says which and why."""


ARCHIVED_CHECKS = 16
"""Archived rollouts whose latest checks a replica keeps once read (a current rollout
finished long ago is shown on every `xdsctl status`)."""


class AuditSide:
    kv: SyncKV
    keys: Keys
    log_keys: AuditKeys
    path: str
    fence: int | None
    _archived_checks: OrderedDict[Rollout, dict[str, AuditEntry]]

    @property
    def memory(self) -> AuditMemory:
        """The view's `AuditMemory` (the store's own)."""
        raise NotImplementedError

    @property
    def states(self) -> Mapping[tuple[str, str], RolloutState]:
        """The view's rollouts."""
        raise NotImplementedError

    def _check_lead(self) -> int:
        raise NotImplementedError

    def _deposed(self) -> NoReturn:
        raise NotImplementedError

    def migrate(self) -> bool:
        """The store's schema brought up to this release's (the archive needs 3)."""
        raise NotImplementedError

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
        """Paged from etcd (the live log of the rollouts the view knows, their archives),
        merged by id; with `limit`, the newest `limit`. Blocking: on the event loop, run
        it in a thread. StoreReadError when etcd does not answer."""
        query = Query(service, version, region, kind, since, after_id, before_id)
        try:
            return audit_log.read(self.kv, self.log_keys, self.memory, query, limit)
        except grpc.RpcError as exc:
            raise StoreReadError(f"cannot read {self.path}: {rpc_error(exc)}") from None

    def latest_checks(self, service: str, version: str) -> dict[str, AuditEntry]:
        """From the view (an unarchived rollout's are held); an archived one's read from
        its archive once, then kept (`ARCHIVED_CHECKS` of them: they never change)."""
        rollout = (service, version)
        held = self.memory.latest_checks(rollout)
        if held is not None:
            return held
        if rollout in self._archived_checks:
            self._archived_checks.move_to_end(rollout)
            return dict(self._archived_checks[rollout])
        if rollout not in self.memory.archives:  # (a reader's view, or unknown: read back)
            state = self.states.get(rollout)
            out: dict[str, AuditEntry] = {}
            for region in state.regions if state is not None else ():
                got = self.audit(service, region, kind="check", limit=1, version=version)
                out.update((region, e) for e in got)
            return out
        got = self.audit(service, kind="check", version=version)
        checks = {e.region: e for e in got if e.region}
        self._archived_checks[rollout] = checks
        while len(self._archived_checks) > ARCHIVED_CHECKS:
            self._archived_checks.popitem(last=False)
        return dict(checks)

    # ---- retention (rollout/archive.py) ----

    def archivable(self, now: float, retention: float) -> list[tuple[str, str]]:
        """Finished rollouts past the retention whose audit is live, oldest change first."""
        states = sorted(self.states.values(), key=lambda s: s.updated_at)
        return [
            (s.service, s.canary_version)
            for s in states
            if due(s, now, retention) and (s.service, s.canary_version) in self.memory.heads
        ]

    async def archive(self, service: str, version: str, now: float) -> bool:
        """Move a finished rollout's live log into its archive: read and encoded off the
        loop (`audit_log.stage`), then one fenced transaction writes the archive (a large
        one's parts staged before it) and its index and deletes the live keys, only while
        the rollout's key is the one read (no entry of it came since)."""
        rollout = (service, version)
        self._check_lead()
        self.migrate()  # (a store of schemas 1-2: the flat log moved first)
        try:
            staged = await asyncio.to_thread(stage, self.kv, self.log_keys, rollout, now)
            if staged is None:
                return False
            fence = self._check_lead()
            for request in archive_txns(self.keys.leader, self.log_keys, fence, staged):
                reply = self.kv.txn(request)
                if not reply.succeeded and not still_leads(reply, self.fence):
                    self._deposed()
        except grpc.RpcError as exc:
            raise StoreWriteError(f"cannot archive in {self.path}: {rpc_error(exc)}") from None
        if not reply.succeeded:
            return False  # (archived already, or written since it was read: next time)
        self.memory.archived(rollout, staged.indexed)
        h = staged.indexed.header
        log.info("archived the audit of %s %s (%d entries, %d bytes)", service, version,
                 h.entries, sum(len(p) for p in staged.parts))  # fmt: skip
        return True


# ---- the leader's writes: the flat log moved, a rollout archived ----


def fenced(
    leader: str, fence: int, success: list[Any], compare: tuple[Any, ...] = ()
) -> rpc.TxnRequest:
    """`success` while the leader key is the one this replica won; else the leader key."""
    mine = rpc.Compare(key=leader.encode(), result=rpc.Compare.EQUAL,
                       target=rpc.Compare.CREATE, create_revision=fence)  # fmt: skip
    now = rpc.RequestOp(request_range=rpc.RangeRequest(key=leader.encode()))
    return rpc.TxnRequest(compare=[mine, *compare], success=success, failure=[now])


def put(key: str, value: bytes) -> Any:
    return rpc.RequestOp(request_put=rpc.PutRequest(key=key.encode(), value=value))


def delete(start: str, end: bytes) -> Any:
    return rpc.RequestOp(
        request_delete_range=rpc.DeleteRangeRequest(key=start.encode(), range_end=end)
    )


def moves(pages: Pages, keys: AuditKeys, batch: int = 100) -> Iterable[tuple[list[Any], int]]:
    """The flat log's keys in batches to move (each within one transaction's limits),
    with the highest id of each: (operations, highest id)."""
    folder = keys.legacy()
    ops: list[Any] = []
    size, first, last = 0, "", 0
    for kv in pages.scan(folder, range_end(folder)):
        seq = kv.key.decode().rpartition("/")[2]
        try:
            e = entry_of(kv, seq)
        except ValueError as exc:
            log.error("not moving unreadable store key %s: %s", kv.key.decode(), exc)
            continue
        doc = json.loads(kv.value)
        doc.setdefault(MOVED, kv.mod_revision)
        value = json.dumps(doc).encode()
        ops.append(put(keys.log(e.service, e.canary_version, e.id), value))
        first, last, size = first or kv.key.decode(), e.id, size + len(value)
        if len(ops) >= batch or size >= PART_BYTES:
            yield [*ops, delete(first, kv.key + b"\0")], last
            ops, size, first = [], 0, ""
    if ops:
        yield [*ops, delete(first, (keys.legacy(last)).encode() + b"\0")], last


def move_flat_log(kv: SyncKV, keys: AuditKeys, leader: str, fence: int) -> int | None:
    """Move what is left of the flat log (schemas 1-2) into the per-rollout log, a fenced
    transaction per batch (each entry is in one place at every revision): the highest
    id moved (0: none); None when the fence no longer holds."""
    highest, moved = 0, 0
    for ops, last in moves(Pages(kv), keys):
        if not kv.txn(fenced(leader, fence, ops)).succeeded:
            return None
        highest, moved = last, moved + len(ops) - 1
    if moved:
        log.info("moved %d audit entries under %s to the per-rollout log", moved, keys.prefix)
    return highest


@dataclass(frozen=True)
class Staged:
    """A rollout's archive made from its live log as read at `revision`."""

    indexed: Indexed
    parts: list[bytes]
    state_revision: int
    """Its rollout key's mod revision then: any later entry of it would have moved it."""
    stale: bool = False
    """Parts of an earlier attempt are there (its last transaction failed)."""


def stage(kv: SyncKV, keys: AuditKeys, rollout: Rollout, now: float) -> Staged | None:
    """Read a rollout's state and live log (one revision) and encode its archive;
    None when it has no live entries, or is not finished. (Blocking: off the loop.)"""
    pages = Pages(kv)
    got = pages.get(f"{keys.prefix}/rollouts/{rollout[0]}/{rollout[1]}")
    if got is None:
        return None
    state = state_from_json(got.value.decode())
    if state.phase not in FINISHED:
        return None
    folder = keys.log(*rollout)
    entries, records = [], []
    for item in pages.scan(folder, range_end(folder)):
        try:  # (an archive must read back)
            e = entry_of(item, item.key.decode().rpartition("/")[2])
        except ValueError as exc:
            raise ArchiveError(f"{folder}: {rollout[0]} {rollout[1]} left live: {exc}") from None
        entries.append(e)
        records.append(record_of(item, e))
    if not entries:
        return None
    header = header_for(state, "etcd", entries, now)
    blob = encode(header, records)
    parts = [blob[i : i + PART_BYTES] for i in range(0, len(blob), PART_BYTES)]
    place = keys.archive(*rollout)
    stale = bool(pages.range(place, range_end(place), limit=1, keys_only=True))
    return Staged(Indexed(header, len(parts)), parts, got.mod_revision, stale)


def archive_txns(leader: str, keys: AuditKeys, fence: int, staged: Staged) -> list[Any]:
    """The fenced transactions that archive `staged`: an earlier attempt's parts
    removed, the parts but the last written, then one that writes the last part and the
    index and deletes the rollout's live log, only while its index is absent and its
    rollout key is the one read."""
    h = staged.indexed.header
    rollout = (h.service, h.canary_version)
    place = keys.archive(*rollout)
    out = []
    if staged.stale:
        out.append(fenced(leader, fence, [delete(place, range_end(place))]))
    last = len(staged.parts) - 1
    out += [fenced(leader, fence, [put(keys.archive(*rollout, i), part)])
            for i, part in enumerate(staged.parts[:last])]  # fmt: skip
    folder = keys.log(*rollout)
    unchanged = (
        rpc.Compare(key=keys.index(*rollout).encode(), result=rpc.Compare.EQUAL,
                    target=rpc.Compare.CREATE, create_revision=0),
        rpc.Compare(key=f"{keys.prefix}/rollouts/{rollout[0]}/{rollout[1]}".encode(),
                    result=rpc.Compare.EQUAL, target=rpc.Compare.MOD,
                    mod_revision=staged.state_revision),
    )  # fmt: skip
    final = [
        put(keys.archive(*rollout, last), staged.parts[last]),
        put(keys.index(*rollout), staged.indexed.doc()),
        delete(folder, range_end(folder)),
    ]
    return [*out, fenced(leader, fence, final, unchanged)]


# ---- the schema ----


def migrate_txn(
    keys: Keys, fence: int, old: int, old_revision: int, seq: int, version: int
) -> rpc.TxnRequest:
    """The schema key at `version` (the release's) and `audit-seq` at `seq` (the highest
    audit id), if the leader key is still this replica's and the schema key is still the
    one read (`old_revision`; 0: none); else both keys."""
    doc = {"version": version, "migrated_from": old, "at": time.time()}
    ranges = [
        rpc.RequestOp(request_range=rpc.RangeRequest(key=key.encode()))
        for key in (keys.leader, keys.schema)
    ]
    return rpc.TxnRequest(
        compare=[
            compare_create_revision(keys.leader, fence),
            compare_mod_revision(keys.schema, old_revision),
        ],
        success=[
            put_op(keys.schema, json.dumps(doc).encode()),
            put_op(AuditKeys(keys.prefix).seq, b"%d" % seq),
        ],
        failure=ranges,
    )


def still_leads(reply: Any, fence: int | None) -> bool:
    """A failed transaction's answer (`audit_log.fenced`): is the leader key the fence's?"""
    kvs = reply.responses[0].response_range.kvs if reply.responses else []
    return bool(kvs) and kvs[0].create_revision == fence


def rpc_error(exc: grpc.RpcError) -> str:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return f"{code.name if code else 'error'}: {details}"
