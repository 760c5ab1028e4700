"""The lab's own network (issue 29): a bridge, a namespace per region and one for the
operator's side, and partitions cut into it with nftables.

Why: every fault the lab injected was a process fault on one loopback network, but
regions fail by partition: a region cut off while everything in it keeps running, a
leader that reaches its Envoys but not etcd, a one-way link. A network namespace per
region, joined to the others by a veth pair on one bridge, makes those cuts real
without touching the machine's own network:

```
root namespace (the driver: `lab run`, the tests)   PREFIX-br   10.A.B.1/24
  |-- PREFIX-h0 === PREFIX-n0   in namespace PREFIX-REGION0     10.A.B.2
  |-- PREFIX-h1 === PREFIX-n1   in namespace PREFIX-REGION1     10.A.B.3
  '-- PREFIX-hN === PREFIX-nN   in namespace PREFIX-ops         10.A.B.N+2
```

- Every name derives from a lab-unique prefix (`xl` + 4 hex digits: interface names
  have 15 characters at most), so a crashed lab's leftovers are found from its prefix
  alone, and two labs never touch each other's. The /24 is one of 10.128.0.0/9 that no
  address or route of this machine overlaps (checked when planned, and again under a
  lock when created, so two labs created at once take different ones).
- A plan is pure until `create`: its `record()` goes into `lab.json` first, and
  `destroy_recorded` removes whatever of it exists after a crash (idempotent; it says
  what it removed).
- Cuts are stateless nftables drops in the cut namespace's own table (`inet xdslab`,
  at input and output): no connection-tracking state in them, so the packets of
  established connections drop too and TCP breaks both ways, as a pulled cable does.
  Drop, never reject: a partition is silence, not a reset.

Linux only, as root, with `ip` (iproute2) and `nft` (nftables): `available()` says in
one line why not. Traffic between namespaces crosses the bridge in the root namespace,
where a firewall of the machine's own (br_netfilter with a FORWARD drop policy, as
Docker sets) could drop it; this module never touches the root namespace's firewall.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from xds_server.lab.polling import wait_for

log = logging.getLogger(__name__)

OPS = "ops"
"""The operator's namespace: Prometheus and whatever stands for the operator's side."""
TABLE = "xdslab"
"""The lab's nftables table (family inet) in each of its namespaces."""
PREFIX = re.compile(r"xl[0-9a-f]{4}")
"""A lab's prefix: short (a link name is `PREFIX-h12`, within Linux's 15 characters) and
specific enough that a sweep by it never takes a name the lab did not make."""
KEY = re.compile(r"[a-z0-9]([-a-z0-9]{0,46}[a-z0-9])?")
"""A region's name as a namespace's key (the spec's regions are Kubernetes names)."""
POOL = ipaddress.IPv4Network("10.128.0.0/9")
"""Where a lab's /24 is drawn from."""
LOCK = Path("/run/xds-lab-netns.lock")
"""Held while a lab checks its names and /24 are free and takes them."""
COMMAND_TIMEOUT = 10.0
TRIES = 64
"""Random draws of a prefix and a /24 before planning gives up."""

_CHAINS = f"""table inet {TABLE} {{
  chain input {{ type filter hook input priority -10; policy accept; }}
  chain output {{ type filter hook output priority -10; policy accept; }}
}}
"""
_FLUSH = f"flush chain inet {TABLE} input\nflush chain inet {TABLE} output\n"


class NetnsError(Exception):
    """A namespace, link or rule that could not be made or removed: one line, naming
    the command and what it said."""


def _run(args: Sequence[str], stdin: str | None = None) -> str:
    """Run one command to completion: its stdout, or NetnsError with its stderr."""
    command = " ".join(args)
    try:
        done = subprocess.run(
            list(args),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"{command}: {exc}") from None
    if done.returncode != 0:
        said = "; ".join(line.strip() for line in done.stderr.splitlines() if line.strip())
        raise NetnsError(f"{command}: {said or f'exit status {done.returncode}'}")
    return done.stdout


