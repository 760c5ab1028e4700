"""`xdsctl`: the debug CLI of xds-server (its admin gRPC API, and its xDS port).

Exit code 0 on success; on failure one clear line on stderr and a non-zero code.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import socket
import sys
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from pathlib import Path
from typing import Any, cast

import grpc
import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import json_format, message

from xds_server.admin.v1 import admin_pb2, admin_pb2_grpc
from xds_server.spec import parse_duration
from xds_server.xds.resources import ROUTE_CONFIG_NAME
from xds_server.xds.types import BY_SHORT_NAME, CLUSTER, ENDPOINT, ROUTE


class CtlError(Exception):
    """A failure to report as one line."""


class UsageError(CtlError):
    """A command-line mistake: one line, exit code 2."""


STATUS_MARK = "x-xds-admin"
"""Trailing metadata the admin API puts on every status it sends itself (a copy of
admin/service.py's): with it, UNAVAILABLE is the server's answer, not a transport failure."""
MAX_LIMIT = 2**31 - 1


# ---- output ----


def to_dict(msg: message.Message) -> dict[str, Any]:
    return dict(
        json_format.MessageToDict(
            msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
    )


def in_field_order(msg: message.Message) -> dict[str, Any]:
    """`to_dict`, its keys in the message's field order (defaults are not moved last)."""
    data = to_dict(msg)
    return {f.name: data[f.name] for f in msg.DESCRIPTOR.fields if f.name in data}


def emit(args: argparse.Namespace, data: Any, table: Callable[[], str]) -> None:
    if args.output == "json":
        print(json.dumps(data, indent=2))
    elif args.output == "yaml":
        print(yaml.safe_dump(data, sort_keys=False), end="")
    else:
        print(table())


def render_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    rows = [[str(c) for c in r] for r in rows]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def ago(ts: float) -> str:
    return seconds(time.time() - ts) if ts else "-"


def seconds(s: float) -> str:
    """A duration in seconds, as `ago` writes one: 42s, 7m, 3h."""
    s = max(0.0, s)
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.0f}h"


