"""The admin gRPC API behind `xdsctl`, and Envoy's Client Status Discovery Service.

Credentials are names with bearer tokens (`--admin-token-file`, see `parse_tokens`).
Mutations need `authorization: Bearer TOKEN` when tokens are configured (reads too with
`auth_reads`), and go through the rollout controller, so each lands in the audit log
with who (the token's name, and beside it the actor the caller claims in `x-xds-actor`)
and why (the request's reason). Mistakes come back as gRPC statuses a person can act on:
NOT_FOUND, INVALID_ARGUMENT, FAILED_PRECONDITION, UNAUTHENTICATED.

`AdminGuard` stands in front of every method: it checks credentials for reads, turns an
undecodable request into INVALID_ARGUMENT and a handler's bug into INTERNAL, one log
line each, and marks every status the server sends itself (`STATUS_MARK`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import re
import traceback
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn, Protocol

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc
from google.protobuf import json_format

from xds_server.admin.v1 import admin_pb2, admin_pb2_grpc
from xds_server.outputs.istio_apply import IstioApplier
from xds_server.rollout.audit import AuditEntry
from xds_server.rollout.controller import RolloutController, StoreUnavailable
from xds_server.rollout.ports import Committed, StateStore
from xds_server.rollout.state import RolloutState, region_split
from xds_server.spec import MeshSpec
from xds_server.traffic import WeightError
from xds_server.xds.publisher import XdsPublisher
from xds_server.xds.status import NodeStatus
from xds_server.xds.types import BY_SHORT_NAME, SEND_ORDER, short

Context = Any  # grpc.aio.ServicerContext; grpc ships no usable type stubs
ACTOR_KEY = "x-xds-actor"
STATUS_MARK = "x-xds-admin"
"""Trailing metadata on every status this API sends itself: a client tells "the server
said UNAVAILABLE" from "the server could not be reached" by it (ctl.py keeps a copy)."""
MAX_REASON = 1000
MAX_ACTOR = 200
BARE_TOKEN_NAME = "admin"
"""The name of the token in a token file that is one bare token (no `NAME:`)."""
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_TOKEN_RE = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces: a header value

log = logging.getLogger("xds_server.admin")


class TokenFileError(ValueError):
    """A token file that cannot be used; the message names the file and the line."""


def parse_tokens(text: str, source: str) -> dict[str, str]:
    """`NAME:TOKEN` lines -> {name: token}. A file of one line without a colon is a single
    bare token, named "admin". Never puts a token in an error message."""
    lines = text.splitlines()
    if not "".join(lines).strip():
        raise TokenFileError(f"{source}: the token file is empty")
    if len(lines) == 1 and ":" not in lines[0]:
        _check_token(lines[0].strip(), f"{source} line 1")
        return {BARE_TOKEN_NAME: lines[0].strip()}
    tokens: dict[str, str] = {}
    seen: dict[str, int] = {}  # token -> line
    for number, raw in enumerate(lines, 1):
        where = f"{source} line {number}"
        if not raw.strip():
            raise TokenFileError(f"{where}: empty line (every line is NAME:TOKEN)")
        name, colon, token = (part.strip() for part in raw.partition(":"))
        if not colon:
            raise TokenFileError(
                f"{where}: expected NAME:TOKEN (a bare token is only allowed as the "
                "file's single line)"
            )
        if not _NAME_RE.fullmatch(name):
            raise TokenFileError(
                f"{where}: the name before ':' must be 1-64 letters, digits, '.', '_', "
                "'@' or '-', starting with a letter or digit"
            )
        _check_token(token, where)
        if name in tokens:
            raise TokenFileError(f"{where}: the name {name!r} is already on an earlier line")
        if token in seen:
            raise TokenFileError(
                f"{where}: the same token as line {seen[token]} (each name needs its own)"
            )
        tokens[name], seen[token] = token, number
    return tokens


