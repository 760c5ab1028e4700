"""The shared registry on etcd: `xds-server register` and `registered(...)` put a model
server's address under `registry/SERVICE/REGION/VERSION/HOST:PORT` on a lease of its own,
and every replica adds the registered instances to the pools of their version
(`ha/instances.py`) and pushes them to its Envoys.

Real etcd (three members), real replicas (`xds-server serve --store` processes), real
Envoys, real `xds-server register` processes; `with_registered` is also tested as the pure
function it is (examples, then a property)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import event, given, settings
from hypothesis import strategies as st

from tests.support import wait_for
from tests.test_ha_replicas import CLI, Replica, start_replica, store_view
from xds_server.ha.etcd import async_client, parse_store_url
from xds_server.ha.instances import Instance, with_registered
from xds_server.ha.registry import RegistrationError, check_address, registered
from xds_server.ha.store import EtcdStore
from xds_server.lab.etcd import EtcdCluster
from xds_server.lab.procs import Envoy, Process, free_port, http_post_json
from xds_server.lab.upstream import ModelServer
from xds_server.render.bootstrap import BootstrapOptions
from xds_server.rollout.state import Phase, RegionState
from xds_server.spec import MeshSpec, validate_spec
from xds_server.traffic import Split, TrafficState

REGIONS = ("us-east", "eu-west")
SERVICE = "recommender"
CANARY, PRODUCTION = f"{SERVICE}|canary", f"{SERVICE}|production"


# ---- helpers ----


def mesh_doc(static: Mapping[str, str], rollout: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """recommender: production (v1) at one static address per region; canary (v2) lists
    no endpoints, so its hosts are the registry's v2 instances."""
    service: dict[str, Any] = {
        "name": SERVICE,
        "domains": ["*"],
        "prefix": "/",
        "pools": {
            "production": {"version": "v1", "endpoints": {r: [static[r]] for r in REGIONS}},
            "canary": {"version": "v2"},
        },
    }
    if rollout is not None:
        service["rollout"] = dict(rollout)
    return {"regions": list(REGIONS), "listener": {"port": 10000}, "services": [service]}


def push_spec(url: str, doc: dict[str, Any]) -> None:
    """Validate `doc` and store it as the mesh's spec (what `xds-server spec push` does)."""
    validate_spec(doc, "tests/test_registry.py")
    text = yaml.safe_dump(doc, sort_keys=False)

    async def push() -> None:
        address = parse_store_url(url)
        client = async_client(address, timeout=5)
        store = EtcdStore(address, client)
        try:
            await store.push_spec(text, "tests/test_registry.py")
        finally:
            store.close()
            await client.close()

    asyncio.run(push())


def addresses(store: EtcdStore, version: str | None = None, region: str | None = None) -> set[str]:
    """The registered addresses now (read from etcd, not from a watch)."""
    store.read()
    return {
        i.address
        for i in store.view.registry.values()
        if version in (None, i.version) and region in (None, i.region)
    }


def hosts(envoy: Envoy, cluster: str) -> set[str] | None:
    """The hosts Envoy has for a cluster (its admin /clusters); None: no such cluster."""
    for c in envoy.admin_get("/clusters?format=json").get("cluster_statuses", []):
        if c["name"] == cluster:
            return {
                f"{h['address']['socket_address']['address']}:"
                f"{h['address']['socket_address']['port_value']}"
                for h in c.get("host_statuses", [])
            }
    return None


def serves(envoy: Envoy, cluster: str, want: set[str]) -> Callable[[], bool]:
    """A check: does this Envoy have exactly `want` as the cluster's hosts?"""
    return lambda: hosts(envoy, cluster) == want


def has(envoy: Envoy, cluster: str, address: str) -> Callable[[], bool]:
    """A check: does this Envoy have `address` among the cluster's hosts?"""
    return lambda: address in (hosts(envoy, cluster) or ())


