"""The etcd `StateStore`: rollout state, the audit log, the spec and the routes versions.

Every replica keeps a `View` of what it serves and decides from (rollouts, routes
versions, the spec, the registry, replicas; of the audit only `AuditMemory`: the chain's
heads, each unfinished rollout's newest entries, the archives' headers), loaded in pages
at one revision and then kept current by one watch. Those reads (`load_rollouts`,
`latest_checks`, ...) are answered from the view, never by a round trip, so an
unreachable etcd never blocks the event loop on them and a follower serves exactly what
the watch delivered. The audit itself is never held: `audit(...)` pages it from etcd
(`ha/audit_log.py`: the live log per rollout, the archives), so a caller on the event
loop runs it in a thread.

Writes are the leader's, and fenced: `record` is one transaction that commits the state,
its audit entries and the routes keys of the regions it changes only while the leader
key still has the create revision this replica won it with (`fence`). A deposed leader
(paused past its lease, partitioned) is refused (`StoreFenced`) and never commits.

Routes versions: a region's snapshot carries `routes_version(region)`, the newest of the
spec's revision and the region's routes key's revision, times 1000 (the lower digits are
left to the replica's own make-before-break rebuilds). It is derived from the store, so
every replica gives the same routes the same version.

The audit's hash chain (`rollout/audit_chain.py`): `record` links each entry to its
rollout's head as the leader's view holds it. That view is the store's newest: the
transaction commits only while `audit-seq` (the last id given, written by every record)
is the one the view holds, which proves no entry was committed after the view's heads.
A deposed leader's stale view never commits (the fence).

Retention (`rollout/archive.py`): the leader moves a finished rollout's live log into
its archive (`archive`: read and encoded off the loop, then one fenced transaction that
writes the archive and its index and deletes the live keys).

Schema versions: the `schema` key (`Keys.schema`, a JSON document whose `version` is
SCHEMA_VERSION; absent: version 1, the stores made before versions). `start` refuses a
newer one (`StoreVersionError`, one line); the leader migrates an older one once
(`migrate`, before its first write): 2 -> 3 moves the flat audit log (`audit/ID`) into
the per-rollout log, a fenced transaction per batch, then sets `audit-seq` and the
schema key in a transaction conditioned on the fence and on the schema key it read.
Replicas of the previous release ignore the new keys while they follow, and refuse to
write (or to start) once the schema key says 3.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn

import grpc
from aetcd import rpc
from aetcd.exceptions import RevisionCompactedError

from xds_server.ha import audit_log, directory_parts
from xds_server.ha.audit_log import (
    VERSION_SCALE,
    AuditKeys,
    AuditMemory,
    Pages,
)
from xds_server.ha.etcd import (
    EtcdAddress,
    Keys,
    SyncKV,
    compare_mod_revision,
    compare_version,
    one_line,
    put_op,
    range_end,
)
from xds_server.ha.instances import Instance, instance_from_json
from xds_server.ha.store_audit import (
    AuditSide,
    fenced,
    migrate_txn,
    move_flat_log,
    rpc_error,
    still_leads,
)
from xds_server.ha.store_audit import StoreReadError as StoreReadError  # (re-exported)
from xds_server.rollout.audit import AuditEntry
from xds_server.rollout.audit_chain import genesis
from xds_server.rollout.audit_codec import chained, to_document
from xds_server.rollout.ports import StoreFenced, StoreWriteError
from xds_server.rollout.state import FINISHED, RolloutState, state_from_json, state_to_json
from xds_server.rollout.store import SCHEMA_VERSION, UNVERSIONED, newer_schema

log = logging.getLogger("xds_server.ha.store")

WATCH_RETRY_SECONDS = 0.5
VIEW_KEYS = ("schema", "spec", "leader", "audit-seq")
VIEW_FOLDERS = (
    "rollouts", "routes", "registry", "replicas", "replica-nodes", "replica-beats",
    "archive-index",
)  # fmt: skip
"""What a replica loads (the rest, the audit's entries and archives and the spec's
history, is read when asked for)."""


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
    """What a replica holds of the prefix, as of `revision` (see the module's docstring)."""

    revision: int = 0
    schema: int = UNVERSIONED
    schema_revision: int = 0
    """The schema key's mod revision; 0: no key (a store made before versions)."""
    log: AuditMemory = field(default_factory=AuditMemory)
    """Of the audit, what decisions and reads need without a round trip."""
    spec: StoredSpec | None = None
    rollouts: dict[tuple[str, str], RolloutState] = field(default_factory=dict)
    routes: dict[str, int] = field(default_factory=dict)
    """Region -> the mod revision of its routes key."""
    leader: LeaderKey | None = None
    replicas: dict[str, dict[str, Any]] = field(default_factory=dict)
    registry: dict[str, Instance] = field(default_factory=dict)
    """Registered instances by key (each on its instance's lease)."""
    replica_parts: dict[str, dict[int, list[dict[str, Any]]]] = field(default_factory=dict)
    """Replica id -> its node parts (`directory_parts`), merged into `replicas`."""
    departed: dict[str, tuple[dict[str, Any], float]] = field(default_factory=dict)
    """Replicas whose key went away (a lease that expired: dead, or frozen): their last
    document, and when (monotonic)."""
    heard: dict[str, tuple[int, float]] = field(default_factory=dict)
    """Replica id -> (the mod revision of its key or of its beat key, the newer; when
    this replica first saw that revision, monotonic). Each replica writes its beat key
    (or, for an older release, rewrites its key) at every renewal, so one not heard
    from for a while is a silent replica (frozen, or cut off from the store) even
    before its lease runs out."""


Listener = Callable[[frozenset[str]], None]
"""Told which parts changed ("spec", "rollouts", "routes", "leader", "replicas", "audit",
"registry", "schema")."""


class EtcdStore(AuditSide):
    """The `StateStore` of a replica. `await start()` loads the view; `watch()` keeps it."""

    def __init__(self, address: EtcdAddress, client: Any = None) -> None:
        self.address = address
        self.keys = Keys(address.prefix)
        self.log_keys = AuditKeys(address.prefix)
        self._archived_checks = OrderedDict()
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
        """Load the view (raises when etcd cannot be reached; StoreVersionError, before
        anything else is read, for a newer schema). The reads run off the loop."""
        self.view = await asyncio.to_thread(self._load, self.view)

    def read(self) -> None:
        """Load the view now, blocking (a reader outside any event loop: the lab, `manifests
        istio --store`), without the unfinished rollouts' newest entries (reads of the
        audit page from etcd all the same); StoreReadError when etcd does not answer."""
        try:
            self.view = self._load(self.view, newest=False, refuse_newer=False)
        except grpc.RpcError as exc:
            raise StoreReadError(f"cannot read {self.path}: {rpc_error(exc)}") from None

    def _load(self, old: View, newest: bool = True, refuse_newer: bool = True) -> View:
        """The view at one revision: the keys it holds, a page at a time; then what it
        keeps of the audit (`audit_log.load`). A newer schema: StoreVersionError, or
        (`refuse_newer` False: a reader) what it can read of it."""
        pages = Pages(self.kv)
        view = View(departed=dict(old.departed), heard=dict(old.heard))  # (copies: a thread)
        prefix = self.keys.prefix
        for name in VIEW_KEYS:
            if (kv := pages.get(f"{prefix}/{name}")) is not None:
                _apply(view, prefix, kv.key.decode(), kv, deleted=False)
            if name == "schema" and view.schema > SCHEMA_VERSION and refuse_newer:
                raise newer_schema(self.path + self.keys.schema, view.schema)
        for folder in VIEW_FOLDERS:
            start = f"{prefix}/{folder}/"
            for kv in pages.scan(start, range_end(start)):
                _apply(view, prefix, kv.key.decode(), kv, deleted=False)
        audit_log.load(pages, self.log_keys, view.log, view.rollouts, newest)
        view.revision = pages.revision
        return view

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def watch(self) -> None:
        """Keep the view current until cancelled; reconnects (from the last revision
        seen, so nothing is missed) whenever the stream breaks.

        Fragmented: a watch that starts behind (a reconnect, or a replica too busy to
        read its stream, which etcd then catches up) is sent up to 1,000 revisions' events
        in one response, and a few directory keys of thousands of nodes make that
        hundreds of MB. Whole, it passes gRPC's 4 MiB a message: the stream breaks, is
        watched again from the same revision, and breaks again, for good (seen at
        3 x 3,000 streams: `Received message larger than max (706717694 vs. 4194304)`,
        and the replicas cut off from every decision). In fragments no piece exceeds
        etcd's request limit, and the events come one by one all the same."""
        while True:
            try:
                watch = await self.client.watch_prefix(
                    self.keys.everything.encode(),
                    start_revision=self.view.revision + 1,
                    fragment=True,  # (a catch-up in pieces etcd's max request size: below)
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

    @property
    def memory(self) -> AuditMemory:
        return self.view.log

    @property
    def states(self) -> Mapping[tuple[str, str], RolloutState]:
        return self.view.rollouts

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
        seq = self.view.log.seq + len(entries)
        try:
            reply = self.kv.txn(self._commit_txn(fence, state, entries, regions, seq))
        except grpc.RpcError as exc:
            raise StoreWriteError(f"cannot write {self.path}: {rpc_error(exc)}") from None
        if not reply.succeeded and still_leads(reply, self.fence):
            # The fence holds, audit-seq moved: an earlier attempt that timed out did
            # commit. The watch brings those entries; this decision is made again.
            raise StoreWriteError(
                f"cannot write {self.path}: the audit moved past {self.view.log.seq} since "
                "this replica's view (a commit it has not seen yet)"
            )
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
        carry their chain; 2 -> 3: the flat audit log moved into the per-rollout log, a
        fenced transaction per batch, and `audit-seq`), the last step fenced and
        conditioned on the schema key the view holds. True: this call migrated; False:
        it was done (by another replica, the transaction found). StoreFenced when this
        replica does not lead; StoreWriteError for a newer schema, or etcd not answering."""
        view = self.view
        if view.schema > SCHEMA_VERSION:
            raise StoreWriteError(str(newer_schema(self.path + self.keys.schema, view.schema)))
        if view.schema == SCHEMA_VERSION:
            return False
        fence = self._check_lead()
        try:
            seq = max(view.log.seq, self._move_flat_log(fence))
            request = migrate_txn(
                self.keys, fence, view.schema, view.schema_revision, seq, SCHEMA_VERSION
            )
            reply = self.kv.txn(request)
        except grpc.RpcError as exc:
            raise StoreWriteError(f"cannot migrate {self.path}: {rpc_error(exc)}") from None
        if reply.succeeded:
            log.info("migrated %s from schema %d to %d", self.path, view.schema, SCHEMA_VERSION)
            view.schema, view.schema_revision = SCHEMA_VERSION, reply.header.revision
            view.log.seq, view.log.seq_revision, view.log.legacy = seq, reply.header.revision, False
            return True
        if not still_leads(reply, fence):
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

    def _move_flat_log(self, fence: int) -> int:
        """What is left of the flat audit log moved (`audit_log.move_flat_log`): the
        highest id moved (0: none)."""
        highest = move_flat_log(self.kv, self.log_keys, self.keys.leader, fence)
        if highest is None:
            self._deposed()
        return highest

    def _commit_txn(
        self,
        fence: int,
        state: RolloutState,
        entries: Sequence[AuditEntry],
        regions: Collection[str],
        last: int,
    ) -> rpc.TxnRequest:
        """The state, the entries as the rollout's log keys up to `last` (and audit-seq),
        and the routes keys, if the leader key is still this replica's and audit-seq is
        the view's; else the leader key."""
        rollout = (state.service, state.canary_version)
        ops = [put_op(self.keys.rollout(*rollout), state_to_json(state).encode())]
        first = last - len(entries) + 1
        ops += [put_op(self.log_keys.log(*rollout, first + i), to_document(e).encode())
                for i, e in enumerate(entries)]  # fmt: skip
        if entries:
            ops.append(put_op(self.log_keys.seq, b"%d" % last))
        ops += [put_op(self.keys.routes(region), b"%d" % last) for region in sorted(regions)]
        seq_now = compare_mod_revision(self.log_keys.seq, self.view.log.seq_revision)
        return fenced(self.keys.leader, fence, ops, (seq_now,))

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
        rollout = (state.service, state.canary_version)
        view.rollouts[rollout] = state
        finished = state.phase in FINISHED
        if finished:
            view.log.finished(rollout)
        first = last - len(entries) + 1
        for i, e in enumerate(entries):
            version = None if e.snapshot_version is None else revision * VERSION_SCALE
            view.log.note(replace(e, id=first + i, snapshot_version=version), finished)
        if entries:
            view.log.seq, view.log.seq_revision = last, revision
        for region in regions:
            view.routes[region] = revision
        # Everything below `revision` was seen by the watch or is ours.
        if revision == view.revision + 1:
            view.revision = revision

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
            if state.phase in FINISHED:
                view.log.finished((state.service, state.canary_version))
            return "rollouts"
        if kind in ("audit-log", "audit", "archive-index") or rest == "audit-seq":
            return None if deleted else audit_log.apply(view.log, view.rollouts, rest, kv)
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
                parts = view.replica_parts.get(name, {})
                view.replicas[name] = directory_parts.merged(json.loads(value), parts)
                view.departed.pop(name, None)
                if view.heard.get(name, (0, 0.0))[0] < kv.mod_revision:
                    view.heard[name] = (kv.mod_revision, time.monotonic())
            return "replicas"
        if kind == "replica-nodes":
            return _apply_part(view, name, value, deleted)
        if kind == "replica-beats" and not deleted:
            _apply_beat(view, name, value, kv.mod_revision)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # (JSON of another shape)
        log.error("ignoring unreadable store key %s: %s", key, one_line(exc))
    return None


def _apply_beat(view: View, name: str, value: bytes, revision: int) -> None:
    """A replica's heartbeat: heard from, its document unchanged but for when it was
    `updated`. Nothing is told (`Listener`): silence is judged when nodes are counted
    (`replicas.peer_nodes`). A beat of a replica not in view is dropped: its key's
    arrival is heard from, and a key that went away is a replica gone."""
    doc = view.replicas.get(name)
    if doc is None or view.heard.get(name, (0, 0.0))[0] >= revision:
        return
    view.heard[name] = (revision, time.monotonic())
    updated = json.loads(value).get("updated")
    if isinstance(updated, (int, float)) and not isinstance(updated, bool):
        view.replicas[name] = {**doc, "updated": updated}  # (the same node list)


def _apply_part(view: View, name: str, value: bytes, deleted: bool) -> str | None:
    """One part of a replica's nodes. A part goes only with its replica's lease: its
    deletion leaves the replica's document whole, for `departed` to remember."""
    replica, _, part = name.rpartition("/")
    parts = view.replica_parts.setdefault(replica, {})
    if deleted:
        parts.pop(int(part), None)
        if not parts:
            del view.replica_parts[replica]
        return None
    parts[int(part)] = directory_parts.read_part(value)
    if replica not in view.replicas:
        return None
    view.replicas[replica] = directory_parts.merged(view.replicas[replica], parts)
    return "replicas"


def _linked(view: View, entries: Sequence[AuditEntry]) -> list[AuditEntry]:
    """The entries, each linked to its rollout's head (the view's, then the one before
    it in `entries`); the snapshot version hashed as the commit mark."""
    heads: dict[tuple[str, str], str] = {}
    out = []
    for e in entries:
        rollout = (e.service, e.canary_version)
        prev = heads.get(rollout) or view.log.head_hash(rollout) or genesis(*rollout)
        e = chained(e, prev, snapshot_mark=True)
        assert e.chain is not None
        heads[rollout] = e.chain.hash
        out.append(e)
    return out


def _schema_version(value: bytes) -> int:
    """The schema key's document -> its version (ValueError when it has none)."""
    version = json.loads(value).get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"schema: 'version' is {version!r}, not a version number")
    return version
