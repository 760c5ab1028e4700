"""Loading a mesh spec: YAML -> `MeshSpec`, or a `SpecError` listing every problem with
its file, field path and what is wrong.

The file's text becomes a document in `document.py` (UTF-8, bounded YAML); here the
document becomes the spec: regions, the listener, services and their pools. Sections
with parsers of their own: `rollout:` (`plan.py`), `istio:` (`istio.py`),
`notifications:` (`notifications.py`), `rollout_groups:` and `after:` (`groups.py`).
"""

from __future__ import annotations

import dataclasses
import datetime
import re
from pathlib import Path
from typing import Any

from xds_server.spec.checker import Checker, join
from xds_server.spec.document import load_document, utf8_text
from xds_server.spec.groups import check_after, parse_after, parse_groups
from xds_server.spec.istio import parse_istio
from xds_server.spec.model import (
    POOL_NAMES,
    Endpoint,
    Listener,
    MeshSpec,
    Pool,
    Protocol,
    Service,
    SpecError,
    SpecProblem,
)
from xds_server.spec.notifications import parse_notifications
from xds_server.spec.plan import check_health, parse_health_check, parse_plan
from xds_server.spec.rollout import (
    DEFAULT_QUERIES,
    GRPC_SERVER_FAULTS,
    GRPC_STATUS_CODES,
    HealthCheck,
    RolloutPlan,
    grpc_queries,
)
from xds_server.spec.values import NAME_RE, is_ip, kind_of, parse_host_port

_VERSION_RE = re.compile(r"^[A-Za-z0-9][-A-Za-z0-9_.]{0,62}$")
_SERVICE_KEYS = (
    "name",
    "domains",
    "prefix",
    "protocol",
    "grpc",
    "pools",
    "rollout",
    "notifications",
    "after",
)
_TOP_KEYS = (
    "regions",
    "listener",
    "services",
    "rollout",
    "istio",
    "notifications",
    "rollout_groups",
)


def load_spec(path: str | Path) -> MeshSpec:
    """Read and validate a spec file; raise SpecError naming the file on any problem."""
    source = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise SpecError(source, [SpecProblem("", f"cannot read file: {reason}")]) from None
    return parse_spec(utf8_text(data, source), source)


def parse_spec(text: str, source: str = "<memory>") -> MeshSpec:
    return validate_spec(load_document(text, source), source)


def validate_spec(doc: Any, source: str = "<memory>") -> MeshSpec:
    c = Checker()
    spec = _MeshParser(c, source).spec(doc)
    if c.problems or spec is None:
        raise SpecError(source, c.problems or [SpecProblem("", "empty spec")])
    return spec


