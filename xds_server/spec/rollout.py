"""The `rollout:` section's models: steps, timing, guardrails, analysis, warm-up, queries.

Plain frozen data. The top-level `rollout:` gives defaults and a service's own overrides
them key by key (see `spec.plan`, which parses it); the rollout engine reads these.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum

UPSTREAM_REQUESTS = (
    'sum(increase(envoy_cluster_upstream_rq_total{{region="{region}",'
    'envoy_cluster_name="{cluster}"}}[{window}]))'
)
_5XX_SERIES = (
    'envoy_cluster_upstream_rq_xx{{region="{region}",'
    'envoy_cluster_name="{cluster}",envoy_response_code_class="5"}}'
)


def counted(series: str) -> str:
    """The events a counter `series` (a selector template) counted over the window, a
    series born within it included (see UPSTREAM_5XX).

    A series born within the window, on an Envoy Prometheus scraped before it began:
    its last value, all of it counted within the window, and not its `increase()` as
    well (which extrapolates a young counter back towards zero: the sum of both counted
    up to twice its first sample, and error rates above 1 were read). Any other series:
    its `increase()` (on an Envoy, or by a Prometheus, new within the window, the first
    sample may hold older counts)."""
    born = (
        f"((last_over_time({series}[{{window}}]) unless {series} offset {{window}})"
        ' and on(instance) (up{{region="{region}"}} offset {window}))'
    )
    return (
        f"(sum(increase({series}[{{window}}]) unless {born}) or vector(0))"
        f" + (sum({born}) or vector(0))"
    )


UPSTREAM_5XX = counted(_5XX_SERIES)
"""A pool's 5xx answers over the window. Envoy makes a response class's series on its
first use, and `increase()` cannot count what a series held when it appeared: a
canary's first errors (all of them, for one scrape interval, and always the first
sample's count) would read as none, and a step could pass on them. So the value of a
series born within the window (absent at its start) is counted whole, when its Envoy
was scraped before the window began (its `up` was there: not a new Envoy, nor a
Prometheus that has just started, whose first samples hold older counts; a cluster new
in the window, a canary pool just added, still counts). It may count what one scrape
interval held before the window, never less."""
UPSTREAM_4XX = counted(_5XX_SERIES.replace('class="5"', 'class="4"'))
"""The caller's-mistake answers (`client_errors`), counted as the 5xx are: no series
reads as none, a series born within the window counts from its first sample."""
CANARY_MATCH_HEADER = "x-xds-canary-match"
"""Envoy sets it ("true") on the requests its `canary_match` routes send to the canary and
removes it from every other request (a caller cannot set it): model servers label their
series with it (`CANARY_MATCH_LABEL`) so that the analysis leaves those requests out."""
CANARY_MATCH_LABEL = "canary_match"
SPLIT_ONLY = f'{CANARY_MATCH_LABEL}!="true"'
"""The matcher that keeps a model server's series to the split's traffic: every built-in
model-side template has it, and a template of the spec's own should (the README says);
the series of a server that does not export the label match it."""


def delivered_query(errors: str) -> str:
    """What a pool delivered: its completed upstream requests less its `errors`.

    A request its caller gave up on (a stall) is reset, never completed. The counter
    exists from the cluster's start; a response class's or a gRPC status's own series
    does not (Envoy makes it on first use), and `increase()` cannot count what a series
    held when it appeared, nor over a gap in the scrapes: a canary's first seconds at 5%,
    or the first look after Prometheus was away, would read as nothing delivered."""
    return (
        "clamp_min(sum(increase(envoy_cluster_upstream_rq_completed"
        '{{region="{region}",envoy_cluster_name="{cluster}"}}[{window}]))'
        f" - ({errors} or vector(0)), 0)"
    )


DEFAULT_QUERIES: Mapping[str, str] = {
    # Over Envoy's own cluster stats, scraped from each Envoy with a `region` label.
    "requests": UPSTREAM_REQUESTS,
    "errors": UPSTREAM_5XX,
    # Answers that blame the caller: a canary serving its model under another name 404s.
    "client_errors": UPSTREAM_4XX,
    # Mirrored requests (the warm-up's shadow phase): Envoy's router drops their answers
    # before any filter sees them, so they are judged on the cluster's upstream stats
    # whatever the protocol (a gRPC service keeps these when its other queries change).
    "shadow_requests": UPSTREAM_REQUESTS,
    "shadow_errors": UPSTREAM_5XX,
    "p99_ms": "histogram_quantile(0.99, sum by (le) (rate(envoy_cluster_upstream_rq_time_bucket"
    '{{region="{region}",envoy_cluster_name="{cluster}"}}[{window}])))',
    # One series per bucket (`le`), counts of requests at or below each bound, in ms.
    "latency_buckets": "sum by (le) (increase(envoy_cluster_upstream_rq_time_bucket"
    '{{region="{region}",envoy_cluster_name="{cluster}"}}[{window}]))',
    # Every Envoy of the region: how many of the pool's hosts it sees, and how many healthy.
    "hosts": "sum(envoy_cluster_membership_total"
    '{{region="{region}",envoy_cluster_name="{cluster}"}})',
    "healthy_hosts": "sum(envoy_cluster_membership_healthy"
    '{{region="{region}",envoy_cluster_name="{cluster}"}})',
    # Throughput: what the canary delivered (a completed response that is not a 5xx; a
    # request the caller gave up on, or a reset, has none) against every request the
    # service's pools were sent in the region.
    "delivered": delivered_query(UPSTREAM_5XX),
    "service_requests": 'sum(increase(envoy_cluster_upstream_rq_total{{region="{region}",'
    'envoy_cluster_name=~"{service}\\\\|(production|baseline|canary)"}}[{window}]))',
    # Per tenant, from the model servers' own series (Envoy's stats have no tenant).
    # (Only the split's requests: never those `canary_match` sent, see SPLIT_ONLY.)
    "tenant_requests": 'sum(increase(model_requests_total{{region="{region}",pool="{pool}",'
    f'tenant="{{tenant}}",{SPLIT_ONLY}}}}}[{{window}}]))',
    "tenant_errors": 'sum(increase(model_requests_total{{region="{region}",pool="{pool}",'
    f'tenant="{{tenant}}",code=~"5..",{SPLIT_ONLY}}}}}[{{window}}]))',
    "tenant_p99_ms": "histogram_quantile(0.99, sum by (le) (rate(model_request_duration_ms_bucket"
    f'{{{{region="{{region}}",pool="{{pool}}",tenant="{{tenant}}",{SPLIT_ONLY}}}}}[{{window}}])))',
}
"""PromQL templates; `{region}`, `{cluster}` and `{window}` (like `30s`) are filled in,
and `{service}`, `{pool}`, `{version}`, `{tenant}` where they mean something."""


GRPC_STATUS_CODES: Mapping[str, int] = {
    "OK": 0,
    "CANCELLED": 1,
    "UNKNOWN": 2,
    "INVALID_ARGUMENT": 3,
    "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6,
    "PERMISSION_DENIED": 7,
    "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9,
    "ABORTED": 10,
    "OUT_OF_RANGE": 11,
    "UNIMPLEMENTED": 12,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
    "DATA_LOSS": 15,
    "UNAUTHENTICATED": 16,
}
GRPC_SERVER_FAULTS: tuple[str, ...] = (
    "UNKNOWN",
    "DEADLINE_EXCEEDED",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
)
"""The gRPC statuses that are the server's fault: what a gRPC pool counts as errors unless
its service says otherwise (`grpc.error_codes`). A client's own mistake (INVALID_ARGUMENT,
NOT_FOUND, ...) or a call it cancelled is not the canary's failure."""