def first_times(
    checks: Mapping[str, Callable[[], bool]],
    timeout: float,
    what: str,
    running: Process | None = None,
) -> dict[str, float]:
    """Poll every check until all have held once; when each first held (monotonic).
    `running`: a process that must not exit meanwhile (its log tail says why it did)."""
    seen: dict[str, float] = {}

    def all_seen() -> bool:
        if running is not None and not running.alive():
            return True
        for name, check in checks.items():
            if name not in seen and check():
                seen[name] = time.monotonic()
        return len(seen) == len(checks)

    wait_for(all_seen, what, timeout=timeout, interval=0.01)
    if running is not None and not running.alive():
        raise AssertionError(f"{running.name} exited while waiting for {what}:\n{running.tail()}")
    return seen


def since(start: float, times: Mapping[str, float]) -> str:
    return ", ".join(f"{name} {t - start:.3f} s" for name, t in times.items())


def register_argv(url: str, version: str, region: str, address: str, *extra: str) -> list[str]:
    return [*CLI, "register", "--store", url, "--service", SERVICE, "--version", version,
            "--region", region, "--address", address, *extra]  # fmt: skip


@pytest.fixture
def procs() -> Iterator[list[Process]]:
    """Processes a test starts; stopped (SIGTERM, then SIGKILL) in reverse order."""
    started: list[Process] = []
    yield started
    for p in reversed(started):
        p.stop()


@pytest.fixture
def store(etcd_cluster: EtcdCluster) -> Iterator[EtcdStore]:
    """A reader of the store (one client for the whole test)."""
    reader = EtcdStore(parse_store_url(etcd_cluster.url))
    yield reader
    reader.close()


@pytest.fixture
def spec_pushed(etcd_cluster: EtcdCluster) -> str:
    """The store, holding the spec of `mesh_doc` (nothing listens at the static ports)."""
    push_spec(etcd_cluster.url, mesh_doc({r: f"127.0.0.1:{free_port()}" for r in REGIONS}))
    return etcd_cluster.url


# ---- registration reaches every replica's Envoys, and leaves them ----


@dataclass
class Mesh:
    url: str
    static: dict[str, str]
    """Production's static address per region."""
    envoys: dict[str, Envoy]
    """us-east on replica a ("a"), us-east on replica b ("b"), eu-west on b ("b-eu");
    each named (`Process.name`) envoy-REGION-KEY."""


@pytest.fixture
def mesh(tmp_path: Path, etcd_cluster: EtcdCluster, procs: list[Process]) -> Mesh:
    """Two replicas serving every region, an Envoy of us-east on each and one of eu-west.
    The rollout's first wave is eu-west, which has no canary host: it stays warming, so
    us-east's canary never gets weight here (a weighted pool that loses its last host
    keeps it: tested with the warm-up, and with `with_registered`)."""
    static = {r: f"127.0.0.1:{free_port()}" for r in REGIONS}
    waves = {"regions": {"waves": [["eu-west"], ["us-east"]]}}
    push_spec(etcd_cluster.url, mesh_doc(static, waves))
    replicas = {n: start_replica(tmp_path, etcd_cluster.url, n) for n in ("a", "b")}
    procs.extend(r.process for r in replicas.values())
    wait_for(
        lambda: set(store_view(etcd_cluster.url).view.replicas) == {"a", "b"},
        "both replicas in the store",
        timeout=20,
    )

    def envoy(name: str, region: str, replica: Replica) -> Envoy:
        opts = BootstrapOptions(
            region=region,
            node_id=f"{region}-{name}",
            xds_port=replica.xds,
            admin_port=free_port(),
            listen=f"127.0.0.1:{free_port()}",
        )
        started = Envoy(opts, tmp_path / "envoy")
        procs.append(started)
        return started

    envoys = {
        "a": envoy("a", "us-east", replicas["a"]),
        "b": envoy("b", "us-east", replicas["b"]),
        "b-eu": envoy("b-eu", "eu-west", replicas["b"]),
    }
    ready: dict[str, Callable[[], bool]] = {}
    for e in envoys.values():
        ready[f"{e.name} production"] = serves(e, PRODUCTION, {static[e.opts.region]})
        ready[f"{e.name} canary"] = serves(e, CANARY, set())
    first_times(ready, 20, "every Envoy serving the spec")
    return Mesh(etcd_cluster.url, static, envoys)


