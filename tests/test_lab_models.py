"""The lab's model servers as the output gate and tenant budgets see them: real servers,
the real load generator, a real Envoy and a real Prometheus.

- v2's scores differ from v1's a little (PSI a few hundredths), drift collapses them;
- every request is counted by tenant and code, and timed per tenant;
- a stalled request is cancelled by its caller before Envoy's route timeout, so Envoy
  counts it as sent upstream and never as a 5xx nor in its request-time histogram;
- Prometheus scrapes the model servers with `region` and `pool` labels.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.support import wait_for
from xds_server.lab.layout import SERVICE, MeshOptions
from xds_server.lab.load import LoadGenerator
from xds_server.lab.mesh import LocalMesh
from xds_server.lab.procs import Envoy, http_get, http_post_json
from xds_server.lab.upstream import ModelServer
from xds_server.lab.upstream_model import SCORE_BUCKETS
from xds_server.render.bootstrap import LATENCY_BUCKETS_MS
from xds_server.traffic import Split

from .conftest import EnvoyFactory, ServerThread

CANARY = "recommender|canary"

Samples = list[tuple[str, dict[str, str], float]]


SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def scrape(url: str) -> Samples:
    """Prometheus text as written: sample names as they are (a parser would add `_total`
    to Envoy's counters, where `upstream_rq{envoy_response_code}` then collides with
    `upstream_rq_total`)."""
    status, body, _ = http_get(url)
    assert status == 200, body[:200]
    out: Samples = []
    for line in body.decode().splitlines():
        if (m := SAMPLE.match(line)) is not None:
            out.append((m[1], dict(LABEL.findall(m[2] or "")), float(m[3])))
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of that name whose labels include these (0 without one)."""
    return sum(v for n, ls, v in samples if n == name and labels.items() <= ls.items())


def score_counts(server: ModelServer) -> list[float]:
    """The 20 buckets of `model_prediction_score` as counts per bucket (not cumulative)."""
    samples = scrape(f"http://127.0.0.1:{server.port}/metrics")
    cumulative = [
        value(samples, "model_prediction_score_bucket", le=str(b), version=server.version)
        for b in SCORE_BUCKETS
    ]
    return [c - p for c, p in zip(cumulative, [0.0, *cumulative[:-1]], strict=True)]