def grpc_queries(error_codes: tuple[str, ...]) -> dict[str, str]:
    """The default queries of a gRPC service, over Envoy's gRPC stats filter.

    A gRPC failure is an HTTP 200 with a `grpc-status` trailer, so Envoy's HTTP response
    classes cannot see it. The listener's `envoy.filters.http.grpc_stats` filter counts
    every call by its final status, local replies included (an upstream reset becomes
    UNAVAILABLE there), as `envoy_cluster_grpc_<code>`, `envoy_cluster_grpc_total`:
    requests are calls, errors the calls that ended in one of `error_codes`.

    Delivered (the throughput check) is `delivered_query` of those errors, as for HTTP.
    What the service's pools were sent stays Envoy's upstream request count: a call its
    caller gave up on has no status, but was sent."""
    errors = grpc_status_count(error_codes)
    return {
        # Envoy makes the calls' counter on a cluster's first call, as each status's.
        "requests": counted(
            'envoy_cluster_grpc_total{{region="{region}",envoy_cluster_name="{cluster}"}}'
        ),
        "errors": errors,
        "client_errors": grpc_status_count(grpc_client_codes(error_codes)),
        "delivered": delivered_query(errors),
    }


def grpc_status_count(codes: tuple[str, ...]) -> str:
    """Calls that ended in one of `codes`: a term per status, `counted` as the 5xx are
    (Envoy makes a status's series on its first call). Not one selector
    over `__name__=~"envoy_cluster_grpc_(5|14)"`: increase() drops the metric's name, two
    statuses of one cluster then collide, and Prometheus refuses the whole query ("vector
    cannot contain metrics with the same labelset")."""
    terms = [
        counted(
            f'envoy_cluster_grpc_{n}{{{{region="{{region}}",envoy_cluster_name="{{cluster}}"}}}}'
        )
        for n in sorted(GRPC_STATUS_CODES[c] for c in codes)
    ]
    return " + ".join(terms) or "vector(0)"


