"""Loading a mesh spec: YAML -> `MeshSpec`, or a `SpecError` listing every problem with
its file, field path and what is wrong."""

from __future__ import annotations

import dataclasses
import datetime
import re
from pathlib import Path
from typing import Any

import yaml

from xds_server.spec.checker import Checker, join, one_line, shown
from xds_server.spec.model import (
    POOL_NAMES,
    Endpoint,
    IstioCluster,
    IstioConfig,
    Listener,
    MeshSpec,
    Pool,
    Protocol,
    Service,
    SpecError,
    SpecProblem,
)
from xds_server.spec.notifications import parse_notifications
from xds_server.spec.plan import parse_plan
from xds_server.spec.rollout import (
    DEFAULT_QUERIES,
    GRPC_SERVER_FAULTS,
    GRPC_STATUS_CODES,
    RolloutPlan,
    grpc_queries,
)
from xds_server.spec.values import (
    NAME_RE,
    is_dns_subdomain,
    is_ip,
    is_label_key,
    is_label_value,
    kind_of,
    parse_host_port,
)

_VERSION_RE = re.compile(r"^[A-Za-z0-9][-A-Za-z0-9_.]{0,62}$")
_TOP_KEYS = ("regions", "listener", "services", "rollout", "istio", "notifications")
_ISTIO_KEYS = (
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
)


MAX_DEPTH = 100
"""How deeply collections may nest, aliases followed. The deepest field of a real spec is
about 7 levels down (services[0].rollout.analysis.metrics.NAME.field), so 100 refuses
nothing a person writes; it stops a corrupted or hostile file long before PyYAML's
recursive composer (about 3 stack frames a level) reaches Python's recursion limit, and
before the checker's messages repr a value nested thousands deep."""
MAX_ALIASED = 1_000_000
"""How many values aliases may add by repetition (a 'billion laughs' file is a few lines
that would make one error message print billions of them)."""


