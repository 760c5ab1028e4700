"""The lab's scenarios: their names, what each does to the mesh and what it expects.

A table apart from the orchestration (`lab/run.py`) and the report (`lab/report.py`), and
importable without the lab's extra dependencies (`pip install 'xds-server[lab]'`): the
command line lists `SCENARIO_NAMES` whether the extra is installed or not. A new
scenario is one entry in `SCENARIOS`; a new kind of fault, a field of `Fault` (a model
server's knob), a `replica_fault` word that `lab/follow.py`'s `inject_replica_fault`
knows, or a `Partition` kind (issue 29) that `lab/faults.py` cuts and heals.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

LAB_PLAN: dict[str, Any] = {
    "steps": [5, 20, 75, 100],
    "step_duration": "5s",
    "interval": "1s",
    "window": "5s",
    "ack_timeout": "10s",
    "max_hold": "30s",
    "failures_before_rollback": 2,
    "guardrails": {
        "max_error_rate": 0.05,
        "max_p99_ms": 250,
        "min_requests": 5,
        # Every tenant's slice of the canary, from the model servers' own series: gold
        # (10% of the lab's requests) has the tight budget.
        "tenants": {
            "header": "x-tenant",
            "min_requests": 5,
            "budgets": {"gold": {"max_p99_ms": 120}, "free": {"max_p99_ms": 250}},
        },
    },
    # The lab's canary sees a few requests a second: a canary error rate shown to be
    # under 30% is judged negligible here (the 5% ceiling above still applies).
    # prediction_shift compares the models' score histograms (v2 really differs from
    # v1 a little: PSI about 0.04, under the 0.1 allowance). client_errors (4xx; gRPC:
    # NOT_FOUND, INVALID_ARGUMENT, ...) is judged as error_rate is.
    "analysis": {
        "metrics": {
            "error_rate": {"ignore_below": 0.3, "confidence": 0.95},
            "client_errors": {"ignore_below": 0.3, "confidence": 0.95},
            "latency": {"min_requests": 20},
            "prediction_shift": {"min_requests": 40},
        }
    },
    # Before any user request: Envoy health-checks the new pools, then mirrors a fifth of
    # production's requests to them for a few seconds, and the canary ramps up slowly.
    "warmup": {
        # (The check's type goes with the protocol: `GET /healthz` over HTTP, the
        # default path; grpc.health.v1 over gRPC, which reads no path.)
        "health_check": {"interval": "500ms", "timeout": "500ms"},
        "shadow": {"percent": 20, "duration": "3s"},
        "slow_start": "5s",
    },
}

STALL_PLAN: dict[str, Any] = {**LAB_PLAN, "step_duration": "20s"}
"""Throughput needs evidence: a canary delivering two thirds of its share at 20% of
50 requests/s is told from noise after about 1,000 of the region's requests."""

FAST_PLAN: dict[str, Any] = {
    **{k: v for k, v in LAB_PLAN.items() if k != "warmup"},
    "step_duration": "3s",
    "window": "4s",
    "analysis": {
        "metrics": {
            name: spec
            for name, spec in LAB_PLAN["analysis"]["metrics"].items()
            if name != "prediction_shift"
        }
    },
}
"""The lab's plan with shorter steps, no warm-up and no output gate (which waits for 40
outputs a side, 16 s at 5%): for the rollout tests and benchmarks, which are about the
rollout's mechanics."""


GROUP_PLAN: dict[str, Any] = {
    **FAST_PLAN,
    "guardrails": {k: v for k, v in FAST_PLAN["guardrails"].items() if k != "tenants"},
}
"""Two services in a rollout group (the `features` option): the rollout tests' short
steps, judged on Envoy's own stats only. The model servers' series (tenants, outputs)
carry no service label the built-in queries ask for, and the features service's
servers answer the recommender's calls: a per-tenant query would read both services'."""