def grpc_client_codes(error_codes: tuple[str, ...]) -> tuple[str, ...]:
    """The caller-class statuses (`client_errors`): every one but OK, CANCELLED (the
    caller gave up) and those counted as the server's errors (`grpc.error_codes`)."""
    return tuple(c for c in GRPC_STATUS_CODES if c not in ("OK", "CANCELLED", *error_codes))


class MetricKind(StrEnum):
    """What an analysis metric compares (see `MetricSpec`). The first four read Envoy's
    own stats; the others read the user's `query` (or `numerator`/`denominator`)."""

    ERRORS = "errors"
    CLIENT_ERRORS = "client_errors"
    """Answers that blame the caller (4xx; gRPC's caller-class statuses), judged as a
    proportion of requests like errors: a canary may not blame callers production serves."""
    LATENCY = "latency"
    TAIL = "tail"
    RATIO = "ratio"
    """Two counts, judged as a proportion (like errors): a click-through, a fallback rate."""
    VALUE = "value"
    """A rate or a gauge, read every interval; the per-interval canary/comparator ratios
    are judged (tokens/s, a revenue rate)."""
    DISTRIBUTION = "distribution"
    """A histogram's buckets, compared by Mann-Whitney U (a model's confidence)."""
    OUTPUT = "output"
    """The model's output histogram, compared by the population stability index."""


USER_QUERY_KINDS = frozenset(
    {MetricKind.RATIO, MetricKind.VALUE, MetricKind.DISTRIBUTION, MetricKind.OUTPUT}
)
QUERY_PLACEHOLDERS = ("region", "cluster", "pool", "version", "window", "service", "tenant")
"""What a PromQL template may name, in braces (PromQL's own braces are doubled)."""
PREDICTION_BUCKETS_QUERY = (
    "sum by (le) (increase(model_prediction_score_bucket"
    f'{{{{region="{{region}}",pool="{{pool}}",{SPLIT_ONLY}}}}}[{{window}}]))'
)
"""The lab's model servers' output histogram (see the README for what to export)."""


CLIENT_ERRORS = "client_errors"
"""The built-in metric of the caller's-mistake answers (`metric_defaults`), one of the
default metrics."""


class Direction(StrEnum):
    """Which change of a metric is bad."""

    INCREASE = "increase"
    DECREASE = "decrease"
    EITHER = "either"


