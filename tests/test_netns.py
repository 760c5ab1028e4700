"""The lab's own network (issue 29, `xds_server/lab/netns.py`), made for real: network
namespaces, veth pairs, a bridge, nftables, and real TCP between them.

One network for the cases that cut: regions `east` and `west` and `ops`, a Python HTTP
server in each region's namespace (the same port in both: each namespace has ports of
its own), probed from the other namespaces and from the driver (this process, in the
root namespace). Each cut is healed after its case, whatever happened. A probe connects
with a short timeout: a reachable server's kernel accepts at once, a cut one never
answers (drops are silence). Two more networks check destroy, after a crash too, and
that labs at once do not collide.

Needs root, `ip` and `nft` (`netns.available()`): without them the test skips saying why;
under CI=1 (`make test`, which runs as root) it fails instead.
"""

from __future__ import annotations

import http.client
import ipaddress
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import wait_for
from xds_server.lab import netns
from xds_server.lab.netns import NetnsError, NetworkPlan

PORT = 8080
CONNECT = 0.5
"""Seconds a probe's connect may take: a live server's kernel accepts in microseconds."""
REGIONS = ("east", "west")

PROBE = """
import json, socket, sys
from concurrent.futures import ThreadPoolExecutor
targets, connect = json.loads(sys.argv[1]), float(sys.argv[2])
def get(target):
    host, port = target
    try:
        with socket.create_connection((host, port), timeout=connect) as s:
            s.settimeout(10)
            s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
            return int(s.makefile("rb").readline().split()[1])
    except Exception as exc:
        return type(exc).__name__
with ThreadPoolExecutor(len(targets)) as pool:
    print(json.dumps(list(pool.map(get, targets))))
"""
"""Answers each (host, port): the HTTP status, or the error's name (TimeoutError for a
cut); run inside a namespace, or in the driver."""


def needs_namespaces() -> None:
    reason = netns.available()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: `make test` runs as root with nftables)")
    pytest.skip(f"{reason}; under CI=1 this fails instead")


@dataclass
class Lab:
    plan: NetworkPlan

    def reach(
        self, source: str | None, targets: Sequence[str], port: int = PORT
    ) -> dict[str, int | str]:
        """What each target namespace's server answers from `source` (a namespace's key;
        None: the driver)."""
        hosts = [[self.plan.address(key), port] for key in targets]
        prefix = [] if source is None else self.plan.exec_prefix(source)
        argv = [*prefix, sys.executable, "-c", PROBE, json.dumps(hosts), str(CONNECT)]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
        return dict(zip(targets, json.loads(out.stdout), strict=True))