HA_PLAN: dict[str, Any] = FAST_PLAN
"""The failover scenarios are about the control plane, not the judge: the rollout tests'
short steps, so a run (and its test) takes half as long. (canary-instance-loss keeps the
lab's plan: its steps give the second instance time to ramp up at 5%, and its first's
lease time to run out at 20%, before 75% rests on the one left.)"""


PARTITION_PLAN: dict[str, Any] = {
    **FAST_PLAN,
    "ack_timeout": "4s",
    "max_hold": "12s",
    "on_max_hold": "pause",
}
"""The partition scenarios (issue 29): the rollout tests' short steps, an `ack_timeout`
a cut outlasts within seconds and a `max_hold` reached within a run. `on_max_hold:
pause`: a cut region's nodes are unseen (no replica hears them), which holds the step
until max_hold and then follows this rule; its metrics are stale signals besides
(`judge.trusted`), which always pause (issue 27: never the canary's fault). With
`pause`, both say the same."""


WRONG_MODEL_NAME = "recommender-v2"
"""wrong-model-name: the name the canary serves its model under (callers ask for the
service's name, `recommender`)."""


@dataclass(frozen=True)
class Fault:
    region_index: int
    at_step: int
    """Injected once every region has reached this step (1: 20% canary)."""
    error_rate: float | None = None
    latency_ms: float | None = None
    drift: bool | None = None
    """The canary's scores collapse (its inputs scaled by 0.01), still fast and 200."""
    tenant_latency_ms: Mapping[str, float] | None = None
    """Extra latency for these tenants only, e.g. {"gold": 300}."""
    stall_fraction: float | None = None
    """This share of user requests hangs until the caller gives up."""
    model_name: str | None = None
    """The canary serves its model under this name, while callers ask for the service's
    (the lab's servers answer every inference NOT_FOUND / 404; a real server's lab
    starts the canary's model under this name)."""
    service: str = "recommender"
    """Whose canary: the recommender's, or (with `Scenario.features`) "features"."""

    def knobs(self) -> dict[str, Any]:
        """The fault knobs this fault sets, as `mesh.faults.set` takes them."""
        names = (
            "error_rate",
            "latency_ms",
            "drift",
            "tenant_latency_ms",
            "stall_fraction",
            "model_name",
        )
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def describe(self) -> str:
        return "; ".join(_describe_knob(k, v) for k, v in self.knobs().items()) or "no change"


def _describe_knob(name: str, value: Any) -> str:
    if name == "error_rate":
        return f"error rate {value:.0%}"
    if name == "latency_ms":
        return f"+{value:g} ms latency"
    if name == "drift":
        return "drifting scores" if value else "no drift"
    if name == "tenant_latency_ms":
        return ", ".join(f"tenant {t} +{ms:g} ms" for t, ms in value.items())
    if name == "model_name":
        return f"model served as {value!r}"
    return f"{value:.0%} of requests stall"


PARTITION_KINDS = ("region", "leader", "prometheus", "asymmetric")
"""What a `Partition` cuts (issue 29; `lab/netns.py` makes the cuts):

- "region": the region's namespace from every other one (control plane, etcd,
  Prometheus; the driver keeps watching it), until the rollout has followed
  `on_max_hold` (or `lasts` seconds);
- "leader": the leading replica's namespace from the other regions' (their replicas and
  etcd members): it keeps its Envoys, Prometheus and its own etcd member, a minority;
  healed once another replica leads and has committed a decision (or after `lasts`);
- "prometheus": the operator's namespace (Prometheus) from the region's: its targets go
  stale while the others' do not; healed after `lasts` seconds;
- "asymmetric": the region's replica's xDS port, for the region's own addresses only:
  the replica reaches etcd, its Envoys cannot reach it; healed when the rollout ends.
"""