class NoDataRule(StrEnum):
    """What a metric without data becomes once its hold reaches `max_hold`."""

    FAIL = "fail"
    PAUSE = "pause"
    PASS = "pass"


class FalseAlarmScope(StrEnum):
    """What a metric's 1 - confidence bounds (see `Analysis.false_alarm_scope`)."""

    ROLLOUT = "rollout"
    STEP = "step"


class OnMaxHold(StrEnum):
    ROLLBACK = "rollback"
    PAUSE = "pause"


@dataclass(frozen=True)
class TenantBudget:
    max_p99_ms: float | None = None
    max_error_rate: float | None = None


@dataclass(frozen=True)
class Tenants:
    """Per-tenant SLO budgets, each judged on that tenant's slice of the canary's traffic
    (from the model servers' per-tenant series: the `tenant_*` queries)."""

    header: str = "x-tenant"
    """The request header that names the tenant (documentation: the model servers label
    their series with it)."""
    budgets: Mapping[str, TenantBudget] = field(default_factory=dict)
    min_requests: int = 20
    """Below this many requests of a tenant in the window, its budget is not judged."""


@dataclass(frozen=True)
class Guardrails:
    max_error_rate: float = 0.05
    """Ceiling on the canary's 5xx responses over all its responses."""
    max_p99_ms: float = 500.0
    min_requests: int = 20
    """Below this many canary requests in the window there is no evidence: hold."""
    min_throughput_ratio: float = 0.8
    """Floor on what the canary delivers (completed, non-5xx requests) over the share of
    the region's requests its weight implies, over the step; 0 turns it off."""
    tenants: Tenants = field(default_factory=Tenants)


@dataclass(frozen=True)
class MetricSpec:
    """One statistical comparison of canary against its comparator (baseline or production).

    `errors` compares 5xx counts as proportions of requests; `latency` compares the
    request-time histograms (Mann-Whitney U on the buckets); `tail` compares the shares of
    requests slower than the two pools' joint `quantile` (a p99 regression that leaves
    the median alone). All are sequential tests: looking every interval does not raise
    the false-alarm rate above 1 - confidence (over the whole rollout, or per step: see
    `Analysis.false_alarm_scope`).
    """

    name: str
    kind: MetricKind = MetricKind.ERRORS
    direction: Direction = Direction.INCREASE
    """Which change is bad: an increase, a decrease, or either."""
    allowed_change: float = 1.0
    """Ratio canary/comparator that is not a regression (1.1: up to 10% worse is fine)."""
    detect_change: float = 2.0
    """errors: the ratio the data must be able to rule out before the metric may pass."""
    ignore_below: float = 0.01
    """errors: a canary error rate shown to be below this passes whatever the comparator."""
    quantile: float = 0.5
    """latency: the quantile whose ratio is the effect size (the effect-size floor);
    tail: the quantile that splits slow requests from the rest."""
    confidence: float = 0.99
    min_requests: int = 50
    """latency, tail: fewer samples on either side is no data."""
    critical: bool = False
    """A failure of a critical metric scores 0 and fails the verdict at once."""
    group: str = ""
    on_no_data: NoDataRule = NoDataRule.FAIL
    """Too little data holds the step; once that hold reaches `max_hold`: fail, pause or
    pass this metric."""
    query: str = ""
    """value, distribution, output: the PromQL template (a `_bucket` series summed by
    `le` for the two histogram kinds)."""
    numerator: str = ""
    denominator: str = ""
    """ratio: the two counts' templates."""
    fail_change: float | None = None
    """output: a significant PSI above `allowed_change` holds the step (marginal); above
    this it fails."""
    max: float | None = None
    min: float | None = None
    """Absolute guardrails on the canary's own value over the window (a ratio, a value,
    a distribution's `quantile`), checked like the SLA guardrails."""


