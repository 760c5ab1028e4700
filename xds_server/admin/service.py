"""The admin gRPC API behind `xdsctl`, and Envoy's Client Status Discovery Service.

Credentials are names with bearer tokens (`--admin-token-file`, see `parse_tokens`).
Mutations need `authorization: Bearer TOKEN` when tokens are configured (reads too with
`auth_reads`), and go through the rollout controller, so each lands in the audit log
with who (the token's name, and beside it the actor the caller claims in `x-xds-actor`)
and why (the request's reason). Mistakes come back as gRPC statuses a person can act on:
NOT_FOUND, INVALID_ARGUMENT, FAILED_PRECONDITION, UNAUTHENTICATED.

Every change takes one path through `Operator` (the dashboard's checks too), with its
`Refused` sent as a status: `AdminService._change` (`Operator.submit`), and for the named
changes, which may name a rollout group instead of a service, `AdminService._named`
(`Operator.named`); a handler only says which controller call its request means.

`AdminGuard` (admin/guard.py) stands in front of every method: it checks credentials for
reads, turns an undecodable request into INVALID_ARGUMENT and a handler's bug into
INTERNAL, one log line each, and marks every status the server sends itself.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc
from google.protobuf import any_pb2, json_format

from xds_server.admin.auth import Credentials, Scope
from xds_server.admin.guard import AdminGuard, invocation_metadata
from xds_server.admin.operator import Act, Operator, Refused, check_weights, pushes_first
from xds_server.admin.v1 import admin_pb2 as pb
from xds_server.admin.v1 import admin_pb2_grpc
from xds_server.admin.views import (
    LEASE_UNKNOWN,
    NO_REGISTRY,
    AdminView,
    WatchQueue,
    audit_message,
    event_message,
    group_answer,
    group_name,
    instances_message,
    node_message,
    registry_instances,
    replicas_message,
    rollout_message,
    rollout_messages,
    service_rollout,
    store_message,
    stragglers_by_node,
)
from xds_server.ha.store_audit import StoreReadError
from xds_server.rollout.ports import StateStore
from xds_server.rollout.state import RolloutState
from xds_server.xds.publisher import XdsPublisher
from xds_server.xds.status import NodeStatus
from xds_server.xds.types import BY_SHORT_NAME, SEND_ORDER, short

if TYPE_CHECKING:
    from aetcd import Client as EtcdClient

Ctx = grpc.aio.ServicerContext
"""A call's context, as `Ctx[Request, Response]`."""
T = TypeVar("T")
Rq = TypeVar("Rq")
Rs = TypeVar("Rs")
Metadata = dict[str, str | bytes]
"""A call's invocation metadata (headers), by key."""
log = logging.getLogger("xds_server.admin")


def _metadata(context: Ctx[Rq, Rs]) -> Metadata:
    return invocation_metadata(context)


