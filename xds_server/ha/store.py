"""The etcd `StateStore`: rollout state, the audit log, the spec and the routes versions.

Every replica keeps a `View` of everything under the prefix, loaded once and then kept
current by one watch. Reads (the port's `load_rollouts`, `audit`, ...) are answered from
the view, never by a round trip, so an unreachable etcd never blocks the event loop on
a read and a follower serves exactly what the watch delivered.

Writes are the leader's, and fenced: `record` is one transaction that commits the state,
its audit entries and the routes keys of the regions it changes only while the leader
key still has the create revision this replica won it with (`fence`). A deposed leader
(paused past its lease, partitioned) is refused (`StoreFenced`) and never commits.

Routes versions: a region's snapshot carries `routes_version(region)`, the newest of the
spec's revision and the region's routes key's revision, times 1000 (the lower digits are
left to the replica's own make-before-break rebuilds). It is derived from the store, so
every replica gives the same routes the same version.

The audit's hash chain (`rollout/audit_chain.py`): `record` links each entry to its
rollout's newest entry as the leader's view holds it. That view is the store's newest:
it was read whole at election, has every commit of this leader's since, and the
transaction commits only while the next audit key is free, which proves no entry was
committed after the view's newest (any writer takes keys in sequence). A deposed leader's
stale view never commits (the fence).

Schema versions: the `schema` key (`Keys.schema`, a JSON document whose `version` is
SCHEMA_VERSION; absent: version 1, the stores made before versions). `start` refuses a
newer one (`StoreVersionError`, one line); the leader migrates an older one once
(`migrate`, before its first write), in a transaction conditioned on the fence and on
the schema key being the one it read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn

import grpc
from aetcd import rpc
from aetcd.exceptions import RevisionCompactedError

from xds_server.ha.etcd import (
    EtcdAddress,
    Keys,
    SyncKV,
    compare_create_revision,
    compare_mod_revision,
    compare_version,
    one_line,
    put_op,
    range_end,
)
from xds_server.ha.instances import Instance, instance_from_json
from xds_server.rollout.audit import AuditEntry
from xds_server.rollout.audit_chain import genesis
from xds_server.rollout.audit_codec import chained, from_document, to_document
from xds_server.rollout.ports import StoreFenced, StoreWriteError
from xds_server.rollout.state import RolloutState, state_from_json, state_to_json
from xds_server.rollout.store import SCHEMA_VERSION, UNVERSIONED, newer_schema

log = logging.getLogger("xds_server.ha.store")

VERSION_SCALE = 1000
"""A store revision R gives routes version R * 1000."""
WATCH_RETRY_SECONDS = 0.5


class StoreReadError(Exception):
    """The store could not be read; the message says which and why."""


@dataclass(frozen=True)
class StoredSpec:
    text: str
    revision: int
    """The spec key's mod revision."""
    number: int
    """1 for the first spec pushed, then 2, 3, ..."""
    pushed_at: float
    source: str


@dataclass(frozen=True)
class LeaderKey:
    replica: str
    create_revision: int
    lease: int


@dataclass
class View:
    """Everything under the prefix, as of `revision`."""

    revision: int = 0
    schema: int = UNVERSIONED
    schema_revision: int = 0
    """The schema key's mod revision; 0: no key (a store made before versions)."""
    heads: dict[tuple[str, str], tuple[int, str | None]] = field(default_factory=dict)
    """Each rollout's newest audit entry: its id and hash (None: unchained)."""
    spec: StoredSpec | None = None
    rollouts: dict[tuple[str, str], RolloutState] = field(default_factory=dict)
    audit: dict[int, AuditEntry] = field(default_factory=dict)
    routes: dict[str, int] = field(default_factory=dict)
    """Region -> the mod revision of its routes key."""
    leader: LeaderKey | None = None
    replicas: dict[str, dict[str, Any]] = field(default_factory=dict)
    registry: dict[str, Instance] = field(default_factory=dict)
    """Registered instances by key (each on its instance's lease)."""
    departed: dict[str, tuple[dict[str, Any], float]] = field(default_factory=dict)
    """Replicas whose key went away (a lease that expired: dead, or frozen): their last
    document, and when (monotonic)."""
    heard: dict[str, tuple[int, float]] = field(default_factory=dict)
    """Replica id -> (its key's mod revision, when this replica first saw that revision,
    monotonic). Each replica rewrites its key at every renewal, so a key not rewritten
    for a while is a silent replica (frozen, or cut off from the store) even before its
    lease runs out."""