def test_a_registered_instance_reaches_every_replicas_envoys_and_sigterm_removes_it(
    tmp_path: Path, mesh: Mesh, store: EtcdStore, procs: list[Process]
) -> None:
    address = f"127.0.0.1:{free_port()}"
    east = [mesh.envoys["a"], mesh.envoys["b"]]
    launched = time.monotonic()
    proc = Process("register-canary", register_argv(mesh.url, "v2", "us-east", address),
                   tmp_path / "register-canary.log")  # fmt: skip
    procs.append(proc)
    checks: dict[str, Callable[[], bool]] = {
        "key in store": lambda: address in addresses(store),
        **{e.name: has(e, CANARY, address) for e in east},
    }
    seen = first_times(checks, 15, "the registered canary on every us-east Envoy", proc)
    key = seen.pop("key in store")
    print(
        f"\nregister: key in store {key - launched:.3f} s after launch; "
        f"then on the Envoys: {since(key, seen)}"
    )
    # The registry only adds to the region it names, and to the pool of its version.
    assert hosts(mesh.envoys["b-eu"], CANARY) == set()
    for e in east:
        assert hosts(e, PRODUCTION) == {mesh.static["us-east"]}
    (instance,) = store_view(mesh.url).view.registry.values()
    assert (instance.service, instance.version, instance.region, instance.address) == (
        SERVICE, "v2", "us-east", address,
    )  # fmt: skip
    assert instance.ttl == 10 and instance.lease != 0

    # SIGTERM: the lease is revoked at once (well before its 10 s TTL runs out).
    stopped = time.monotonic()
    proc.signal(signal.SIGTERM)
    checks = {
        "key gone": lambda: address not in addresses(store),
        **{e.name: serves(e, CANARY, set()) for e in east},
    }
    seen = first_times(checks, 5, "the canary gone from every us-east Envoy")
    print(f"register SIGTERMed: {since(stopped, seen)}")
    assert proc.proc.wait(5) == 0
    for e in east:
        assert hosts(e, PRODUCTION) == {mesh.static["us-east"]}


def test_a_pool_with_static_endpoints_also_gets_its_registered_instances_until_the_lease_expires(
    tmp_path: Path, mesh: Mesh, store: EtcdStore, procs: list[Process]
) -> None:
    """A v1 instance joins production's static host in us-east (the union), on every
    replica's Envoys; SIGKILLed, it leaves when its lease runs out."""
    address = f"127.0.0.1:{free_port()}"
    east = [mesh.envoys["a"], mesh.envoys["b"]]
    union = {mesh.static["us-east"], address}
    proc = Process("register-v1", register_argv(mesh.url, "v1", "us-east", address, "--ttl", "2s"),
                   tmp_path / "register-v1.log")  # fmt: skip
    procs.append(proc)
    checks: dict[str, Callable[[], bool]] = {e.name: serves(e, PRODUCTION, union) for e in east}
    first_times(checks, 15, "production's static host and the registered one on every Envoy", proc)
    # Not the canary's (another version), not eu-west's (another region).
    for e in east:
        assert hosts(e, CANARY) == set()
    assert hosts(mesh.envoys["b-eu"], PRODUCTION) == {mesh.static["eu-west"]}
    assert hosts(mesh.envoys["b-eu"], CANARY) == set()

    # SIGKILL: nothing revokes the lease; etcd lets it run out after its TTL (2 s).
    killed = time.monotonic()
    proc.kill()
    checks = {
        "key gone": lambda: address not in addresses(store),
        **{e.name: serves(e, PRODUCTION, {mesh.static["us-east"]}) for e in east},
    }
    seen = first_times(checks, 10, "the SIGKILLed instance gone from every Envoy")
    print(f"\nregister SIGKILLed (ttl 2 s): {since(killed, seen)}")


# ---- the Python API, the health URL, bad input ----


