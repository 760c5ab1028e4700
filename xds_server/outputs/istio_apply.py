"""The `istio` output mode: apply each region's Istio objects to that region's cluster.

Level-triggered and coalescing. The controller's sink (`IstioSink`, through `update`)
only records the newest desired objects per region and wakes that region's worker; it
never waits for a cluster. Each region has its own asyncio worker and its own single thread for the
synchronous `kubernetes` client, so a slow or unreachable cluster delays nobody else:
not the controller, not a rollback pushed over xDS, not the other regions' applies.
A worker always applies the *latest* desired objects; a failed apply is retried with
exponential backoff (the newest objects at each retry), and its error is kept in the
region's status for `xdsctl` and in metrics. Unchanged objects are applied again every
`resync` seconds, which undoes hand edits in the cluster.

Applies are server-side apply (`PATCH` with `application/apply-patch+yaml`, field
manager `xds-server`, `force=true`): we own the fields we write, and nothing else.
After a region's objects are applied, the objects this instance made for that region
earlier and no longer wants (a service removed from the spec) are deleted, as `kubectl
apply --prune` does: only those labelled managed by xds-server, for that region and
for this `istio.instance`, in our namespace. Pruning runs when the set of objects
changed and at each resync; its failure is reported and retried with the next apply,
and never holds up an apply (applies carry the weights, rollbacks included).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from xds_server.render.istio import (
    FIELD_MANAGER,
    GROUP,
    LABEL_PREFIX,
    PLURALS,
    VERSION,
    owner_labels,
    region_objects,
)
from xds_server.rollout.ports import Committed
from xds_server.spec import IstioCluster, IstioConfig, MeshSpec

log = logging.getLogger("xds_server.istio")

APPLY_PATCH = "application/apply-patch+yaml"

Objects = tuple[Mapping[str, Any], ...]


class ApplyError(Exception):
    """One apply that failed; the message names the object and what the cluster said."""


class Cluster(Protocol):
    """One region's cluster, called synchronously from that region's thread."""

    def apply(self, objects: Objects) -> None:
        """Server-side apply every object."""

    def prune(self, keep: Objects) -> None:
        """Delete the objects we made for the region earlier that are not in `keep`."""


class KubeCluster:
    """One region's cluster through the `kubernetes` client: a kubeconfig context, or
    the pod's ServiceAccount. The client is built on first use, in the worker's thread,
    so a missing kubeconfig is an apply error (retried, reported) rather than a crash."""

    def __init__(self, cluster: IstioCluster, config: IstioConfig, region: str) -> None:
        self.cluster = cluster
        self.timeout = config.timeout
        self.namespace = config.namespace
        self.region = region
        self.labels = {**owner_labels(config), f"{LABEL_PREFIX}region": region}
        """What every object we made for this region carries: the pruning selector."""
        self._api: Any = None

    def describe(self) -> str:
        if self.cluster.in_cluster:
            return "in-cluster"
        where = self.cluster.kubeconfig or "default kubeconfig"
        return f"context {self.cluster.context} ({where})"

    def _custom_objects(self) -> Any:
        if self._api is None:
            from kubernetes import client, config

            if self.cluster.in_cluster:
                cfg = client.Configuration()
                config.load_incluster_config(client_configuration=cfg)
                api_client = client.ApiClient(cfg)
            else:
                kubeconfig = self.cluster.kubeconfig
                if kubeconfig and not Path(kubeconfig).is_file():
                    raise ApplyError(f"kubeconfig {kubeconfig}: no such file")
                api_client = config.new_client_from_config(
                    config_file=kubeconfig, context=self.cluster.context, persist_config=False
                )
            self._api = client.CustomObjectsApi(api_client)
        return self._api

    def _client(self) -> Any:
        try:
            return self._custom_objects()
        except ApplyError:
            raise
        except Exception as exc:  # the kubernetes config loader raises many kinds
            raise ApplyError(f"cannot load cluster config ({self.describe()}): {exc}") from exc

    def apply(self, objects: Objects) -> None:
        api = self._client()
        timeout = (self.timeout, self.timeout)
        for obj in objects:
            meta = obj["metadata"]
            with _calling(f"{obj['kind']} {meta['namespace']}/{meta['name']}"):
                api.patch_namespaced_custom_object(
                    GROUP,
                    VERSION,
                    meta["namespace"],
                    PLURALS[obj["kind"]],
                    meta["name"],
                    dict(obj),
                    field_manager=FIELD_MANAGER,
                    force=True,
                    _content_type=APPLY_PATCH,
                    _request_timeout=timeout,
                )

    def prune(self, keep: Objects) -> None:
        """Routes go before the subsets they might name."""
        api = self._client()
        wanted = {(o["kind"], o["metadata"]["name"]) for o in keep}
        selector = ",".join(f"{k}={v}" for k, v in self.labels.items())
        timeout = (self.timeout, self.timeout)
        for kind, plural in reversed(list(PLURALS.items())):
            with _calling(f"listing {kind}s in {self.namespace}"):
                found = api.list_namespaced_custom_object(
                    GROUP,
                    VERSION,
                    self.namespace,
                    plural,
                    label_selector=selector,
                    _request_timeout=timeout,
                )
            for item in found.get("items", []):
                name = item["metadata"]["name"]
                if (kind, name) in wanted:
                    continue
                what = f"{kind} {self.namespace}/{name}"
                with _calling(f"deleting {what}", gone_is_fine=True):
                    api.delete_namespaced_custom_object(
                        GROUP, VERSION, self.namespace, plural, name, _request_timeout=timeout
                    )
                    log.info("deleted %s from %s: no longer in the spec", what, self.region)


@contextlib.contextmanager
def _calling(what: str, gone_is_fine: bool = False) -> Iterator[None]:
    """One API call: its failure becomes an ApplyError naming `what` and the answer
    (with `gone_is_fine`, a 404 is what we wanted)."""
    from kubernetes.client.exceptions import ApiException

    try:
        yield
    except ApiException as exc:
        if gone_is_fine and exc.status == 404:
            return
        raise ApplyError(f"{what}: HTTP {exc.status}: {_status_message(exc)}") from exc
    except Exception as exc:  # connection refused, timeouts, TLS
        raise ApplyError(f"{what}: {type(exc).__name__}: {exc}") from exc


def _message(exc: Exception) -> str:
    """An ApplyError already names the object; anything else (a bug) names its type."""
    return str(exc) if isinstance(exc, ApplyError) else f"{type(exc).__name__}: {exc}"


def _status_message(exc: Any) -> str:
    """The `message` of the Kubernetes Status the API server answered, else the reason."""
    try:
        return str(json.loads(exc.body)["message"])
    except (TypeError, ValueError, KeyError):
        return str(exc.reason or "no details")


@dataclass(frozen=True)
class RegionApplyStatus:
    """What `xdsctl status` and the metrics say about one region's applies."""

    region: str
    target: str
    desired_generation: int = 0
    """Grows by one each time the region's desired objects change (or a resync is due)."""
    applied_generation: int = 0
    """The newest generation the cluster accepted in full."""
    attempts: int = 0
    """Apply attempts since this process started."""
    consecutive_failures: int = 0
    last_error: str = ""
    last_attempt_at: float = 0.0
    last_success_at: float = 0.0
    next_retry_at: float = 0.0
    """When a failed apply is tried again; 0 when none is waiting."""
    objects: int = 0
    prune_error: str = ""
    """Why deleting objects no longer wanted failed (tried again with the next apply)."""

    @property
    def pending(self) -> bool:
        return self.applied_generation < self.desired_generation