@dataclass(frozen=True)
class Partition:
    kind: str
    region_index: int = 1
    """The region cut (for "leader": whichever region's replica leads at the cut)."""
    at_step: int = 1
    """Cut once every region has reached this step and every Envoy routes by it."""
    lasts: float = 0.0
    """Seconds from the cut to the heal ("prometheus"), or the most a cut healed on an
    event lasts (0: the run's own timeout)."""
    converge_within: float = 10.0
    """After the heal, the cut region's Envoys route by the committed state and its
    replica lists them again, within this many seconds."""

    def __post_init__(self) -> None:
        if self.kind not in PARTITION_KINDS:
            raise ValueError(f"partition kind {self.kind!r}: not one of {PARTITION_KINDS}")

    @property
    def needs_ha(self) -> bool:
        """Replicas on etcd: every kind but Prometheus's is about them."""
        return self.kind != "prometheus"

    def describe(self, region: str) -> str:
        return {
            "region": f"{region} cut off from every other namespace",
            "leader": "the leader's namespace cut from the other regions' (etcd, replicas)",
            "prometheus": f"Prometheus cut from {region}'s namespace",
            "asymmetric": f"{region}'s replica's xDS port dropped for {region}'s Envoys",
        }[self.kind]


@dataclass(frozen=True)
class Scenario:
    name: str
    expect: str
    fault: Fault | None
    description: str
    cause: str = ""
    """A rollback's metric (as the dashboard names it) must contain this, if given."""
    grpc_causes: tuple[str, ...] = ()
    """Over gRPC, when it differs: the rollback's metric must contain one of these."""
    plan: Mapping[str, Any] | None = None
    """The scenario's own rollout plan (default: LAB_PLAN)."""
    replica_fault: str | None = None
    """Replicas on etcd (implies `--ha`): "leader" SIGKILLs the leading replica,
    "etcd-member" one etcd member of three, "canary-instance" one region's registered
    canary instance (once a second one is in its Envoys), once every region has reached
    step 1."""
    features: bool = False
    """Two services: the lab's `features` option (the recommender calls a `features`
    service; both in the consistent rollout group `ranking`). The run also reports the
    `group` figures: crossed arms per service (which must be 0) and the time from the
    fault to every Envoy at 0% canary for both."""
    partition: Partition | None = None
    """A network partition (issue 29): implies `--netns`, and `--ha` but for Prometheus's
    (`needs_ha`); the `partition` figures and checks of the report."""

    @property
    def needs_ha(self) -> bool:
        """Replicas on etcd, whatever the command line says."""
        return self.replica_fault is not None or (
            self.partition is not None and self.partition.needs_ha
        )

    @property
    def needs_netns(self) -> bool:
        """The lab's own network namespaces, whatever the command line says."""
        return self.partition is not None