class AdminService(admin_pb2_grpc.AdminServicer):
    def __init__(
        self,
        view: AdminView,
        tokens: Mapping[str, str] | None = None,
        auth_reads: bool = False,
        scopes: Mapping[str, Scope] | None = None,
    ) -> None:
        self.view = view
        self.auth = Credentials(tokens, auth_reads, scopes)
        self.operator = Operator(
            self.auth, lambda: view.spec, lambda: view.controller, lambda: view.directory
        )
        self.started = time.time()
        self.address = ""
        """Where this API listens (`run_admin_server` sets it): one process's own entry
        in `ListReplicas` (a replica's comes from its key)."""
        self.xds_address = ""
        """One process's xDS address as configured, for `ListReplicas`; "": ":PORT"."""

    @property
    def server(self) -> XdsPublisher:
        return self.view.publisher

    # ---- helpers ----

    async def _store(self, context: Ctx[Rq, Rs]) -> StateStore:
        store = self.view.store
        if store is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "this server keeps no rollout state")
        return store

    async def _change(
        self,
        context: Ctx[Rq, pb.Rollout],
        service: str,
        reason: str,
        act: Act,
        check: Callable[[], None] = lambda: None,
    ) -> pb.Rollout:
        """Every change: `Operator.submit` (credentials first, so an unauthenticated
        caller learns nothing from validation errors; the dashboard's path too), its
        `Refused` sent as the call's status, the rollout as it now stands answered."""
        headers = _metadata(context)
        state = await _checked(
            context, lambda: self.operator.submit(headers, service, reason, act, check)
        )
        return rollout_message(self.view, state)

    async def _named(
        self,
        context: Ctx[Rq, pb.Rollout],
        name: str,
        request: pb.RolloutActionRequest | pb.PromoteRolloutRequest,
        promote_all: bool = False,
    ) -> pb.Rollout:
        """A named change (pause, resume, abort, promote) of `request.service`, or of
        every member of the rollout group `request.group` (exactly one of them). A
        member's change answers with the whole group's rollouts too: pausing, resuming or
        aborting one member acts on every member."""
        headers, r = _metadata(context), request

        def change() -> list[RolloutState]:
            caller = self.operator.caller(headers)
            return self.operator.named(
                caller, name, r.reason, service=r.service, group=r.group, promote_all=promote_all
            )

        states = await _checked(context, change)
        group = r.group or group_name(self.view, r.service)
        if group and not r.group:  # the members as they now stand, this one first
            rollouts = self.view.rollouts()
            members = self.view.spec.group(group).services
            states += [rollouts[m] for m in members if m != r.service and m in rollouts]
        return group_answer(self.view, states, group)

    # ---- nodes ----

    async def _check_region(self, context: Ctx[Rq, Rs], region: str) -> None:
        """A region filter ("": none) names one of the spec's regions, or NOT_FOUND."""
        if region and region not in self.view.spec.regions:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"unknown region {region!r} (regions: {', '.join(self.view.spec.regions)})",
            )

    async def ListNodes(
        self,
        request: pb.ListNodesRequest,
        context: Ctx[pb.ListNodesRequest, pb.ListNodesResponse],
    ) -> pb.ListNodesResponse:
        await self._check_region(context, request.region)
        nodes = self.view.nodes(request.region or None)
        missed = stragglers_by_node(self.view)
        return pb.ListNodesResponse(
            nodes=[
                node_message(self.server, n, missed.get((n.region, n.node_id), "")) for n in nodes
            ]
        )

    async def GetNodeConfig(
        self,
        request: pb.GetNodeConfigRequest,
        context: Ctx[pb.GetNodeConfigRequest, pb.GetNodeConfigResponse],
    ) -> pb.GetNodeConfigResponse:
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
        return pb.GetNodeConfigResponse(json=json.dumps(node_config(node, types), indent=2))

    # ---- rollouts ----

    async def ListRollouts(
        self,
        request: pb.ListRolloutsRequest,
        context: Ctx[pb.ListRolloutsRequest, pb.ListRolloutsResponse],
    ) -> pb.ListRolloutsResponse:
        return pb.ListRolloutsResponse(
            rollouts=rollout_messages(self.view), store=store_message(self.view)
        )

    async def GetRollout(
        self, request: pb.GetRolloutRequest, context: Ctx[pb.GetRolloutRequest, pb.Rollout]
    ) -> pb.Rollout:
        await _checked(context, lambda: self.operator.check_service(request.service))
        rollout = service_rollout(self.view, request.service)
        if rollout is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"service {request.service!r} has no rollout (it has no "
                "canary pool, or its canary is its production version)",
            )
        return rollout

    async def PauseRollout(
        self, request: pb.RolloutActionRequest, context: Ctx[pb.RolloutActionRequest, pb.Rollout]
    ) -> pb.Rollout:
        return await self._named(context, "pause", request)

    async def ResumeRollout(
        self, request: pb.RolloutActionRequest, context: Ctx[pb.RolloutActionRequest, pb.Rollout]
    ) -> pb.Rollout:
        return await self._named(context, "resume", request)

    async def AbortRollout(
        self, request: pb.RolloutActionRequest, context: Ctx[pb.RolloutActionRequest, pb.Rollout]
    ) -> pb.Rollout:
        return await self._named(context, "abort", request)

    async def PromoteRollout(
        self,
        request: pb.PromoteRolloutRequest,
        context: Ctx[pb.PromoteRolloutRequest, pb.Rollout],
    ) -> pb.Rollout:
        return await self._named(context, "promote", request, promote_all=request.all)

    async def SetWeights(
        self, request: pb.SetWeightsRequest, context: Ctx[pb.SetWeightsRequest, pb.Rollout]
    ) -> pb.Rollout:
        r = request
        canary, baseline, regions = r.canary_percent, r.baseline_percent, tuple(r.regions)
        return await self._change(
            context,
            r.service,
            r.reason,
            lambda c, who: c.set_weights(r.service, regions, canary, baseline, r.reason, who),
            lambda: check_weights(canary, baseline),
        )

    async def WatchRollouts(
        self,
        request: pb.WatchRolloutsRequest,
        context: Ctx[pb.WatchRolloutsRequest, pb.RolloutEvent],
    ) -> AsyncIterator[pb.RolloutEvent]:
        controller = await _checked(context, self.operator.controller)
        sink = WatchQueue(request.service)
        unsubscribe = controller.subscribe(sink)
        try:
            while True:
                yield event_message(self.view, await sink.queue.get())
        finally:
            unsubscribe()

    # ---- audit ----

    async def GetAudit(
        self, request: pb.GetAuditRequest, context: Ctx[pb.GetAuditRequest, pb.GetAuditResponse]
    ) -> pb.GetAuditResponse:
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
        if request.before_id < 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"before_id is {request.before_id}; expected an entry's id (0: no bound)",
            )
        store = await self._store(context)
        read = functools.partial(
            store.audit,
            service=request.service or None,
            region=request.region or None,
            since=request.since or None,
            limit=request.limit or None,
            before_id=request.before_id or None,
            version=request.canary_version or None,
        )
        try:
            entries = await asyncio.to_thread(read)  # (a store read: etcd pages it)
        except StoreReadError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        canonical = request.canonical  # (the bytes each hash covers: audit verify)
        return pb.GetAuditResponse(entries=[audit_message(e, canonical) for e in entries])

    # ---- replicas ----

    async def ListReplicas(
        self,
        request: pb.ListReplicasRequest,
        context: Ctx[pb.ListReplicasRequest, pb.ListReplicasResponse],
    ) -> pb.ListReplicasResponse:
        return replicas_message(self.view, self.started, self.address, self.xds_address)

    # ---- the shared registry ----

    async def ListInstances(
        self,
        request: pb.ListInstancesRequest,
        context: Ctx[pb.ListInstancesRequest, pb.ListInstancesResponse],
    ) -> pb.ListInstancesResponse:
        directory = self.view.directory
        if directory is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, NO_REGISTRY)
        if request.service:
            await _checked(context, lambda: self.operator.check_service(request.service))
        await self._check_region(context, request.region)
        instances = registry_instances(directory, request.service, request.region)
        left, error = await lease_times(directory.store.client, [i.lease for i in instances])
        return instances_message(directory, instances, left, error)

    # ---- the istio output mode ----

    async def GetIstioApplyStatus(
        self,
        request: pb.GetIstioApplyStatusRequest,
        context: Ctx[pb.GetIstioApplyStatusRequest, pb.GetIstioApplyStatusResponse],
    ) -> pb.GetIstioApplyStatusResponse:
        istio = self.view.istio
        if istio is None:
            return pb.GetIstioApplyStatusResponse(enabled=False)
        return pb.GetIstioApplyStatusResponse(
            enabled=True,
            regions=[
                pb.IstioApplyStatus(
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


async def _checked(context: Ctx[Rq, Rs], call: Callable[[], T]) -> T:
    """`call()`, with a `Refused` sent as its gRPC status; then `pushes_first`."""
    try:
        result = call()
    except Refused as exc:
        await context.abort(grpc.StatusCode[exc.code], exc.message)
    await pushes_first()
    return result


LEASE_LOOKUP_TIMEOUT = 2.0
"""The longest `ListInstances` waits for etcd to tell the leases' times to live."""


async def lease_times(
    client: EtcdClient, leases: Iterable[int], timeout: float = LEASE_LOOKUP_TIMEOUT
) -> tuple[dict[int, float], str]:
    """The seconds each lease has left, as etcd tells (`LEASE_UNKNOWN` for one that is
    gone), asked once per lease, all at once, for at most `timeout` seconds; a lease etcd
    did not tell of in that time is left out, and the second value says why ("": none)."""
    ids = sorted({lease for lease in leases if lease})

    async def one(lease: int) -> float:
        reply = await asyncio.wait_for(client.get_lease_info(lease, keys=False), timeout)
        return float(reply.TTL) if reply.TTL >= 0 else LEASE_UNKNOWN

    results = await asyncio.gather(*(one(lease) for lease in ids), return_exceptions=True)
    left: dict[int, float] = {}
    failures: list[BaseException] = []
    for lease, result in zip(ids, results, strict=True):
        if isinstance(result, BaseException):
            failures.append(result)
        else:
            left[lease] = result
    if not failures:
        return left, ""
    why = (
        f"no answer within {timeout:g}s"
        if isinstance(failures[0], TimeoutError)
        else " ".join(f"{type(failures[0]).__name__}: {failures[0]}".split())[:200]
    )
    log.debug("lease times to live unknown for %d lease(s): %s", len(failures), why)
    return left, f"etcd did not tell {len(failures)} of {len(ids)} leases' time to live: {why}"


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

    def _response(self, request: csds_pb2.ClientStatusRequest) -> csds_pb2.ClientStatusResponse:
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

    async def FetchClientStatus(
        self,
        request: csds_pb2.ClientStatusRequest,
        context: Ctx[csds_pb2.ClientStatusRequest, csds_pb2.ClientStatusResponse],
    ) -> csds_pb2.ClientStatusResponse:
        return self._response(request)

    async def StreamClientStatus(
        self,
        requests: AsyncIterator[csds_pb2.ClientStatusRequest],
        context: Ctx[csds_pb2.ClientStatusRequest, csds_pb2.ClientStatusResponse],
    ) -> AsyncIterator[csds_pb2.ClientStatusResponse]:
        async for request in requests:
            yield self._response(request)


def _resource_name(packed: any_pb2.Any) -> str:
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
    admin.address = f"{address.rpartition(':')[0]}:{port}"
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