def stamp(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


# ---- the admin client ----


CHANGES = frozenset(
    {"PauseRollout", "ResumeRollout", "PromoteRollout", "AbortRollout", "SetWeights"}
)
"""The methods that change a rollout: only the server that decides takes them."""


def parse_servers(text: str) -> list[str]:
    """`--server A,B,C`: the admin APIs to try, in order (replicas of one mesh)."""
    targets = [t.strip() for t in text.split(",") if t.strip()]
    if not targets:
        raise UsageError(f"--server {text!r}: expected HOST:PORT[,HOST:PORT...]")
    return targets


class NoneAnswered(CtlError):
    """Every admin API of `--server A,B,...` failed: one line per address and why."""

    def __init__(self, method: str, failures: Sequence[tuple[str, grpc.RpcError]]) -> None:
        lines = [f"no admin API could answer {method} ({len(failures)} tried):"]
        lines += [f"  {target}: {short_rpc_error(exc)}" for target, exc in failures]
        super().__init__("\n".join(lines))


def moves_on(exc: grpc.RpcError, change: bool) -> bool:
    """Should the next address of `--server A,B,...` be tried? Yes when this one cannot be
    reached or says UNAVAILABLE (a replica that does not decide, a store it cannot
    write: nothing was changed); for a read, also when it does not answer in time (a
    change that timed out may have happened: it is not sent again elsewhere)."""
    code = exc.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return True
    return code == grpc.StatusCode.DEADLINE_EXCEEDED and not change and not answered(exc)


class Admin:
    """The admin API at `--server`: one address, or several replicas' tried in order
    (the first that answers is asked first for the rest of the command)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.targets = parse_servers(args.server)
        self.server = self.targets[0]
        """The address asked last: the one that answered, or that failed last."""
        self._credentials = (
            grpc.ssl_channel_credentials(Path(args.tls_ca).read_bytes()) if args.tls_ca else None
        )
        self._stubs: dict[str, Any] = {}
        self.metadata = [("x-xds-actor", args.actor)]
        if args.token_file:
            token = Path(args.token_file).read_text().strip()
            if not token or "\n" in token:
                raise UsageError(f"--token-file {args.token_file}: expected one line, the token")
            self.metadata.append(("authorization", f"Bearer {token}"))
        self.timeout = args.timeout

    def stub(self, target: str) -> Any:
        if target not in self._stubs:
            channel = (
                grpc.secure_channel(target, self._credentials)
                if self._credentials is not None
                else grpc.insecure_channel(target)
            )
            self._stubs[target] = admin_pb2_grpc.AdminStub(channel)
        return self._stubs[target]

    def _order(self) -> list[str]:
        return [self.server, *(t for t in self.targets if t != self.server)]

    def call(self, method: str, request: message.Message) -> Any:
        failures: list[tuple[str, grpc.RpcError]] = []
        for target in self._order():
            self.server = target
            try:
                return getattr(self.stub(target), method)(
                    request, metadata=self.metadata, timeout=self.timeout
                )
            except grpc.RpcError as exc:
                if len(self.targets) == 1 or not moves_on(exc, method in CHANGES):
                    raise
                failures.append((target, exc))
        raise NoneAnswered(method, failures)

    def stream(self, method: str, request: message.Message) -> Generator[Any, None, None]:
        """A server stream, from the first address that does not refuse it before its
        first message (a replica that does not decide refuses a watch at once)."""
        failures: list[tuple[str, grpc.RpcError]] = []
        for target in self._order():
            self.server = target
            call = getattr(self.stub(target), method)(request, metadata=self.metadata)
            received = False
            try:
                for item in call:
                    received = True
                    yield item
                return
            except grpc.RpcError as exc:
                if received or len(self.targets) == 1 or not moves_on(exc, change=False):
                    raise
                failures.append((target, exc))
            finally:
                call.cancel()
        raise NoneAnswered(method, failures)


# ---- commands ----


def cmd_status(args: argparse.Namespace, admin: Admin) -> None:
    nodes = admin.call("ListNodes", admin_pb2.ListNodesRequest()).nodes
    listed = admin.call("ListRollouts", admin_pb2.ListRolloutsRequest())
    rollouts, store = listed.rollouts, listed.store
    istio = admin.call("GetIstioApplyStatus", admin_pb2.GetIstioApplyStatusRequest())
    replicas = list_replicas(admin)
    by_region: dict[str, dict[str, int]] = {}
    for n in nodes:
        counts = by_region.setdefault(n.region, {})
        counts[n.sync_state] = counts.get(n.sync_state, 0) + 1
    data = {
        "server": admin.server,
        "nodes": by_region,
        "rollouts": [
            {
                "service": r.service,
                "canary_version": r.canary_version,
                "phase": r.phase,
                "reason": r.reason,
            }
            for r in rollouts
        ],
    }
    if store.known:
        data["store"] = to_dict(store)
    if istio.enabled:
        data["istio_apply"] = [to_dict(r) for r in istio.regions]
    if replicas is not None:
        data["replica_store"] = replicas.store
        data["replicas"] = [in_field_order(r) for r in replicas.replicas]

    def table() -> str:
        out = [f"admin API {admin.server}: reachable; {len(nodes)} nodes connected"]
        if store.known:
            out[0] += f"; {store_line(store)}"
        if replicas is not None:
            out.append(replicas_table(replicas))
        out.append(
            render_table(
                ["REGION", "NODES"],
                [
                    (region, ", ".join(f"{v} {k}" for k, v in sorted(c.items())))
                    for region, c in sorted(by_region.items())
                ],
            )
            if by_region
            else "no nodes"
        )
        out.append(
            render_table(
                ["SERVICE", "CANARY", "PHASE", "REASON"],
                [(r.service, r.canary_version, r.phase, r.reason[:80]) for r in rollouts],
            )
            if rollouts
            else "no rollouts"
        )
        if istio.enabled:
            out.append(istio_table(istio.regions))
        return "\n\n".join(out)

    emit(args, data, table)


def list_replicas(admin: Admin) -> Any:
    """The replicas, when there is more to say than "this one process": several, or a
    store. None for one process, and from a server older than `ListReplicas`."""
    try:
        listed = admin.call("ListReplicas", admin_pb2.ListReplicasRequest())
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
            return None
        raise
    return listed if listed.store or len(listed.replicas) > 1 else None


def replicas_table(listed: Any) -> str:
    """Every replica: what it serves, where, and which one decides."""
    rows = []
    for r in listed.replicas:
        counts = ", ".join(f"{region} {n}" for region, n in sorted(r.nodes_by_region.items()))
        rows.append(
            (
                r.id + (" *" if r.this else ""),
                ",".join(r.regions) or "all",
                r.xds_address or "-",
                r.admin_address or "-",
                f"{r.nodes} ({counts})" if len(r.nodes_by_region) > 1 else r.nodes,
                "leader" if r.leader else "follower",
            )
        )
    where = f" on {listed.store}" if listed.store else ""
    head = f"{len(rows)} replica(s){where}; * answered"
    return head + "\n" + render_table(["ID", "REGIONS", "XDS", "ADMIN", "NODES", "ROLE"], rows)


def store_line(store: Any) -> str:
    """The state store's health, in a few words."""
    if store.writable and not store.unsaved_rollbacks:
        return "state store: writable"
    line = f"state store: FAILING for {ago(store.failing_since)}: {store.error}"
    if store.writable:
        line = "state store: writable again"
    if store.unsaved_rollbacks:
        line += f"; {store.unsaved_rollbacks} rollback(s) pushed, not yet saved"
    return line


def istio_table(regions: Sequence[Any]) -> str:
    """Where each region's Istio objects are: in sync, or how far behind and why."""
    rows = []
    for r in regions:
        state = "pending" if r.pending else "applied"
        if r.next_retry_at:
            state = f"retrying in {max(0.0, r.next_retry_at - time.time()):.0f}s"
        rows.append(
            (
                r.region,
                r.target,
                f"{r.applied_generation}/{r.desired_generation}",
                state,
                r.attempts,
                ago(r.last_success_at),
                (r.last_error or (f"prune: {r.prune_error}" if r.prune_error else ""))[:80] or "-",
            )
        )
    return render_table(
        ["ISTIO REGION", "CLUSTER", "APPLIED/DESIRED", "STATE", "ATTEMPTS", "LAST OK", "ERROR"],
        rows,
    )


def cmd_nodes(args: argparse.Namespace, admin: Admin) -> None:
    nodes = admin.call("ListNodes", admin_pb2.ListNodesRequest(region=args.region or "")).nodes

    def table() -> str:
        rows = []
        for n in sorted(nodes, key=lambda n: (n.region, n.id)):
            types = {t.type: t for t in n.types}
            nack = next((t for t in n.types if t.sync_state == "NACKED"), None)
            rows.append(
                (
                    n.id,
                    n.region,
                    n.client_type or "-",
                    n.sync_state,
                    *(
                        f"{types[t].sync_state} {types[t].acked_version or '-'}"
                        for t in ("cluster", "endpoint", "listener", "route")
                    ),
                    ago(n.connected_since),
                    f"{nack.type}: {nack.nack_error[:60]}" if nack else "",
                    n.identity or "-",
                )
            )
        return render_table(
            [
                "NODE",
                "REGION",
                "TYPE",
                "SYNC",
                "CLUSTERS",
                "ENDPOINTS",
                "LISTENERS",
                "ROUTES",
                "AGE",
                "LAST NACK",
                "IDENTITY",
            ],
            rows,
        )

    emit(args, [to_dict(n) for n in nodes], table)


def cmd_registry(args: argparse.Namespace, admin: Admin) -> None:
    """The shared registry's instances (replicas on etcd), with each lease's time left."""
    request = admin_pb2.ListInstancesRequest(service=args.service or "", region=args.region or "")
    listed = admin.call("ListInstances", request)
    instances = sorted(listed.instances, key=lambda i: (i.service, i.region, i.version, i.address))

    def table() -> str:
        if not instances:
            where = " ".join(
                f"{flag} {value}"
                for flag, value in (("--service", args.service), ("--region", args.region))
                if value
            )
            return f"no instances registered in {listed.store}" + (f" ({where})" if where else "")
        out = render_table(
            ["SERVICE", "VERSION", "REGION", "ADDRESS", "AGE", "LEASE-LEFT"],
            [
                (
                    i.service,
                    i.version,
                    i.region,
                    i.address,
                    seconds(i.age_seconds),
                    f"{i.lease_ttl_left:.0f}s" if i.lease_ttl_left >= 0 else "-",
                )
                for i in instances
            ],
        )
        # ("-": a lease that is gone, or that etcd did not tell of: then this says why)
        return out + (f"\n{listed.lease_error}" if listed.lease_error else "")

    emit(args, [in_field_order(i) for i in instances], table)


def cmd_config(args: argparse.Namespace, admin: Admin) -> None:
    resp = admin.call(
        "GetNodeConfig", admin_pb2.GetNodeConfigRequest(node_id=args.node, type=args.type or "")
    )
    data = json.loads(resp.json)
    if args.output == "yaml":
        print(yaml.safe_dump(data, sort_keys=False), end="")
    else:
        print(json.dumps(data, indent=2))


def _rollout_rows(r: Any) -> list[tuple[Any, ...]]:
    rows = []
    for reg in r.regions:
        m = json.loads(reg.latest_measurements_json) if reg.latest_measurements_json else {}
        canary = (m or {}).get("canary") or {}
        err = canary.get("error_rate")
        p99 = canary.get("p99_ms")
        rows.append(
            (
                reg.region,
                reg.phase,
                reg.step,
                f"{reg.production_percent:g}/{reg.baseline_percent:g}/"
                f"{reg.canary_percent:g}" + (" (manual)" if reg.manual else ""),
                f"{err * 100:.1f}%" if err is not None else "-",
                f"{p99:.0f}ms" if p99 is not None else "-",
                reg.reason[:70],
            )
        )
    return rows


ROLLOUT_HEADERS = [
    "REGION",
    "PHASE",
    "STEP",
    "WEIGHTS P/B/C %",
    "CANARY ERR",
    "CANARY P99",
    "REASON",
]


def cmd_rollout(args: argparse.Namespace, admin: Admin) -> None:
    action = args.action
    if action == "list":
        rollouts = admin.call("ListRollouts", admin_pb2.ListRolloutsRequest()).rollouts
        emit(
            args,
            [to_dict(r) for r in rollouts],
            lambda: render_table(
                ["SERVICE", "CANARY", "PHASE", "STEPS BY REGION"],
                [
                    (
                        r.service,
                        r.canary_version,
                        r.phase,
                        " ".join(f"{g.region}={g.step}" for g in r.regions),
                    )
                    for r in rollouts
                ],
            ),
        )
        return
    if action == "watch":
        cmd_watch(args, admin)
        return
    if not args.service:
        raise CtlError(f"rollout {action}: name the service")
    if action == "get":
        r = admin.call("GetRollout", admin_pb2.GetRolloutRequest(service=args.service))
    else:
        if not args.reason:
            raise CtlError(f"rollout {action}: --reason is required (it goes in the audit log)")
        if action == "promote":
            r = admin.call(
                "PromoteRollout",
                admin_pb2.PromoteRolloutRequest(
                    service=args.service, reason=args.reason, all=args.all
                ),
            )
        elif action == "set-weights":
            if args.canary is None:
                raise CtlError("rollout set-weights: --canary is required")
            r = admin.call(
                "SetWeights",
                admin_pb2.SetWeightsRequest(
                    service=args.service,
                    regions=args.region or [],
                    canary_percent=args.canary,
                    baseline_percent=args.baseline,
                    reason=args.reason,
                ),
            )
        else:
            method = {"pause": "PauseRollout", "resume": "ResumeRollout", "abort": "AbortRollout"}[
                action
            ]
            r = admin.call(
                method, admin_pb2.RolloutActionRequest(service=args.service, reason=args.reason)
            )
    emit(
        args,
        to_dict(r),
        lambda: (
            f"{r.service} {r.canary_version}: {r.phase} ({r.reason})\n"
            + render_table(ROLLOUT_HEADERS, _rollout_rows(r))
        ),
    )


def cmd_watch(args: argparse.Namespace, admin: Admin) -> None:
    events = admin.stream(
        "WatchRollouts", admin_pb2.WatchRolloutsRequest(service=args.service or "")
    )
    try:
        for ev in events:
            if args.output == "table":
                for line in ev.transitions:
                    print(f"{stamp(ev.time)} {ev.rollout.service} [{ev.actor}] {line}", flush=True)
            else:
                print(json.dumps(to_dict(ev)), flush=True)
    except KeyboardInterrupt:
        events.close()


def cmd_audit(args: argparse.Namespace, admin: Admin) -> None:
    limit = parse_limit(args.limit) if args.limit is not None else 0
    since = parse_since(args.since) if args.since else 0.0
    entries = admin.call(
        "GetAudit",
        admin_pb2.GetAuditRequest(
            service=args.service or "", region=args.region or "", since=since, limit=limit
        ),
    ).entries
    emit(
        args,
        [to_dict(e) for e in entries],
        lambda: render_table(
            ["TIME", "SERVICE", "REGION", "KIND", "STEP", "PHASE", "ACTOR", "REASON"],
            [
                (
                    stamp(e.time),
                    e.service,
                    e.region or "all",
                    e.kind,
                    e.step,
                    f"{e.phase_from}->{e.phase_to}",
                    e.actor,
                    e.reason[:90],
                )
                for e in entries
            ],
        ),
    )


def parse_limit(text: str) -> int:
    try:
        limit = int(text)
    except ValueError:
        raise UsageError(f"--limit {text!r}: expected a number of entries") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise UsageError(f"--limit {limit}: expected 1 to {MAX_LIMIT} entries")
    return limit


def parse_since(text: str) -> float:
    """`10m` (that long ago), an epoch number, or an ISO time like 2026-11-27T14:00:00."""
    seconds = parse_duration(text)
    if seconds is not None and not text.replace(".", "").isdigit():
        return time.time() - seconds
    try:
        return float(text)
    except ValueError:
        pass
    for fmt in ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d"):
        try:
            return time.mktime(time.strptime(text, fmt))
        except ValueError:
            continue
    raise CtlError(f"--since {text!r}: expected a duration (10m), an epoch time or an ISO time")


# ---- xds fetch: a pretend node on the xDS port ----


async def fetch(
    server: str, region: str, type_url: str, names: list[str], timeout: float
) -> discovery_pb2.DiscoveryResponse:
    async with grpc.aio.insecure_channel(server) as channel:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        node = base_pb2.Node(
            id=f"xdsctl-{region}", cluster=region, locality=base_pb2.Locality(region=region)
        )
        req = discovery_pb2.DiscoveryRequest(node=node, type_url=type_url, resource_names=names)
        call = stub.StreamAggregatedResources(iter([req]), timeout=timeout)
        async for resp in call:
            call.cancel()
            return resp
    raise CtlError("the xDS server closed the stream without a response")


def cmd_xds_fetch(args: argparse.Namespace, admin: Admin | None) -> None:
    type_url = BY_SHORT_NAME[args.type]

    async def run() -> discovery_pb2.DiscoveryResponse:
        names = args.name or []
        if not names and type_url == ENDPOINT:  # endpoints are asked for by cluster name
            clusters = await fetch(args.xds_server, args.region, CLUSTER, [], args.timeout)
            names = [_cluster_name(a) for a in clusters.resources]
        elif not names and type_url == ROUTE:
            names = [ROUTE_CONFIG_NAME]
        return await fetch(args.xds_server, args.region, type_url, names, args.timeout)

    data = to_dict(asyncio.run(run()))
    data.pop("nonce", None)
    if args.output == "yaml":
        print(yaml.safe_dump(data, sort_keys=False), end="")
    else:
        print(json.dumps(data, indent=2))


def _cluster_name(packed: Any) -> str:
    cluster = cluster_pb2.Cluster()
    packed.Unpack(cluster)
    return str(cluster.name)


# ---- the command line ----


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xdsctl", description=__doc__)
    p.add_argument(
        "--server",
        default="127.0.0.1:18001",
        metavar="HOST:PORT[,...]",
        help="the admin API (default 127.0.0.1:18001); replicas' admin APIs, comma-separated, "
        "are tried in order: one that cannot be reached is skipped, and a change goes on "
        "to the one that decides",
    )
    p.add_argument(
        "--token-file",
        metavar="FILE",
        help="bearer token for changes (and for reads on a serve --admin-auth-reads)",
    )
    p.add_argument("--tls-ca", metavar="PEM", help="talk TLS, trusting this CA")
    p.add_argument("--output", "-o", default="table", choices=["table", "json", "yaml"])
    p.add_argument(
        "--actor",
        default=f"{getpass.getuser()}@{socket.gethostname()}",
        help="who you are, for the audit log",
    )
    p.add_argument("--timeout", type=float, default=10.0)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="is the server up; nodes per region; rollouts").set_defaults(
        func=cmd_status
    )
    n = sub.add_parser("nodes", help="connected nodes and what each applied")
    n.add_argument("--region")
    n.set_defaults(func=cmd_nodes)
    g = sub.add_parser(
        "registry", help="model server instances in the shared registry (replicas on etcd)"
    )
    g.add_argument("--service", help="only this service's instances")
    g.add_argument("--region", help="only this region's instances")
    g.set_defaults(func=cmd_registry)
    c = sub.add_parser("config", help="the config last sent to one node (JSON)")
    c.add_argument("node")
    c.add_argument("--type", choices=sorted(BY_SHORT_NAME))
    c.set_defaults(func=cmd_config)
    r = sub.add_parser("rollout", help="list, inspect and steer rollouts")
    r.add_argument(
        "action",
        choices=["list", "get", "pause", "resume", "promote", "abort", "set-weights", "watch"],
    )
    r.add_argument("service", nargs="?")
    r.add_argument("--reason", help="why (required for changes; goes in the audit log)")
    r.add_argument("--all", action="store_true", help="promote: straight to 100%%")
    r.add_argument("--canary", type=float, help="set-weights: canary percent")
    r.add_argument("--baseline", type=float, default=0.0, help="set-weights: baseline percent")
    r.add_argument("--region", action="append", help="set-weights: only these regions")
    r.set_defaults(func=cmd_rollout)
    a = sub.add_parser("audit", help="the audit log")
    a.add_argument("--service")
    a.add_argument("--region")
    a.add_argument("--since", help="10m, an epoch time, or 2026-11-27T14:00:00")
    a.add_argument("--limit", help="only the newest N entries")
    a.set_defaults(func=cmd_audit)
    x = sub.add_parser("xds", help="talk to the xDS port as a pretend node")
    xsub = x.add_subparsers(dest="xds_command", required=True)
    f = xsub.add_parser("fetch", help="print what a proxy of a region would receive")
    f.add_argument("--region", required=True)
    f.add_argument("--type", default="route", choices=sorted(BY_SHORT_NAME))
    f.add_argument("--name", action="append", help="resource name (repeatable)")
    f.add_argument("--xds-server", default="127.0.0.1:18000", metavar="HOST:PORT")
    f.set_defaults(func=cmd_xds_fetch, no_admin=True)
    return p