def _check_token(token: str, where: str) -> None:
    if not token:
        raise TokenFileError(f"{where}: the token is empty")
    if not _TOKEN_RE.fullmatch(token):
        raise TokenFileError(
            f"{where}: the token must be printable ASCII without spaces (it is sent as "
            "a gRPC header)"
        )


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Credentials:
    """Who may use the admin API: names, each with a bearer token. A token is found by
    comparing digests in constant time, against every name (no early exit)."""

    def __init__(self, tokens: Mapping[str, str] | None = None, auth_reads: bool = False) -> None:
        if auth_reads and not tokens:
            raise ValueError("auth_reads needs tokens")
        self._digests = [(name, _digest(token)) for name, token in (tokens or {}).items()]
        self.auth_reads = auth_reads

    @property
    def configured(self) -> bool:
        return bool(self._digests)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self._digests]

    def identify(self, metadata: Mapping[str, Any]) -> str | None:
        """The name whose token `authorization: Bearer TOKEN` carries, or None."""
        scheme, _, token = str(metadata.get("authorization", "")).strip().partition(" ")
        given = _digest(token.strip() if scheme.lower() == "bearer" else "")
        found = None
        for name, digest in self._digests:
            if hmac.compare_digest(digest, given) and found is None:
                found = name
        return found

    def describe(self) -> str:
        if not self.configured:
            return "no tokens configured: changes are unauthenticated, reads open"
        needed = "changes and reads" if self.auth_reads else "changes (reads open)"
        return f"tokens for {', '.join(self.names)} required for {needed}"


def _metadata(context: Context) -> dict[str, Any]:
    return dict(context.invocation_metadata() or ())


async def _unauthenticated(context: Context, what: str, metadata: Mapping[str, Any]) -> NoReturn:
    if metadata.get("authorization"):
        message = "the bearer token matches none of this server's (--admin-token-file)"
    else:
        message = f"this admin API needs a bearer token for {what}: pass --token-file to xdsctl"
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
    raise AssertionError("unreachable")


class AdminView(Protocol):
    """What the admin API reads and drives: the pieces `serve` wired (`app.Parts`)."""

    @property
    def spec(self) -> MeshSpec: ...

    @property
    def publisher(self) -> XdsPublisher: ...

    @property
    def controller(self) -> RolloutController | None:
        """None in a replica that does not decide rollouts."""
        ...

    @property
    def store(self) -> StateStore | None: ...

    @property
    def istio(self) -> IstioApplier | None: ...

    def rollouts(self) -> Mapping[str, RolloutState]:
        """The current rollouts: the controller's, or what a follower read from the store."""
        ...