def psi(actual: list[float], expected: list[float], floor: float = 1e-4) -> float:
    """Population stability index: sum over buckets of (p - q) ln(p / q)."""
    p = [max(c / sum(actual), floor) for c in actual]
    q = [max(c / sum(expected), floor) for c in expected]
    return sum((pi - qi) * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def run_load(
    targets: dict[str, str], n: int, rate: float, timeout_s: float = 10, model: str = "model"
) -> LoadGenerator:
    """`n` requests to each target; returns once every one has its result."""
    load = LoadGenerator(
        targets, rate=rate, max_requests=n, timeout_s=timeout_s, model=model
    ).start()
    try:
        wait_for(lambda: len(load.snapshot()) == n * len(targets), f"{n} results", timeout=120)
    finally:
        load.stop()
    return load


@pytest.fixture
def models() -> Iterator[dict[str, ModelServer]]:
    servers = {
        v: ModelServer(("127.0.0.1", 0), "us-east", pool, v).start_in_thread()
        for v, pool in (("v1", "baseline"), ("v2", "canary"))
    }
    yield servers
    for s in servers.values():
        s.shutdown()
        s.server_close()


def address(server: ModelServer) -> str:
    return f"127.0.0.1:{server.port}"


def set_fault(server: ModelServer, **knobs: object) -> None:
    http_post_json(f"http://{address(server)}/fault", knobs)


def test_v2_scores_drift_a_little_from_v1_and_a_drifting_model_collapses(
    models: dict[str, ModelServer],
) -> None:
    v1, v2 = models["v1"], models["v2"]
    n = 2000
    load = run_load({"v1": address(v1), "v2": address(v2)}, n, rate=400)
    assert load.statuses() == Counter({200: 2 * n})
    base, new = score_counts(v1), score_counts(v2)
    assert sum(base) == sum(new) == n
    # A realistic spread: no bucket holds more than a tenth of the scores.
    assert max(base) < 0.1 * n and max(new) < 0.1 * n
    v1_v2 = psi(new, base)
    print(f"\nPSI v2 vs v1 over {n} requests each: {v1_v2:.4f}")
    assert 0.02 <= v1_v2 <= 0.08

    set_fault(v2, drift=True)
    load = run_load({"v2": address(v2)}, n, rate=400)
    assert load.statuses() == Counter({200: n})
    assert statistics.median(r.latency_s for r in load.snapshot()) < 0.1
    drifted = [a - b for a, b in zip(score_counts(v2), new, strict=True)]
    drift_psi = psi(drifted, base)
    print(f"PSI drifting v2 vs v1 over {n} requests each: {drift_psi:.2f}")
    assert drift_psi > 0.5
    assert max(drifted) >= 0.9 * n  # (about all in one bucket)


def test_each_request_is_counted_and_timed_by_tenant(models: dict[str, ModelServer]) -> None:
    v1 = models["v1"]
    url = f"http://{address(v1)}/metrics"
    run_load({"v1": address(v1)}, 400, rate=200)
    assert http_get(f"http://{address(v1)}/predict?a=0&b=0&c=0")[0] == 200  # no x-tenant
    samples = scrape(url)
    counts = {
        t: value(samples, "model_requests_total", tenant=t, code="200")
        for t in ("gold", "free", "none")
    }
    assert counts == {"gold": 40, "free": 360, "none": 1}  # every 10th request is gold
    assert value(samples, "model_request_duration_ms_count", tenant="gold") == 40
    buckets = [ls["le"] for n, ls, _ in samples if n == "model_request_duration_ms_bucket"]
    assert len(set(buckets)) == len(LATENCY_BUCKETS_MS) + 1  # and +Inf

    def slow(samples: Samples, tenant: str) -> float:
        """Requests of this tenant that took longer than 250 ms inside the server."""
        count = value(samples, "model_request_duration_ms_count", tenant=tenant)
        return count - value(samples, "model_request_duration_ms_bucket", tenant=tenant, le="250.0")

    assert slow(samples, "gold") == slow(samples, "free") == 0
    set_fault(v1, tenant_latency_ms={"gold": 300})
    load = run_load({"v1": address(v1)}, 200, rate=100)
    after = scrape(url)
    assert slow(after, "gold") == 20  # every gold request, inside the server
    assert slow(after, "free") <= 2  # (a scheduling hiccup, at most)
    by_tenant = {
        t: [r.latency_s for r in load.snapshot() if r.tenant == t] for t in ("gold", "free")
    }
    assert min(by_tenant["gold"]) >= 0.3
    assert statistics.median(by_tenant["free"]) < 0.1


@pytest.fixture
def envoy(server: ServerThread, tmp_path: Path) -> Iterator[Envoy]:
    factory = EnvoyFactory(tmp_path / "envoy")
    e = factory.start("us-east", server.port)
    e.wait_ready()
    yield e
    factory.stop_all()


def envoy_counts(envoy: Envoy) -> dict[str, float]:
    """The canary cluster's request counters, from Envoy's admin /stats/prometheus."""
    samples = scrape(envoy.admin + "/stats/prometheus")
    mine = {"envoy_cluster_name": CANARY}
    return {
        "rq_total": value(samples, "envoy_cluster_upstream_rq_total", **mine),
        "rq_2xx": value(
            samples, "envoy_cluster_upstream_rq_xx", envoy_response_code_class="2", **mine
        ),
        "rq_5xx": value(
            samples, "envoy_cluster_upstream_rq_xx", envoy_response_code_class="5", **mine
        ),
        "rq_time_count": value(samples, "envoy_cluster_upstream_rq_time_count", **mine),
        "rq_timeout": value(samples, "envoy_cluster_upstream_rq_timeout", **mine),
        "cx_destroy_local_with_active_rq": value(
            samples, "envoy_cluster_upstream_cx_destroy_local_with_active_rq", **mine
        ),
    }


def test_stalled_requests_are_cancelled_by_the_caller_and_never_reach_envoys_5xx_or_latency(
    server: ServerThread, envoy: Envoy, upstreams: dict[tuple[str, str], ModelServer]
) -> None:
    canary = upstreams[("us-east", "canary")]
    listen = f"127.0.0.1:{envoy.listen_port}"  # type: ignore[attr-defined]
    server.call(lambda: server.server.set_split("recommender", Split.from_percent({"canary": 100})))
    wait_for(
        lambda: json.loads(http_get(f"http://{listen}/predict")[1]).get("pool") == "canary",
        "the Envoy to route to the canary",
        timeout=15,
    )

    # Histograms reach /stats/prometheus at each flush (1 s): wait until it is all in.
    def caught_up() -> dict[str, float] | None:
        counts = envoy_counts(envoy)
        return counts if counts["rq_time_count"] == counts["rq_2xx"] > 0 else None

    before = wait_for(caught_up, "Envoy's request-time histogram to catch up", timeout=10)
    set_fault(canary, stall_fraction=0.33)
    n = 60
    load = run_load({"envoy": listen}, n, rate=30, timeout_s=2.0)
    results = Counter((r.status, r.error) for r in load.snapshot())
    stalled = canary.stats()["stalled_requests"]
    print(f"\nclient side: {dict(results)}; the canary stalled {stalled}")
    assert stalled == int(n * 0.33 + 1e-9)  # deterministic: every third-ish request
    assert results == Counter({(200, ""): n - stalled, (0, "timeout"): stalled})
    assert all(r.latency_s >= 2.0 for r in load.snapshot() if r.error)

    def settled() -> dict[str, float] | None:
        delta = {k: v - before[k] for k, v in envoy_counts(envoy).items()}
        return delta if delta["rq_time_count"] == n - stalled else None

    delta = wait_for(settled, "Envoy's request-time histogram to flush", timeout=10)
    print(f"Envoy's canary cluster over the load: {delta}")
    assert delta["rq_total"] == n  # every request was sent upstream
    assert delta["rq_2xx"] == n - stalled
    assert delta["rq_5xx"] == 0 and delta["rq_timeout"] == 0  # never answered by Envoy
    assert delta["cx_destroy_local_with_active_rq"] == stalled  # cancelled
    # The model server saw its callers hang up, and let the stalled threads go.
    wait_for(lambda: canary.stats()["stalled_now"] == 0, "stalled requests to end", timeout=5)
    samples = scrape(f"http://{address(canary)}/metrics")
    assert value(samples, "model_requests_total", code="499") == stalled


def prom_query(mesh: LocalMesh, query: str) -> list[dict[str, object]]:
    assert mesh.processes.prometheus is not None
    status, body, _ = http_get(f"{mesh.processes.prometheus.url}/api/v1/query?query={quote(query)}")
    assert status == 200, body
    return list(json.loads(body)["data"]["result"])


def test_prometheus_scrapes_the_model_servers_with_region_and_pool(tmp_path: Path) -> None:
    opts = MeshOptions(regions=("us-east",), envoys_per_region=1, load_rate=20)
    prod = 'region="us-east",pool="production"'
    with LocalMesh(tmp_path / "mesh", opts) as mesh:
        mesh.processes.start_load(max_seconds=120)
        direct = {"direct": f"127.0.0.1:{mesh.layout.model_ports[('us-east', 'canary')]}"}
        run_load(direct, 20, rate=20, model=SERVICE)

        def scalar(query: str) -> float:
            return float(prom_query(mesh, query)[0]["value"][1])  # type: ignore[index]

        gold = f'sum(increase(model_requests_total{{{prod},tenant="gold"}}[30s]))'
        wait_for(lambda: scalar(gold) > 0, "gold requests in Prometheus", timeout=30)
        by_le = f"sum by (le) (increase(model_prediction_score_bucket{{{prod}}}[30s]))"
        series = wait_for(lambda: prom_query(mesh, by_le), "score buckets", timeout=30)
        assert len(series) == len(SCORE_BUCKETS) + 1
        canary_query = 'model_prediction_score_count{pool="canary"}'
        canary = wait_for(lambda: prom_query(mesh, canary_query), "the canary's scores", timeout=30)
        assert len(canary) == 1
        labels = canary[0]["metric"]
        assert isinstance(labels, dict)
        got = (labels["region"], labels["pool"], labels["version"], labels["job"])
        assert got == ("us-east", "canary", "v2", "model")
        tenants = f"sum by (tenant) (model_requests_total{{{prod}}})"
        counts = {
            s["metric"]["tenant"]: float(s["value"][1])  # type: ignore[index]
            for s in prom_query(mesh, tenants)
        }
        assert set(counts) == {"gold", "free"}
        assert 0.08 <= counts["gold"] / (counts["gold"] + counts["free"]) <= 0.12, counts
        duration = f'model_request_duration_ms_bucket{{{prod},tenant="free"}}'
        assert len(prom_query(mesh, duration)) == len(LATENCY_BUCKETS_MS) + 1