def answered(exc: grpc.RpcError) -> bool:
    """Did the admin API itself send this status (rather than the transport fail)?"""
    try:
        trailing = exc.trailing_metadata() or ()
    except (AttributeError, ValueError):
        return False
    # grpc's stubs call each item a _Metadatum; at run time it is a (key, value) tuple.
    return any(key == STATUS_MARK for key, _ in cast(Iterable[tuple[str, Any]], trailing))


def short_rpc_error(exc: grpc.RpcError) -> str:
    """Why one address of several failed, in a few words."""
    code = exc.code()
    details = " ".join((exc.details() or "").split())
    if code == grpc.StatusCode.UNAVAILABLE and not answered(exc):
        reason = (
            "connection refused"
            if "refused" in details.lower()
            else details.split(";")[-1].strip() or "unavailable"
        )
        return f"cannot reach it: {reason}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and not answered(exc):
        return "did not answer in time"
    return f"{code.name}: {details}"


def describe_rpc_error(exc: grpc.RpcError, target: str, what: str) -> str:
    code = exc.code()
    details = exc.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE and not answered(exc):
        reason = (
            "connection refused"
            if "refused" in details.lower()
            else details.split(";")[-1].strip() or "unavailable"
        )
        return f"cannot reach {what} at {target}: {reason}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"{what} at {target} did not answer in time"
    return f"{code.name}: {details}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    no_admin = getattr(args, "no_admin", False)
    target, what = (args.xds_server, "xDS server") if no_admin else (args.server, "admin API")
    admin: Admin | None = None
    try:
        admin = None if no_admin else Admin(args)
        args.func(args, admin)
        return 0
    except grpc.RpcError as exc:
        if admin is not None:
            target = admin.server  # (of several, the one whose answer this is)
        print(f"xdsctl: {describe_rpc_error(exc, target, what)}", file=sys.stderr)
    except UsageError as exc:
        print(f"xdsctl: {exc}", file=sys.stderr)
        return 2
    except CtlError as exc:
        print(f"xdsctl: {exc}", file=sys.stderr)
    except OSError as exc:
        print(f"xdsctl: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
