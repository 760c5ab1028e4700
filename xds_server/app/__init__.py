"""`xds-server serve`, wired: one server for both deployments (`server.py`), built from
a spec source (`specs.py`), an elector (`electors.py`) and a store; while this process
decides, a `LeaderRuntime` (`leader.py`) runs the controller and the leader's sinks.

The names below are imported when first used: the supervisor of `serve --workers`
(`supervisor.py`) and `ServeOptions` stay light, without the server (gRPC, the store
clients), which each worker imports for itself."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from xds_server.app.options import ServeOptions
    from xds_server.app.running import Running
    from xds_server.app.server import Server, StoreError, local, replica
    from xds_server.app.specs import REGISTRY_COALESCE_SECONDS, SpecFile

_WHERE = {
    "REGISTRY_COALESCE_SECONDS": "specs",
    "Running": "running",
    "ServeOptions": "options",
    "Server": "server",
    "SpecFile": "specs",
    "StoreError": "server",
    "local": "server",
    "replica": "server",
}

__all__ = [
    "REGISTRY_COALESCE_SECONDS",
    "Running",
    "ServeOptions",
    "Server",
    "SpecFile",
    "StoreError",
    "local",
    "replica",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