def metric_defaults(name: str, kind: MetricKind) -> MetricSpec:
    """A metric's settings before the spec overrides any: the kind's own defaults (a
    `latency` metric tolerates 10% by default, a `tail` metric 20% on the p99), in its
    kind's group."""
    base = MetricSpec(name, kind, group=str(kind))
    if kind == MetricKind.CLIENT_ERRORS:
        # Answers that blame the caller (the `client_errors` query: 4xx; over gRPC
        # `grpc_client_codes`) that the canary gives and its comparator does not, for the
        # same traffic (a model served under another name fails every call so); a steady
        # share of bad requests is in both. Judged as error_rate is, in its group.
        return replace(base, critical=True, group="errors", on_no_data=NoDataRule.PAUSE)
    if kind in (MetricKind.ERRORS, MetricKind.RATIO):
        return base
    if kind in (MetricKind.LATENCY, MetricKind.DISTRIBUTION):
        return replace(base, allowed_change=1.1, on_no_data=NoDataRule.PASS)
    if kind == MetricKind.VALUE:
        return replace(base, allowed_change=1.1, min_requests=5, on_no_data=NoDataRule.PASS)
    if kind == MetricKind.OUTPUT:
        # PSI bands used across the industry: < 0.1 no real shift, 0.1-0.25 a moderate
        # one (hold: a person looks), > 0.25 a significant one (fail).
        return replace(
            base,
            allowed_change=0.1,
            fail_change=0.25,
            min_requests=100,
            critical=True,
            on_no_data=NoDataRule.PASS,
            query=PREDICTION_BUCKETS_QUERY,
        )
    return replace(
        base, allowed_change=1.2, quantile=0.99, min_requests=200, on_no_data=NoDataRule.PASS
    )


BUILTIN_KINDS: Mapping[str, MetricKind] = {
    "error_rate": MetricKind.ERRORS,
    "latency": MetricKind.LATENCY,
    "latency_p99": MetricKind.TAIL,
    "prediction_shift": MetricKind.OUTPUT,
    CLIENT_ERRORS: MetricKind.CLIENT_ERRORS,
}
"""Metric names whose kind goes without saying in the spec."""


DEFAULT_METRICS: tuple[MetricSpec, ...] = (
    # Too few requests to tell is not a failure: a person decides (pause), not the noise.
    replace(
        metric_defaults("error_rate", MetricKind.ERRORS),
        critical=True,
        on_no_data=NoDataRule.PAUSE,
    ),
    # The absolute p99 guardrail still holds when latency has too few samples to compare.
    metric_defaults("latency", MetricKind.LATENCY),
    # The slowest 1%: a regression there is what users of a model server feel first.
    replace(metric_defaults("latency_p99", MetricKind.TAIL), critical=True),
    # A canary that blames its callers where production answers them (a model served
    # under another name: every call a 404 / NOT_FOUND) fails every call without a 5xx.
    metric_defaults(CLIENT_ERRORS, MetricKind.CLIENT_ERRORS),
)


@dataclass(frozen=True)
class Analysis:
    """How the statistical comparison is scored (Kayenta's model: groups, weights, 0-100)."""

    metrics: tuple[MetricSpec, ...] = DEFAULT_METRICS
    groups: Mapping[str, float] = field(
        default_factory=lambda: {
            "errors": 40,
            "latency": 40,
            "tail": 20,
            "ratio": 40,
            "value": 40,
            "distribution": 40,
            "output": 40,
        }
    )
    """Weight of each metric group in the score (a metric's group is its kind unless it
    says otherwise); a group not listed weighs 1. Only the groups of the plan's metrics
    count."""
    pass_score: float = 95.0
    marginal_score: float = 75.0
    """At or above: hold (neither pass nor fail); below: fail."""
    false_alarm_scope: FalseAlarmScope = FalseAlarmScope.ROLLOUT
    """What a metric's 1 - confidence bounds. `rollout`: its false alarms over the whole
    rollout, shared equally by the sequential tests it runs there (one per analysed phase
    and region), so a healthy canary is rarely rolled back however many steps and regions
    it crosses; `step`: each phase in each region on its own, as Kayenta's judge does."""


