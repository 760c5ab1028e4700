"""`xds-server serve`, wired: one server for both deployments (`server.py`), built from
a spec source (`specs.py`), an elector (`electors.py`) and a store; while this process
decides, a `LeaderRuntime` (`leader.py`) runs the controller and the leader's sinks."""

from xds_server.app.options import ServeOptions
from xds_server.app.running import Running
from xds_server.app.server import Server, StoreError, local, replica
from xds_server.app.specs import REGISTRY_COALESCE_SECONDS, SpecFile

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
