"""The `istio` output mode: server-side applies through the real `kubernetes` client.

The API servers are FakeKubeApiServer (tests/fake_kube.py): no real one can run on this
build machine. Everything else is real: the client, kubeconfig contexts, the applier's
workers and threads, the controller, the store, the telemetry registry and, in the last
test, `xds-server serve` and `xdsctl` as processes.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from tests.conftest import make_spec_doc
from tests.fake_kube import FakeKubeApiServer, write_kubeconfig
from tests.support import wait_for, wait_for_async
from xds_server.lab.procs import Process, free_port, http_get
from xds_server.outputs.istio_apply import IstioApplier, IstioMetrics, IstioSink, KubeCluster
from xds_server.render import istio
from xds_server.rollout import decide as sm
from xds_server.rollout.controller import RolloutController
from xds_server.rollout.metrics import PrometheusSource
from xds_server.rollout.store import Store
from xds_server.spec import IstioCluster, IstioConfig, MeshSpec, validate_spec
from xds_server.xds.publisher import XdsPublisher

REGIONS = ("us-east", "eu-west", "ap-south")
PORTS = {(r, p): 9000 + i for i, (r, p) in enumerate((r, p) for r in REGIONS for p in "pbc")}
CLI = [sys.executable, "-m", "xds_server.cli"]
CTL = [sys.executable, "-m", "xds_server.ctl"]


@pytest.fixture
def fakes() -> Iterator[dict[str, FakeKubeApiServer]]:
    """One fake API server per region, each with its own token."""
    servers = {r: FakeKubeApiServer(token=f"token-{r}").start() for r in REGIONS}
    yield servers
    for s in servers.values():
        s.close()


def spec_doc(kubeconfig: Path, apply: bool = True) -> dict[str, Any]:
    ports = {(r, pool): PORTS[(r, pool[0])] for r in REGIONS for pool in sm_pools()}
    doc = make_spec_doc(ports, pools=sm_pools())
    doc["rollout"] = {"steps": [10, 50, 100]}
    doc["istio"] = {
        "namespace": "models",
        "apply": apply,
        "retry": {"initial": "20ms", "max": "80ms"},
        "timeout": "5s",
        "regions": {r: {"context": f"ctx-{r}", "kubeconfig": str(kubeconfig)} for r in REGIONS},
    }
    return doc


def sm_pools() -> tuple[str, ...]:
    return ("production", "baseline", "canary")


@pytest.fixture
def spec(tmp_path: Path, fakes: dict[str, FakeKubeApiServer]) -> MeshSpec:
    kubeconfig = write_kubeconfig(
        tmp_path / "kubeconfig", {f"ctx-{r}": s for r, s in fakes.items()}
    )
    return validate_spec(spec_doc(kubeconfig), str(tmp_path / "mesh.yaml"))


def istio_cfg(spec: MeshSpec) -> IstioConfig:
    assert spec.istio is not None
    return spec.istio


@asynccontextmanager
async def running(applier: IstioApplier) -> AsyncIterator[IstioApplier]:
    task = asyncio.create_task(applier.run())
    try:
        yield applier
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def vs_weights(fake: FakeKubeApiServer, region: str) -> dict[str, int] | None:
    vs = fake.get("virtualservices", "models", f"recommender-{region}")
    return istio.route_weights(vs) if vs else None


def desired(spec: MeshSpec, rollouts: dict[str, Any] | None = None) -> dict[str, Any]:
    return {r: istio.region_objects(spec, r, rollouts or {}) for r in spec.regions}


def test_applies_are_server_side_applies_with_our_field_manager(
    spec: MeshSpec, fakes: dict[str, FakeKubeApiServer]
) -> None:
    async def main() -> None:
        applier = IstioApplier(istio_cfg(spec))
        async with running(applier):
            applier.update(desired(spec))
            await wait_for_async(
                lambda: not any(s.pending for s in applier.status()), "every region"
            )

    asyncio.run(main())
    for region, fake in fakes.items():
        patches = fake.patches()
        assert [p.path for p in patches] == [
            f"/apis/networking.istio.io/v1/namespaces/models/destinationrules/recommender-{region}",
            f"/apis/networking.istio.io/v1/namespaces/models/virtualservices/recommender-{region}",
        ]
        for p, obj in zip(patches, istio.region_objects(spec, region, {}), strict=True):
            assert p.headers["content-type"] == "application/apply-patch+yaml"
            assert p.query == {"fieldManager": ["xds-server"], "force": ["true"]}
            assert p.headers["authorization"] == f"Bearer token-{region}"  # its own context
            assert yaml.safe_load(p.body) == obj
        stored = fake.get("virtualservices", "models", f"recommender-{region}")
        assert stored is not None
        assert stored["metadata"]["labels"]["xds-server/region"] == region
        assert stored["metadata"]["managedFields"][0]["manager"] == "xds-server"
        assert vs_weights(fake, region) == {"production": 100, "baseline": 0, "canary": 0}


OURS = {
    "app.kubernetes.io/managed-by": "xds-server",
    "xds-server/instance": "default",
    "xds-server/region": "us-east",
}
NOT_OURS = (
    ("models", "by-hand"),
    ("models", "old-eu-west"),
    ("models", "other-instance"),
    ("other", "old-us-east"),
)


def plant_leftovers(fake: FakeKubeApiServer) -> FakeKubeApiServer:
    for plural in ("virtualservices", "destinationrules"):
        fake.put(plural, "models", "old-us-east", OURS)
        fake.put(plural, "models", "by-hand", {"team": "search"})
        fake.put(plural, "models", "old-eu-west", {**OURS, "xds-server/region": "eu-west"})
        fake.put(plural, "models", "other-instance", {**OURS, "xds-server/instance": "b"})
        fake.put(plural, "other", "old-us-east", OURS)
    return fake


def leftovers(fake: FakeKubeApiServer) -> list[str]:
    return sorted(p for (p, ns, name) in fake.objects if (ns, name) == ("models", "old-us-east"))


def test_objects_of_a_service_gone_from_the_spec_are_deleted_and_nothing_else(
    spec: MeshSpec, fakes: dict[str, FakeKubeApiServer]
) -> None:
    """`old` was applied by an earlier xds-server for a service since removed from the
    spec; the others are not ours to delete: made by hand, for another region sharing
    the cluster, by another xds-server instance, or in another namespace."""
    fake = plant_leftovers(fakes["us-east"])

    async def main() -> None:
        applier = IstioApplier(istio_cfg(spec))
        async with running(applier):
            applier.update(desired(spec))
            await wait_for_async(lambda: not leftovers(fake), "the leftovers deleted")

    asyncio.run(main())
    assert sorted(fake.objects) == sorted(
        (plural, ns, name)
        for plural in ("virtualservices", "destinationrules")
        for ns, name in (("models", "recommender-us-east"), *NOT_OURS)
    )
    # Make before break: the wanted objects were applied before anything was deleted,
    # and the route went before the subsets it named.
    calls = [(r.method, r.path.rsplit("/", 2)[-2]) for r in fake.requests if r.method != "GET"]
    assert calls == [
        ("PATCH", "destinationrules"),
        ("PATCH", "virtualservices"),
        ("DELETE", "virtualservices"),
        ("DELETE", "destinationrules"),
    ]


def test_a_failed_prune_holds_up_no_apply_and_is_tried_again_with_the_next(
    spec: MeshSpec, fakes: dict[str, FakeKubeApiServer]
) -> None:
    """A Role without `list` (say, kept from an older release) must not turn every apply,
    rollbacks included, into a failure with backoff."""
    fake = plant_leftovers(fakes["us-east"])
    fake.fail_next(1, 403, "virtualservices is forbidden: cannot list", lists=True)
    registry = CollectorRegistry()
    metrics = IstioMetrics(registry)

    async def main() -> None:
        applier = IstioApplier(istio_cfg(spec))
        metrics.attach(applier)
        async with running(applier):
            applier.update(desired(spec))
            st = await wait_for_async(
                lambda: (s := applier.region_status("us-east")).prune_error and s, "prune error"
            )
            assert not st.pending and st.consecutive_failures == 0 and st.last_error == ""
            assert st.prune_error.startswith("listing VirtualServices in models: HTTP 403")
            assert leftovers(fake) == ["destinationrules", "virtualservices"]
            # The next change (a step of a rollout) is applied, and the prune done with it.
            state = sm.start(spec.services[0].rollout, "recommender", "v2", spec.regions, 0)
            applier.update(desired(spec, {"recommender": state.state}))
            await wait_for_async(lambda: not leftovers(fake), "the leftovers deleted")
            await wait_for_async(
                lambda: not applier.region_status("us-east").prune_error, "cleared"
            )

    asyncio.run(main())
    labels = {"region": "us-east", "result": "prune_failure"}
    assert registry.get_sample_value("xds_istio_apply_total", labels) == 1


@pytest.mark.parametrize("why", ["prune: false", "nothing wanted"])
def test_nothing_is_deleted_when_pruning_is_off_or_nothing_is_wanted(
    spec: MeshSpec, fakes: dict[str, FakeKubeApiServer], why: str
) -> None:
    """An empty set is more likely a spec read half-written than a wish to unroute every
    service; and an operator who grants no `delete` turns pruning off."""
    fake = plant_leftovers(fakes["us-east"])
    cfg = istio_cfg(spec)
    wanted = desired(spec)
    if why == "prune: false":
        cfg = replace(cfg, prune=False)
    else:
        wanted["us-east"] = []

    async def main() -> None:
        applier = IstioApplier(cfg)
        async with running(applier):
            applier.update(wanted)
            await wait_for_async(
                lambda: applier.region_status("us-east").applied_generation, "applied"
            )

    asyncio.run(main())
    assert leftovers(fake) == ["destinationrules", "virtualservices"]
    assert all(r.method != "DELETE" for r in fake.requests)


def test_newer_objects_do_not_wait_out_the_backoff_of_a_failed_apply(
    spec: MeshSpec, fakes: dict[str, FakeKubeApiServer]
) -> None:
    """The backoff spares a struggling API server retries of the same objects; a rollback
    decided meanwhile is tried at once."""
    fakes["us-east"].fail_next(1)
    cfg = replace(istio_cfg(spec), retry_initial=60, retry_max=60)

    async def main() -> None:
        applier = IstioApplier(cfg)
        async with running(applier):
            applier.update(desired(spec))
            await wait_for_async(
                lambda: applier.region_status("us-east").consecutive_failures, "a failure"
            )
            state = sm.start(spec.services[0].rollout, "recommender", "v2", spec.regions, 0)
            applier.update(desired(spec, {"recommender": state.state}))
            await wait_for_async(
                lambda: not applier.region_status("us-east").pending, "the newer objects"
            )

    asyncio.run(main())
    assert vs_weights(fakes["us-east"], "us-east") is not None


def test_a_failed_apply_is_retried_with_backoff_and_reported(
    spec: MeshSpec, fakes: dict[str, FakeKubeApiServer]
) -> None:
    registry = CollectorRegistry()
    metrics = IstioMetrics(registry)
    fakes["eu-west"].fail_next(3, 503, "etcdserver: request timed out")
    seen: list[tuple[str, int, str]] = []

    async def main() -> None:
        applier = IstioApplier(istio_cfg(spec))
        metrics.attach(applier)
        applier.subscribe(lambda st, what: seen.append((st.region, st.consecutive_failures, what)))
        async with running(applier):
            applier.update(desired(spec))
            await wait_for_async(
                lambda: applier.region_status("eu-west").consecutive_failures >= 1, "fail"
            )
            st = applier.region_status("eu-west")
            assert st.pending and st.next_retry_at > 0
            assert st.last_error == (
                "DestinationRule models/recommender-eu-west: HTTP 503: "
                "etcdserver: request timed out"
            )
            assert sample("xds_istio_apply_pending", region="eu-west") == 1
            await wait_for_async(
                lambda: not applier.region_status("eu-west").pending, "eu-west retries"
            )
            st = applier.region_status("eu-west")
            assert (st.attempts, st.consecutive_failures, st.last_error) == (4, 0, "")
            assert st.applied_generation == st.desired_generation == 1

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    asyncio.run(main())
    assert [s for s in seen if s[0] == "eu-west" and s[2] == "failure"] == [
        ("eu-west", 1, "failure"),
        ("eu-west", 2, "failure"),
        ("eu-west", 3, "failure"),
    ]
    assert sample("xds_istio_apply_total", region="eu-west", result="failure") == 3
    assert sample("xds_istio_apply_total", region="eu-west", result="success") == 1
    assert sample("xds_istio_apply_total", region="us-east", result="failure") == 0
    assert sample("xds_istio_apply_pending", region="eu-west") == 0
    assert sample("xds_istio_apply_consecutive_failures", region="eu-west") == 0
    assert vs_weights(fakes["eu-west"], "eu-west") == {
        "production": 100,
        "baseline": 0,
        "canary": 0,
    }


def test_only_the_latest_desired_state_is_applied(
    spec: MeshSpec, fakes: dict[str, FakeKubeApiServer]
) -> None:
    """While a cluster is slow, newer states coalesce: the next apply is the newest one."""
    svc = spec.service("recommender")
    start = sm.start(svc.rollout, svc.name, "v2", spec.regions, 0).state

    def at(step: int) -> dict[str, Any]:
        rs = sm.RegionState(sm.PROGRESSING, step)
        return {svc.name: replace(start, regions=dict.fromkeys(spec.regions, rs))}

    fake = fakes["us-east"]

    async def main() -> None:
        applier = IstioApplier(istio_cfg(spec))
        async with running(applier):
            with fake.hold():
                applier.update(desired(spec, at(0)))
                await wait_for_async(lambda: fake.patches(), "the first apply to reach the cluster")
                for step in (1, 2):
                    applier.update(desired(spec, at(step)))
                assert applier.region_status("us-east").desired_generation == 3
            await wait_for_async(lambda: not applier.region_status("us-east").pending, "us-east")

    asyncio.run(main())
    bodies = [yaml.safe_load(p.body) for p in fake.patches()]
    vss = [b for b in bodies if b["kind"] == "VirtualService"]
    assert [istio.route_weights(v)["canary"] for v in vss] == [10, 100]  # step 1 never sent
    assert vs_weights(fake, "us-east") == {"production": 0, "baseline": 0, "canary": 100}


def test_a_cluster_that_stops_answering_holds_up_no_other_region(
    spec: MeshSpec, fakes: dict[str, FakeKubeApiServer]
) -> None:
    async def main() -> None:
        applier = IstioApplier(istio_cfg(spec))
        async with running(applier):
            with fakes["ap-south"].hold():
                applier.update(desired(spec))
                await wait_for_async(
                    lambda: (
                        not applier.region_status("us-east").pending
                        and not applier.region_status("eu-west").pending
                    ),
                    "the answering regions",
                )
                assert applier.region_status("ap-south").pending
                assert vs_weights(fakes["ap-south"], "ap-south") is None
            await wait_for_async(lambda: not applier.region_status("ap-south").pending, "ap-south")

    asyncio.run(main())


def test_a_rejected_object_is_reported_by_name_with_the_servers_reason(
    spec: MeshSpec, fakes: dict[str, FakeKubeApiServer]
) -> None:
    objs = istio.region_objects(spec, "us-east", {})
    objs[-1]["spec"]["http"][0]["route"][0]["weight"] = "all"

    async def main() -> str:
        applier = IstioApplier(istio_cfg(spec))
        async with running(applier):
            applier.update({"us-east": objs})
            await wait_for_async(
                lambda: applier.region_status("us-east").consecutive_failures, "a 422"
            )
            return applier.region_status("us-east").last_error

    error = asyncio.run(main())
    assert error.startswith("VirtualService models/recommender-us-east: HTTP 422: ")
    assert "spec.http.0.route.0.weight: 'all' is not of type 'integer'" in error


def test_a_missing_kubeconfig_is_an_apply_error_not_a_crash(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    cluster = KubeCluster(IstioCluster("ctx", str(missing)), IstioConfig(timeout=1), "us-east")

    async def main() -> str:
        applier = IstioApplier(
            IstioConfig(retry_initial=0.01, retry_max=0.02), {"us-east": cluster}
        )
        async with running(applier):
            applier.update({"us-east": [{"kind": "VirtualService"}]})
            await wait_for_async(
                lambda: applier.region_status("us-east").consecutive_failures >= 2, "2"
            )
            return applier.region_status("us-east").last_error

    assert asyncio.run(main()) == f"kubeconfig {missing}: no such file"


def test_decisions_reach_the_clusters_and_a_stuck_one_does_not_hold_up_a_rollback(
    tmp_path: Path, spec: MeshSpec, fakes: dict[str, FakeKubeApiServer]
) -> None:
    """A real controller and store: decisions go out over xDS at once, and to each
    region's cluster through the applier, even while one cluster is stuck."""
    svc = spec.service("recommender")
    store = Store.in_dir(tmp_path / "state")
    store.record(sm.start(svc.rollout, svc.name, "v2", spec.regions, time.time()).state, [])

    async def main() -> None:
        server = XdsPublisher(spec)
        controller = RolloutController(
            lambda: spec, server, store, PrometheusSource("http://127.0.0.1:9")
        )
        applier = IstioApplier(istio_cfg(spec))
        controller.subscribe(IstioSink(applier))
        controller.restore()
        async with running(applier):
            want = {"production": 80, "baseline": 10, "canary": 10}
            for region, fake in fakes.items():
                await wait_for_async(
                    lambda f=fake, r=region: vs_weights(f, r) == want, f"{region} step 0"
                )
            controller.promote("recommender", "more canary", "test")
            want = {"production": 0, "baseline": 50, "canary": 50}
            for region, fake in fakes.items():
                await wait_for_async(
                    lambda f=fake, r=region: vs_weights(f, r) == want, f"{region} step 1"
                )
            with fakes["eu-west"].hold():
                asked = len(fakes["eu-west"].patches())
                controller.promote("recommender", "even more", "test")
                await wait_for_async(
                    lambda: len(fakes["eu-west"].patches()) > asked, "eu-west's apply"
                )
                controller.abort("recommender", "bad canary", "test")
                # xDS has the rollback the moment the decision is committed
                assert server.traffic.split("recommender", "eu-west").canary == 0
                back = {"production": 100, "baseline": 0, "canary": 0}
                for region in ("us-east", "ap-south"):
                    await wait_for_async(
                        lambda r=region: vs_weights(fakes[r], r) == back, f"{region} rollback"
                    )
                assert applier.region_status("eu-west").pending
            await wait_for_async(
                lambda: vs_weights(fakes["eu-west"], "eu-west") == back, "eu-west back"
            )
            vs = fakes["eu-west"].get("virtualservices", "models", "recommender-eu-west")
            assert vs is not None
            assert vs["metadata"]["labels"]["xds-server/phase"] == sm.ROLLED_BACK

    asyncio.run(main())
    store.close()