@dataclass(frozen=True)
class Webhook:
    name: str
    url: str
    timeout: float = 10.0
    retries: int = 2


class CheckType(StrEnum):
    """What a warm-up health check asks a host."""

    HTTP = "http"
    """GET `path`: 200 is healthy (Envoy's HTTP health check)."""
    GRPC = "grpc"
    """`grpc.health.v1.Health/Check` of `grpc_service`: SERVING is healthy."""
    OIP = "oip"
    """Open Inference Protocol model readiness of `model`: over HTTP `GET
    /v2/models/{model}/ready` (Envoy checks it); on a gRPC port with no HTTP port,
    `ModelReady`, which Envoy cannot send: the control plane asks it itself."""


@dataclass(frozen=True)
class HealthCheck:
    type: CheckType | None = None
    """None: `grpc` for a `protocol: grpc` service, `http` otherwise (`for_protocol`)."""
    path: str = "/healthz"
    """`http` checks: the path that answers 200 when the host is ready."""
    grpc_service: str = ""
    """`grpc` checks: the `grpc.health.v1` service name to check ("": the server as a whole)."""
    model: str = ""
    """`oip` checks: the model whose readiness is asked."""
    port: int | None = None
    """Check every host on this port rather than its traffic port (an endpoint's own
    `health_port` wins): MLServer and KServe answer REST beside their gRPC port."""
    interval: float = 1.0
    timeout: float = 1.0
    healthy_threshold: int = 1
    unhealthy_threshold: int = 2
    where: str = field(default="", compare=False)
    """The spec field it was written at (`services[0].rollout.warmup.health_check`), so
    a problem found once the service's protocol is known names the right field."""
    given: frozenset[str] = field(default=frozenset(), compare=False)
    """The fields the spec wrote: one that the check's type does not read is an error."""

    def for_protocol(self, grpc: bool) -> CheckType:
        if self.type is not None:
            return self.type
        return CheckType.GRPC if grpc else CheckType.HTTP

    def over_http(self, grpc: bool, health_port: int | None) -> bool:
        """Is the check an HTTP request? `oip` is, except on a gRPC host's traffic port."""
        kind = self.for_protocol(grpc)
        if kind == CheckType.OIP:
            return not grpc or health_port is not None or self.port is not None
        return kind == CheckType.HTTP

    @property
    def http_path(self) -> str:
        """The path an HTTP check asks (`oip`: the model's readiness)."""
        if self.type == CheckType.OIP:
            return f"/v2/models/{self.model}/ready"
        return self.path


@dataclass(frozen=True)
class Warmup:
    """What a region does before its canary and baseline pools take any user traffic."""

    health_check: HealthCheck | None = None
    """Active health checks of the pools that warm (canary, baseline; never production's
    serving hosts, which the control plane probes once with the same check before any
    weight moves); weight waits for healthy pools."""
    min_healthy: float = 1.0
    """Share of a pool's hosts every Envoy of the region must see healthy."""
    shadow_percent: float = 0.0
    """Share of production's requests mirrored to canary and baseline meanwhile."""
    shadow_duration: float = 0.0
    """How long shadow traffic is judged before the first real step; 0: no shadow phase."""
    slow_start: float = 0.0
    """Envoy's slow_start_config window for the canary cluster; 0: off."""
    webhooks: tuple[Webhook, ...] = ()
    registered_hosts: bool = False
    """The canary or baseline pool takes its hosts from the registry (it lists no
    endpoints): weight waits until each has a registered host in the region."""
    pool_checks: bool = False
    """A pool has a check of its own (`pools.<pool>.health_check`): warm-up runs for it
    even without the service's."""

    @property
    def needed(self) -> bool:
        return bool(
            self.health_check
            or self.pool_checks
            or self.shadow_duration
            or self.webhooks
            or self.registered_hosts
        )