Listener = Callable[[frozenset[str]], None]
"""Told which parts changed ("spec", "rollouts", "routes", "leader", "replicas", "audit",
"registry", "schema")."""


class EtcdStore:
    """The `StateStore` of a replica. `await start()` loads the view; `watch()` keeps it."""

    def __init__(self, address: EtcdAddress, client: Any = None) -> None:
        self.address = address
        self.keys = Keys(address.prefix)
        self.client = client
        """The aetcd client (the watch, leases, the election)."""
        self.kv = SyncKV(address)
        self.view = View()
        self.fence: int | None = None
        """The leader key's create revision while this replica leads; None: it does not."""
        self.on_fenced: Callable[[str], None] | None = None
        self.may_write: Callable[[], bool] = lambda: True
        """The election's deadline: False once the lease may have run out unrenewed."""
        self.admit: Callable[[bool], str | None] = lambda critical: None
        """Why a write (critical: a rollback) may not go ahead now, or None: etcd's
        headroom (`ha/maintainer.py`: above its high-water mark only rollbacks)."""
        self._listeners: list[Listener] = []
        self._changed: set[str] = set()
        self._notify_handle: asyncio.Handle | None = None
        self.path = str(address)
        """What a log line calls this store."""

    # ---- the view ----

    async def start(self) -> None:
        """Load everything under the prefix (raises when etcd cannot be reached)."""
        got = await self.client.get_prefix(self.keys.everything.encode())
        view = View(revision=got.header.revision, heard=self.view.heard)
        for kv in got:
            _apply(view, self.keys.prefix, kv.key.decode(), kv, deleted=False)
        if view.schema > SCHEMA_VERSION:
            raise newer_schema(self.path + self.keys.schema, view.schema)
        self.view = view

    def read(self) -> None:
        """Load the view now, blocking (a reader outside any event loop: the lab, `manifests
        istio --store`); StoreReadError when etcd does not answer."""
        try:
            got = self.kv.range(self.keys.everything, range_end(self.keys.everything))
        except grpc.RpcError as exc:
            raise StoreReadError(f"cannot read {self.path}: {_rpc_error(exc)}") from None
        view = View(
            revision=got.header.revision, departed=self.view.departed, heard=self.view.heard
        )
        for kv in got.kvs:
            _apply(view, self.keys.prefix, kv.key.decode(), kv, deleted=False)
        self.view = view

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def watch(self) -> None:
        """Keep the view current until cancelled; reconnects (from the last revision
        seen, so nothing is missed) whenever the stream breaks."""
        while True:
            try:
                watch = await self.client.watch_prefix(
                    self.keys.everything.encode(), start_revision=self.view.revision + 1
                )
                async for event in watch:
                    self._on_event(event)
            except asyncio.CancelledError:
                raise
            except RevisionCompactedError:
                log.warning("store watch fell behind a compaction: reloading everything")
                await self._reload()
                continue
            except Exception as exc:
                log.warning("store watch broken (%s); retrying", one_line(exc))
            await asyncio.sleep(WATCH_RETRY_SECONDS)  # reconnect backoff

    async def _reload(self) -> None:
        with contextlib.suppress(Exception):  # (the next watch attempt retries)
            await self.start()
            self._changed |= {
                "spec",
                "rollouts",
                "routes",
                "leader",
                "replicas",
                "audit",
                "registry",
                "schema",
            }
            self._notify()

    def _on_event(self, event: Any) -> None:
        kv = event.kv
        view = self.view
        if kv.mod_revision < view.revision and event.kind == "PUT":
            return  # applied already (a reconnect's replay); a commit's events share one
        part = _apply(view, self.keys.prefix, kv.key.decode(), kv, deleted=event.kind == "DELETE")
        view.revision = max(view.revision, kv.mod_revision)
        if part:
            self._changed.add(part)
            if self._notify_handle is None:
                # One notice per batch: the events of one commit arrive together.
                self._notify_handle = asyncio.get_running_loop().call_soon(self._notify)

    def _notify(self) -> None:
        self._notify_handle = None
        changed, self._changed = frozenset(self._changed), set()
        for listener in list(self._listeners):
            try:
                listener(changed)
            except Exception:
                log.exception("a store listener failed; continuing")

    # ---- versions ----

    def routes_version(self, region: str) -> int:
        spec = self.view.spec.revision if self.view.spec else 0
        return max(spec, self.view.routes.get(region, 0)) * VERSION_SCALE

    # ---- the StateStore port ----

    def load_rollouts(self) -> list[RolloutState]:
        return sorted(self.view.rollouts.values(), key=lambda s: s.updated_at)

    def rollout(self, service: str, version: str) -> RolloutState | None:
        return self.view.rollouts.get((service, version))

    def record(
        self,
        state: RolloutState,
        entries: Sequence[AuditEntry],
        *,
        critical: bool = False,
        regions: Collection[str] = (),
    ) -> None:
        """Commit the state, its entries and the routes keys of `regions` in one
        transaction, fenced on the leader key. StoreFenced when this replica does not
        lead; StoreWriteError when etcd does not answer in time. A store of an older
        schema is migrated first; one of a newer schema refused."""
        fence = self._check_lead()
        if (held := self.admit(critical)) is not None:
            raise StoreWriteError(f"not writing {self.path}: {held}")
        if self.view.schema != SCHEMA_VERSION:
            self.migrate()
        entries = _linked(self.view, entries)
        seq = max(self.view.audit, default=0) + len(entries)
        try:
            reply = self.kv.txn(self._commit_txn(fence, state, entries, regions, seq))
        except grpc.RpcError as exc:
            raise StoreWriteError(f"cannot write {self.path}: {_rpc_error(exc)}") from None
        if not reply.succeeded and _still_leads(reply, self.fence):
            # The fence holds, an audit key exists: an earlier attempt that timed out did
            # commit. The watch brings those entries; this decision is made again.
            raise StoreWriteError(f"cannot write {self.path}: audit sequence {seq} is taken")
        if not reply.succeeded:
            self._deposed()
        self._committed(reply.header.revision, state, entries, regions, seq)

    def _check_lead(self) -> int:
        """The fence, while this replica leads and may write; else StoreFenced."""
        if self.fence is None:
            raise StoreFenced("this replica does not lead: it writes nothing")
        if not self.may_write():
            why = "the leader lease was not renewed in time: not writing"
            if self.on_fenced is not None:
                self.on_fenced(why)
            raise StoreFenced(why)
        return self.fence

    def _deposed(self) -> NoReturn:
        fence, self.fence = self.fence, None
        why = (
            f"refused: the leader key is no longer the one this replica won "
            f"(revision {fence}): another replica leads"
        )
        if self.on_fenced is not None:
            self.on_fenced(why)
        raise StoreFenced(why)

    def migrate(self) -> bool:
        """Bring the store's schema up to SCHEMA_VERSION (1 -> 2: audit documents may
        carry their chain; nothing to rewrite), fenced and conditioned on the schema key
        the view holds. True: this call migrated; False: it was done (by another
        replica, the transaction found). StoreFenced when this replica does not lead;
        StoreWriteError for a newer schema, or etcd not answering."""
        view = self.view
        if view.schema > SCHEMA_VERSION:
            raise StoreWriteError(str(newer_schema(self.path + self.keys.schema, view.schema)))
        if view.schema == SCHEMA_VERSION:
            return False
        fence = self._check_lead()
        request = _migrate_txn(self.keys, fence, view.schema, view.schema_revision)
        try:
            reply = self.kv.txn(request)
        except grpc.RpcError as exc:
            raise StoreWriteError(f"cannot migrate {self.path}: {_rpc_error(exc)}") from None
        if reply.succeeded:
            log.info("migrated %s from schema %d to %d", self.path, view.schema, SCHEMA_VERSION)
            view.schema, view.schema_revision = SCHEMA_VERSION, reply.header.revision
            return True
        if not _still_leads(reply, fence):
            self._deposed()
        schema = reply.responses[1].response_range.kvs
        if schema:
            view.schema = _schema_version(schema[0].value)
            view.schema_revision = schema[0].mod_revision
        if view.schema > SCHEMA_VERSION:
            raise StoreWriteError(str(newer_schema(self.path + self.keys.schema, view.schema)))
        if view.schema < SCHEMA_VERSION:
            raise StoreWriteError(f"cannot migrate {self.path}: its schema key changed; again")
        return False

    def _commit_txn(
        self,
        fence: int,
        state: RolloutState,
        entries: Sequence[AuditEntry],
        regions: Collection[str],
        last: int,
    ) -> rpc.TxnRequest:
        """The state, the entries as audit keys up to `last`, and the routes keys, if the
        leader key is still this replica's and no audit key is taken; else the leader key."""
        ops = [put_op(self.keys.rollout(state.service, state.canary_version),
                      state_to_json(state).encode())]  # fmt: skip
        first = last - len(entries) + 1
        audit_keys = [self.keys.audit(first + i) for i in range(len(entries))]
        ops += [
            put_op(k, to_document(e).encode()) for k, e in zip(audit_keys, entries, strict=True)
        ]
        ops += [put_op(self.keys.routes(region), b"%d" % last) for region in sorted(regions)]
        compare = [compare_create_revision(self.keys.leader, fence)]
        compare += [compare_create_revision(k, 0) for k in audit_keys]
        leader_now = rpc.RequestOp(request_range=rpc.RangeRequest(key=self.keys.leader.encode()))
        return rpc.TxnRequest(compare=compare, success=ops, failure=[leader_now])

    def _committed(
        self,
        revision: int,
        state: RolloutState,
        entries: Sequence[AuditEntry],
        regions: Collection[str],
        last: int,
    ) -> None:
        """Our own commit is in the view at once (the watch's copy is then skipped)."""
        view = self.view
        view.rollouts[(state.service, state.canary_version)] = state
        first = last - len(entries) + 1
        for i, e in enumerate(entries):
            version = None if e.snapshot_version is None else revision * VERSION_SCALE
            view.audit[first + i] = replace(e, id=first + i, snapshot_version=version)
            _note_head(view, view.audit[first + i])
        for region in regions:
            view.routes[region] = revision
        # Everything below `revision` was seen by the watch or is ours.
        if revision == view.revision + 1:
            view.revision = revision

    def audit(
        self,
        service: str | None = None,
        region: str | None = None,
        since: float | None = None,
        kind: str | None = None,
        limit: int | None = None,
        after_id: int | None = None,
    ) -> list[AuditEntry]:
        out = [
            e
            for _, e in sorted(self.view.audit.items())
            if (service is None or e.service == service)
            and (region is None or e.region == region)
            and (kind is None or e.kind == kind)
            and (since is None or e.time >= since)
            and (after_id is None or e.id > after_id)
        ]
        return out[-limit:] if limit is not None else out

    def latest_checks(self, service: str, version: str) -> dict[str, AuditEntry]:
        out: dict[str, AuditEntry] = {}
        for _, e in sorted(self.view.audit.items()):
            if (e.service, e.canary_version, e.kind) == (service, version, "check") and e.region:
                out[e.region] = e
        return out

    def close(self) -> None:
        self.kv.close()

    # ---- the spec ----

    async def push_spec(self, text: str, source: str) -> StoredSpec | None:
        """Write a (validated) spec as the next one; None if it equals the current."""
        if (held := self.admit(False)) is not None:
            raise StoreWriteError(f"not pushing the spec to {self.path}: {held}")
        current = await self.client.get(self.keys.spec.encode())
        number = current.version if current is not None else 0
        if current is not None and json.loads(current.value)["text"] == text:
            return None
        doc = json.dumps({"text": text, "pushed_at": time.time(), "source": source}).encode()
        if not await self._push_txn(number, doc):
            again = await self.client.get(self.keys.spec.encode())
            if again is not None and json.loads(again.value)["text"] == text:
                return None  # (another replica pushed the same file at the same moment)
            raise StoreWriteError("another spec was pushed at the same moment; try again")
        got = await self.client.get(self.keys.spec.encode())
        return StoredSpec(text, got.mod_revision, got.version, time.time(), source)

    async def _push_txn(self, number: int, doc: bytes) -> bool:
        """The spec and its history entry, only if no other push came in between."""
        await self.client.connect()
        request = rpc.TxnRequest(
            compare=[compare_version(self.keys.spec, number)],
            success=[put_op(self.keys.spec, doc), put_op(self.keys.spec_history(number + 1), doc)],
        )
        reply = await self.client.kvstub.Txn(request, timeout=5)
        return bool(reply.succeeded)

    async def spec_history(self) -> list[StoredSpec]:
        prefix = self.keys.spec_history()
        got = await self.client.get_prefix(prefix.encode())
        out = []
        for kv in got:
            doc = json.loads(kv.value)
            number = int(kv.key.decode()[len(prefix) :])
            out.append(StoredSpec(doc["text"], kv.mod_revision, number, doc["pushed_at"],
                                  doc["source"]))  # fmt: skip
        return sorted(out, key=lambda s: s.number)