def test_registered_holds_the_instance_in_the_store_for_the_block_and_no_longer(
    spec_pushed: str, store: EtcdStore
) -> None:
    address = f"127.0.0.1:{free_port()}"
    during: list[Instance] = []

    async def run() -> None:
        async with registered(spec_pushed, SERVICE, "v2", "us-east", address, ttl=3) as reg:
            # In the store when the block starts: nothing to wait for.
            assert reg.registered.is_set()
            during.extend(store_view(spec_pushed).view.registry.values())
        assert not reg.registered.is_set()
        # Gone as soon as the block has ended (the lease is revoked, not left to expire).
        assert address not in addresses(store)
        # An exception leaving the block deregisters too.
        with pytest.raises(RuntimeError, match="the model server crashed"):
            async with registered(spec_pushed, SERVICE, "v1", "eu-west", address, ttl=3):
                assert address in addresses(store, "v1", "eu-west")
                raise RuntimeError("the model server crashed")
        assert address not in addresses(store)

    asyncio.run(run())
    (instance,) = during
    assert (instance.service, instance.version, instance.region, instance.address) == (
        SERVICE, "v2", "us-east", address,
    )  # fmt: skip
    assert instance.ttl == 3 and instance.lease != 0


def test_with_a_health_url_it_is_registered_only_while_the_url_answers_2xx(
    tmp_path: Path, spec_pushed: str, store: EtcdStore, procs: list[Process]
) -> None:
    upstream = ModelServer(("127.0.0.1", 0), "us-east", "canary", "v2").start_in_thread()
    try:
        address = f"127.0.0.1:{upstream.port}"
        argv = register_argv(spec_pushed, "v2", "us-east", address, "--ttl", "2s",
                             "--health-url", f"http://{address}/healthz")  # fmt: skip
        proc = Process("register-health", argv, tmp_path / "register-health.log")
        procs.append(proc)
        present: dict[str, Callable[[], bool]] = {"key": lambda: address in addresses(store)}
        absent: dict[str, Callable[[], bool]] = {"key": lambda: address not in addresses(store)}
        first_times(present, 15, "the healthy instance registered", proc)

        turned = time.monotonic()
        http_post_json(f"http://{address}/fault", {"healthy": False})
        gone = first_times(absent, 10, "the unhealthy instance's key gone", proc)["key"]
        http_post_json(f"http://{address}/fault", {"healthy": True})
        back_at = time.monotonic()
        back = first_times(present, 10, "the instance registered again", proc)["key"]
        print(
            f"\nhealth URL (ttl 2 s, checked every 0.67 s): 503 -> key gone in "
            f"{gone - turned:.3f} s; 200 again -> key back in {back - back_at:.3f} s"
        )
        proc.signal(signal.SIGTERM)
        assert proc.proc.wait(5) == 0
        assert address not in addresses(store)
    finally:
        upstream.shutdown()
        upstream.server_close()