@dataclass(frozen=True)
class Gate:
    """A hold after a step has passed, before the next (`steps: [5, 20, {pause: 10m},
    75, 100]`): for a time, or until an operator promotes. The canary keeps its weight
    and keeps being judged meanwhile: a breach still rolls back at once."""

    seconds: float | None = None
    """None: until promoted (`{pause: until_promoted}`)."""

    @property
    def until_promoted(self) -> bool:
        return self.seconds is None

    def describe(self) -> str:
        return "pause until promoted" if self.seconds is None else f"pause {self.seconds:g}s"


@dataclass(frozen=True)
class MatchRule:
    """A `canary_match` entry: requests whose header (or cookie) has this exact value go
    to the canary whatever the step, counted apart from the analysed traffic."""

    value: str
    header: str | None = None
    cookie: str | None = None

    def describe(self) -> str:
        where = f"header {self.header}" if self.header else f"cookie {self.cookie}"
        return f"{where} = {self.value}"


@dataclass(frozen=True)
class Sticky:
    """Keep each user on one version within a step: the user is the value of this header
    (or cookie); a user moves only when the canary's share grows past them."""

    header: str | None = None
    cookie: str | None = None

    def describe(self) -> str:
        return f"header {self.header}" if self.header else f"cookie {self.cookie}"


@dataclass(frozen=True)
class RolloutPlan:
    steps: tuple[float, ...] = (5, 20, 75, 100)
    step_duration: float = 60.0
    interval: float = 10.0
    window: float = 60.0
    """The sliding analysis window; it never reaches back before the step's start."""
    ack_timeout: float = 30.0
    """How long each node has to ACK a step's routes, from when that node was sent them."""
    ack_quorum: float = 1.0
    """The share of a region's nodes that must ACK a step's routes for the region to count
    as applied (issue 28); the rest, once past `ack_timeout`, are stragglers: named,
    left out of the analysis, not a rollback while the quorum holds. 1.0: every node."""
    nack_tolerance: int = 0
    """NACKing nodes of a region tolerated (as stragglers: they keep their last good
    config) before a rollback; 0: the first NACK rolls back."""
    max_hold: float = 300.0
    on_max_hold: OnMaxHold = OnMaxHold.ROLLBACK
    failures_before_rollback: int = 2
    waves: tuple[tuple[str, ...], ...] | None = None
    """None: lockstep (every region passes a step before any moves on)."""
    guardrails: Guardrails = field(default_factory=Guardrails)
    analysis: Analysis = field(default_factory=Analysis)
    warmup: Warmup = field(default_factory=Warmup)
    queries: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_QUERIES))
    gates: Mapping[int, Gate] = field(default_factory=dict)
    """Holds after a step (by the index of the step they follow)."""
    bake: float = 0.0
    """After the last step: seconds the canary keeps being judged at 100%, the old
    production pool kept warm at weight 0, before the rollout is final."""
    confirm_step: tuple[Webhook, ...] = ()
    """Asked before each weight increase; anything but a 2xx holds the step."""
    canary_match: tuple[MatchRule, ...] = ()
    sticky: Sticky | None = None

    def wave_list(self, regions: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
        return self.waves if self.waves is not None else (regions,)

    def analysis_tests(self, regions: int) -> int:
        """How many sequential tests each metric runs in a rollout over `regions` regions
        (steps below 100% and the shadow phase have a comparator), when its false-alarm
        level is shared by the rollout; 1 when it is per step."""
        if self.analysis.false_alarm_scope == FalseAlarmScope.STEP:
            return 1
        phases = sum(1 for w in self.steps if w < 100) + (1 if self.warmup.shadow_duration else 0)
        return max(1, phases * max(1, regions))

    def for_shadow(self) -> RolloutPlan:
        """This plan as the shadow phase reads it: requests and errors from the
        `shadow_` queries (what Envoy can count of mirrored requests)."""
        queries = {
            **self.queries,
            "requests": self.queries["shadow_requests"],
            "errors": self.queries["shadow_errors"],
        }
        return replace(self, queries=queries)

    @property
    def needs_latency_buckets(self) -> bool:
        return any(m.kind in (MetricKind.LATENCY, MetricKind.TAIL) for m in self.analysis.metrics)
