"""The mesh spec: typed, frozen models and one validator that reports every problem.

Nothing here imports anything else of the package: the spec is what every other layer
reads, so it sits at the bottom.
"""

from xds_server.spec.mesh import load_spec, parse_spec, validate_spec
from xds_server.spec.model import (
    POOL_NAMES,
    Endpoint,
    IstioCluster,
    IstioConfig,
    Listener,
    MeshSpec,
    Pool,
    Service,
    SpecError,
    SpecProblem,
)
from xds_server.spec.rollout import (
    DEFAULT_METRICS,
    DEFAULT_QUERIES,
    Analysis,
    Direction,
    FalseAlarmScope,
    Guardrails,
    HealthCheck,
    MetricKind,
    MetricSpec,
    NoDataRule,
    OnMaxHold,
    RolloutPlan,
    Warmup,
    Webhook,
)
from xds_server.spec.values import parse_duration, parse_host_port

__all__ = [
    "DEFAULT_METRICS",
    "DEFAULT_QUERIES",
    "POOL_NAMES",
    "Analysis",
    "Direction",
    "Endpoint",
    "FalseAlarmScope",
    "Guardrails",
    "HealthCheck",
    "IstioCluster",
    "IstioConfig",
    "Listener",
    "MeshSpec",
    "MetricKind",
    "MetricSpec",
    "NoDataRule",
    "OnMaxHold",
    "Pool",
    "RolloutPlan",
    "Service",
    "SpecError",
    "SpecProblem",
    "Warmup",
    "Webhook",
    "load_spec",
    "parse_duration",
    "parse_host_port",
    "parse_spec",
    "validate_spec",
]
