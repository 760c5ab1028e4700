"""`xdsctl`: the debug CLI. For now it fetches what a region's proxies would receive."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import json_format

from xds_server.xds.resources import ROUTE_CONFIG_NAME
from xds_server.xds.types import BY_SHORT_NAME, CLUSTER, ENDPOINT, ROUTE


async def fetch(
    server: str, region: str, type_url: str, names: list[str], timeout: float
) -> discovery_pb2.DiscoveryResponse:
    """Ask the xDS server for one type as a pretend node of `region`."""
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
    raise RuntimeError("the server closed the stream without a response")


async def _default_names(server: str, region: str, type_url: str, timeout: float) -> list[str]:
    """Endpoints and routes are asked for by name: take them from clusters / listeners."""
    if type_url == ENDPOINT:
        resp = await fetch(server, region, CLUSTER, [], timeout)
        return [_name(a) for a in resp.resources]
    if type_url == ROUTE:
        return [ROUTE_CONFIG_NAME]
    return []


def _name(packed: Any) -> str:
    cluster = cluster_pb2.Cluster()
    packed.Unpack(cluster)
    return str(cluster.name)


def _to_json(resp: discovery_pb2.DiscoveryResponse) -> dict[str, object]:
    # xds_server.xds.resources (imported above) registers every type the Any fields hold.
    return dict(json_format.MessageToDict(resp, preserving_proto_field_name=True))


def cmd_xds_fetch(args: argparse.Namespace) -> int:
    type_url = BY_SHORT_NAME[args.type]

    async def run() -> discovery_pb2.DiscoveryResponse:
        names = args.name or await _default_names(
            args.xds_server, args.region, type_url, args.timeout
        )
        return await fetch(args.xds_server, args.region, type_url, names, args.timeout)

    resp = asyncio.run(run())
    print(json.dumps(_to_json(resp), indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="xdsctl", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    xds = sub.add_parser("xds", help="talk to the xDS port as a pretend node")
    xsub = xds.add_subparsers(dest="xds_command", required=True)
    f = xsub.add_parser("fetch", help="print what a proxy of a region would receive")
    f.add_argument("--region", required=True)
    f.add_argument("--type", default="route", choices=sorted(BY_SHORT_NAME))
    f.add_argument("--name", action="append", help="resource name (repeatable)")
    f.add_argument("--xds-server", default="127.0.0.1:18000", metavar="HOST:PORT")
    f.add_argument("--timeout", type=float, default=5.0)
    f.set_defaults(func=cmd_xds_fetch)
    args = p.parse_args(argv)
    try:
        return int(args.func(args))
    except grpc.aio.AioRpcError as exc:
        detail = exc.details() or exc.code().name
        print(f"xdsctl: {args.xds_server}: {exc.code().name}: {detail}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
