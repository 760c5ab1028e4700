"""The warm-up's health beyond Envoy's counts, through the `HostProber` port.

Three things the control plane asks hosts itself, with the spec's own check:

- production's serving hosts, once per rollout and region, before any weight moves: a
  check that no production host passes is a misconfigured check (a wrong path, a
  server with no `grpc.health.v1`), and the rollout pauses naming each host and cause,
  instead of waiting out its warm-up on a canary that can never pass;
- a warming pool's hosts, when Envoy counts too few healthy: the cause per host
  (Envoy's stats say how many, never why);
- a warming pool whose check Envoy cannot send (an OIP `ModelReady` on a gRPC port):
  `HealthBook` keeps Envoy's arithmetic (interval, thresholds) for those hosts.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from xds_server.rollout.ports import HostProber
from xds_server.rollout.probes import describe, unreached
from xds_server.spec import Endpoint, HealthCheck, Protocol, Service

log = logging.getLogger("xds_server.warmup")


def _hosts(svc: Service, pool: str, region: str) -> tuple[Endpoint, ...]:
    p = svc.pools.get(pool)
    return p.endpoints.get(region, ()) if p is not None else ()


async def probe_hosts(
    prober: HostProber,
    hc: HealthCheck,
    svc: Service,
    hosts: tuple[Endpoint, ...],
    timeout: float,
) -> list[str | None]:
    """Every host at once; each answer (None: passed) in the hosts' order."""
    grpc = svc.protocol == Protocol.GRPC
    return list(await asyncio.gather(*(prober.probe(hc, grpc, ep, timeout) for ep in hosts)))


def _named(
    hc: HealthCheck, svc: Service, hosts: tuple[Endpoint, ...], causes: list[str | None]
) -> str:
    grpc = svc.protocol == Protocol.GRPC
    return "; ".join(
        f"{describe(hc, grpc, ep)}: {cause}"
        for ep, cause in zip(hosts, causes, strict=True)
        if cause is not None
    )


async def production_fails(
    prober: HostProber, svc: Service, region: str, timeout: float
) -> str | None:
    """Why the warm-up's check is misconfigured (no production host of the region passes
    it: each host and its cause), or None (one passes, nothing to check, or no host
    answered at all: timeouts and unreachable hosts say nothing about the check)."""
    hc = svc.health_check("production")
    hosts = _hosts(svc, "production", region)
    if hc is None or not hosts:
        return None
    causes = await probe_hosts(prober, hc, svc, hosts, timeout)
    if any(cause is None for cause in causes):
        return None
    named = _named(hc, svc, hosts, causes)
    if all(cause is not None and unreached(cause) for cause in causes):
        # The control plane may not reach the hosts at all (another network than its
        # Envoys'): no evidence against the check; the warming pools' checks decide.
        log.warning(
            "%s %s: production's hosts did not answer the probe: %s", svc.name, region, named
        )
        return None
    return (
        f"the warm-up health check fails on production's serving hosts in {region} too, "
        f"so the check is misconfigured (no weight moved): {named}"
    )


async def why_unhealthy(
    prober: HostProber, svc: Service, pool: str, region: str, timeout: float
) -> str:
    """The pool's hosts that fail the check now, each with its cause ("" if none does)."""
    hc = svc.health_check(pool)
    hosts = _hosts(svc, pool, region)
    if hc is None or not hosts:
        return ""
    causes = await probe_hosts(prober, hc, svc, hosts, timeout)
    return _named(hc, svc, hosts, causes)


@dataclass
class _Host:
    healthy: bool = False
    passed: int = 0
    failed: int = 0
    asked: float | None = None
    cause: str | None = "not checked yet"


class HealthBook:
    """Envoy's health arithmetic for the hosts the control plane checks itself: a host
    starts unhealthy, becomes healthy after `healthy_threshold` passes in a row and
    unhealthy again after `unhealthy_threshold` failures in a row; each is asked at most
    once per `interval`."""

    def __init__(self) -> None:
        self._hosts: dict[tuple[str, str, str, str], dict[Endpoint, _Host]] = {}
        """(service, pool, version, region) -> its hosts' books."""

    async def check(
        self,
        prober: HostProber,
        svc: Service,
        pool: str,
        region: str,
        timeout: float,
        now: float,
    ) -> tuple[int, int, str]:
        """(hosts, healthy hosts, the unhealthy ones and their causes)."""
        hc = svc.health_check(pool)
        hosts = _hosts(svc, pool, region)
        if hc is None or not hosts:
            return len(hosts), len(hosts), ""
        key = (svc.name, pool, svc.pools[pool].version, region)
        old = self._hosts.get(key, {})
        book = self._hosts[key] = {ep: old.get(ep, _Host()) for ep in hosts}  # drops the gone
        due = [ep for ep, h in book.items() if h.asked is None or now - h.asked >= hc.interval]
        for ep, cause in zip(
            due, await probe_hosts(prober, hc, svc, tuple(due), timeout), strict=True
        ):
            _record(book[ep], hc, cause, now)
        healthy = sum(h.healthy for h in book.values())
        causes = [None if h.healthy else h.cause or "not yet passed" for h in book.values()]
        return len(hosts), healthy, _named(hc, svc, hosts, causes)

    def forget(self, service: str) -> None:
        for key in [k for k in self._hosts if k[0] == service]:
            del self._hosts[key]


def _record(host: _Host, hc: HealthCheck, cause: str | None, now: float) -> None:
    host.asked = now
    if cause is None:
        host.passed, host.failed = host.passed + 1, 0
        if host.passed >= hc.healthy_threshold:
            host.healthy, host.cause = True, None
        else:
            host.cause = f"passed {host.passed} of {hc.healthy_threshold} times in a row"
    else:
        host.passed, host.failed, host.cause = 0, host.failed + 1, cause
        if host.failed >= hc.unhealthy_threshold or not host.healthy:
            host.healthy = False