class _MeshParser:
    def __init__(self, checker: Checker, source: str) -> None:
        self.c = checker
        self.source = source
        self.regions: tuple[str, ...] = ()
        self.default_plan = RolloutPlan()
        self.paths: dict[str, str] = {}
        """Each parsed service's field path (`services[2]`), for checks across services."""

    def spec(self, doc: Any) -> MeshSpec | None:
        if doc is None:
            self.c.fail("", "the spec is empty")
            return None
        top = self.c.mapping(doc, "", _TOP_KEYS)
        self.regions = tuple(self._regions(top.get("regions")))
        listener = self._listener(top.get("listener"))
        self.default_plan = parse_plan(
            self.c, top.get("rollout"), "rollout", RolloutPlan(), self.regions
        )
        services = self._services(top.get("services"))
        istio = None
        if top.get("istio") is not None:
            istio = parse_istio(self.c, top["istio"], services, self.regions, self.source)
        notifications = parse_notifications(self.c, top.get("notifications"), "notifications")
        groups = parse_groups(self.c, top.get("rollout_groups"), services, self.regions)
        check_after(self.c, services, self.paths, groups)
        return MeshSpec(
            self.regions, listener, tuple(services), self.source, istio, top, notifications, groups
        )

    def _regions(self, value: Any) -> list[str]:
        if value is None:
            self.c.fail("regions", "required: a list of region names")
            return []
        if not isinstance(value, list) or not value:
            self.c.fail(
                "regions", f"expected a non-empty list of region names, got {kind_of(value)}"
            )
            return []
        out: list[str] = []
        for i, name in enumerate(value):
            if not isinstance(name, str) or not NAME_RE.match(name):
                self.c.fail(
                    f"regions[{i}]",
                    f"bad region name {name!r}: use lowercase letters, digits and '-' (at most 63)",
                )
            elif name in out:
                self.c.fail(f"regions[{i}]", f"duplicate region {name!r}")
            else:
                out.append(name)
        return out

    def _listener(self, value: Any) -> Listener:
        if value is None:
            return Listener()
        m = self.c.mapping(value, "listener", ("port", "address"))
        port = m.get("port", 10000)
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            self.c.fail("listener.port", f"bad port {port!r}: expected an integer from 1 to 65535")
            port = 1
        address = m.get("address", "127.0.0.1")
        if not is_ip(address):
            self.c.fail("listener.address", f"bad address {address!r}: expected an IP address")
            address = "127.0.0.1"
        return Listener(address=address, port=port)

    def _services(self, value: Any) -> list[Service]:
        if value is None:
            self.c.fail("services", "required: a list of services")
            return []
        if not isinstance(value, list):
            self.c.fail("services", f"expected a list of services, got {kind_of(value)}")
            return []
        out: list[Service] = []
        domains_seen: dict[str, str] = {}
        for i, item in enumerate(value):
            svc = self._service(item, f"services[{i}]")
            if svc is None:
                continue
            if any(s.name == svc.name for s in out):
                self.c.fail(f"services[{i}].name", f"duplicate service {svc.name!r}")
                continue
            for d in svc.domains:
                if d in domains_seen:
                    self.c.fail(
                        f"services[{i}].domains",
                        f"domain {d!r} is already used by service {domains_seen[d]!r}; "
                        "Envoy needs each domain in one virtual host only",
                    )
                domains_seen.setdefault(d, svc.name)
            out.append(svc)
            self.paths[svc.name] = f"services[{i}]"
        return out

    def _service(self, value: Any, path: str) -> Service | None:
        m = self.c.mapping(value, path, _SERVICE_KEYS)
        if not m:
            return None
        name = m.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            self.c.fail(
                join(path, "name"),
                f"bad service name {name!r}: use lowercase letters, digits and '-' (at most 63)",
            )
            name = None
        domains = m.get("domains", ["*"])
        if (
            not isinstance(domains, list)
            or not domains
            or not all(isinstance(d, str) and d for d in domains)
        ):
            self.c.fail(join(path, "domains"), "expected a non-empty list of domain strings")
            domains = ["*"]
        elif len(set(domains)) != len(domains):
            self.c.fail(join(path, "domains"), "duplicate domain in the list")
        prefix = m.get("prefix", "/")
        if not isinstance(prefix, str) or not prefix.startswith("/"):
            self.c.fail(join(path, "prefix"), f"bad prefix {prefix!r}: must start with '/'")
            prefix = "/"
        pools = self._pools(m.get("pools"), join(path, "pools"))
        plan = parse_plan(
            self.c, m.get("rollout"), join(path, "rollout"), self.default_plan, self.regions
        )
        notifications = None
        if "notifications" in m:
            notifications = parse_notifications(
                self.c, m["notifications"], join(path, "notifications")
            )
        protocol = self.c.choice(m.get("protocol", "http"), join(path, "protocol"), Protocol)
        error_codes = self._grpc(m.get("grpc"), join(path, "grpc"), protocol)
        after = parse_after(self.c, m.get("after"), join(path, "after"))
        if name is None or pools is None or protocol is None:
            return None
        if any(p.health_check is not None for p in pools.values()):
            plan = dataclasses.replace(
                plan, warmup=dataclasses.replace(plan.warmup, pool_checks=True)
            )
        self._check_health(pools, plan, name, protocol, join(path, "pools"))
        if protocol == Protocol.GRPC:
            plan = _with_grpc_queries(plan, error_codes)
        if any(pools[p].registered for p in ("canary", "baseline") if p in pools):
            # No weight before a registered host is there: warm-up waits for one.
            warmup = dataclasses.replace(plan.warmup, registered_hosts=True)
            plan = dataclasses.replace(plan, warmup=warmup)
        return Service(
            name, tuple(domains), prefix, pools, plan, notifications, protocol, error_codes, after
        )

    def _grpc(self, value: Any, path: str, protocol: Protocol | None) -> tuple[str, ...]:
        """`grpc: {error_codes: [UNAVAILABLE, ...]}`: the statuses that count as errors."""
        if value is None:
            return GRPC_SERVER_FAULTS
        if protocol != Protocol.GRPC:
            self.c.fail(path, "only a service with `protocol: grpc` has a `grpc:` section")
        m = self.c.mapping(value, path, ("error_codes",))
        codes = m.get("error_codes", list(GRPC_SERVER_FAULTS))
        cpath = join(path, "error_codes")
        if not isinstance(codes, list) or not codes:
            self.c.fail(cpath, "expected a non-empty list of gRPC status names, like UNAVAILABLE")
            return GRPC_SERVER_FAULTS
        known = ", ".join(c for c in GRPC_STATUS_CODES if c != "OK")
        out: list[str] = []
        for i, code in enumerate(codes):
            text = str(code).upper()
            if text not in GRPC_STATUS_CODES or text == "OK":
                self.c.fail(
                    f"{cpath}[{i}]",
                    f"unknown gRPC status {code!r} (one of {known})",
                )
            elif text not in out:
                out.append(text)
        return tuple(out) or GRPC_SERVER_FAULTS

    def _pools(self, value: Any, path: str) -> dict[str, Pool] | None:
        if value is None:
            self.c.fail(path, "required: at least a production pool")
            return None
        m = self.c.mapping(value, path, POOL_NAMES)
        if not m:
            return None
        if "production" not in m:
            self.c.fail(path, "missing production pool")
        out: dict[str, Pool] = {}
        for pool_name in POOL_NAMES:
            if pool_name in m:
                pool = self._pool(pool_name, m[pool_name], join(path, pool_name))
                if pool is not None:
                    out[pool_name] = pool
        return out if "production" in out else None

    def _check_health(
        self, pools: dict[str, Pool], plan: RolloutPlan, name: str, protocol: Protocol, path: str
    ) -> None:
        """Each warm-up check against the pools it checks (its own, or the service's for
        the pools without one): their endpoints' health ports, the service's protocol."""
        by_check: dict[int, tuple[HealthCheck | None, dict[str, bool]]] = {}
        for pool_name, pool in pools.items():
            hc = pool.health_check or plan.warmup.health_check
            ports = _health_ports(pool_name, pool, path)
            entry = by_check.setdefault(id(hc), (hc, {}))
            entry[1].update(ports)
        for hc, ports in by_check.values():
            check_health(self.c, hc, name, protocol == Protocol.GRPC, ports)

    def _pool(self, name: str, value: Any, path: str) -> Pool | None:
        m = self.c.mapping(value, path, ("version", "endpoints", "health_check"))
        if not m:
            return None
        version = m.get("version")
        # YAML reads `1.2` as a number and `2024-05-01` as a date: a version is their text.
        if isinstance(version, int | float | datetime.date) and not isinstance(version, bool):
            version = version.isoformat() if isinstance(version, datetime.date) else str(version)
        if not isinstance(version, str) or not _VERSION_RE.match(version):
            self.c.fail(
                join(path, "version"),
                f"bad version {version!r}: expected a short string such as v1 or 2024-05-01",
            )
            version = None
        hc = None
        if m.get("health_check") not in (None, False):
            hc = parse_health_check(self.c, m["health_check"], join(path, "health_check"))
        if "endpoints" not in m:  # the registry's instances (replicas on etcd)
            return None if version is None else Pool(name, version, {}, True, hc)
        endpoints = self._endpoints(m.get("endpoints"), join(path, "endpoints"))
        if version is None or endpoints is None:
            return None
        return Pool(name, version, endpoints, health_check=hc)

    def _endpoints(self, value: Any, path: str) -> dict[str, tuple[Endpoint, ...]] | None:
        if value is None:
            self.c.fail(path, "required: endpoints per region")
            return None
        if not isinstance(value, dict):
            self.c.fail(path, f"expected a mapping of region to addresses, got {kind_of(value)}")
            return None
        ok = True
        out: dict[str, tuple[Endpoint, ...]] = {}
        for region, addrs in value.items():
            rpath = join(path, str(region))
            if region not in self.regions:
                self.c.fail(
                    rpath, f"unknown region {region!r} (regions: {', '.join(self.regions)})"
                )
                ok = False
                continue
            if not isinstance(addrs, list) or not addrs:
                self.c.fail(rpath, "expected a non-empty list of HOST:PORT addresses")
                ok = False
                continue
            eps: list[Endpoint] = []
            for j, addr in enumerate(addrs):
                ep = self._address(addr, f"{rpath}[{j}]")
                if ep is None:
                    ok = False
                elif any((e.host, e.port) == (ep.host, ep.port) for e in eps):
                    self.c.fail(f"{rpath}[{j}]", f"duplicate address {str(ep)!r}")
                    ok = False
                else:
                    eps.append(ep)
            out[region] = tuple(eps)
        for region in self.regions:
            if region not in value:
                self.c.fail(path, f"no endpoints for region {region!r}")
                ok = False
        return out if ok else None

    def _address(self, value: Any, path: str) -> Endpoint | None:
        """`HOST:PORT`, or `{address: HOST:PORT, health_port: N}` for a host whose health
        is served on a port of its own."""
        if isinstance(value, dict):
            m = self.c.mapping(value, path, ("address", "health_port"))
            if "address" not in m:
                self.c.fail(join(path, "address"), "required: the host's HOST:PORT")
                return None
            ep = self._address(m["address"], join(path, "address"))
            if "health_port" not in m or ep is None:
                return ep
            health = m["health_port"]
            if isinstance(health, bool) or not isinstance(health, int) or not 1 <= health <= 65535:
                self.c.fail(
                    join(path, "health_port"),
                    f"bad port {health!r}: expected an integer from 1 to 65535",
                )
                return None
            return Endpoint(ep.host, ep.port, health)
        try:
            host, port = parse_host_port(value if isinstance(value, str) else "", port_from=1)
        except ValueError as exc:
            self.c.fail(path, f"bad address {value!r}: {exc}")
            return None
        if not is_ip(host):
            self.c.fail(
                path,
                f"bad address {value!r}: the host must be an IP address "
                "(Envoy does not resolve EDS endpoints)",
            )
            return None
        return Endpoint(host, port)


def _health_ports(name: str, pool: Pool, path: str) -> dict[str, bool]:
    """Each endpoint's field -> does it name a `health_port`? (A registered pool's hosts
    bring their own: `register --health-port`.)"""
    out: dict[str, bool] = {}
    for region, eps in pool.endpoints.items():
        for j, ep in enumerate(eps):
            where = f"{path}.{name}.endpoints.{region}[{j}]"
            out[where + ".health_port" if ep.health_port else where] = bool(ep.health_port)
    return out


def _with_grpc_queries(plan: RolloutPlan, error_codes: tuple[str, ...]) -> RolloutPlan:
    """A gRPC service reads errors from Envoy's gRPC stats: each default query it did not
    write itself is replaced by its gRPC counterpart (`rollout.grpc_queries`)."""
    ours = grpc_queries(error_codes)
    queries = dict(plan.queries)
    for key, query in ours.items():
        if queries.get(key) == DEFAULT_QUERIES[key]:
            queries[key] = query
    return dataclasses.replace(plan, queries=queries)