Listener = Callable[[RegionApplyStatus, str], None]
"""Called with the region's new status and what happened: "desired", "success",
"failure", "prune_failure" (or "" for bookkeeping)."""


class IstioApplier:
    def __init__(
        self,
        config: IstioConfig,
        clusters: Mapping[str, Cluster] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.clusters: dict[str, Cluster] = dict(
            clusters
            if clusters is not None
            else {r: KubeCluster(c, config, r) for r, c in config.clusters.items()}
        )
        self.clock = clock
        self._desired: dict[str, Objects] = {}
        self._pruned: dict[str, frozenset[tuple[str, str]]] = {}
        """Per region, the (kind, name)s of the objects wanted at its last clean prune."""
        self._status = {
            r: RegionApplyStatus(r, _describe(c)) for r, c in sorted(self.clusters.items())
        }
        self._wake: dict[str, asyncio.Event] = {}
        self._executors = {
            r: ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"istio-apply-{r}")
            for r in self.clusters
        }
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def status(self) -> list[RegionApplyStatus]:
        return list(self._status.values())

    def region_status(self, region: str) -> RegionApplyStatus:
        return self._status[region]

    def update(self, desired: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
        """Record the newest desired objects per region; wake regions whose objects changed.

        Never blocks: called from the controller's listener on the event loop thread.
        Regions without a configured cluster are ignored.
        """
        for region, objects in desired.items():
            if region not in self._status:
                continue
            frozen = tuple(objects)
            if frozen == self._desired.get(region):
                continue
            self._desired[region] = frozen
            st = self._status[region]
            self._set(
                replace(st, desired_generation=st.desired_generation + 1, objects=len(frozen)),
                "desired",
            )
            self._event(region).set()

    async def run(self) -> None:
        """One worker per region, until cancelled."""
        try:
            await asyncio.gather(*(self._worker(r) for r in self.clusters))
        finally:
            for ex in self._executors.values():
                ex.shutdown(wait=False, cancel_futures=True)

    def _event(self, region: str) -> asyncio.Event:
        return self._wake.setdefault(region, asyncio.Event())

    def _set(self, status: RegionApplyStatus, what: str) -> None:
        self._status[status.region] = status
        for listener in list(self._listeners):
            listener(status, what)

    async def _worker(self, region: str) -> None:
        """Apply the region's newest objects whenever they change (or a resync is due);
        after a failure, back off (doubling up to `retry_max`), but newer objects (a
        rollback) are tried at once."""
        wake = self._event(region)
        delay = self.config.retry_initial
        while True:
            if not self._status[region].pending:
                await self._idle(region, wake)
            elif await self._apply(region, retry_in=delay):
                delay = self.config.retry_initial
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), timeout=delay)
                wake.clear()
                delay = min(delay * 2, self.config.retry_max)

    async def _idle(self, region: str, wake: asyncio.Event) -> None:
        """Wait for new objects; when `resync` passes without any, the same objects are
        due again (which undoes hand edits), and leftovers are looked for again."""
        try:
            await asyncio.wait_for(wake.wait(), timeout=self.config.resync)
        except TimeoutError:
            if region in self._desired:
                st = self._status[region]
                self._set(replace(st, desired_generation=st.desired_generation + 1), "")
                self._pruned.pop(region, None)
        wake.clear()

    async def _apply(self, region: str, retry_in: float) -> bool:
        """One apply of the region's newest objects, then a prune; False when the apply
        failed (to be tried again in `retry_in` seconds)."""
        st = self._status[region]
        generation, objects = st.desired_generation, self._desired[region]
        self._set(replace(st, attempts=st.attempts + 1, last_attempt_at=self.clock()), "")
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._executors[region], self.clusters[region].apply, objects
            )
        except Exception as exc:
            self._failed(region, _message(exc), retry_in)
            return False
        st = self._status[region]
        self._set(
            replace(
                st,
                applied_generation=max(st.applied_generation, generation),
                consecutive_failures=0,
                last_error="",
                last_success_at=self.clock(),
                next_retry_at=0.0,
            ),
            "success",
        )
        log.info(
            "istio objects applied to %s: generation %d, %d objects",
            region,
            generation,
            len(objects),
        )
        await self._prune(region, objects)
        return True

    def _failed(self, region: str, message: str, retry_in: float) -> None:
        st = self._status[region]
        self._set(
            replace(
                st,
                consecutive_failures=st.consecutive_failures + 1,
                last_error=message,
                next_retry_at=self.clock() + retry_in,
            ),
            "failure",
        )
        log.warning(
            "istio apply to %s failed (attempt %d, retry in %gs): %s",
            region,
            st.consecutive_failures + 1,
            retry_in,
            message,
        )

    async def _prune(self, region: str, objects: Objects) -> None:
        """Delete what the region no longer wants, when the set of objects it wants
        changed since the last clean prune (or a resync is due)."""
        names = frozenset((o["kind"], o["metadata"]["name"]) for o in objects)
        if not self.config.prune or self._pruned.get(region) == names:
            return
        if not names:
            # An empty spec, or one read half-written: deleting everything is never urgent.
            log.warning("istio: no objects wanted in %s: nothing pruned", region)
            return
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(
                self._executors[region], self.clusters[region].prune, objects
            )
        except Exception as exc:
            message = _message(exc)
            self._set(replace(self._status[region], prune_error=message), "prune_failure")
            log.warning(
                "istio prune in %s failed (tried again with the next apply): %s", region, message
            )
            return
        self._pruned[region] = names
        if self._status[region].prune_error:
            self._set(replace(self._status[region], prune_error=""), "")