def names_of(prefix: str) -> list[str]:
    """Every namespace and link this machine has of a lab's prefix."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return [line for line in (listed + links).splitlines() if f"{prefix}-" in line]


def half_open(lab: Lab, key: str) -> str:
    """The connections half open in namespace `key` (a SYN came, its answer went unanswered)."""
    argv = [*lab.plan.exec_prefix(key), "ss", "-Htn", "state", "syn-recv"]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    needs_namespaces()
    plan = netns.plan_network(REGIONS)
    served = tmp_path_factory.mktemp("served")
    servers: list[subprocess.Popen[bytes]] = []
    try:
        plan.create()
        for key in REGIONS:
            command = [sys.executable, "-m", "http.server", "-p", "HTTP/1.1", str(PORT)]
            command += ["-b", plan.address(key), "-d", str(served)]
            servers.append(
                subprocess.Popen(
                    [*plan.exec_prefix(key), *command],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        lab = Lab(plan)
        wait_for(lambda: set(lab.reach(None, REGIONS).values()) == {200}, "both servers")
        yield lab
    finally:
        for server in servers:
            server.kill()
            server.wait()
        plan.destroy()
        assert names_of(plan.prefix) == []


@pytest.fixture
def net(lab: Lab) -> Iterator[Lab]:
    """The shared network, healed after the case whatever it did."""
    try:
        yield lab
    finally:
        lab.plan.heal()


def test_a_plan_is_names_and_addresses_of_its_own_and_its_record_rebuilds_it() -> None:
    plan = NetworkPlan.build("xl0a1b", "10.200.7.0/24", ["us-east-1", "eu-west"])
    assert [ns.key for ns in plan.namespaces] == ["us-east-1", "eu-west", "ops"]
    assert plan.driver_address == "10.200.7.1"
    assert [ns.address for ns in plan.namespaces] == ["10.200.7.2", "10.200.7.3", "10.200.7.4"]
    assert plan.exec_prefix("eu-west") == ["ip", "netns", "exec", "xl0a1b-eu-west"]
    assert all(len(link) <= 15 and link.startswith("xl0a1b-") for link in plan.links())
    assert all(len(ns.link) <= 15 for ns in plan.namespaces)
    record = json.loads(json.dumps(plan.record()))
    assert NetworkPlan.from_record(record) == plan
    assert {t["namespace"] for t in record["tables"]} == {ns.name for ns in plan.namespaces}

    with pytest.raises(NetnsError, match=r"^lab\.json netns\.subnet: missing"):
        NetworkPlan.from_record({**record, "subnet": None}, "lab.json netns")
    with pytest.raises(NetnsError, match=r"^netns\.prefix: 'eth0' is not a lab's prefix"):
        netns.destroy_recorded({**record, "prefix": "eth0"})
    with pytest.raises(NetnsError, match="the name of the operator's namespace"):
        NetworkPlan.build("xl0a1b", "10.200.7.0/24", ["ops"])
    with pytest.raises(NetnsError, match="neither a namespace of the lab nor an IPv4"):
        plan.cut("eu-west", ["nowhere"])


def test_every_namespace_reaches_every_other_and_the_driver_reaches_all(net: Lab) -> None:
    for source in (None, "west", "ops", "east"):
        assert net.reach(source, REGIONS) == {"east": 200, "west": 200}, source
    lo = subprocess.run([*net.plan.exec_prefix("ops"), "ip", "-o", "link", "show", "lo"],
                        capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "LOOPBACK,UP" in lo


def test_a_cut_breaks_both_ways_and_heals(net: Lab) -> None:
    plan = net.plan
    change = plan.cut("east", ["west"])
    assert change.namespace == f"{plan.prefix}-east" and plan.address("west") in change.what
    assert net.reach("west", ["east"]) == {"east": "TimeoutError"}
    assert net.reach("east", ["west"]) == {"west": "TimeoutError"}
    assert half_open(net, "west") == ""  # east's SYN never left east (not only its answer)
    assert net.reach(None, REGIONS) == {"east": 200, "west": 200}  # the driver still sees it
    assert net.reach("ops", ["east"]) == {"east": 200}
    assert f"ip saddr {plan.address('west')} drop" in plan.rules("east")

    [healed] = plan.heal("east")
    assert healed.what == "healed" and " drop" not in plan.rules("east")
    assert net.reach("west", ["east"]) == {"east": 200}
    assert net.reach("east", ["west"]) == {"west": 200}


def test_an_established_connection_breaks_too(net: Lab) -> None:
    plan = net.plan
    conn = http.client.HTTPConnection(plan.address("east"), PORT, timeout=10)
    try:

        def get() -> int:
            conn.request("GET", "/")
            response = conn.getresponse()
            response.read()
            return response.status

        assert get() == 200
        assert conn.sock is not None
        opened = conn.sock.getsockname()
        assert get() == 200 and conn.sock.getsockname() == opened  # one kept-alive connection
        plan.cut("east", [plan.driver_address])
        conn.sock.settimeout(1.0)
        with pytest.raises(TimeoutError):
            get()
    finally:
        conn.close()


def test_isolate_cuts_every_namespace_but_keeps_the_driver_and_loopback(net: Lab) -> None:
    net.plan.isolate("east")
    assert net.reach("west", ["east"]) == {"east": "TimeoutError"}
    assert net.reach("ops", ["east"]) == {"east": "TimeoutError"}
    assert net.reach("east", ["west"]) == {"west": "TimeoutError"}
    assert half_open(net, "west") == ""
    assert net.reach(None, ["east"]) == {"east": 200}
    assert net.reach("east", ["east"]) == {"east": 200}  # its own address, over lo


def test_a_dropped_port_is_one_way(net: Lab) -> None:
    """The asymmetric cut: west cannot reach east's port, while east reaches west and
    the driver and ops still reach east's port."""
    net.plan.drop_port("east", PORT, ["west"])
    assert net.reach("west", ["east"]) == {"east": "TimeoutError"}
    assert net.reach("east", ["west"]) == {"west": 200}
    assert net.reach("ops", ["east"]) == {"east": 200}
    assert net.reach(None, ["east"]) == {"east": 200}


