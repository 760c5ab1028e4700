"""A whole local mesh on loopback: model servers, Prometheus, `xds-server serve`, Envoys.

The rollout tests and the lab both run on this, so they start and stop things the same
way. Everything runs on 127.0.0.1 with free ports; `stop()` ends every process it
started, by pid.

`LocalMesh` orchestrates one lab: it makes the plan (`layout`: options, files, ports)
and the rooms that share it, starts them in order and stops them. Callers go to the room
that owns what they want:

- `processes` (lab/processes.py): what runs; start the load, proxyless clients, a
  replica; its Envoys, replicas, etcd, Prometheus;
- `credentials` (lab/credentials.py): the admin token's file, mTLS certificates;
- `spec` (lab/specfile.py): the mesh spec; `add_canary()` starts a rollout;
- `faults` (lab/faults.py): a model server's fault knobs, killed processes;
- `state` (lab/state.py): the rollout, the audit log, the leader, from the store;
- `traffic` (lab/traffic.py): Envoys' weights and hosts, model servers' and proxyless
  clients' counts, Prometheus's series.

With `MeshOptions(netns=True)` (issue 29) the lab has a network of its own
(`lab/netns.py`): `start` makes it first, `stop` removes it last (also after a start
that failed); `layout.net` is its plan (`cut`, `isolate`, `heal`), `layout.host(key)`
each namespace's address. Where namespaces cannot be made, `start` says why in one line
and the lab runs on loopback.
"""

from __future__ import annotations

from pathlib import Path

from xds_server.lab.credentials import Credentials
from xds_server.lab.faults import FaultInjector
from xds_server.lab.layout import MeshLayout, MeshOptions
from xds_server.lab.netns import NetworkPlan
from xds_server.lab.processes import MeshProcesses
from xds_server.lab.specfile import SpecWriter
from xds_server.lab.state import StateReader
from xds_server.lab.traffic import TrafficReader


class LocalMesh:
    def __init__(self, workdir: Path, options: MeshOptions | None = None) -> None:
        self.workdir = workdir
        self.opts = options or MeshOptions()
        self.layout = MeshLayout(workdir, self.opts)
        self.credentials = Credentials(self.layout)
        self.processes = MeshProcesses(self.layout, self.credentials)
        self.spec = SpecWriter(self.layout, self.processes)
        self.state = StateReader(self.layout, self.processes)
        self.traffic = TrafficReader(self.layout, self.processes)
        self.faults = FaultInjector(self.layout, self.processes)
        self._net_made = False

    @property
    def net(self) -> NetworkPlan | None:
        """The lab's network (with `netns`, where the machine can), planned."""
        return self.layout.net

    def start(self) -> LocalMesh:
        """Model servers, the spec (production only), certificates, Prometheus, the
        server (with `ha`: etcd first, then a replica per region), then the Envoys."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.layout.netns_unavailable is not None:
            print(f"lab: --netns: {self.layout.netns_unavailable}; running on loopback instead")
        if self.net is not None:
            self._net_made = True  # before create: a create that fails removes its part
            self.net.create()
        procs = self.processes
        if self.opts.ha:
            # The store first: model servers register in it, and check the spec's there.
            procs.start_etcd()
            self.spec.write(with_canary=False)
        procs.start_models()
        if not self.opts.ha:
            self.spec.write(with_canary=False)
        if self.opts.mtls:
            self.credentials.make_certs()
        procs.start_prometheus()
        if self.opts.ha:
            procs.start_replicas()
            self.state.wait_replicas()
        else:
            procs.start_server()
        procs.start_envoys()
        return self

    def stop(self) -> None:
        try:
            self.processes.stop()
            self.state.close()
        finally:
            if self.net is not None and self._net_made:
                self._net_made = False
                self.net.destroy()

    def __enter__(self) -> LocalMesh:
        try:
            return self.start()
        except BaseException:
            self.stop()  # what did start must not outlive a start that failed
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
