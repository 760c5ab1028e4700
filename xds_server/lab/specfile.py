"""The lab's mesh spec: written whole, atomically, each time the scenario changes it.

Without `ha` the server watches `mesh.yaml`; with `ha` the replicas read the spec from
the store, so each write is also pushed there (`xds-server spec push`). The lab's one
change mid-run is `add_canary()`: the baseline and canary pools appear and the server
starts a rollout.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from xds_server.lab.layout import SERVICE, VERSIONS, MeshLayout
from xds_server.lab.processes import MeshProcesses


class SpecWriter:
    def __init__(self, layout: MeshLayout, processes: MeshProcesses) -> None:
        self.layout = layout
        self.opts = layout.opts
        self.processes = processes

    @property
    def path(self) -> Path:
        return self.layout.spec_path

    def add_canary(self) -> None:
        """Add the baseline and canary pools: the server sees a new canary and starts."""
        self.write(with_canary=True)

    def write(self, with_canary: bool) -> None:
        pools = ("production", "baseline", "canary") if with_canary else ("production",)
        doc: dict[str, Any] = {
            "regions": list(self.opts.regions),
            "listener": {"port": 10000},
            "rollout": self.opts.rollout,
            "services": [
                {
                    "name": SERVICE,
                    "domains": ["*"],
                    "prefix": "/",
                    "protocol": self.opts.protocol,
                    "pools": {pool: self._pool_doc(pool) for pool in pools},
                }
            ],
        }
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
                 "--spec", str(self.path), "--store", etcd.url],
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip

    def _pool_doc(self, pool: str) -> dict[str, Any]:
        """A pool of the spec: with `ha` its version only (the registry's instances)."""
        if self.opts.ha:
            return {"version": VERSIONS[pool]}
        endpoints = {r: [self._endpoint(r, pool)] for r in self.opts.regions}
        return {"version": VERSIONS[pool], "endpoints": endpoints}

    def _endpoint(self, region: str, pool: str) -> str | dict[str, Any]:
        """HOST:PORT; a gRPC MLServer's with its REST port as `health_port` (it serves no
        grpc.health.v1: the warm-up asks `/v2/health/ready` there)."""
        address = f"127.0.0.1:{self.layout.pool_port(region, pool)}"
        if self.opts.models == "mlserver" and self.opts.protocol == "grpc":
            return {"address": address, "health_port": self.layout.model_ports[(region, pool)]}
        return address