class _EventQueue:
    """A `TrafficSink` for one WatchRollouts stream: a slow watcher loses the oldest."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.queue: asyncio.Queue[Committed] = asyncio.Queue(maxsize=1000)

    def follow(self, event: Committed) -> None:
        state = event.state
        if state is None or (self.service and state.service != self.service):
            return
        if self.queue.full():
            self.queue.get_nowait()
        self.queue.put_nowait(event)


class AdminService(admin_pb2_grpc.AdminServicer):  # type: ignore[misc]
    def __init__(
        self, view: AdminView, tokens: Mapping[str, str] | None = None, auth_reads: bool = False
    ) -> None:
        self.view = view
        self.auth = Credentials(tokens, auth_reads)

    @property
    def server(self) -> XdsPublisher:
        return self.view.publisher

    # ---- helpers ----

    async def _authorize(self, context: Context) -> str:
        """Check the credential of a change; return the actor for the audit log: the
        token's name, with the actor the caller claims beside it when it differs
        ("alice (claims: bob)"); without tokens configured, the claim marked as such
        ("bob (unauthenticated)")."""
        meta = _metadata(context)
        name = self.auth.identify(meta)
        if self.auth.configured and name is None:
            await _unauthenticated(context, "changes", meta)
        claim = str(meta.get(ACTOR_KEY, "")).strip()
        if len(claim) > MAX_ACTOR:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"actor is {len(claim)} characters; at most {MAX_ACTOR}",
            )
        if name is None:
            return f"{claim or 'unknown'} (unauthenticated)"
        return name if claim in ("", name) else f"{name} (claims: {claim})"

    async def _controller(self, context: Context) -> RolloutController:
        controller = self.view.controller
        if controller is None:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "this server does not run the rollout controller (another "
                "process holds the state directory's lock)",
            )
        assert controller is not None
        return controller

    async def _store(self, context: Context) -> StateStore:
        store = self.view.store
        if store is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "this server keeps no rollout state")
        assert store is not None
        return store

    async def _mutate(
        self,
        context: Context,
        actor: str,
        reason: str,
        act: Callable[[RolloutController, str], RolloutState],
    ) -> Any:
        """`actor`: from `_authorize`, which each mutation calls before looking at its
        request (an unauthenticated caller learns nothing from validation errors)."""
        if not reason.strip():
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "a reason is required for every change (it goes in the audit log)",
            )
        if len(reason) > MAX_REASON:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"reason is {len(reason)} characters; at most {MAX_REASON}",
            )
        controller = await self._controller(context)
        try:
            state = act(controller, actor)
        except KeyError as exc:
            await _abort(context, grpc.StatusCode.NOT_FOUND, exc)
        except WeightError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, exc)
        except ValueError as exc:
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION, exc)
        except StoreUnavailable as exc:
            await _abort(context, grpc.StatusCode.UNAVAILABLE, exc)
        return self._rollout(state)

    def _rollout(self, state: RolloutState) -> admin_pb2.Rollout:
        svc = self.view.spec.service(state.service)
        store = self.view.store
        latest = store.latest_checks(state.service, state.canary_version) if store else {}
        out = admin_pb2.Rollout(
            service=state.service,
            canary_version=state.canary_version,
            phase=state.phase,
            reason=state.reason,
            steps=list(svc.rollout.steps),
        )
        for region, rs in state.regions.items():
            split = region_split(svc.rollout, rs, svc.has_baseline).percent()
            check = latest.get(region)
            out.regions.append(
                admin_pb2.RegionRollout(
                    region=region,
                    phase=rs.phase,
                    step=rs.step,
                    reason=rs.reason,
                    production_percent=split["production"],
                    baseline_percent=split["baseline"],
                    canary_percent=split["canary"],
                    manual=rs.manual_canary is not None,
                    latest_measurements_json=json.dumps(check.measurements) if check else "",
                )
            )
        return out

    # ---- nodes ----

    async def ListNodes(self, request: Any, context: Context) -> Any:
        if request.region and request.region not in self.view.spec.regions:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"unknown region {request.region!r} (regions: {', '.join(self.view.spec.regions)})",
            )
        nodes = self.server.nodes.nodes(request.region or None)
        return admin_pb2.ListNodesResponse(nodes=[self._node(n) for n in nodes])

    def _node(self, n: NodeStatus) -> admin_pb2.Node:
        snap = self.server.cache.get(n.region)
        current = {t: snap.type_version(t) if snap else "" for t in SEND_ORDER}
        types = []
        for t in SEND_ORDER:
            ts = n.types[t]
            types.append(
                admin_pb2.TypeStatus(
                    type=short(t),
                    current_version=current[t],
                    sent_version=ts.sent_version,
                    acked_version=ts.acked_version,
                    nack_version=ts.nack_version,
                    nack_error=ts.nack_error,
                    sent_at=ts.sent_at or 0,
                    acked_at=ts.acked_at or 0,
                    nack_at=ts.nack_at or 0,
                    sync_state=n.sync_state(t, current[t]),
                )
            )
        return admin_pb2.Node(
            id=n.node_id,
            region=n.region,
            connected_since=n.connected_since,
            listen=n.listen,
            user_agent=n.user_agent,
            types=types,
            sync_state=n.overall_sync(current),
            stream_id=n.stream_id,
            identity=n.identity,
        )

    async def GetNodeConfig(self, request: Any, context: Context) -> Any:
        nodes = self.server.nodes.find(request.node_id)
        if not nodes:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no connected node {request.node_id!r} (xdsctl nodes lists them)",
            )
        if request.type and request.type not in BY_SHORT_NAME:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"unknown type {request.type!r} (one of: {', '.join(BY_SHORT_NAME)})",
            )
        node = max(nodes, key=lambda n: n.connected_since)
        types = [BY_SHORT_NAME[request.type]] if request.type else list(SEND_ORDER)
        return admin_pb2.GetNodeConfigResponse(json=json.dumps(node_config(node, types), indent=2))

    # ---- rollouts ----

    async def ListRollouts(self, request: Any, context: Context) -> Any:
        states = self.view.rollouts().values()
        return admin_pb2.ListRolloutsResponse(
            rollouts=[self._rollout(s) for s in states], store=self._store_status()
        )

    def _store_status(self) -> admin_pb2.StoreStatus:
        controller = self.view.controller
        if controller is None:
            return admin_pb2.StoreStatus(known=False, writable=True)
        h = controller.store_health
        return admin_pb2.StoreStatus(
            known=True,
            writable=h.ok,
            error=h.error,
            failing_since=h.since or 0.0,
            failed_writes=h.failed_writes,
            unsaved_rollbacks=h.unsaved_rollbacks,
        )

    async def GetRollout(self, request: Any, context: Context) -> Any:
        await self._known_service(request.service, context)
        state = self.view.rollouts().get(request.service)
        if state is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"service {request.service!r} has no rollout (it has no "
                "canary pool, or its canary is its production version)",
            )
        assert state is not None
        return self._rollout(state)

    async def _known_service(self, service: str, context: Context) -> None:
        try:
            self.view.spec.service(service)
        except KeyError:
            names = ", ".join(s.name for s in self.view.spec.services)
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"unknown service {service!r} (services: {names})"
            )

    async def PauseRollout(self, request: Any, context: Context) -> Any:
        actor = await self._authorize(context)
        await self._known_service(request.service, context)
        return await self._mutate(
            context,
            actor,
            request.reason,
            lambda c, who: c.pause(request.service, request.reason, who),
        )

    async def ResumeRollout(self, request: Any, context: Context) -> Any:
        actor = await self._authorize(context)
        await self._known_service(request.service, context)
        return await self._mutate(
            context,
            actor,
            request.reason,
            lambda c, who: c.resume(request.service, request.reason, who),
        )

    async def AbortRollout(self, request: Any, context: Context) -> Any:
        actor = await self._authorize(context)
        await self._known_service(request.service, context)
        return await self._mutate(
            context,
            actor,
            request.reason,
            lambda c, who: c.abort(request.service, request.reason, who),
        )

    async def PromoteRollout(self, request: Any, context: Context) -> Any:
        actor = await self._authorize(context)
        await self._known_service(request.service, context)
        return await self._mutate(
            context,
            actor,
            request.reason,
            lambda c, who: c.promote(request.service, request.reason, who, request.all),
        )

    async def SetWeights(self, request: Any, context: Context) -> Any:
        actor = await self._authorize(context)
        await self._known_service(request.service, context)
        canary, baseline = request.canary_percent, request.baseline_percent
        if not (0 <= canary <= 100 and 0 <= baseline <= 100 and canary + baseline <= 100):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"bad weights: canary {canary:g}% and baseline {baseline:g}% "
                "must each be 0-100 and together at most 100",
            )
        return await self._mutate(
            context,
            actor,
            request.reason,
            lambda c, who: c.set_weights(
                request.service, tuple(request.regions), canary, baseline, request.reason, who
            ),
        )

    async def WatchRollouts(self, request: Any, context: Context) -> AsyncIterator[Any]:
        controller = await self._controller(context)
        sink = _EventQueue(request.service)
        unsubscribe = controller.subscribe(sink)
        try:
            while True:
                ev = await sink.queue.get()
                assert ev.state is not None and ev.decision is not None
                yield admin_pb2.RolloutEvent(
                    time=ev.time,
                    actor=ev.actor,
                    rollout=self._rollout(ev.state),
                    transitions=[
                        f"{t.region or 'all'}: {t.phase_from} -> {t.phase_to}: {t.reason}"
                        for t in ev.decision.transitions
                    ],
                )
        finally:
            unsubscribe()

    # ---- audit ----

    async def GetAudit(self, request: Any, context: Context) -> Any:
        if request.limit < 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"limit is {request.limit}; expected 0 (every entry) or more",
            )
        if not (math.isfinite(request.since) and request.since >= 0):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"since is {request.since}; expected seconds since the epoch (0: from the start)",
            )
        store = await self._store(context)
        entries = store.audit(
            service=request.service or None,
            region=request.region or None,
            since=request.since or None,
            limit=request.limit or None,
        )
        return admin_pb2.GetAuditResponse(entries=[_audit(e) for e in entries])

    # ---- the istio output mode ----

    async def GetIstioApplyStatus(self, request: Any, context: Context) -> Any:
        istio = self.view.istio
        if istio is None:
            return admin_pb2.GetIstioApplyStatusResponse(enabled=False)
        return admin_pb2.GetIstioApplyStatusResponse(
            enabled=True,
            regions=[
                admin_pb2.IstioApplyStatus(
                    region=st.region,
                    target=st.target,
                    desired_generation=st.desired_generation,
                    applied_generation=st.applied_generation,
                    attempts=st.attempts,
                    consecutive_failures=st.consecutive_failures,
                    last_error=st.last_error,
                    last_attempt_at=st.last_attempt_at,
                    last_success_at=st.last_success_at,
                    next_retry_at=st.next_retry_at,
                    pending=st.pending,
                    objects=st.objects,
                    prune_error=st.prune_error,
                )
                for st in istio.status()
            ],
        )


def _audit(e: AuditEntry) -> admin_pb2.AuditEntry:
    def js(v: Any) -> str:
        return json.dumps(v) if v is not None else ""

    return admin_pb2.AuditEntry(
        id=e.id,
        time=e.time,
        service=e.service,
        canary_version=e.canary_version,
        region=e.region or "",
        kind=e.kind,
        step=e.step if e.step is not None else -1,
        phase_from=e.phase_from or "",
        phase_to=e.phase_to or "",
        reason=e.reason,
        verdict_json=js(e.verdict),
        measurements_json=js(e.measurements),
        weights_before_json=js(e.weights_before),
        weights_after_json=js(e.weights_after),
        snapshot_version=e.snapshot_version or 0,
        actor=e.actor,
    )


async def _abort(context: Context, code: grpc.StatusCode, exc: Exception) -> NoReturn:
    message = exc.args[0] if exc.args else str(exc)
    await context.abort(code, str(message))
    raise AssertionError("unreachable")


def _decoded(node: NodeStatus, type_url: str) -> discovery_pb2.DiscoveryResponse | None:
    body = node.types[type_url].sent_response
    return discovery_pb2.DiscoveryResponse.FromString(body) if body else None


def node_config(node: NodeStatus, types: list[str]) -> dict[str, Any]:
    """What the server last sent this node, per type, as JSON-ready dicts."""
    out: dict[str, Any] = {"node": node.node_id, "region": node.region, "types": {}}
    for t in types:
        resp = _decoded(node, t)
        ts = node.types[t]
        out["types"][short(t)] = {
            "sent_version": ts.sent_version,
            "acked_version": ts.acked_version,
            "nack_error": ts.nack_error,
            "resources": [
                json_format.MessageToDict(r, preserving_proto_field_name=True)
                for r in (resp.resources if resp else [])
            ],
        }
    return out


# ---- CSDS ----

_CONFIG_STATUS = {
    "SYNCED": csds_pb2.SYNCED,
    "STALE": csds_pb2.STALE,
    "NOT SENT": csds_pb2.NOT_SENT,
    "NACKED": csds_pb2.ERROR,
}


class ClientStatusService(csds_pb2_grpc.ClientStatusDiscoveryServiceServicer):  # type: ignore[misc]
    """envoy.service.status.v3: which config each connected client holds, for tooling."""

    def __init__(self, server: XdsPublisher) -> None:
        self.server = server

    def _response(self, request: Any) -> Any:
        from envoy.admin.v3 import config_dump_shared_pb2 as dump

        resp = csds_pb2.ClientStatusResponse()
        for n in self.server.nodes:
            if request.node.id and request.node.id != n.node_id:
                continue
            snap = self.server.cache.get(n.region)
            cfg = resp.config.add()
            cfg.node.CopyFrom(
                base_pb2.Node(
                    id=n.node_id, cluster=n.region, locality=base_pb2.Locality(region=n.region)
                )
            )
            for t in SEND_ORDER:
                ts = n.types[t]
                state = n.sync_state(t, snap.type_version(t) if snap else "")
                client = (
                    dump.NACKED
                    if state == "NACKED"
                    else dump.ACKED
                    if ts.acked_version == ts.sent_version and ts.sent_version
                    else dump.REQUESTED
                )
                decoded = _decoded(n, t)
                for res in decoded.resources if decoded else []:
                    x = cfg.generic_xds_configs.add(
                        type_url=t,
                        version_info=ts.sent_version,
                        config_status=_CONFIG_STATUS[state],
                        client_status=client,
                    )
                    x.name = _resource_name(res)
                    if not request.exclude_resource_contents:
                        x.xds_config.CopyFrom(res)
        return resp

    async def FetchClientStatus(self, request: Any, context: Context) -> Any:
        return self._response(request)

    async def StreamClientStatus(
        self, requests: AsyncIterator[Any], context: Context
    ) -> AsyncIterator[Any]:
        async for request in requests:
            yield self._response(request)


def _resource_name(packed: Any) -> str:
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.config.endpoint.v3 import endpoint_pb2
    from envoy.config.listener.v3 import listener_pb2
    from envoy.config.route.v3 import route_pb2

    for cls, field in (
        (cluster_pb2.Cluster, "name"),
        (listener_pb2.Listener, "name"),
        (route_pb2.RouteConfiguration, "name"),
        (endpoint_pb2.ClusterLoadAssignment, "cluster_name"),
    ):
        if packed.Is(cls.DESCRIPTOR):
            msg = cls()
            packed.Unpack(msg)
            return str(getattr(msg, field))
    return ""


# ---- the guard in front of every method ----


class _Undecodable:
    """A request that did not decode, passed to its handler's guard to refuse."""

    def __init__(self, size: int, error: Exception) -> None:
        self.size = size
        self.error = error