def _apply(view: View, prefix: str, key: str, kv: Any, *, deleted: bool) -> str | None:
    """One key under `prefix` into the view; the part it changed, or None."""
    rest = key[len(prefix) + 1 :]
    kind, _, name = rest.partition("/")
    value = b"" if deleted else kv.value
    try:
        if rest == "schema" and not deleted:
            view.schema = _schema_version(value)
            view.schema_revision = kv.mod_revision
            return "schema"
        if rest == "spec" and not deleted:
            doc = json.loads(value)
            view.spec = StoredSpec(
                doc["text"], kv.mod_revision, kv.version, doc["pushed_at"], doc["source"]
            )
            return "spec"
        if kind == "rollouts" and not deleted:
            state = state_from_json(value.decode())
            view.rollouts[(state.service, state.canary_version)] = state
            return "rollouts"
        if kind == "audit" and not deleted:
            entry = from_document(value, int(name), kv.mod_revision * VERSION_SCALE)
            view.audit[entry.id] = entry
            _note_head(view, entry)
            return "audit"
        if kind == "routes":
            view.routes[name] = kv.mod_revision
            return "routes"
        if rest == "leader":
            view.leader = (
                None if deleted else LeaderKey(value.decode(), kv.create_revision, kv.lease)
            )
            return "leader"
        if kind == "registry":
            if deleted:
                view.registry.pop(key, None)
            else:
                view.registry[key] = instance_from_json(value, kv.lease, kv.create_revision)
            return "registry"
        if kind == "replicas":
            if deleted:
                view.heard.pop(name, None)
                if name in view.replicas:
                    view.departed[name] = (view.replicas.pop(name), time.monotonic())
            else:
                view.replicas[name] = json.loads(value)
                view.departed.pop(name, None)
                if view.heard.get(name, (0, 0.0))[0] != kv.mod_revision:
                    view.heard[name] = (kv.mod_revision, time.monotonic())
            return "replicas"
    except (ValueError, KeyError, TypeError) as exc:
        log.error("ignoring unreadable store key %s: %s", key, one_line(exc))
    return None