def available() -> str | None:
    """None when this machine can run the lab in namespaces, else one line saying why
    not (the lab prints it and runs on loopback as before). Tries what `create` needs
    inside a throwaway namespace: a bridge, a veth pair and an nftables table."""
    if os.geteuid() != 0:
        return f"network namespaces need root (running as uid {os.geteuid()})"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (Debian's {package} package; `make setup`)"
    probe = f"xlprobe{os.getpid()}-{secrets.token_hex(2)}"
    try:
        _run(["ip", "netns", "add", probe])
    except NetnsError as exc:
        return f"cannot create a network namespace: {exc}"
    try:
        links = "link add b0 type bridge\nlink add v0 type veth peer name v1\n"
        _run(["ip", "-n", probe, "-batch", "-"], links)
        _run(["ip", "netns", "exec", probe, "nft", "-f", "-"], _CHAINS)
    except NetnsError as exc:
        return f"network namespaces without bridges, veths or nftables here: {exc}"
    finally:
        _quietly(["ip", "netns", "del", probe])
    return None


def _quietly(args: Sequence[str]) -> None:
    try:
        _run(args)
    except NetnsError as exc:
        log.warning("%s", exc)


@dataclass(frozen=True)
class Namespace:
    """One namespace of the lab's network and its end of the bridge."""

    key: str
    """The region's name, or `ops`."""
    name: str
    """The namespace's name (`ip netns`): PREFIX-KEY."""
    address: str
    """Its address on the bridge; processes in it bind here to be reached."""
    host_link: str
    """The veth end on the bridge, in the root namespace."""
    link: str
    """The veth end inside the namespace."""

    def exec_prefix(self) -> list[str]:
        """Prepended to a command to run it inside the namespace. `ip netns exec` execs
        the command, so a process started this way keeps its own pid (kill it by pid)."""
        return ["ip", "netns", "exec", self.name]


@dataclass(frozen=True)
class Change:
    """One cut or heal, as done: for the log, the audit and `summary.json`."""

    key: str
    namespace: str
    what: str
    at: float
    """Unix time the rules took effect."""
    seconds: float
    """How long applying them took."""

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class NetworkPlan:
    """The lab's network, planned: names and addresses, nothing made until `create`."""

    prefix: str
    subnet: str
    regions: tuple[str, ...]
    namespaces: tuple[Namespace, ...]

    @classmethod
    def build(cls, prefix: str, subnet: str, regions: Sequence[str]) -> NetworkPlan:
        """The layout a prefix, a /24 and the regions imply (the same every time, so a
        record rebuilds the plan it came from). NetnsError for a name or address that
        cannot be one."""
        if not PREFIX.fullmatch(prefix):
            raise NetnsError(f"prefix {prefix!r}: not xl + 4 hex digits")
        network = _network(subnet)
        _check_regions(regions)
        keys = [*regions, OPS]
        if network.num_addresses - 3 < len(keys):
            raise NetnsError(f"subnet {network}: too small for {len(keys)} namespaces")
        hosts = network.hosts()
        next(hosts)  # .1: the driver's, on the bridge
        namespaces = tuple(
            Namespace(key, f"{prefix}-{key}", str(next(hosts)), f"{prefix}-h{i}", f"{prefix}-n{i}")
            for i, key in enumerate(keys)
        )
        return cls(prefix, str(network), tuple(regions), namespaces)

    @classmethod
    def from_record(cls, record: Mapping[str, Any], where: str = "netns") -> NetworkPlan:
        """The plan a `record()` was written from; NetnsError naming `where`'s field."""
        regions = record.get("regions")
        if not isinstance(regions, list) or not all(isinstance(r, str) for r in regions):
            raise NetnsError(f"{where}.regions: not a list of region names")
        for field in ("prefix", "subnet"):
            if not isinstance(record.get(field), str):
                raise NetnsError(f"{where}.{field}: missing or not a string")
        try:
            return cls.build(record["prefix"], record["subnet"], regions)
        except NetnsError as exc:
            raise NetnsError(f"{where}: {exc}") from None

    @property
    def bridge(self) -> str:
        return f"{self.prefix}-br"

    @property
    def driver_address(self) -> str:
        """The root namespace's address on the bridge: the driver reaches every
        namespace from it, and `isolate` always keeps it."""
        return str(ipaddress.IPv4Network(self.subnet)[1])

    def namespace(self, key: str) -> Namespace:
        for ns in self.namespaces:
            if ns.key == key:
                return ns
        raise KeyError(f"no namespace {key!r} in the lab's network (regions and {OPS})")

    def address(self, key: str) -> str:
        return self.namespace(key).address

    def exec_prefix(self, key: str) -> list[str]:
        return self.namespace(key).exec_prefix()

    def links(self) -> list[str]:
        """The links made in the root namespace (the namespaces' ends go with them)."""
        return [self.bridge, *(ns.host_link for ns in self.namespaces)]

    def record(self) -> dict[str, Any]:
        """Everything `create` makes, as JSON, for `lab.json`: written before `create`,
        so `destroy_recorded` finds it all after a crash at any point."""
        return {
            "prefix": self.prefix,
            "subnet": self.subnet,
            "regions": list(self.regions),
            "driver_address": self.driver_address,
            "bridge": self.bridge,
            "namespaces": [asdict(ns) for ns in self.namespaces],
            "links": self.links(),
            "tables": [
                {"namespace": ns.name, "family": "inet", "name": TABLE} for ns in self.namespaces
            ],
        }

    def create(self) -> None:
        """Make the bridge, the namespaces (`lo` up in each), the veth pairs, the
        addresses and each namespace's empty table. Checks again, under a lock shared
        with other labs, that the names and the /24 are still free; on any failure
        removes what it made and raises NetnsError."""
        began = time.monotonic()
        with _lock():
            _check_free(self.prefix, ipaddress.IPv4Network(self.subnet))
            try:
                _run(["ip", "-batch", "-"], self._root_batch())
                for ns in self.namespaces:
                    _run(["ip", "-n", ns.name, "-batch", "-"], self._inside_batch(ns))
                    _run([*ns.exec_prefix(), "nft", "-f", "-"], _CHAINS)
            except NetnsError:
                destroy_recorded(self.record())
                raise
        log.info(
            "netns %s: %d namespaces on %s (%s: driver) in %.0f ms",
            self.prefix,
            len(self.namespaces),
            self.subnet,
            self.driver_address,
            (time.monotonic() - began) * 1000,
        )

    def _root_batch(self) -> str:
        length = ipaddress.IPv4Network(self.subnet).prefixlen
        lines = [f"netns add {ns.name}" for ns in self.namespaces]
        lines.append(f"link add {self.bridge} type bridge")
        for ns in self.namespaces:
            lines.append(f"link add {ns.host_link} type veth peer name {ns.link} netns {ns.name}")
            lines.append(f"link set {ns.host_link} master {self.bridge} up")
        lines.append(f"addr add {self.driver_address}/{length} dev {self.bridge}")
        lines.append(f"link set {self.bridge} up")
        return "\n".join(lines) + "\n"

    def _inside_batch(self, ns: Namespace) -> str:
        length = ipaddress.IPv4Network(self.subnet).prefixlen
        return (
            f"link set lo up\naddr add {ns.address}/{length} dev {ns.link}\nlink set {ns.link} up\n"
        )

    def destroy(self) -> list[str]:
        """Remove everything of this plan that exists; what was removed."""
        return destroy_recorded(self.record())

    # Cuts. Each is one `nft -f` inside the namespace cut (milliseconds), logged, and
    # adds to the cuts already there; `heal` removes them all.

    def cut(self, key: str, peers: Iterable[str]) -> Change:
        """Cut namespace `key` from `peers` (namespaces' keys or IPv4 addresses), both
        ways: nothing from them arrives, nothing to them leaves."""
        group = self._addresses(peers)
        rules = [
            f"add rule inet {TABLE} input ip saddr {group} drop",
            f"add rule inet {TABLE} output ip daddr {group} drop",
        ]
        return self._apply(key, rules, f"cut from {group}")

    def isolate(self, key: str, keep: Iterable[str] = ()) -> Change:
        """Cut namespace `key` from everything but the driver (and `keep`): a region cut
        off while the lab still watches it. Loopback inside the namespace stays up, and
        so does a process's traffic to its own namespace's address (it runs over `lo`)."""
        group = self._addresses([self.driver_address, *keep])
        rules = [
            f'add rule inet {TABLE} input iifname != "lo" ip saddr != {group} drop',
            f'add rule inet {TABLE} input iifname != "lo" meta nfproto ipv6 drop',
            f'add rule inet {TABLE} output oifname != "lo" ip daddr != {group} drop',
            f'add rule inet {TABLE} output oifname != "lo" meta nfproto ipv6 drop',
        ]
        return self._apply(key, rules, f"isolated (but for {group})")

    def drop_port(self, key: str, port: int, peers: Iterable[str]) -> Change:
        """Drop TCP port `port` of namespace `key` for `peers` only, both ways: the one
        side of an asymmetric link (a replica's Envoys cannot reach its xDS port; the
        replica still reaches etcd and everything else). A peer may be the namespace's
        own address: its own processes' connections to it run over `lo` and drop too."""
        if not 0 < port < 65536:
            raise NetnsError(f"port {port}: not a TCP port")
        group = self._addresses(peers)
        rules = [
            f"add rule inet {TABLE} input ip saddr {group} tcp dport {port} drop",
            f"add rule inet {TABLE} output ip daddr {group} tcp sport {port} drop",
        ]
        return self._apply(key, rules, f"port {port} dropped for {group}")

    def heal(self, key: str | None = None) -> list[Change]:
        """Remove the lab's rules from namespace `key` (every namespace when None)."""
        keys = [key] if key is not None else [ns.key for ns in self.namespaces]
        return [self._apply(k, [_FLUSH], "healed") for k in keys]

    def rules(self, key: str) -> str:
        """The namespace's table as nft lists it: what is cut there now."""
        return _run([*self.exec_prefix(key), "nft", "list", "table", "inet", TABLE])

    def _addresses(self, peers: Iterable[str]) -> str:
        """Keys or addresses -> an nftables anonymous set of addresses."""
        keys = {ns.key: ns.address for ns in self.namespaces}
        found: list[str] = []
        for peer in peers:
            if peer in keys:
                found.append(keys[peer])
                continue
            try:
                found.append(str(ipaddress.IPv4Address(peer)))
            except ValueError:
                raise NetnsError(
                    f"{peer!r}: neither a namespace of the lab nor an IPv4 address"
                ) from None
        if not found:
            raise NetnsError("no peers: a cut needs at least one address")
        return "{ " + ", ".join(dict.fromkeys(found)) + " }"

    def _apply(self, key: str, rules: Sequence[str], what: str) -> Change:
        ns = self.namespace(key)
        began = time.monotonic()
        _run([*ns.exec_prefix(), "nft", "-f", "-"], "\n".join(rules) + "\n")
        seconds = time.monotonic() - began
        log.info("netns %s: %s (%.0f ms)", ns.name, what, seconds * 1000)
        return Change(key, ns.name, what, time.time(), seconds)


def plan_network(regions: Sequence[str]) -> NetworkPlan:
    """A plan on a fresh prefix and a /24 of `POOL` that nothing on this machine uses
    (its addresses, its routes in every table, other labs' bridges)."""
    _check_regions(regions)
    taken = _lab_names()
    in_use = _networks_in_use()
    draw = secrets.SystemRandom()
    for _ in range(TRIES):
        prefix = f"xl{secrets.token_hex(2)}"
        index = draw.randrange(POOL.num_addresses // 256)
        subnet = ipaddress.IPv4Network((int(POOL.network_address) + index * 256, 24))
        if any(name.startswith(f"{prefix}-") for name in taken):
            continue
        if any(subnet.overlaps(net) for net in in_use):
            continue
        return NetworkPlan.build(prefix, str(subnet), regions)
    raise NetnsError(f"no free prefix and /24 of {POOL} in {TRIES} draws")


def destroy_recorded(record: Mapping[str, Any], where: str = "netns") -> list[str]:
    """Remove every namespace and link of the lab whose record this is, and whatever
    else carries its prefix (a crash in the middle of `create`): first the processes
    still in its namespaces (only the lab's run there), then the links (a veth pair goes
    whole, so nothing waits on the kernel's namespace cleanup), then the namespaces and
    their tables. Idempotent: what is already gone is skipped. Returns what it removed."""
    prefix = record.get("prefix")
    if not isinstance(prefix, str) or not PREFIX.fullmatch(prefix):
        raise NetnsError(f"{where}.prefix: {prefix!r} is not a lab's prefix")
    mine = f"{prefix}-"
    namespaces = [n for n in _existing_namespaces() if n.startswith(mine)]
    links = [n for n in _existing_links() if n.startswith(mine)]
    removed: list[str] = []
    for ns in namespaces:
        removed.extend(_kill_processes(ns))
    bridge = f"{prefix}-br"
    for link in sorted(links, key=lambda name: name == bridge):
        try:
            _run(["ip", "link", "del", link])
        except NetnsError:
            if link in _existing_links():
                raise
            continue  # gone meanwhile (its namespace's end went first)
        removed.append(f"link {link}")
    for ns in namespaces:
        _run(["ip", "netns", "del", ns])
        removed.append(f"netns {ns} (with its table inet {TABLE})")
    if removed:
        log.info("netns %s: removed %s", prefix, ", ".join(removed))
    return removed


def _kill_processes(namespace: str) -> list[str]:
    """SIGKILL what still runs in one of the lab's namespaces, and wait until it is gone
    (or a zombie): a process holds its namespace alive after its name is removed."""
    pids = [int(p) for p in _run(["ip", "netns", "pids", namespace]).split()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
    try:
        wait_for(
            lambda: not any(_running(pid) for pid in pids),
            f"processes {pids} in {namespace} to end",
            timeout=5.0,
        )
    except TimeoutError as exc:  # its name goes anyway; the namespace lives on with it
        log.warning("%s", exc)
    return [f"process {pid} in {namespace}" for pid in pids]


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _existing_namespaces() -> list[str]:
    listed = json.loads(_run(["ip", "-j", "netns", "list"]) or "[]")
    return [str(entry["name"]) for entry in listed]


def _existing_links() -> list[str]:
    return [str(entry["ifname"]) for entry in json.loads(_run(["ip", "-j", "link", "show"]))]


def _lab_names() -> list[str]:
    return [*_existing_namespaces(), *_existing_links()]


def _networks_in_use() -> list[ipaddress.IPv4Network]:
    """This machine's IPv4 networks: its addresses' and its routes' (every table)."""
    found: list[ipaddress.IPv4Network] = []
    for link in json.loads(_run(["ip", "-j", "-4", "addr", "show"])):
        for info in link.get("addr_info", []):
            interface = ipaddress.IPv4Interface(f"{info['local']}/{info['prefixlen']}")
            found.append(interface.network)
    for route in json.loads(_run(["ip", "-j", "-4", "route", "show", "table", "all"])):
        try:
            network = ipaddress.IPv4Network(route.get("dst", ""), strict=False)
        except ValueError:  # "default", and kinds of route without a network
            continue
        if network.prefixlen > 0:
            found.append(network)
    return found


def _check_free(prefix: str, subnet: ipaddress.IPv4Network) -> None:
    if any(name.startswith(f"{prefix}-") for name in _lab_names()):
        raise NetnsError(f"prefix {prefix}: names of it exist already (another lab?)")
    for net in _networks_in_use():
        if subnet.overlaps(net):
            raise NetnsError(f"{subnet} overlaps {net}, in use on this machine: plan again")


def _check_regions(regions: Sequence[str]) -> None:
    for region in regions:
        if not isinstance(region, str) or not KEY.fullmatch(region):
            raise NetnsError(f"region {region!r}: not a name for a namespace ([a-z0-9-])")
        if region == OPS:
            raise NetnsError(f"region {OPS!r}: the name of the operator's namespace")
    if len(set(regions)) != len(regions):
        raise NetnsError(f"regions {list(regions)}: a region twice")


def _network(subnet: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(subnet)
    except ValueError as exc:
        raise NetnsError(f"subnet {subnet!r}: {exc}") from None


@contextmanager
def _lock() -> Iterator[None]:
    """The machine-wide lock labs take to check and take names and a /24."""
    try:
        handle = LOCK.open("a")
    except OSError as exc:
        raise NetnsError(f"{LOCK}: {exc}") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