class AdminGuard(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """In front of every method of the admin port (the admin API and CSDS).

    grpc.aio logs a traceback for a request that does not decode and for a handler that
    raises; here each becomes one log line and a status (INVALID_ARGUMENT, INTERNAL).
    With `auth_reads`, every method needs a credential (the servicer checks changes
    itself). Every status sent carries `STATUS_MARK`."""

    def __init__(self, auth: Credentials) -> None:
        self.auth = auth

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        if handler is None:  # no such method: UNIMPLEMENTED, as without the guard
            return None
        return _Guarded(self.auth, str(details.method)).wrap(handler)


class _Guarded:
    """One call path's handler behind the guard."""

    def __init__(self, auth: Credentials, method: str) -> None:
        self.auth = auth
        self.method = method

    def wrap(self, handler: Any) -> Any:
        deserialize = handler.request_deserializer

        def lenient(raw: bytes) -> Any:
            try:
                return deserialize(raw) if deserialize is not None else raw
            except Exception as exc:
                return _Undecodable(len(raw), exc)

        changes: dict[str, Any] = {"request_deserializer": lenient}
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, kind)
            if behavior is not None:
                streams_in, streams_out = kind.startswith("stream"), kind.endswith("stream")
                make = self._streaming if streams_out else self._unary
                changes[kind] = make(behavior, streams_in)
        return handler._replace(**changes)

    def _unary(self, behavior: Callable[..., Any], streams_in: bool) -> Callable[..., Any]:
        async def call(request: Any, context: Context) -> Any:
            request = await self._admit(request, context, streams_in)
            try:
                return await behavior(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await self._failed(context, exc)

        return call

    def _streaming(self, behavior: Callable[..., Any], streams_in: bool) -> Callable[..., Any]:
        async def call(request: Any, context: Context) -> AsyncIterator[Any]:
            request = await self._admit(request, context, streams_in)
            try:
                async for response in behavior(request, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await self._failed(context, exc)

        return call

    async def _admit(self, request: Any, context: Context, streams_in: bool) -> Any:
        context.set_trailing_metadata(((STATUS_MARK, "1"),))
        if self.auth.auth_reads:
            meta = _metadata(context)
            if self.auth.identify(meta) is None:
                await _unauthenticated(context, "reads as well as changes", meta)
        if streams_in:
            return self._each_decoded(request, context)
        return await self._decoded(request, context)

    async def _each_decoded(self, requests: AsyncIterator[Any], context: Context) -> Any:
        async for request in requests:
            yield await self._decoded(request, context)

    async def _decoded(self, request: Any, context: Context) -> Any:
        if isinstance(request, _Undecodable):
            error = " ".join(str(request.error).split())
            log.warning(
                "admin API %s from %s: undecodable request (%d bytes): %s",
                self.method,
                context.peer(),
                request.size,
                error,
            )
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the request to {self.method} does not decode: {error}",
            )
        return request

    async def _failed(self, context: Context, exc: Exception) -> NoReturn:
        """A handler raised: a bug. One line at error level; the traceback at debug."""
        frames = traceback.extract_tb(exc.__traceback__)
        where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
        message = " ".join(str(exc).split())
        log.error("admin API %s failed: %s: %s%s", self.method, type(exc).__name__, message, where)
        log.debug("admin API %s failed", self.method, exc_info=exc)
        await context.abort(
            grpc.StatusCode.INTERNAL,
            f"{self.method} failed: {type(exc).__name__} (the server's log has the details)",
        )
        raise AssertionError("unreachable")


def add_admin_services(grpc_server: grpc.aio.Server, admin: AdminService) -> None:
    """The admin API and CSDS on `grpc_server`, which must have an `AdminGuard` in front
    (it checks credentials for reads): `run_admin_server` makes one so."""
    admin_pb2_grpc.add_AdminServicer_to_server(admin, grpc_server)
    csds_pb2_grpc.add_ClientStatusDiscoveryServiceServicer_to_server(
        ClientStatusService(admin.server), grpc_server
    )


async def run_admin_server(
    admin: AdminService, address: str, tls: tuple[bytes, bytes] | None = None
) -> None:
    """Serve the admin API and CSDS on `address` until cancelled."""
    grpc_server = grpc.aio.server(interceptors=[AdminGuard(admin.auth)])
    add_admin_services(grpc_server, admin)
    if tls is not None:
        creds = grpc.ssl_server_credentials([(tls[1], tls[0])])
        port = grpc_server.add_secure_port(address, creds)
    else:
        port = grpc_server.add_insecure_port(address)
    await grpc_server.start()
    log.info(
        "admin API on %s (port %d, %s, %s)",
        address,
        port,
        "TLS" if tls else "plaintext",
        admin.auth.describe(),
    )
    try:
        await grpc_server.wait_for_termination()
    finally:
        await grpc_server.stop(0.5)