def test_serve_applies_to_each_regions_cluster_and_reports_it(
    tmp_path: Path, fakes: dict[str, FakeKubeApiServer]
) -> None:
    """`xds-server serve` with `istio: {apply: true}`: the rollout it starts lands in each
    region's cluster; `xdsctl status` and /metrics say so."""
    kubeconfig = write_kubeconfig(
        tmp_path / "kubeconfig", {f"ctx-{r}": s for r, s in fakes.items()}
    )
    spec_path = tmp_path / "mesh.yaml"
    spec_path.write_text(yaml.safe_dump(spec_doc(kubeconfig)))
    fakes["ap-south"].fail_next(2)
    admin, metrics = free_port(), free_port()
    server = Process(
        "server",
        [
            *CLI,
            "serve",
            "--spec",
            str(spec_path),
            "--xds-address",
            f"127.0.0.1:{free_port()}",
            "--admin-address",
            f"127.0.0.1:{admin}",
            "--metrics-address",
            f"127.0.0.1:{metrics}",
            "--state-dir",
            str(tmp_path / "state"),
            "--prometheus-url",
            f"http://127.0.0.1:{free_port()}",
        ],
        tmp_path / "server.log",
    )
    try:
        want = {"production": 80, "baseline": 10, "canary": 10}  # the rollout's first step
        for region, fake in fakes.items():
            wait_for(
                lambda f=fake, r=region: vs_weights(f, r) == want, f"{region}'s VS", timeout=30
            )

        def status() -> dict[str, Any] | None:
            out = subprocess.run(
                [*CTL, "--server", f"127.0.0.1:{admin}", "-o", "json", "status"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            data: dict[str, Any] = json.loads(out.stdout) if out.returncode == 0 else {}
            regions = data.get("istio_apply", [])
            if len(regions) == 3 and not any(r["pending"] for r in regions):
                return data
            return None

        data = wait_for(status, "xdsctl status to show every region applied", timeout=30)
        by_region = {r["region"]: r for r in data["istio_apply"]}
        assert by_region["ap-south"]["consecutive_failures"] == "0"
        assert int(by_region["ap-south"]["attempts"]) >= 3  # two failures, then success
        assert by_region["us-east"]["target"] == f"context ctx-us-east ({kubeconfig})"
        text = http_get(f"http://127.0.0.1:{metrics}/metrics")[1].decode()
        assert 'xds_istio_apply_total{region="ap-south",result="failure"} 2.0' in text
        assert 'xds_istio_apply_pending{region="us-east"} 0.0' in text
        table = subprocess.run(
            [*CTL, "--server", f"127.0.0.1:{admin}", "status"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        assert "ISTIO REGION" in table and "ctx-ap-south" in table
        server.signal(signal.SIGTERM)
        assert server.proc.wait(20) == 0
    finally:
        server.stop()