def load_spec(path: str | Path) -> MeshSpec:
    """Read and validate a spec file; raise SpecError naming the file on any problem."""
    source = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise SpecError(source, [SpecProblem("", f"cannot read file: {reason}")]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(source, [_not_utf8(data, exc)]) from None
    return parse_spec(text, source)


def _not_utf8(data: bytes, exc: UnicodeDecodeError) -> SpecProblem:
    line = data.count(b"\n", 0, exc.start) + 1
    line_start = data.rfind(b"\n", 0, exc.start) + 1
    column = len(data[line_start : exc.start].decode("utf-8", "replace")) + 1
    return SpecProblem(
        f"line {line}, column {column}",
        f"not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start} ({exc.reason}); "
        "a spec is a UTF-8 YAML file",
    )


def parse_spec(text: str, source: str = "<memory>") -> MeshSpec:
    try:
        doc = _load_yaml(text)
    except yaml.YAMLError as exc:
        raise SpecError(source, [_yaml_problem(exc, text)]) from None
    return validate_spec(doc, source)


class _Refused(yaml.MarkedYAMLError):
    """Valid YAML this loader will not build (too deep, aliases repeating too much)."""


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader, bounded: nesting deeper than MAX_DEPTH is refused while it is
    composed (before the recursion gets deep), and a scalar its tag cannot read (a date
    like 2024-13-45, an integer past Python's 4,300 digits, `!!int x`) is a YAML error at
    its line instead of a ValueError from inside PyYAML."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.depth = 0
        self.aliased = False

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if not self.check_event(yaml.SequenceStartEvent, yaml.MappingStartEvent):
            self.aliased = self.aliased or self.check_event(yaml.AliasEvent)
            return super().compose_node(parent, index)
        if self.depth >= MAX_DEPTH:
            mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
            raise _Refused(None, None, f"nesting deeper than {MAX_DEPTH} levels", mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except Exception as exc:  # whatever a tag's constructor raises on a bad scalar
            tag = str(node.tag).replace("tag:yaml.org,2002:", "!!")
            value = node.value if isinstance(node, yaml.ScalarNode) else "a collection"
            reason = f" ({str(exc).split(';')[0]})" if isinstance(exc, ValueError) else ""
            raise yaml.constructor.ConstructorError(
                None, None, f"{shown(value)} is not a valid {tag}{reason}", node.start_mark
            ) from None


def _load_yaml(text: str) -> Any:
    loader = _SpecLoader(text)  # (a ReaderError here: a character YAML does not allow)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if loader.aliased:
            _check_aliases(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_aliases(root: yaml.Node) -> None:
    """Refuse what aliases make of a document the composer let through: nesting deeper
    than MAX_DEPTH, a collection inside itself, more than MAX_ALIASED repeated values.
    Iterative, each node once."""
    depth: dict[int, int] = {}  # by id(node): collections nested at and below it
    size: dict[int, int] = {}  # by id(node): values, aliases expanded (capped)
    open_: set[int] = set()  # the collections on the current path
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, closing = stack.pop()
        kids = _children(node)
        if closing:
            open_.discard(id(node))
            below = max((depth[id(k)] for k in kids), default=0)
            depth[id(node)] = below + isinstance(node, yaml.CollectionNode)
            size[id(node)] = min(1 + sum(size[id(k)] for k in kids), 2 * MAX_ALIASED)
            if depth[id(node)] > MAX_DEPTH:
                msg = f"nesting deeper than {MAX_DEPTH} levels (aliases followed)"
                raise _Refused(None, None, msg, node.start_mark)
        elif id(node) in open_:
            msg = "an alias inside this collection refers to it: endless nesting"
            raise _Refused(None, None, msg, node.start_mark)
        elif id(node) not in depth:
            open_.add(id(node))
            stack.append((node, True))
            stack.extend((k, False) for k in kids)
    if size[id(root)] - len(size) > MAX_ALIASED:
        msg = f"aliases repeat more than {MAX_ALIASED:,} values"
        raise _Refused(None, None, msg, root.start_mark)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _yaml_problem(exc: yaml.YAMLError, text: str) -> SpecProblem:
    """One line for a YAML error: where, what, and what PyYAML was reading there."""
    if isinstance(exc, yaml.reader.ReaderError):
        before = text[: exc.position]
        line = len(_LINE_BREAK.findall(before)) + 1
        column = len(_LINE_BREAK.split(before)[-1]) + 1
        return SpecProblem(
            f"line {line}, column {column}",
            f"not valid YAML: character #x{exc.character:04x} is not allowed ({exc.reason})",
        )
    if not isinstance(exc, yaml.MarkedYAMLError):
        return SpecProblem("", one_line(f"not valid YAML: {exc}"))
    where = _at(exc.problem_mark)
    message = exc.problem or str(exc)
    if exc.context:
        context_at = _at(exc.context_mark)
        shown_at = f" at {context_at}" if context_at and context_at != where else ""
        message += f" ({exc.context}{shown_at})"
    prefix = "" if isinstance(exc, _Refused) else "not valid YAML: "
    return SpecProblem(where, one_line(prefix + message))


_LINE_BREAK = re.compile("\r\n|[\n\r\x85\u2028\u2029]")
"""What YAML counts as a line break (its marks count lines the same way)."""


def _at(mark: yaml.Mark | None) -> str:
    return "" if mark is None else f"line {mark.line + 1}, column {mark.column + 1}"


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
            istio = _IstioParser(self.c, self.regions, self.source).istio(top["istio"], services)
        notifications = parse_notifications(self.c, top.get("notifications"), "notifications")
        return MeshSpec(
            self.regions, listener, tuple(services), self.source, istio, top, notifications
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
        return out

    def _service(self, value: Any, path: str) -> Service | None:
        m = self.c.mapping(
            value,
            path,
            ("name", "domains", "prefix", "protocol", "grpc", "pools", "rollout", "notifications"),
        )
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
        if name is None or pools is None or protocol is None:
            return None
        if protocol == Protocol.GRPC:
            plan = _with_grpc_queries(plan, error_codes)
        if any(pools[p].registered for p in ("canary", "baseline") if p in pools):
            # No weight before a registered host is there: warm-up waits for one.
            warmup = dataclasses.replace(plan.warmup, registered_hosts=True)
            plan = dataclasses.replace(plan, warmup=warmup)
        return Service(
            name, tuple(domains), prefix, pools, plan, notifications, protocol, error_codes
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

    def _pool(self, name: str, value: Any, path: str) -> Pool | None:
        m = self.c.mapping(value, path, ("version", "endpoints"))
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
        if "endpoints" not in m:  # the registry's instances (replicas on etcd)
            return None if version is None else Pool(name, version, {}, registered=True)
        endpoints = self._endpoints(m.get("endpoints"), join(path, "endpoints"))
        if version is None or endpoints is None:
            return None
        return Pool(name, version, endpoints)

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
                elif ep in eps:
                    self.c.fail(f"{rpath}[{j}]", f"duplicate address {addr!r}")
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


class _IstioParser:
    """The `istio:` section."""

    def __init__(self, checker: Checker, regions: tuple[str, ...], source: str) -> None:
        self.c = checker
        self.regions = regions
        self.source = source

    def istio(self, value: Any, services: list[Service]) -> IstioConfig | None:
        m = self.c.mapping(value, "istio", _ISTIO_KEYS)
        if not m and not isinstance(value, dict):
            return None
        d = IstioConfig()
        namespace = m.get("namespace", d.namespace)
        if not isinstance(namespace, str) or not NAME_RE.match(namespace):
            self.c.fail(
                "istio.namespace",
                f"bad namespace {namespace!r}: use lowercase letters, digits and '-' (at most 63)",
            )
            namespace = d.namespace
        labels = self._labels(m, d)
        domain = m.get("cluster_domain", d.cluster_domain)
        if not isinstance(domain, str) or not is_dns_subdomain(domain):
            self.c.fail("istio.cluster_domain", f"bad DNS domain {domain!r}")
            domain = d.cluster_domain
        apply = self.c.boolean(m.get("apply", False), "istio.apply") or False
        prune = self.c.boolean(m.get("prune", d.prune), "istio.prune")
        instance = m.get("instance", d.instance)
        if not isinstance(instance, str) or not instance or not is_label_value(instance):
            self.c.fail(
                "istio.instance",
                f"bad instance {instance!r}: it labels objects, so at most 63 letters, "
                "digits, '-', '_', '.', starting and ending with a letter or digit",
            )
            instance = d.instance
        seconds = self._durations(m, d)
        clusters = self._clusters(m.get("regions"), apply)
        self._check_versions(services, labels.get("pool_label", d.pool_label))
        return IstioConfig(
            namespace=namespace,
            version_label=labels.get("version_label", d.version_label),
            pool_label=labels.get("pool_label", d.pool_label),
            cluster_domain=domain,
            apply=apply,
            clusters=clusters,
            retry_initial=seconds["istio.retry.initial"],
            retry_max=seconds["istio.retry.max"],
            timeout=seconds["istio.timeout"],
            resync=seconds["istio.resync"],
            instance=instance,
            prune=d.prune if prune is None else prune,
        )

    def _labels(self, m: dict[str, Any], d: IstioConfig) -> dict[str, str]:
        labels: dict[str, str] = {}
        for key in ("version_label", "pool_label"):
            label = m.get(key, getattr(d, key))
            if key == "pool_label" and label == "":
                labels[key] = ""
            elif not isinstance(label, str) or not is_label_key(label):
                self.c.fail(
                    f"istio.{key}",
                    f"bad label key {label!r}: expected NAME or PREFIX/NAME as in Kubernetes "
                    "(NAME: at most 63 letters, digits, '-', '_', '.')",
                )
            else:
                labels[key] = label
        if labels.get("version_label") and labels.get("version_label") == labels.get("pool_label"):
            self.c.fail("istio.pool_label", "must differ from istio.version_label")
        return labels

    def _durations(self, m: dict[str, Any], d: IstioConfig) -> dict[str, float]:
        seconds: dict[str, float] = {}
        retry = self.c.mapping(m.get("retry", {}), "istio.retry", ("initial", "max"))
        for path, raw, default in (
            ("istio.retry.initial", retry.get("initial"), d.retry_initial),
            ("istio.retry.max", retry.get("max"), d.retry_max),
            ("istio.timeout", m.get("timeout"), d.timeout),
            ("istio.resync", m.get("resync"), d.resync),
        ):
            parsed = None if raw is None else self.c.duration(raw, path)
            seconds[path] = default if parsed is None else parsed
        if seconds["istio.retry.max"] < seconds["istio.retry.initial"]:
            self.c.fail("istio.retry.max", "must be at least istio.retry.initial")
        return seconds

    def _check_versions(self, services: list[Service], pool_label: str) -> None:
        for i, svc in enumerate(services):
            for pool in svc.pools.values():
                if not is_label_value(pool.version):
                    self.c.fail(
                        f"services[{i}].pools.{pool.name}.version",
                        f"version {pool.version!r} cannot be a Kubernetes label value "
                        "(the istio section selects pods by it): it must end with a letter "
                        "or digit",
                    )
            base, prod = svc.pools.get("baseline"), svc.pools["production"]
            if not pool_label and base is not None and base.version == prod.version:
                self.c.fail(
                    "istio.pool_label",
                    f"empty, so subsets select by version only, but service {svc.name!r} has "
                    f"baseline and production both at {prod.version!r}: their subsets would "
                    "select the same pods",
                )

    def _clusters(self, value: Any, apply: bool) -> dict[str, IstioCluster]:
        if value is None:
            if apply:
                self.c.fail("istio.regions", "required when apply is true: a cluster per region")
            return {}
        if not isinstance(value, dict):
            self.c.fail(
                "istio.regions", f"expected a mapping of region to cluster, got {kind_of(value)}"
            )
            return {}
        out: dict[str, IstioCluster] = {}
        seen: dict[tuple[str | None, str | None], str] = {}
        for region, item in value.items():
            cluster = self._cluster(region, item)
            if cluster is None:
                continue
            key = (cluster.kubeconfig, cluster.context)
            if key in seen:
                self.c.fail(
                    f"istio.regions.{region}",
                    f"same cluster as region {seen[key]!r}: each region's objects are named "
                    "after it, so two regions in one cluster would route the same host twice",
                )
                continue
            seen[key] = region
            out[region] = cluster
        if apply:
            for region in self.regions:
                if region not in value:
                    self.c.fail(
                        "istio.regions",
                        f"no cluster for region {region!r} (apply: true needs one per region)",
                    )
        return out

    def _cluster(self, region: Any, item: Any) -> IstioCluster | None:
        path = f"istio.regions.{region}"
        if region not in self.regions:
            self.c.fail(path, f"unknown region {region!r} (regions: {', '.join(self.regions)})")
            return None
        m = self.c.mapping(item, path, ("context", "kubeconfig", "in_cluster"))
        in_cluster = self.c.boolean(m.get("in_cluster", False), f"{path}.in_cluster")
        if in_cluster is None:
            return None
        context, kubeconfig = m.get("context"), m.get("kubeconfig")
        if in_cluster:
            if context is not None or kubeconfig is not None:
                self.c.fail(
                    path, "in_cluster uses the pod's ServiceAccount: drop context and kubeconfig"
                )
                return None
        elif not isinstance(context, str) or not context:
            self.c.fail(
                f"{path}.context",
                "required: the kubeconfig context of this region's cluster (or in_cluster: true)",
            )
            return None
        if kubeconfig is not None:
            if not isinstance(kubeconfig, str) or not kubeconfig:
                self.c.fail(f"{path}.kubeconfig", "expected a file path")
                return None
            if not Path(kubeconfig).is_absolute() and self.source != "<memory>":
                kubeconfig = str(Path(self.source).parent / kubeconfig)
        return IstioCluster(context, kubeconfig, in_cluster)


def _with_grpc_queries(plan: RolloutPlan, error_codes: tuple[str, ...]) -> RolloutPlan:
    """A gRPC service reads errors from Envoy's gRPC stats: each default query it did not
    write itself is replaced by its gRPC counterpart (`rollout.grpc_queries`)."""
    ours = grpc_queries(error_codes)
    queries = dict(plan.queries)
    for key, query in ours.items():
        if queries.get(key) == DEFAULT_QUERIES[key]:
            queries[key] = query
    return dataclasses.replace(plan, queries=queries)
