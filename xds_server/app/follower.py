"""A process that serves xDS but does not decide: it serves exactly the weights the
committed rollout state implies, so every Envoy of a region gets one split whichever
replica it is connected to."""

from __future__ import annotations

import logging
from collections.abc import Callable

from xds_server.rollout.ports import StateStore
from xds_server.rollout.state import RolloutState, current_rollouts, rollout_traffic
from xds_server.spec import MeshSpec
from xds_server.traffic import TrafficState
from xds_server.xds.dataplane import DataPlane

log = logging.getLogger("xds_server.app")


class Follower:
    def __init__(
        self,
        spec: Callable[[], MeshSpec],
        store: StateStore,
        dataplane: DataPlane,
        interval: float = 0.5,
    ) -> None:
        self._spec = spec
        self.store = store
        self.dataplane = dataplane
        self.interval = interval
        """How often a store without a watch (SQLite) is read again."""
        self.rollouts: dict[str, RolloutState] = {}
        self._served = TrafficState()

    def refresh(self) -> None:
        """Serve what the committed state implies under the current spec."""
        spec = self._spec()
        self.rollouts = current_rollouts(spec, self.store.load_rollouts())
        traffic = rollout_traffic(spec, self.rollouts)
        if traffic != self._served:
            self._served = traffic
            self.dataplane.set_traffic(traffic, urgent=True, reason="following committed state")

    def try_refresh(self) -> None:
        try:
            self.refresh()
        except Exception as exc:  # a locked or failing store: the next poll tries again
            log.warning("follower could not read the committed state: %s", exc)
