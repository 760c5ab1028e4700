"""The lab's mesh spec: written whole, atomically, each time the scenario changes it.

Without `ha` the server watches `mesh.yaml`; with `ha` the replicas read the spec from
the store, so each write is also pushed there (`xds-server spec push`). The lab's one
change mid-run is `add_canary()`: the baseline and canary pools appear and the server
starts a rollout.

With the `features` option the spec has two services in the rollout group `ranking`;
`shape` says which have a canary (of which version), whether they are grouped
(consistent or not) and which waits for which (`after:`). A test that changes it and
calls `write_shape()` starts the next rollouts on the same running lab: a new canary
version is a new rollout.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from xds_server.lab.layout import FEATURES, GROUP, SERVICE, VERSIONS, MeshLayout
from xds_server.lab.processes import MeshProcesses


@dataclass
class SpecShape:
    """What the spec says beyond the pools' addresses (with `features`)."""

    canaries: dict[str, str] = field(default_factory=dict)
    """Service -> its canary's version; a service not named has production only."""
    group: bool = True
    """The two services are the rollout group `ranking`."""
    consistent: bool = True
    """... with version-consistent routing (`consistent: true`)."""
    after: dict[str, list[str]] = field(default_factory=dict)
    """Service -> the services whose rollouts it waits for (`after:`)."""
    rollout: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Service -> its own `rollout:` section, overlaid on the lab's plan."""


class SpecWriter:
    def __init__(self, layout: MeshLayout, processes: MeshProcesses) -> None:
        self.layout = layout
        self.opts = layout.opts
        self.processes = processes
        self.shape = SpecShape()

    @property
    def path(self) -> Path:
        return self.layout.spec_path

    def add_canary(self) -> None:
        """Add the baseline and canary pools (of every service): the server sees a new
        canary and starts."""
        self.write(with_canary=True)

    def write(self, with_canary: bool) -> None:
        canary = VERSIONS["canary"]
        self.shape.canaries = {s: canary for s in self.layout.services()} if with_canary else {}
        self.write_shape()

    def write_shape(self, shape: SpecShape | None = None) -> None:
        """The spec of `shape` (default: the current one, kept), written whole."""
        self.shape = shape or self.shape
        doc: dict[str, Any] = {
            "regions": list(self.opts.regions),
            "listener": {"port": 10000},
            "rollout": self.opts.rollout,
            "services": [self._service_doc(s) for s in self.layout.services()],
        }
        if self.opts.features and self.shape.group:
            doc["rollout_groups"] = [
                {
                    "name": GROUP,
                    "services": [FEATURES, SERVICE],
                    "consistent": self.shape.consistent,
                }
            ]
        if self.opts.notify_url:
            doc["notifications"] = {
                "targets": [{"name": "lab", "type": "webhook", "url": self.opts.notify_url}]
            }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
        tmp.replace(self.path)  # atomic: the server never reads half a file
        etcd = self.processes.etcd
        if etcd is not None:  # replicas read the spec from the store: push it there
            subprocess.run(
                [sys.executable, "-m", "xds_server.cli", "spec", "push",
                 "--spec", str(self.path), "--store", etcd.url, *etcd.client_flags()],
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip

    def _service_doc(self, service: str) -> dict[str, Any]:
        """One service: the recommender takes every domain; `features` its own name
        (the Host its callers send), so each has its virtual host."""
        canary = self.shape.canaries.get(service)
        pools = ("production", "baseline", "canary") if canary else ("production",)
        doc: dict[str, Any] = {
            "name": service,
            "domains": [FEATURES] if service == FEATURES else ["*"],
            "prefix": "/",
            "protocol": self.opts.protocol,
            "pools": {
                pool: self._pool_doc(service, pool, canary if pool == "canary" else None)
                for pool in pools
            },
        }
        if self.shape.after.get(service):
            doc["after"] = list(self.shape.after[service])
        if self.shape.rollout.get(service):
            doc["rollout"] = dict(self.shape.rollout[service])
        return doc

    def _pool_doc(self, service: str, pool: str, version: str | None = None) -> dict[str, Any]:
        """A pool of the spec: with `ha` its version only (the registry's instances)."""
        version = version or VERSIONS[pool]
        if self.opts.ha:
            return {"version": version}
        endpoints = {r: [self._endpoint(service, r, pool)] for r in self.opts.regions}
        return {"version": version, "endpoints": endpoints}

    def _endpoint(self, service: str, region: str, pool: str) -> str | dict[str, Any]:
        """HOST:PORT; a gRPC MLServer's with its REST port as `health_port` (it serves no
        grpc.health.v1: the warm-up asks `/v2/health/ready` there)."""
        host = self.layout.host(region)  # its namespace's, with `netns`
        if service == FEATURES:
            return f"{host}:{self.layout.feature_ports[(region, pool)]}"
        address = f"{host}:{self.layout.pool_port(region, pool)}"
        if self.opts.models == "mlserver" and self.opts.protocol == "grpc":
            return {"address": address, "health_port": self.layout.model_ports[(region, pool)]}
        return address
