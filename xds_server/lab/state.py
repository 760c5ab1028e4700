"""What the control plane decided, read from its store: the rollout, the audit log, the
leader.

Without `ha` that is the server's SQLite file (read once it exists); with `ha` the etcd
store the replicas share (its view re-read on each call). Reads only: the lab never
writes the store (the server and the replicas do).
"""

from __future__ import annotations

from typing import Any

from xds_server.ha.etcd import parse_store_url
from xds_server.ha.store import EtcdStore
from xds_server.lab.layout import MeshLayout
from xds_server.lab.polling import wait_for
from xds_server.lab.processes import MeshProcesses
from xds_server.rollout.audit import AuditEntry
from xds_server.rollout.state import RolloutState
from xds_server.rollout.store import FILE_NAME, Store


class StateReader:
    def __init__(self, layout: MeshLayout, processes: MeshProcesses) -> None:
        self.layout = layout
        self.processes = processes
        self._sqlite: Store | None = None
        self._etcd_store: EtcdStore | None = None

    @property
    def audit_log(self) -> str:
        """Where the audit log is: the store's URL, or the server's SQLite file."""
        etcd = self.processes.etcd
        return str(etcd.url) if etcd else str(self.layout.state_dir / FILE_NAME)

    def rollout(self, service: str | None = None) -> dict[str, Any] | None:
        """The newest rollout's (of `service`, or of any) phase, reason, canary version
        and each region's phase and step; None before there is one."""
        states = [s for s in self._states() if service in (None, s.service)]
        if not states:
            return None
        s = states[-1]
        return {
            "phase": s.phase,
            "reason": s.reason,
            "service": s.service,
            "canary_version": s.canary_version,
            "regions": {r: {"phase": rs.phase, "step": rs.step} for r, rs in s.regions.items()},
        }

    def wait_phase(
        self, phases: set[str], timeout: float, service: str | None = None
    ) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            state = self.rollout(service)
            return state if state is not None and state["phase"] in phases else None

        whose = f"{service}'s " if service else ""
        return wait_for(
            reached, f"{whose}rollout phase in {sorted(phases)}", timeout=timeout, interval=0.1
        )

    def audit(self, after_id: int | None = None) -> list[AuditEntry]:
        if self.processes.etcd is not None:
            store = self.etcd_store()
            store.read()
            return store.audit(after_id=after_id)
        sqlite = self._store()
        return sqlite.audit(after_id=after_id) if sqlite else []

    # ---- replicas on etcd (`ha`) ----

    def etcd_store(self) -> EtcdStore:
        """A reader of the replicas' store (its view re-read on each call's `read()`)."""
        assert self.processes.etcd is not None
        if self._etcd_store is None:
            self._etcd_store = EtcdStore(parse_store_url(self.processes.etcd.url))
        return self._etcd_store

    def leader(self) -> str | None:
        """The replica (region) that holds the leader key now, if any."""
        store = self.etcd_store()
        store.read()
        return store.view.leader.replica if store.view.leader else None

    def wait_leader(self, timeout: float = 30, other_than: str | None = None) -> str:
        def elected() -> str | None:
            lead = self.leader()
            return lead if lead and lead != other_than else None

        return wait_for(
            elected,
            "a leader replica" + (f" other than {other_than}" if other_than else ""),
            timeout=timeout,
            interval=0.05,
        )

    def wait_replicas(self, timeout: float = 30) -> None:
        """Until every replica has its key in the store (it does once its xDS port is
        open): an Envoy started earlier would settle on its neighbour's replica."""

        def listed() -> bool:
            store = self.etcd_store()
            store.read()
            return set(store.view.replicas) >= set(self.processes.replicas)

        wait_for(listed, "every replica's key in the store", timeout=timeout, interval=0.1)

    def close(self) -> None:
        if self._sqlite is not None:
            self._sqlite.close()
            self._sqlite = None
        if self._etcd_store is not None:
            self._etcd_store.close()
            self._etcd_store = None

    def _store(self) -> Store | None:
        """One read connection to the server's state, once the server has created it."""
        if self._sqlite is None and (self.layout.state_dir / FILE_NAME).exists():
            self._sqlite = Store.in_dir(self.layout.state_dir)
        return self._sqlite

    def _states(self) -> list[RolloutState]:
        if self.processes.etcd is not None:
            store = self.etcd_store()
            store.read()
            return store.load_rollouts()
        sqlite = self._store()
        return sqlite.load_rollouts() if sqlite else []
