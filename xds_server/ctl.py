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
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2

from xds_server.admin.v1 import admin_pb2
from xds_server.ctl_client import (
    ABORT_ROLLOUT,
    GET_AUDIT,
    GET_ISTIO_APPLY_STATUS,
    GET_NODE_CONFIG,
    GET_ROLLOUT,
    LIST_INSTANCES,
    LIST_NODES,
    LIST_REPLICAS,
    LIST_ROLLOUTS,
    PAUSE_ROLLOUT,
    PROMOTE_ROLLOUT,
    RESUME_ROLLOUT,
    SET_WEIGHTS,
    Admin,
    CtlError,
    UsageError,
    describe_rpc_error,
)
from xds_server.ctl_output import (
    Status,
    chain_docs,
    chain_table,
    emit,
    emit_document,
    in_field_order,
    instances_table,
    nodes_table,
    render_table,
    rollout_table,
    rollouts_table,
    stamp,
    to_dict,
)
from xds_server.rollout.audit_chain import Chained, verify
from xds_server.spec import parse_duration
from xds_server.xds.resources import ROUTE_CONFIG_NAME
from xds_server.xds.types import BY_SHORT_NAME, CLUSTER, ENDPOINT, ROUTE

MAX_LIMIT = 2**31 - 1
AUDIT_PAGE = 200
"""Entries per GetAudit call (an entry is 1-20 KB: an answer stays under gRPC's 4 MB)."""


# ---- commands ----


def cmd_status(args: argparse.Namespace, admin: Admin) -> None:
    nodes = admin.call(LIST_NODES, admin_pb2.ListNodesRequest()).nodes
    listed = admin.call(LIST_ROLLOUTS, admin_pb2.ListRolloutsRequest())
    istio = admin.call(GET_ISTIO_APPLY_STATUS, admin_pb2.GetIstioApplyStatusRequest())
    status = Status(admin.server, nodes, listed, istio, list_replicas(admin))
    emit(args, status.document(), status.table)


def list_replicas(admin: Admin) -> admin_pb2.ListReplicasResponse | None:
    """The replicas, when there is more to say than "this one process": several, or a
    store. None for one process, and from a server older than `ListReplicas`."""
    try:
        listed = admin.call(LIST_REPLICAS, admin_pb2.ListReplicasRequest())
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
            return None
        raise
    return listed if listed.store or len(listed.replicas) > 1 else None


def cmd_nodes(args: argparse.Namespace, admin: Admin) -> None:
    nodes = admin.call(LIST_NODES, admin_pb2.ListNodesRequest(region=args.region or "")).nodes
    emit(args, [to_dict(n) for n in nodes], lambda: nodes_table(nodes))


def cmd_registry(args: argparse.Namespace, admin: Admin) -> None:
    """The shared registry's instances (replicas on etcd), with each lease's time left."""
    request = admin_pb2.ListInstancesRequest(service=args.service or "", region=args.region or "")
    listed = admin.call(LIST_INSTANCES, request)
    instances = sorted(listed.instances, key=lambda i: (i.service, i.region, i.version, i.address))

    def table() -> str:
        if instances:
            return instances_table(instances, listed)
        where = " ".join(
            f"{flag} {value}"
            for flag, value in (("--service", args.service), ("--region", args.region))
            if value
        )
        return f"no instances registered in {listed.store}" + (f" ({where})" if where else "")

    emit(args, [in_field_order(i) for i in instances], table)


def cmd_config(args: argparse.Namespace, admin: Admin) -> None:
    resp = admin.call(
        GET_NODE_CONFIG, admin_pb2.GetNodeConfigRequest(node_id=args.node, type=args.type or "")
    )
    emit_document(args, json.loads(resp.json))


def cmd_rollout(args: argparse.Namespace, admin: Admin) -> None:
    action = args.action
    if action == "list":
        rollouts = admin.call(LIST_ROLLOUTS, admin_pb2.ListRolloutsRequest()).rollouts
        emit(args, [to_dict(r) for r in rollouts], lambda: rollouts_table(rollouts))
        return
    if action == "watch":
        cmd_watch(args, admin)
        return
    check_target(args)
    if action == "get":
        r = admin.call(GET_ROLLOUT, admin_pb2.GetRolloutRequest(service=args.service))
    else:
        r = rollout_change(args, admin)
    emit(args, to_dict(r), lambda: rollout_table(r))


GROUP_ACTIONS = ("pause", "resume", "abort", "promote")
"""What `--group NAME` does to every member of a rollout group at once."""


def check_target(args: argparse.Namespace) -> None:
    """A rollout command names its service, or (a group action) `--group NAME`: one."""
    action, service, group = args.action, args.service, args.group
    if group is not None and action not in GROUP_ACTIONS:
        raise UsageError(
            f"rollout {action}: --group works with {', '.join(GROUP_ACTIONS)}; "
            "name a service instead"
        )
    if group is not None and service:
        raise UsageError(
            f"rollout {action}: name the service or --group {group}, not both "
            "(a group action acts on every member)"
        )
    if group is not None and not group:
        raise UsageError(f"rollout {action}: --group needs the group's name")
    if group is None and not service:
        hint = " (or --group NAME)" if action in GROUP_ACTIONS else ""
        raise CtlError(f"rollout {action}: name the service{hint}")
    if group is not None and action == "promote" and args.all:
        raise UsageError(
            "rollout promote: --all promotes one service; a group moves a step at a time"
        )