def _linked(view: View, entries: Sequence[AuditEntry]) -> list[AuditEntry]:
    """The entries, each linked to its rollout's newest entry (the view's, then the one
    before it in `entries`); the snapshot version hashed as the commit mark."""
    heads: dict[tuple[str, str], str] = {}
    out = []
    for e in entries:
        rollout = (e.service, e.canary_version)
        prev = heads.get(rollout) or view.heads.get(rollout, (0, None))[1] or genesis(*rollout)
        e = chained(e, prev, snapshot_mark=True)
        assert e.chain is not None
        heads[rollout] = e.chain.hash
        out.append(e)
    return out


def _note_head(view: View, entry: AuditEntry) -> None:
    rollout = (entry.service, entry.canary_version)
    if entry.id >= view.heads.get(rollout, (0, None))[0]:
        view.heads[rollout] = (entry.id, entry.chain.hash if entry.chain else None)


def _schema_version(value: bytes) -> int:
    """The schema key's document -> its version (ValueError when it has none)."""
    version = json.loads(value).get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"schema: 'version' is {version!r}, not a version number")
    return version


def _migrate_txn(keys: Keys, fence: int, old: int, old_revision: int) -> rpc.TxnRequest:
    """The schema key at SCHEMA_VERSION, if the leader key is still this replica's and the
    schema key is still the one read (`old_revision`; 0: none); else both keys."""
    doc = {"version": SCHEMA_VERSION, "migrated_from": old, "at": time.time()}
    ranges = [
        rpc.RequestOp(request_range=rpc.RangeRequest(key=key.encode()))
        for key in (keys.leader, keys.schema)
    ]
    return rpc.TxnRequest(
        compare=[
            compare_create_revision(keys.leader, fence),
            compare_mod_revision(keys.schema, old_revision),
        ],
        success=[put_op(keys.schema, json.dumps(doc).encode())],
        failure=ranges,
    )


def _still_leads(reply: Any, fence: int | None) -> bool:
    kvs = reply.responses[0].response_range.kvs if reply.responses else []
    return bool(kvs) and kvs[0].create_revision == fence


def _rpc_error(exc: grpc.RpcError) -> str:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return f"{code.name if code else 'error'}: {details}"