def test_bad_input_exits_2_with_one_line_and_no_traceback(spec_pushed: str) -> None:
    good = {"--store": spec_pushed, "--service": SERVICE, "--version": "v2",
            "--region": "us-east", "--address": f"127.0.0.1:{free_port()}"}  # fmt: skip
    unreachable = f"etcd://127.0.0.1:{free_port()}"
    cases: dict[str, tuple[dict[str, str], str]] = {
        "unknown region": ({"--region": "mars"}, "--region 'mars': not in the spec"),
        "unknown service": ({"--service": "nosuch"}, "--service 'nosuch': not in the spec"),
        "host not an IP": ({"--address": "localhost:8080"}, "must be an IP address"),
        "no port": ({"--address": "127.0.0.1"}, "--address '127.0.0.1'"),
        "port out of range": ({"--address": "127.0.0.1:70000"}, "--address '127.0.0.1:70000'"),
        "no store there": ({"--store": unreachable}, "cannot reach the store"),
        "not a store URL": ({"--store": "http://127.0.0.1:2379"}, "--store"),
        "no spec under the prefix": ({"--store-prefix": "/elsewhere"}, "holds no spec"),
        "ttl not a duration": ({"--ttl": "soon"}, "--ttl"),
        "ttl too short": ({"--ttl": "1s"}, "--ttl"),
        "ttl negative": ({"--ttl": "-5s"}, "--ttl"),
        "health URL not http": ({"--health-url": "ftp://127.0.0.1/"}, "--health-url"),
    }
    started = time.monotonic()
    running = {
        name: subprocess.Popen(
            [*CLI, "register", *(f"{k}={v}" for k, v in {**good, **over}.items())],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (over, _) in cases.items()
    }
    problems = []
    for name, proc in running.items():
        _, err = proc.communicate(timeout=30)
        lines = err.splitlines()
        want = cases[name][1]
        if (
            proc.returncode != 2
            or len(lines) != 1
            or "Traceback" in err
            or not lines[0].startswith("xds-server: ")
            or want not in lines[0]
        ):
            problems.append(f"{name}: exit {proc.returncode}, stderr {err!r}, want {want!r}")
        else:
            print(f"\n{name}: {lines[0]}", end="")
    print(f"\n(all {len(cases)} in {time.monotonic() - started:.2f} s)")
    assert not problems, "\n".join(problems)


def test_registered_refuses_bad_input_with_one_line_registration_errors(spec_pushed: str) -> None:
    """What the command refuses, the Python API refuses too, before registering."""
    for bad in ("localhost:8080", "127.0.0.1", "127.0.0.1:0", ""):
        with pytest.raises(RegistrationError, match="--address"):
            check_address(bad)
    assert check_address("127.0.0.1:8080") == "127.0.0.1:8080"
    address = f"127.0.0.1:{free_port()}"

    async def refused(store: str, region: str = "us-east", **kw: Any) -> str:
        service = kw.pop("service", SERVICE)
        with pytest.raises(RegistrationError) as raised:
            async with registered(store, service, "v2", region, address, **kw):
                pass
        message = str(raised.value)
        assert "\n" not in message
        return message

    assert "--region 'mars': not in the spec" in asyncio.run(refused(spec_pushed, "mars"))
    assert "--service 'nosuch'" in asyncio.run(refused(spec_pushed, service="nosuch"))
    unreachable = f"etcd://127.0.0.1:{free_port()}"
    assert "cannot reach the store" in asyncio.run(refused(unreachable))
    assert "holds no spec" in asyncio.run(refused(spec_pushed, prefix="/elsewhere"))
    # A TTL of 0 or less would renew the lease in a busy loop (sleeping ttl/3 between
    # renewals), and a health URL that is no http(s) URL would never answer 2xx.
    for ttl in (0.0, -1.0):
        assert "ttl" in asyncio.run(refused(spec_pushed, ttl=ttl)).lower()
    assert "health" in asyncio.run(refused(spec_pushed, ttl=3, health_url="not a url")).lower()


# ---- the rollout waits for a registered host ----


def test_warm_up_waits_for_a_registered_canary_host_and_a_step_that_loses_it_holds(
    tmp_path: Path, etcd_cluster: EtcdCluster, store: EtcdStore, procs: list[Process]
) -> None:
    """No Prometheus and no health check: the only thing warm-up waits for is a
    registered canary host. Lockstep over both regions: us-east, once it has one, is warm
    and waits for eu-west, which has none. With one in each, the wave takes its first
    step; when us-east's goes, its Envoys keep it (held) and the step holds."""
    url = etcd_cluster.url
    static = {r: f"127.0.0.1:{free_port()}" for r in REGIONS}
    push_spec(url, mesh_doc(static, {"interval": "1s"}))
    replica = start_replica(tmp_path, url, "solo")
    procs.append(replica.process)
    opts = BootstrapOptions(
        region="us-east",
        node_id="envoy-east",
        xds_port=replica.xds,
        admin_port=free_port(),
        listen=f"127.0.0.1:{free_port()}",
    )
    envoy = Envoy(opts, tmp_path / "envoy")
    procs.append(envoy)

    def regions() -> dict[str, RegionState]:
        store.read()
        rollouts = store.load_rollouts()
        return dict(rollouts[0].regions) if rollouts else {}

    def waiting(region: str) -> bool:
        rs = regions().get(region)
        return (
            rs is not None and rs.warming and f"canary: no registered host in {region}" in rs.reason
        )

    wait_for(
        lambda: all(waiting(r) for r in REGIONS), "both regions waiting for a host", timeout=20
    )
    east, west = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    proc = Process("register-east", register_argv(url, "v2", "us-east", east),
                   tmp_path / "register-east.log")  # fmt: skip
    procs.append(proc)
    first_times({"key": lambda: east in addresses(store)}, 15, "the canary registered", proc)
    registered_at = time.monotonic()

    def east_warm() -> bool:
        rs = regions()["us-east"]
        return bool(rs.warming and rs.step_passed and "no registered host" not in rs.reason)

    first_times({"warm": east_warm}, 10, "us-east's warm-up passed", proc)
    print(f"\nus-east warm {time.monotonic() - registered_at:.3f} s after its canary registered")
    assert regions()["us-east"].phase == Phase.WARMING  # (waiting for the rest of its wave)
    assert waiting("eu-west")
    # Its Envoy gets the host (the warm-up judged the served spec; EDS follows it).
    wait_for(serves(envoy, CANARY, {east}), "the canary host in us-east's Envoy", timeout=10)
    assert regions()["us-east"].phase == Phase.WARMING  # (hosts, but no weight yet)

    # eu-west's canary: the wave takes its first step.
    argv = register_argv(url, "v2", "eu-west", west)
    procs.append(Process("register-west", argv, tmp_path / "register-west.log"))

    def at_first_step() -> bool:
        now = regions()
        return all(now[r].phase == Phase.PROGRESSING and now[r].step == 0 for r in REGIONS)

    wait_for(at_first_step, "both regions at their first step", timeout=15)

    # us-east's only canary host deregisters while the canary takes 5% there: its Envoys
    # keep the host (a pool emptied while weighted is held), and the step holds.
    proc.signal(signal.SIGTERM)
    assert proc.proc.wait(5) == 0
    assert east not in addresses(store)

    def holding() -> bool:
        store.read()
        return any("no host left in us-east" in e.reason for e in store.audit(region="us-east"))

    wait_for(holding, "us-east's step holding for want of a canary host", timeout=10)
    assert hosts(envoy, CANARY) == {east}
    now = regions()
    assert now["us-east"].phase == Phase.PROGRESSING and now["us-east"].step == 0
    assert now["us-east"].hold_since is not None


# ---- with_registered, pure ----


def unit_spec(canary_static: Mapping[str, list[str]] | None = None) -> MeshSpec:
    """production v1 static (10.0.0.1:80 in us-east, 10.0.0.2:80 in eu-west), baseline
    v1 and canary v2 from the registry (or the canary static too)."""
    doc = mesh_doc({"us-east": "10.0.0.1:80", "eu-west": "10.0.0.2:80"})
    pools = doc["services"][0]["pools"]
    pools["baseline"] = {"version": "v1"}
    if canary_static is not None:
        pools["canary"]["endpoints"] = dict(canary_static)
    return validate_spec(doc, "unit")


def inst(
    address: str,
    version: str = "v2",
    region: str = "us-east",
    service: str = SERVICE,
    revision: int = 1,
    pool: str = "",
) -> Instance:
    return Instance(service, version, region, address, 0.0, 10.0, 7, revision, pool)


def eps(spec: MeshSpec, pool: str, region: str) -> list[str]:
    return [str(e) for e in spec.service(SERVICE).pools[pool].endpoints.get(region, ())]


def weighted(region: str, split: Split) -> TrafficState:
    return TrafficState({(SERVICE, region): split})


def test_with_registered_a_weighted_pool_left_empty_keeps_its_hosts_and_is_held() -> None:
    spec = unit_spec()
    before = with_registered(spec, [inst("10.1.0.1:80"), inst("10.1.0.2:80", revision=2)])
    assert eps(before.spec, "canary", "us-east") == ["10.1.0.1:80", "10.1.0.2:80"]
    at_5 = weighted("us-east", Split.at_canary_percent(5, has_baseline=True))
    after = with_registered(spec, [], before.spec, at_5)
    key = ("us-east", SERVICE, "canary")
    assert eps(after.spec, "canary", "us-east") == ["10.1.0.1:80", "10.1.0.2:80"]
    assert key in after.held and after.live[key] == 0
    # Held again on the next update (from what was served, the held hosts).
    again = with_registered(spec, [], after.spec, at_5)
    assert eps(again.spec, "canary", "us-east") == ["10.1.0.1:80", "10.1.0.2:80"]
    assert key in again.held
    # Mirrored traffic counts: a shadowing canary is held too.
    shadowing = weighted("us-east", Split(shadow=500))
    assert key in with_registered(spec, [], before.spec, shadowing).held
    # A new instance ends the hold: the pool is what is registered, not the union.
    back = with_registered(spec, [inst("10.1.0.9:80")], after.spec, at_5)
    assert eps(back.spec, "canary", "us-east") == ["10.1.0.9:80"] and not back.held


def test_with_registered_an_unweighted_pool_left_empty_is_emptied() -> None:
    spec = unit_spec()
    before = with_registered(spec, [inst("10.1.0.1:80")])
    for traffic in (None, TrafficState(), weighted("eu-west", Split.at_canary_percent(5, True))):
        after = with_registered(spec, [], before.spec, traffic)
        assert eps(after.spec, "canary", "us-east") == []
        assert not after.held and after.live[("us-east", SERVICE, "canary")] == 0


def test_with_registered_counts_live_hosts_and_unions_static_with_registered() -> None:
    spec = unit_spec()
    served = with_registered(
        spec,
        [
            inst("10.1.0.2:80", "v1", revision=5),  # production's version: production, baseline
            inst("10.1.0.1:80", "v1", revision=3),
            inst("10.0.0.1:80", "v1", revision=4),  # production's static host, registered too
            inst("10.1.0.3:80", revision=6),
            inst("10.1.0.4:80", "v1", pool="baseline", revision=7),  # baseline only
        ],
    )
    # Static first, then registered in registration order; no duplicates.
    assert eps(served.spec, "production", "us-east") == [
        "10.0.0.1:80",
        "10.1.0.1:80",
        "10.1.0.2:80",
    ]
    assert eps(served.spec, "baseline", "us-east") == [
        "10.1.0.1:80", "10.0.0.1:80", "10.1.0.2:80", "10.1.0.4:80",
    ]  # fmt: skip
    assert eps(served.spec, "canary", "us-east") == ["10.1.0.3:80"]
    assert eps(served.spec, "production", "eu-west") == ["10.0.0.2:80"]
    assert served.live == {
        ("us-east", SERVICE, "production"): 3,
        ("us-east", SERVICE, "baseline"): 4,
        ("us-east", SERVICE, "canary"): 1,
        ("eu-west", SERVICE, "production"): 1,
        ("eu-west", SERVICE, "baseline"): 0,
        ("eu-west", SERVICE, "canary"): 0,
    }
    # A canary with static endpoints gets its registered ones as well.
    mixed = with_registered(
        unit_spec({"us-east": ["10.2.0.1:80"], "eu-west": ["10.2.0.2:80"]}),
        [inst("10.1.0.3:80")],
    )
    assert eps(mixed.spec, "canary", "us-east") == ["10.2.0.1:80", "10.1.0.3:80"]
    assert eps(mixed.spec, "canary", "eu-west") == ["10.2.0.2:80"]


def test_with_registered_selects_nothing_of_another_version_region_or_service() -> None:
    spec = unit_spec()
    strangers = [
        inst("10.9.0.1:80", "v3"),  # no pool has v3
        inst("10.9.0.2:80", "v2", "ap-south"),  # a region the spec lacks
        inst("10.9.0.3:80", "v2", service="ranker"),  # a service the spec lacks
        inst("10.9.0.4:80", "v2", "eu-west"),  # eu-west's canary, not us-east's
    ]
    served = with_registered(spec, strangers)
    assert eps(served.spec, "canary", "us-east") == []
    assert eps(served.spec, "canary", "eu-west") == ["10.9.0.4:80"]
    assert eps(served.spec, "production", "us-east") == ["10.0.0.1:80"]
    assert eps(served.spec, "baseline", "us-east") == []
    assert served.spec.regions == spec.regions
    assert [s.name for s in served.spec.services] == [SERVICE]


def registry_key(i: Instance) -> tuple[str, str, str, str]:
    return i.service, i.region, i.version, i.address


ADDRESSES = st.sampled_from([f"10.0.0.{h}:{p}" for h in (1, 2, 3) for p in (80, 81)])
POOLS = ("production", "baseline", "canary")

INSTANCE = st.builds(
    Instance,
    service=st.sampled_from([SERVICE, "ranker"]),
    version=st.sampled_from(["v1", "v2", "v3", "v4"]),
    region=st.sampled_from([*REGIONS, "ap-south"]),
    address=ADDRESSES,
    registered_at=st.just(0.0),
    ttl=st.just(10.0),
    lease=st.just(0),
    revision=st.integers(0, 50),
    pool=st.sampled_from(["", *POOLS]),
)
MATCHING = st.builds(
    Instance,
    service=st.just(SERVICE),
    version=st.sampled_from(["v1", "v2", "v3"]),
    region=st.sampled_from(REGIONS),
    address=ADDRESSES,
    registered_at=st.just(0.0),
    ttl=st.just(10.0),
)
"""Instances some pool selects (what the previous update served)."""


@st.composite
def mesh_and_instances(
    draw: st.DrawFn,
) -> tuple[MeshSpec, list[Instance], MeshSpec, TrafficState]:
    static: dict[str, dict[str, list[str]] | None] = {}
    versions = {p: draw(st.sampled_from(["v1", "v2", "v3"])) for p in POOLS}
    for p in POOLS:
        listed = p == "production" or draw(st.booleans())
        static[p] = (
            {r: draw(st.lists(ADDRESSES, min_size=1, max_size=3, unique=True)) for r in REGIONS}
            if listed
            else None
        )
    doc = mesh_doc({r: "10.0.0.1:80" for r in REGIONS})
    doc["services"][0]["pools"] = {
        p: {"version": versions[p], **({"endpoints": static[p]} if static[p] else {})}
        for p in POOLS
    }
    spec = validate_spec(doc, "property")
    # (one instance per key: registry/SERVICE/REGION/VERSION/HOST:PORT)
    instances = draw(st.lists(INSTANCE, max_size=8, unique_by=registry_key))
    previous = with_registered(
        spec, draw(st.lists(MATCHING, max_size=6, unique_by=registry_key))
    ).spec
    split = st.sampled_from(
        [Split(), Split.at_canary_percent(5, True), Split(shadow=100), Split(0, 5000, 5000)]
    )
    traffic = TrafficState({(SERVICE, r): draw(split) for r in REGIONS})
    return spec, instances, previous, traffic


@settings(max_examples=150, deadline=None)
@given(mesh_and_instances())
def test_with_registered_serves_static_union_matching_registered(
    case: tuple[MeshSpec, list[Instance], MeshSpec, TrafficState],
) -> None:
    spec, instances, previous, traffic = case
    served = with_registered(spec, instances, previous, traffic)
    assert served.spec.regions == spec.regions
    for name, pool in spec.service(SERVICE).pools.items():
        got_pool = served.spec.service(SERVICE).pools[name]
        assert got_pool.version == pool.version
        for region in spec.regions:
            key = (region, SERVICE, name)
            static = list(pool.endpoints.get(region, ()))
            matching = [
                i.endpoint
                for i in instances
                if (i.service, i.region, i.version) == (SERVICE, region, pool.version)
                and i.pool in ("", name)
            ]
            want = set(static) | set(matching)
            got = list(got_pool.endpoints.get(region, ()))
            assert len(got) == len(set(got)), f"{key}: a host twice: {got}"
            assert served.live[key] == len(want)
            split = traffic.split(SERVICE, region)
            takes_traffic = split.get(name) > 0 or (name != "production" and split.shadow > 0)
            kept = list(previous.service(SERVICE).pools[name].endpoints.get(region, ()))
            if not want and takes_traffic and kept:
                # Emptied while it takes traffic: the hosts it had, nothing of anyone else's.
                event("a held pool")
                assert key in served.held and got == kept
            else:
                assert key not in served.held
                assert set(got) == want
                assert got[: len(static)] == static  # static first, as the spec lists them
