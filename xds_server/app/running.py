"""The running parts of one `serve`, read-only: what the admin API and the dashboard
read (`admin.views.AdminView`). The server swaps its leader and follower as leadership
comes and goes (`Roles`); readers always see the current ones."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from xds_server.app.follower import Follower
from xds_server.app.leader import LeaderRuntime
from xds_server.app.workers import Listing
from xds_server.ha.maintainer import StoreMaintainer
from xds_server.ha.replicas import Directory
from xds_server.outputs.istio_apply import IstioApplier, IstioSink
from xds_server.rollout.controller import RolloutController
from xds_server.rollout.ports import StateStore
from xds_server.rollout.state import RolloutState
from xds_server.spec import MeshSpec
from xds_server.xds.publisher import XdsPublisher
from xds_server.xds.status import NodeStatus


class Roles:
    """Who this process is right now: the leader's term, or a follower (one of them, or
    neither for a moment). Only the server changes it."""

    def __init__(self) -> None:
        self.leader: LeaderRuntime | None = None
        self.follower: Follower | None = None


class Running:
    def __init__(
        self,
        publisher: XdsPublisher,
        store: StateStore | None = None,
        directory: Directory | None = None,
        roles: Roles | None = None,
        maintainer: StoreMaintainer | None = None,
    ) -> None:
        self._publisher = publisher
        self._store = store
        self._directory = directory
        self._roles = roles or Roles()
        self.listing: Listing | None = None
        """`serve --workers`: the other workers of this host (their nodes, their rows)."""
        self._maintainer = maintainer

    @property
    def spec(self) -> MeshSpec:
        return self._publisher.spec

    @property
    def publisher(self) -> XdsPublisher:
        return self._publisher

    @property
    def store(self) -> StateStore | None:
        return self._store

    @property
    def directory(self) -> Directory | None:
        """Replicas on etcd: every replica's key (for `xdsctl status`); None for one process."""
        return self._directory

    @property
    def etcd(self) -> StoreMaintainer | None:
        """Replicas on etcd: its size, alarms and upkeep; None for one process."""
        return self._maintainer

    @property
    def controller(self) -> RolloutController | None:
        """None in a process that does not decide rollouts."""
        leader = self._roles.leader
        return leader.controller if leader is not None else None

    @property
    def istio(self) -> IstioApplier | None:
        leader = self._roles.leader
        sinks = leader.sinks if leader is not None else []
        return next((s.applier for s in sinks if isinstance(s, IstioSink)), None)

    def nodes(self, region: str | None = None) -> list[NodeStatus]:
        """Every node connected to this process, then those of the other workers of
        `serve --workers` (their route standing, `via worker-N`)."""
        own = self._publisher.node_status(region)
        return own if self.listing is None else [*own, *self.listing.nodes(region)]

    def workers(self) -> list[dict[str, Any]]:
        """`serve --workers` on SQLite: every worker's row (id, pid, leader, nodes...);
        [] otherwise."""
        return self.listing.documents() if self.listing is not None else []

    def rollouts(self) -> Mapping[str, RolloutState]:
        """The current rollouts: the controller's, or what the follower read."""
        if (controller := self.controller) is not None:
            return controller.rollouts
        follower = self._roles.follower
        return follower.rollouts if follower is not None else {}