SCENARIOS = {
    s.name: s
    for s in (
        Scenario(
            "healthy",
            "promoted",
            None,
            "a healthy canary goes 5% -> 20% -> 75% -> 100% in every region",
        ),
        Scenario(
            "bad-canary",
            "rolled_back",
            Fault(1, 1, error_rate=0.3),
            "at 20%, one region's canary starts failing 30% of requests: every region rolls back",
        ),
        Scenario(
            "slow-canary",
            "rolled_back",
            Fault(0, 1, latency_ms=400),
            "at 20%, one region's canary answers 400 ms slower: p99 breaches 250 ms, every "
            "region rolls back",
        ),
        Scenario(
            "drifting-canary",
            "rolled_back",
            Fault(1, 1, drift=True),
            "at 20%, one region's canary scores collapse (fast, 200, wrong): the output "
            "gate (prediction_shift, PSI) rolls every region back",
            cause="prediction_shift",
        ),
        Scenario(
            "tenant-regression",
            "rolled_back",
            Fault(0, 1, tenant_latency_ms={"gold": 200}),
            "at 20%, one region's canary is 200 ms slower for the gold tenant only (10% of "
            "requests; the aggregate p99 stays under 250 ms): gold's budget rolls back",
            cause="tenant gold",
        ),
        Scenario(
            "wrong-model-name",
            "rolled_back",
            Fault(1, 0, model_name=WRONG_MODEL_NAME),
            "from the first step, one region's canary serves its model under another name: "
            "it answers every inference NOT_FOUND (gRPC) / 404 (REST) where production "
            "answers them, fast and never a 5xx: client_errors rolls every region back",
            cause="client_errors",
        ),
        Scenario(
            "stalling-canary",
            "rolled_back",
            Fault(2, 1, stall_fraction=0.33),
            "at 20%, one region's canary stalls on a third of its requests, which callers "
            "give up on (in neither its error rate nor its latency): throughput rolls back",
            cause="throughput",
            # gRPC sends the caller's deadline along: the model server ends a stalled
            # call DEADLINE_EXCEEDED when the caller gives up, so Envoy times it and
            # counts it as an error, and latency or errors may see it first.
            grpc_causes=("p99_ms", "error_rate", "throughput"),
            plan=STALL_PLAN,
        ),
        Scenario(
            "leader-failover",
            "promoted",
            None,
            "replicas on etcd: at 20%, the leading replica is SIGKILLed under load; another "
            "takes the lead within its lease's TTL and the rollout goes on to 100%",
            replica_fault="leader",
            plan=HA_PLAN,
        ),
        Scenario(
            "canary-instance-loss",
            "promoted",
            None,
            "replicas on etcd, model servers registered: at 5%, eu-west gets a second "
            "canary instance; at 20% its first is SIGKILLed: its lease runs out, every "
            "Envoy drops it, and the rollout goes on to 100%",
            replica_fault="canary-instance",
        ),
        Scenario(
            "etcd-member-loss",
            "promoted",
            None,
            "replicas on etcd: at 20%, one etcd member of three is SIGKILLed; the store "
            "keeps its quorum and the rollout goes on to 100%",
            replica_fault="etcd-member",
            plan=HA_PLAN,
        ),
        Scenario(
            "group-bad-member",
            "rolled_back",
            Fault(1, 1, error_rate=0.2, service="features"),
            "two services in a consistent rollout group (the recommender calls features, "
            "propagating x-xds-arm): at 20%, one region's features canary fails 20% of "
            "requests: both services roll back in every region, and no request crossed arms",
            plan=GROUP_PLAN,
            features=True,
        ),
        Scenario(
            "region-partition",
            "paused",
            None,
            "replicas on etcd, regions in namespaces: at 20%, eu-west (ap-south if eu-west "
            "leads) is cut off from every other namespace for longer than ack_timeout; its "
            "Envoys keep serving 20% with 0 failed requests, the rollout holds and at max_hold "
            "pauses (on_max_hold); on heal the region converges to the committed state",
            plan=PARTITION_PLAN,
            partition=Partition("region", 1, lasts=40.0),
        ),
        Scenario(
            "leader-isolated",
            "promoted",
            None,
            "replicas on etcd, regions in namespaces: at 20%, the leader's namespace loses "
            "the other regions (etcd's majority) but keeps its Envoys: it stops leading "
            "within its TTL, another replica leads and goes on, the old one commits nothing; "
            "healed, the rollout goes on to 100%",
            plan=PARTITION_PLAN,
            partition=Partition("leader", 0, lasts=20.0),
        ),
        Scenario(
            "prometheus-split",
            "promoted",
            None,
            "regions in namespaces: at 20%, Prometheus loses ap-south's Envoys for 8s: "
            "ap-south is stale (no data), the others are judged, no step advances on partial "
            "evidence; healed, the rollout goes on to 100%",
            plan=PARTITION_PLAN,
            partition=Partition("prometheus", 2, lasts=8.0),
        ),
        Scenario(
            "asymmetric",
            "promoted",
            None,
            "replicas on etcd, regions in namespaces: at 20%, eu-west's replica (ap-south's if "
            "eu-west leads) still reaches etcd but its Envoys cannot reach it: they fail over "
            "to the neighbour's replica within seconds, with 0 failed requests, and the "
            "rollout goes on to 100%",
            plan=PARTITION_PLAN,
            partition=Partition("asymmetric", 1),
        ),
    )
}


SCENARIO_NAMES: tuple[str, ...] = tuple(SCENARIOS)
"""`lab run --scenario`'s choices, in the table's order."""