def rollout_change(args: argparse.Namespace, admin: Admin) -> admin_pb2.Rollout:
    """`rollout pause|resume|abort|promote|set-weights SERVICE --reason ...`, or
    `rollout pause|resume|abort|promote --group NAME --reason ...`."""
    action, service, reason = args.action, args.service or "", args.reason
    group = args.group or ""
    if not reason:
        raise CtlError(f"rollout {action}: --reason is required (it goes in the audit log)")
    if action == "promote":
        request = admin_pb2.PromoteRolloutRequest(
            service=service, group=group, reason=reason, all=args.all
        )
        return admin.call(PROMOTE_ROLLOUT, request)
    if action == "set-weights":
        if args.canary is None:
            raise CtlError("rollout set-weights: --canary is required")
        weights = admin_pb2.SetWeightsRequest(
            service=service,
            regions=args.region or [],
            canary_percent=args.canary,
            baseline_percent=args.baseline,
            reason=reason,
        )
        return admin.call(SET_WEIGHTS, weights)
    rpc = {"pause": PAUSE_ROLLOUT, "resume": RESUME_ROLLOUT, "abort": ABORT_ROLLOUT}[action]
    change = admin_pb2.RolloutActionRequest(service=service, group=group, reason=reason)
    return admin.call(rpc, change)


