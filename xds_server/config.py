"""The mesh spec: typed, immutable models and a loader that reports every problem at once.

A spec names the regions, the ingress listener, and for each service its HTTP match and
its pools. Validation collects *all* problems (file, field path, what is wrong) so that a
user fixes a spec in one pass, and so that a bad live edit can be logged in full while
the server keeps serving the last good spec.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from xds_server.rollout.plan import RolloutPlan

POOL_NAMES: tuple[str, ...] = ("production", "baseline", "canary")
"""The pools a service may have, in the order they are listed everywhere."""

_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_VERSION_RE = re.compile(r"^[A-Za-z0-9][-A-Za-z0-9_.]{0,62}$")


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Pool:
    name: str
    version: str
    endpoints: Mapping[str, tuple[Endpoint, ...]]
    """Endpoints per region; every region of the spec has at least one."""


@dataclass(frozen=True)
class Service:
    name: str
    domains: tuple[str, ...]
    prefix: str
    pools: Mapping[str, Pool]
    """Pools by name, always with `production`, in POOL_NAMES order."""
    rollout: RolloutPlan = field(default=None, compare=False)  # type: ignore[assignment]
    """How a canary of this service is rolled out (spec defaults + the service's own)."""

    def pool_names(self) -> tuple[str, ...]:
        return tuple(self.pools)


@dataclass(frozen=True)
class Listener:
    address: str = "127.0.0.1"
    port: int = 10000


@dataclass(frozen=True)
class IstioCluster:
    """Where one region's Istio objects are applied: a kubeconfig context, or in-cluster."""

    context: str | None = None
    kubeconfig: str | None = None
    """A path (relative ones are relative to the spec file); None: $KUBECONFIG or
    ~/.kube/config, as kubectl does."""
    in_cluster: bool = False
    """Use the pod's ServiceAccount (xds-server running inside that region's cluster)."""


@dataclass(frozen=True)
class IstioConfig:
    """The `istio:` section: how rollout state becomes Istio objects, and where they go."""

    namespace: str = "default"
    version_label: str = "version"
    pool_label: str = "xds-server/pool"
    """Second subset label, so that baseline (same version as production) selects its own
    pods; "" selects by version only."""
    cluster_domain: str = "cluster.local"
    apply: bool = False
    """Apply each region's objects to its cluster after every decision (`serve`)."""
    clusters: Mapping[str, IstioCluster] = field(default_factory=dict)
    retry_initial: float = 1.0
    retry_max: float = 60.0
    timeout: float = 10.0
    """Per request to a cluster's API server (connect and read), in seconds."""
    resync: float = 300.0
    """Re-apply unchanged objects this often, undoing hand edits (level-triggered)."""
    instance: str = "default"
    """Labels every object; with `prune`, only this instance's objects are deleted, so
    xds-servers sharing a namespace need different instances."""
    prune: bool = True
    """Delete this instance's objects of services no longer in the spec."""

    def host(self, service: str) -> str:
        return f"{service}.{self.namespace}.svc.{self.cluster_domain}"


@dataclass(frozen=True)
class MeshSpec:
    regions: tuple[str, ...]
    listener: Listener
    services: tuple[Service, ...]
    source: str = "<memory>"
    istio: IstioConfig | None = None
    """The optional `istio:` section; None when the spec has none."""
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """The parsed YAML document, for sections that later layers interpret themselves."""

    def service(self, name: str) -> Service:
        for svc in self.services:
            if svc.name == name:
                return svc
        raise KeyError(name)


@dataclass(frozen=True)
class SpecProblem:
    path: str
    message: str


class SpecError(Exception):
    """A spec that cannot be used; `problems` lists every problem found."""

    def __init__(self, source: str, problems: list[SpecProblem]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        lines = [
            f"{self.source}: {p.path}: {p.message}" if p.path else f"{self.source}: {p.message}"
            for p in self.problems
        ]
        return "\n".join(lines)


def load_spec(path: str | Path) -> MeshSpec:
    """Read and validate a spec file; raise SpecError naming the file on any problem."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(source, [SpecProblem("", f"cannot read file: {exc.strerror}")]) from None
    return parse_spec(text, source)


def parse_spec(text: str, source: str = "<memory>") -> MeshSpec:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f"line {mark.line + 1}, column {mark.column + 1}"
        reason = getattr(exc, "problem", None) or str(exc)
        raise SpecError(source, [SpecProblem(where, f"not valid YAML: {reason}")]) from None
    return validate_spec(doc, source)


def validate_spec(doc: Any, source: str = "<memory>") -> MeshSpec:
    v = _Validator()
    spec = v.spec(doc, source)
    if v.problems or spec is None:
        raise SpecError(source, v.problems or [SpecProblem("", "empty spec")])
    return spec


class _Validator:
    def __init__(self) -> None:
        self.problems: list[SpecProblem] = []

    def fail(self, path: str, message: str) -> None:
        self.problems.append(SpecProblem(path, message))

    def mapping(self, value: Any, path: str, known: set[str] | frozenset[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(path or "(top level)", f"expected a mapping, got {_kind(value)}")
            return {}
        for key in value:
            if not isinstance(key, str) or key not in known:
                self.fail(
                    _join(path, str(key)),
                    f"unknown field (expected one of: {', '.join(sorted(known))})",
                )
        return value

    def spec(self, doc: Any, source: str) -> MeshSpec | None:
        if doc is None:
            self.fail("", "the spec is empty")
            return None
        from xds_server.rollout.plan import RolloutPlan, parse_plan  # (imports this module)

        top = self.mapping(doc, "", {"regions", "listener", "services", "rollout", "istio"})
        regions = self.regions(top.get("regions"))
        listener = self.listener(top.get("listener"))
        self.default_plan = parse_plan(
            top.get("rollout"), "rollout", RolloutPlan(), tuple(regions), self.fail
        )
        services = self.services(top.get("services"), regions)
        istio = None
        if top.get("istio") is not None:
            istio = self.istio(top["istio"], regions, services, source)
        return MeshSpec(tuple(regions), listener, tuple(services), source, istio, top)

    def regions(self, value: Any) -> list[str]:
        if value is None:
            self.fail("regions", "required: a list of region names")
            return []
        if not isinstance(value, list) or not value:
            self.fail("regions", f"expected a non-empty list of region names, got {_kind(value)}")
            return []
        out: list[str] = []
        for i, name in enumerate(value):
            if not isinstance(name, str) or not _NAME_RE.match(name):
                self.fail(
                    f"regions[{i}]",
                    f"bad region name {name!r}: use lowercase letters, digits and '-' (at most 63)",
                )
            elif name in out:
                self.fail(f"regions[{i}]", f"duplicate region {name!r}")
            else:
                out.append(name)
        return out

    def listener(self, value: Any) -> Listener:
        if value is None:
            return Listener()
        m = self.mapping(value, "listener", {"port", "address"})
        port = self.port(m.get("port", 10000), "listener.port")
        address = m.get("address", "127.0.0.1")
        if not _is_ip(address):
            self.fail("listener.address", f"bad address {address!r}: expected an IP address")
            address = "127.0.0.1"
        return Listener(address=address, port=port)

    def port(self, value: Any, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            self.fail(path, f"bad port {value!r}: expected an integer from 1 to 65535")
            return 1
        return value

    def services(self, value: Any, regions: list[str]) -> list[Service]:
        if value is None:
            self.fail("services", "required: a list of services")
            return []
        if not isinstance(value, list):
            self.fail("services", f"expected a list of services, got {_kind(value)}")
            return []
        out: list[Service] = []
        names: set[str] = set()
        domains_seen: dict[str, str] = {}
        for i, item in enumerate(value):
            svc = self.service(item, f"services[{i}]", regions)
            if svc is None:
                continue
            if svc.name in names:
                self.fail(f"services[{i}].name", f"duplicate service {svc.name!r}")
                continue
            names.add(svc.name)
            for d in svc.domains:
                if d in domains_seen:
                    self.fail(
                        f"services[{i}].domains",
                        f"domain {d!r} is already used by service {domains_seen[d]!r}; "
                        "Envoy needs each domain in one virtual host only",
                    )
                domains_seen.setdefault(d, svc.name)
            out.append(svc)
        return out

    def service(self, value: Any, path: str, regions: list[str]) -> Service | None:
        from xds_server.rollout.plan import parse_plan  # (rollout.plan imports this module)

        m = self.mapping(value, path, {"name", "domains", "prefix", "pools", "rollout"})
        if not m:
            return None
        name = m.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            self.fail(
                _join(path, "name"),
                f"bad service name {name!r}: use lowercase letters, digits and '-' (at most 63)",
            )
            name = None
        domains = m.get("domains", ["*"])
        if (
            not isinstance(domains, list)
            or not domains
            or not all(isinstance(d, str) and d for d in domains)
        ):
            self.fail(_join(path, "domains"), "expected a non-empty list of domain strings")
            domains = ["*"]
        elif len(set(domains)) != len(domains):
            self.fail(_join(path, "domains"), "duplicate domain in the list")
        prefix = m.get("prefix", "/")
        if not isinstance(prefix, str) or not prefix.startswith("/"):
            self.fail(_join(path, "prefix"), f"bad prefix {prefix!r}: must start with '/'")
            prefix = "/"
        pools = self.pools(m.get("pools"), _join(path, "pools"), regions)
        plan = parse_plan(
            m.get("rollout"), _join(path, "rollout"), self.default_plan, tuple(regions), self.fail
        )
        if name is None or pools is None:
            return None
        return Service(name, tuple(domains), prefix, pools, plan)

    def pools(self, value: Any, path: str, regions: list[str]) -> dict[str, Pool] | None:
        if value is None:
            self.fail(path, "required: at least a production pool")
            return None
        m = self.mapping(value, path, set(POOL_NAMES))
        if not m:
            return None
        if "production" not in m:
            self.fail(path, "missing production pool")
        out: dict[str, Pool] = {}
        for pool_name in POOL_NAMES:
            if pool_name in m:
                pool = self.pool(pool_name, m[pool_name], _join(path, pool_name), regions)
                if pool is not None:
                    out[pool_name] = pool
        return out if "production" in out else None

    def pool(self, name: str, value: Any, path: str, regions: list[str]) -> Pool | None:
        m = self.mapping(value, path, {"version", "endpoints"})
        if not m:
            return None
        version = m.get("version")
        # YAML reads `1.2` as a number and `2024-05-01` as a date: a version is their text.
        if isinstance(version, int | float | datetime.date) and not isinstance(version, bool):
            version = version.isoformat() if isinstance(version, datetime.date) else str(version)
        if not isinstance(version, str) or not _VERSION_RE.match(version):
            self.fail(
                _join(path, "version"),
                f"bad version {version!r}: expected a short string such as v1 or 2024-05-01",
            )
            version = None
        endpoints = self.endpoints(m.get("endpoints"), _join(path, "endpoints"), regions)
        if version is None or endpoints is None:
            return None
        return Pool(name, version, endpoints)

    def endpoints(
        self, value: Any, path: str, regions: list[str]
    ) -> dict[str, tuple[Endpoint, ...]] | None:
        if value is None:
            self.fail(path, "required: endpoints per region")
            return None
        if not isinstance(value, dict):
            self.fail(path, f"expected a mapping of region to addresses, got {_kind(value)}")
            return None
        ok = True
        out: dict[str, tuple[Endpoint, ...]] = {}
        for region, addrs in value.items():
            rpath = _join(path, str(region))
            if region not in regions:
                self.fail(rpath, f"unknown region {region!r} (regions: {', '.join(regions)})")
                ok = False
                continue
            if not isinstance(addrs, list) or not addrs:
                self.fail(rpath, "expected a non-empty list of HOST:PORT addresses")
                ok = False
                continue
            eps: list[Endpoint] = []
            for j, addr in enumerate(addrs):
                ep = self.address(addr, f"{rpath}[{j}]")
                if ep is None:
                    ok = False
                elif ep in eps:
                    self.fail(f"{rpath}[{j}]", f"duplicate address {addr!r}")
                    ok = False
                else:
                    eps.append(ep)
            out[region] = tuple(eps)
        for region in regions:
            if region not in value:
                self.fail(path, f"no endpoints for region {region!r}")
                ok = False
        return out if ok else None

    def address(self, value: Any, path: str) -> Endpoint | None:
        if not isinstance(value, str):
            self.fail(path, f"bad address {value!r}: expected 'HOST:PORT'")
            return None
        host, sep, port_text = value.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not sep or not port_text.isdigit():
            self.fail(path, f"bad address {value!r}: expected 'HOST:PORT'")
            return None
        if not _is_ip(host):
            self.fail(
                path,
                f"bad address {value!r}: the host must be an IP address "
                "(Envoy does not resolve EDS endpoints)",
            )
            return None
        port = int(port_text)
        if not 1 <= port <= 65535:
            self.fail(path, f"bad address {value!r}: port must be from 1 to 65535")
            return None
        return Endpoint(host, port)

    # ---- the istio: section ----

    def istio(
        self, value: Any, regions: list[str], services: list[Service], source: str
    ) -> IstioConfig | None:
        from xds_server.rollout.plan import parse_duration  # (rollout.plan imports this module)

        m = self.mapping(value, "istio", _ISTIO_KEYS)
        if not m and not isinstance(value, dict):
            return None
        defaults = IstioConfig()
        namespace = m.get("namespace", defaults.namespace)
        if not isinstance(namespace, str) or not _NAME_RE.match(namespace):
            self.fail(
                "istio.namespace",
                f"bad namespace {namespace!r}: use lowercase letters, digits and '-' (at most 63)",
            )
        labels = {}
        for key in ("version_label", "pool_label"):
            label = m.get(key, getattr(defaults, key))
            if key == "pool_label" and label == "":
                labels[key] = ""
            elif not isinstance(label, str) or not _is_label_key(label):
                self.fail(
                    f"istio.{key}",
                    f"bad label key {label!r}: expected NAME or PREFIX/NAME as in Kubernetes "
                    "(NAME: at most 63 letters, digits, '-', '_', '.')",
                )
            else:
                labels[key] = label
        if labels.get("version_label") and labels.get("version_label") == labels.get("pool_label"):
            self.fail("istio.pool_label", "must differ from istio.version_label")
        domain = m.get("cluster_domain", defaults.cluster_domain)
        if not isinstance(domain, str) or not _is_dns_subdomain(domain):
            self.fail("istio.cluster_domain", f"bad DNS domain {domain!r}")
        apply = m.get("apply", False)
        if not isinstance(apply, bool):
            self.fail("istio.apply", f"expected true or false, got {_kind(apply)}")
            apply = False
        prune = m.get("prune", defaults.prune)
        if not isinstance(prune, bool):
            self.fail("istio.prune", f"expected true or false, got {_kind(prune)}")
            prune = defaults.prune
        instance = m.get("instance", defaults.instance)
        if not isinstance(instance, str) or not instance or not _is_label_value(instance):
            self.fail(
                "istio.instance",
                f"bad instance {instance!r}: it labels objects, so at most 63 letters, "
                "digits, '-', '_', '.', starting and ending with a letter or digit",
            )
            instance = defaults.instance
        seconds: dict[str, float] = {}
        retry = self.mapping(m.get("retry", {}), "istio.retry", {"initial", "max"})
        for path, raw, default in (
            ("istio.retry.initial", retry.get("initial"), defaults.retry_initial),
            ("istio.retry.max", retry.get("max"), defaults.retry_max),
            ("istio.timeout", m.get("timeout"), defaults.timeout),
            ("istio.resync", m.get("resync"), defaults.resync),
        ):
            parsed = default if raw is None else parse_duration(raw)
            if parsed is None or parsed <= 0:
                self.fail(path, f"bad duration {raw!r}: expected a positive duration such as 5s")
                parsed = default
            seconds[path] = parsed
        if seconds["istio.retry.max"] < seconds["istio.retry.initial"]:
            self.fail("istio.retry.max", "must be at least istio.retry.initial")
        clusters = self.istio_clusters(m.get("regions"), regions, apply, source)
        pool_label = labels.get("pool_label", defaults.pool_label)
        for i, svc in enumerate(services):
            for pool in svc.pools.values():
                if not _is_label_value(pool.version):
                    self.fail(
                        f"services[{i}].pools.{pool.name}.version",
                        f"version {pool.version!r} cannot be a Kubernetes label value "
                        "(the istio section selects pods by it): it must end with a letter "
                        "or digit",
                    )
            base, prod = svc.pools.get("baseline"), svc.pools["production"]
            if not pool_label and base is not None and base.version == prod.version:
                self.fail(
                    "istio.pool_label",
                    f"empty, so subsets select by version only, but service {svc.name!r} has "
                    f"baseline and production both at {prod.version!r}: their subsets would "
                    "select the same pods",
                )
        return IstioConfig(
            namespace=namespace if isinstance(namespace, str) else defaults.namespace,
            version_label=labels.get("version_label", defaults.version_label),
            pool_label=pool_label,
            cluster_domain=domain if isinstance(domain, str) else defaults.cluster_domain,
            apply=apply,
            clusters=clusters,
            retry_initial=seconds["istio.retry.initial"],
            retry_max=seconds["istio.retry.max"],
            timeout=seconds["istio.timeout"],
            resync=seconds["istio.resync"],
            instance=instance,
            prune=prune,
        )

    def istio_clusters(
        self, value: Any, regions: list[str], apply: bool, source: str
    ) -> dict[str, IstioCluster]:
        if value is None:
            if apply:
                self.fail("istio.regions", "required when apply is true: a cluster per region")
            return {}
        if not isinstance(value, dict):
            self.fail(
                "istio.regions", f"expected a mapping of region to cluster, got {_kind(value)}"
            )
            return {}
        out: dict[str, IstioCluster] = {}
        seen: dict[tuple[str | None, str | None], str] = {}
        for region, item in value.items():
            path = f"istio.regions.{region}"
            if region not in regions:
                self.fail(path, f"unknown region {region!r} (regions: {', '.join(regions)})")
                continue
            m = self.mapping(item, path, {"context", "kubeconfig", "in_cluster"})
            in_cluster = m.get("in_cluster", False)
            if not isinstance(in_cluster, bool):
                self.fail(f"{path}.in_cluster", f"expected true or false, got {_kind(in_cluster)}")
                continue
            context, kubeconfig = m.get("context"), m.get("kubeconfig")
            if in_cluster:
                if context is not None or kubeconfig is not None:
                    self.fail(
                        path,
                        "in_cluster uses the pod's ServiceAccount: drop context and kubeconfig",
                    )
                    continue
            elif not isinstance(context, str) or not context:
                self.fail(
                    f"{path}.context",
                    "required: the kubeconfig context of this "
                    "region's cluster (or in_cluster: true)",
                )
                continue
            if kubeconfig is not None:
                if not isinstance(kubeconfig, str) or not kubeconfig:
                    self.fail(f"{path}.kubeconfig", "expected a file path")
                    continue
                if not Path(kubeconfig).is_absolute() and source != "<memory>":
                    kubeconfig = str(Path(source).parent / kubeconfig)
            key = (kubeconfig, context)
            if key in seen:
                self.fail(
                    path,
                    f"same cluster as region {seen[key]!r}: each region's objects are named "
                    "after it, so two regions in one cluster would route the same host twice",
                )
                continue
            seen[key] = region
            out[region] = IstioCluster(context, kubeconfig, in_cluster)
        if apply:
            for region in regions:
                if region not in value:
                    self.fail(
                        "istio.regions",
                        f"no cluster for region {region!r} (apply: true needs one per region)",
                    )
        return out


_ISTIO_KEYS = frozenset(
    {
        "namespace",
        "version_label",
        "pool_label",
        "cluster_domain",
        "apply",
        "regions",
        "retry",
        "timeout",
        "resync",
        "instance",
        "prune",
    }
)
_LABEL_NAME_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def _is_dns_subdomain(value: str) -> bool:
    return 0 < len(value) <= 253 and all(_DNS_LABEL_RE.match(p) for p in value.split("."))


def _is_label_key(value: str) -> bool:
    """A Kubernetes label key: NAME or PREFIX/NAME, PREFIX a DNS subdomain."""
    prefix, slash, name = value.rpartition("/")
    return bool(_LABEL_NAME_RE.match(name)) and (not slash or _is_dns_subdomain(prefix))


def _is_label_value(value: str) -> bool:
    return value == "" or bool(_LABEL_NAME_RE.match(value))


def _is_ip(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }.get(type(value), type(value).__name__)