def test_labs_at_once_do_not_collide_and_destroy_leaves_nothing(lab: Lab) -> None:
    """Two more networks beside the shared one (the same region's name in all three):
    one destroyed in order, one from its record after a crash (its plan dropped, a
    process still in a namespace); a plan on a /24 in use is refused; the shared one
    serves on throughout."""
    first, second = netns.plan_network(["east"]), netns.plan_network(["east"])
    records = [first.record(), second.record()]
    leftover: subprocess.Popen[bytes] | None = None
    try:
        first.create()
        second.create()
        plans = (lab.plan, first, second)
        assert len({p.prefix for p in plans}) == 3
        for a, b in itertools.combinations(plans, 2):
            assert not ipaddress.IPv4Network(a.subnet).overlaps(ipaddress.IPv4Network(b.subnet))
        leftover = subprocess.Popen([*second.exec_prefix("east"), "sleep", "60"])
        pid, where = str(leftover.pid), second.namespace("east").name
        wait_for(lambda: pid in _pids(where), "the process in east")

        removed = first.destroy()
        assert f"netns {first.prefix}-east (with its table inet xdslab)" in removed
        assert names_of(first.prefix) == []

        crashed = json.loads(json.dumps(second.record()))
        del second
        removed = netns.destroy_recorded(crashed)
        assert f"process {leftover.pid} in {crashed['prefix']}-east" in removed
        assert {f"link {link}" for link in crashed["links"]} <= set(removed)
        assert names_of(crashed["prefix"]) == []
        assert leftover.wait(timeout=5) == -9
        assert netns.destroy_recorded(crashed) == []  # what is gone is fine

        taken = NetworkPlan.build(netns.plan_network(["x"]).prefix, lab.plan.subnet, ["x"])
        with pytest.raises(NetnsError, match=f"overlaps {lab.plan.subnet}"):
            taken.create()
        assert names_of(taken.prefix) == []
        assert lab.reach(None, REGIONS) == {"east": 200, "west": 200}
    finally:
        if leftover is not None and leftover.poll() is None:
            leftover.kill()
            leftover.wait()
        for record in records:
            netns.destroy_recorded(record)


def _pids(namespace: str) -> str:
    return subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout


def test_available_says_in_one_line_why_not(tmp_path: Path) -> None:
    """Not root, or no `nft` on the PATH: one line each (run in a child process as
    `nobody`, and with a PATH holding only `ip`)."""
    needs_namespaces()
    check = [sys.executable, "-c", "from xds_server.lab import netns; print(netns.available())"]
    nobody = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                             *check], capture_output=True, text=True, check=True)  # fmt: skip
    assert nobody.stdout == "network namespaces need root (running as uid 65534)\n"
    (tmp_path / "ip").symlink_to(subprocess.check_output(["which", "ip"], text=True).strip())
    no_nft = subprocess.run(check, capture_output=True, text=True, check=True,
                            env={**os.environ, "PATH": str(tmp_path)})  # fmt: skip
    assert no_nft.stdout.startswith("`nft` is not installed")
    assert no_nft.stdout.count("\n") == 1