class IstioSink:
    """The `TrafficSink` that feeds an applier the objects each committed view implies
    (after every decision, and after a spec change, which can change objects without a
    decision). The istio settings are the applier's (those the process started with);
    the services, pools and rollouts are the view's."""

    def __init__(self, applier: IstioApplier) -> None:
        self.applier = applier

    def follow(self, event: Committed) -> None:
        spec = event.spec
        self.applier.update(
            {
                r: region_objects(spec, r, event.rollouts, self.applier.config)
                for r in self.applier.clusters
                if r in spec.regions
            }
        )

    async def run(self) -> None:
        await self.applier.run()

    def close(self, timeout: float) -> None:
        """Nothing to hand over: the next leader applies the newest objects again."""


class IstioMetrics:
    """Apply results and pending state per region, on `/metrics`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.applies = Counter(
            "xds_istio_apply",
            "Server-side applies of a region's Istio objects to its cluster, by result",
            ["region", "result"],
            registry=registry,
        )
        self.pending = Gauge(
            "xds_istio_apply_pending",
            "1 while a region's cluster does not hold the newest Istio objects",
            ["region"],
            registry=registry,
        )
        self.failures = Gauge(
            "xds_istio_apply_consecutive_failures",
            "Failed applies in a row to a region's cluster (0 once one succeeds)",
            ["region"],
            registry=registry,
        )

    def attach(self, applier: IstioApplier) -> None:
        for st in applier.status():
            for result in APPLY_RESULTS:
                self.applies.labels(st.region, result)
            self._on_apply(st, "")
        applier.subscribe(self._on_apply)

    def _on_apply(self, status: RegionApplyStatus, what: str) -> None:
        if what in APPLY_RESULTS:
            self.applies.labels(status.region, what).inc()
        self.pending.labels(status.region).set(1 if status.pending else 0)
        self.failures.labels(status.region).set(status.consecutive_failures)


APPLY_RESULTS = ("success", "failure", "prune_failure")


def istio_sinks(registry: CollectorRegistry) -> Callable[[MeshSpec], IstioSink | None]:
    """The istio output mode as a leader sink: only the process that decides applies."""
    metrics = IstioMetrics(registry)

    def build(spec: MeshSpec) -> IstioSink | None:
        if spec.istio is None or not spec.istio.apply:
            return None
        applier = IstioApplier(spec.istio)
        metrics.attach(applier)
        log.info(
            "istio output: applying to %s",
            ", ".join(f"{st.region} ({st.target})" for st in applier.status()),
        )
        return IstioSink(applier)

    return build


def _describe(cluster: Cluster) -> str:
    describe = getattr(cluster, "describe", None)
    return str(describe()) if callable(describe) else type(cluster).__name__
