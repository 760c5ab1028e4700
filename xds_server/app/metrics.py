"""The process's `/metrics`: one registry, and the collectors each part owns on it.

Every family is registered when the process starts, whatever its role, so a follower
and a leader expose the same names (a leader-only sink's counters just stay at zero
elsewhere), and the counters outlive leadership terms."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from xds_server.app.electors import LeadershipMetrics
from xds_server.app.leader import SinkFactory, leader_sinks
from xds_server.app.specs import RegistryMetrics
from xds_server.ha.maintainer import EtcdMetrics
from xds_server.rollout.exported import RolloutMetrics
from xds_server.xds.metrics import XdsMetrics


@dataclass(frozen=True)
class ProcessMetrics:
    registry: CollectorRegistry
    xds: XdsMetrics
    rollouts: RolloutMetrics
    leadership: LeadershipMetrics
    registered: RegistryMetrics
    etcd: EtcdMetrics
    sinks: tuple[SinkFactory, ...]
    """The leader sinks' builders (their metrics registered here)."""

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> ProcessMetrics:
        r = registry or CollectorRegistry()
        return cls(
            r,
            XdsMetrics(r),
            RolloutMetrics(r),
            LeadershipMetrics(r),
            RegistryMetrics(r),
            EtcdMetrics(r),
            leader_sinks(r),
        )