def cmd_watch(args: argparse.Namespace, admin: Admin) -> None:
    events = admin.watch(admin_pb2.WatchRolloutsRequest(service=args.service or ""))
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
    if args.action == "verify":
        cmd_audit_verify(args, admin)
        return
    if args.target or args.version:
        raise UsageError("audit: SERVICE and --version go with `audit verify`; else --service")
    limit = parse_limit(args.limit) if args.limit is not None else 0
    since = parse_since(args.since) if args.since else 0.0
    request = admin_pb2.GetAuditRequest(
        service=args.service or "", region=args.region or "", since=since
    )
    entries = audit_pages(admin, request, limit)
    emit(
        args,
        [to_dict(e) for e in entries],
        lambda: render_table(
            ["TIME", "SERVICE", "GROUP", "REGION", "KIND", "STEP", "PHASE", "ACTOR", "REASON"],
            [
                (
                    stamp(e.time),
                    e.service,
                    e.group or "-",
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


def cmd_audit_verify(args: argparse.Namespace, admin: Admin) -> None:
    """Check each rollout's hash chain (issue 30) from the admin API's listing, on any
    replica: every entry with the bytes its hash covers; exit 1 naming the first broken
    entry of each broken chain."""
    service = args.target or args.service or ""
    request = admin_pb2.GetAuditRequest(
        service=service, canonical=True, canary_version=args.version or "" if service else ""
    )
    entries = audit_pages(admin, request, 0, page=AUDIT_PAGE // 2)
    reports = verify(
        Chained(e.id, e.service, e.canary_version, e.prev_hash, e.hash, e.canonical.encode())
        for e in entries
        if not args.version or e.canary_version == args.version
    )
    emit(args, chain_docs(reports), lambda: chain_table(reports))
    broken = [r for r in reports if not r.intact]
    if broken:
        first = "; ".join(f"{r.service} {r.version} at entry {r.broken_at}" for r in broken)
        raise CtlError(f"audit chain broken: {first}")
    if service and not reports:
        raise CtlError(f"no audit entries for {service} {args.version or ''}".rstrip())


def audit_pages(
    admin: Admin, request: admin_pb2.GetAuditRequest, want: int, page: int = 0
) -> list[admin_pb2.AuditEntry]:
    """The newest `want` entries (0: every one) that `request` asks for, oldest first,
    read a page at a time, newest first (the server pages the store the same way), so
    no answer grows with the log. A server older than pages (it ignores `before_id`)
    is asked once for them all."""
    page = page or AUDIT_PAGE
    out: list[admin_pb2.AuditEntry] = []
    before = 0
    while True:
        size = min(page, want - len(out)) if want else page
        asked = admin_pb2.GetAuditRequest()
        asked.CopyFrom(request)
        asked.limit, asked.before_id = size, before
        got = list(admin.call(GET_AUDIT, asked).entries)
        if before and any(e.id >= before for e in got):
            asked.limit, asked.before_id = want, 0
            return list(admin.call(GET_AUDIT, asked).entries)
        out[:0] = got
        if len(got) < size or (want and len(out) >= want):
            return out
        before = got[0].id


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
    emit_document(args, data)


def _cluster_name(packed: any_pb2.Any) -> str:
    cluster = cluster_pb2.Cluster()
    packed.Unpack(cluster)
    return str(cluster.name)


# ---- the command line ----

GLOBALS_ANYWHERE = (
    "Global options may also follow the command, as kubectl's do (xdsctl rollout get "
    "SERVICE -o json); an option given both before and after the command takes the value "
    "given after it."
)


def global_options(after_command: bool) -> argparse.ArgumentParser:
    """xdsctl's global options, for the top parser (`after_command` False: with their
    defaults) or as a parent of every command's parser (True: without defaults, so only
    an option given after the command lands in the namespace, over the one before)."""

    def default(value: object) -> object:
        return argparse.SUPPRESS if after_command else value

    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group(
        "global options"
        + (
            " (also before the command; given in both places, the one here wins)"
            if after_command
            else ""
        )
    )
    g.add_argument(
        "--server",
        default=default("127.0.0.1:18001"),
        metavar="HOST:PORT[,...]",
        help="the admin API (default 127.0.0.1:18001); replicas' admin APIs, comma-separated, "
        "are tried in order: one that cannot be reached is skipped, and a change goes on "
        "to the one that decides",
    )
    g.add_argument(
        "--token-file",
        default=default(None),
        metavar="FILE",
        help="bearer token for changes (and for reads on a serve --admin-auth-reads)",
    )
    g.add_argument(
        "--tls-ca", default=default(None), metavar="PEM", help="talk TLS, trusting this CA"
    )
    g.add_argument("--output", "-o", default=default("table"), choices=["table", "json", "yaml"])
    g.add_argument(
        "--actor",
        default=default(f"{getpass.getuser()}@{socket.gethostname()}"),
        help="who you are, for the audit log",
    )
    g.add_argument("--timeout", type=float, default=default(10.0))
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xdsctl",
        description=__doc__,
        epilog=GLOBALS_ANYWHERE,
        parents=[global_options(after_command=False)],
    )
    sub = p.add_subparsers(dest="command", required=True)
    after = global_options(after_command=True)

    def command(name: str, func: Callable[..., None], **kwargs: Any) -> argparse.ArgumentParser:
        c: argparse.ArgumentParser = sub.add_parser(name, parents=[after], **kwargs)
        c.set_defaults(func=func)
        return c

    command("status", cmd_status, help="is the server up; nodes per region; rollouts")
    command("nodes", cmd_nodes, help="connected nodes and what each applied").add_argument(
        "--region"
    )
    g = command(
        "registry",
        cmd_registry,
        help="model server instances in the shared registry (replicas on etcd)",
    )
    g.add_argument("--service", help="only this service's instances")
    g.add_argument("--region", help="only this region's instances")
    c = command("config", cmd_config, help="the config last sent to one node (JSON)")
    c.add_argument("node")
    c.add_argument("--type", choices=sorted(BY_SHORT_NAME))
    _add_rollout(command("rollout", cmd_rollout, help="list, inspect and steer rollouts"))
    a = command("audit", cmd_audit, help="the audit log; `audit verify`: check its hash chains")
    a.add_argument("action", nargs="?", choices=["list", "verify"], default="list")
    a.add_argument("target", nargs="?", metavar="SERVICE", help="verify: only this service")
    a.add_argument("--version", help="verify: only this canary version's rollout")
    a.add_argument("--service")
    a.add_argument("--region")
    a.add_argument("--since", help="10m, an epoch time, or 2026-11-27T14:00:00")
    a.add_argument("--limit", help="only the newest N entries")
    _add_xds(
        sub.add_parser("xds", parents=[after], help="talk to the xDS port as a pretend node"), after
    )
    return p


def _add_rollout(r: argparse.ArgumentParser) -> None:
    r.add_argument(
        "action",
        choices=["list", "get", "pause", "resume", "promote", "abort", "set-weights", "watch"],
    )
    r.add_argument("service", nargs="?")
    r.add_argument(
        "--group",
        metavar="NAME",
        help="pause, resume, abort or promote every member of this rollout group as one "
        "(instead of naming a service)",
    )
    r.add_argument("--reason", help="why (required for changes; goes in the audit log)")
    r.add_argument("--all", action="store_true", help="promote: straight to 100%%")
    r.add_argument("--canary", type=float, help="set-weights: canary percent")
    r.add_argument("--baseline", type=float, default=0.0, help="set-weights: baseline percent")
    r.add_argument("--region", action="append", help="set-weights: only these regions")


def _add_xds(x: argparse.ArgumentParser, after: argparse.ArgumentParser) -> None:
    xsub = x.add_subparsers(dest="xds_command", required=True)
    f = xsub.add_parser(
        "fetch", parents=[after], help="print what a proxy of a region would receive"
    )
    f.add_argument("--region", required=True)
    f.add_argument("--type", default="route", choices=sorted(BY_SHORT_NAME))
    f.add_argument("--name", action="append", help="resource name (repeatable)")
    f.add_argument("--xds-server", default="127.0.0.1:18000", metavar="HOST:PORT")
    f.set_defaults(func=cmd_xds_fetch, no_admin=True)


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
