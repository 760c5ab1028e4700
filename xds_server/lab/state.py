"""What the control plane decided, read from its store: the rollout, the audit log, the
leader.

Without `ha` that is the server's SQLite file (read once it exists); with `ha` the etcd
store the replicas share (its view re-read on each call). Reads only: the lab never
writes the store (the server and the replicas do).
"""

from __future__ import annotations

from typing import Any

from xds_server.ha.etcd import DEFAULT_PREFIX, parse_store_url
from xds_server.ha.store import EtcdStore, StoreReadError
from xds_server.lab.layout import MeshLayout
from xds_server.lab.polling import wait_for
from xds_server.lab.processes import MeshProcesses
from xds_server.lab.procs import http_get
from xds_server.rollout.audit import AuditEntry
from xds_server.rollout.state import RolloutState
from xds_server.rollout.store import FILE_NAME, Store


class StateReader:
    def __init__(self, layout: MeshLayout, processes: MeshProcesses) -> None:
        self.layout = layout
        self.processes = processes
        self._sqlite: Store | None = None
        self._etcd_store: EtcdStore | None = None
        self._first_member = 0
        """The etcd member the lab's reads go to first (the next one once it fails)."""

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
            return store.audit(after_id=after_id)
        sqlite = self._store()
        return sqlite.audit(after_id=after_id) if sqlite else []

    # ---- replicas on etcd (`ha`) ----

    def etcd_store(self) -> EtcdStore:
        """A reader of the replicas' store, its view read now. When the member it asks
        does not answer (killed, or cut off with its region: a minority, whose reads
        fail rather than answer stale), the next member is asked, each once."""
        etcd = self.processes.etcd
        assert etcd is not None
        scheme, _, rest = etcd.url.partition("://")
        members = rest.split(",")
        for _ in members:
            if self._etcd_store is None:
                first = self._first_member % len(members)
                order = f"{scheme}://" + ",".join(members[first:] + members[:first])
                address = parse_store_url(order, DEFAULT_PREFIX, etcd.security())
                self._etcd_store = EtcdStore(address)
            try:
                self._etcd_store.read()
                return self._etcd_store
            except StoreReadError:
                self._etcd_store.close()
                self._etcd_store = None
                self._first_member += 1
        raise StoreReadError(f"no member of {etcd.url} answers the lab")

    def leader(self) -> str | None:
        """The replica (region) that holds the leader key now, if any."""
        store = self.etcd_store()
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
            return set(store.view.replicas) >= set(self.processes.replicas)

        wait_for(listed, "every replica's key in the store", timeout=timeout, interval=0.1)

    def replica_leads(self, region: str) -> bool | None:
        """Does the region's replica say it leads (`xds_leader` on its /metrics)? None
        when it does not answer. Its own word, not the store's: a replica cut off from
        etcd keeps the leader key's last value in its view until it steps down."""
        ports = self.layout.replica_ports[region]
        url = f"http://{self.layout.replica_host(region)}:{ports['metrics']}/metrics"
        try:
            status, body, _ = http_get(url, timeout=1.0)
        except OSError:  # refused, timed out
            return None
        if status != 200:
            return None
        for line in body.decode(errors="replace").splitlines():
            if line.startswith("xds_leader "):
                return float(line.split()[1]) == 1.0
        return None

    def listed_in_sync(self, nodes: set[str]) -> bool:
        """Is every one of these nodes listed by a replica in the store's directory, in
        sync on routes (it ACKed the last routes its replica sent)? What the leader's
        ACK gate sees of them: listed, they are known again."""
        store = self.etcd_store()
        found: dict[str, bool] = {}
        for doc in store.view.replicas.values():
            for node in doc.get("nodes", []):
                routes = node.get("routes", {})
                synced = bool(routes.get("acked")) and routes.get("acked") == routes.get("sent")
                found[node.get("id", "")] = found.get(node.get("id", ""), False) or synced
        return all(found.get(n, False) for n in nodes)

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
            return store.load_rollouts()
        sqlite = self._store()
        return sqlite.load_rollouts() if sqlite else []
