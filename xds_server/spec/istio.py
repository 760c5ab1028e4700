"""Parsing the optional `istio:` section: how Istio objects are named and labelled, and,
with `apply: true`, the cluster of each region they are applied to (`outputs/istio_apply.py`).

```yaml
istio:
  namespace: models
  apply: true
  regions:
    us-east: {context: prod-us-east}
    eu-west: {in_cluster: true}
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xds_server.spec.checker import Checker
from xds_server.spec.model import IstioCluster, IstioConfig, Service
from xds_server.spec.values import NAME_RE, is_dns_subdomain, is_label_key, is_label_value, kind_of

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


def parse_istio(
    c: Checker, value: Any, services: list[Service], regions: tuple[str, ...], source: str
) -> IstioConfig | None:
    """The section checked against the spec's regions and services (their versions label
    pods); `source`: the spec's file, which relative kubeconfig paths are relative to."""
    return _IstioParser(c, regions, source).istio(value, services)


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
