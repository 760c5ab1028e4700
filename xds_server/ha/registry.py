"""Registering a model server in the shared registry: `registered(...)` and the loop
behind `xds-server register` (`hold_until_stopped`).

An instance's key, `registry/SERVICE/REGION/VERSION/HOST:PORT`, lives on a lease of its
own (default TTL 10 s) renewed every third of the TTL: a SIGKILLed instance's key goes
when its lease runs out, a clean stop revokes the lease at once. With a health URL, the
key is there only while the URL answers 2xx (checked at each renewal).

    async with registered("etcd://127.0.0.1:2379", "recommender", "v2", "us-east",
                          "10.0.0.7:8080"):
        await serve_forever()
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from typing import Any

from xds_server.ha.etcd import (
    DEFAULT_PREFIX,
    EtcdAddress,
    Keys,
    async_client,
    moves_on,
    one_line,
    parse_store_url,
    renew,
    retrying,
)
from xds_server.ha.instances import Instance, instance_to_json
from xds_server.ha.security import StoreSecurity
from xds_server.spec import POOL_NAMES, SpecError, parse_host_port, parse_spec
from xds_server.spec.values import is_ip

log = logging.getLogger("xds_server.ha.registry")

DEFAULT_TTL = 10.0
CALL_DEADLINE = 2.0
"""Seconds the first read of the store may take on one member before the next."""


class RegistrationError(ValueError):
    """An instance that cannot be registered; the message says why, in one line."""


@dataclass(frozen=True)
class InstanceSpec:
    service: str
    version: str
    region: str
    address: str
    ttl: float = DEFAULT_TTL
    health_url: str | None = None
    pool: str = ""
    """Only this pool selects the instance; "": every pool of its version."""
    health_port: int | None = None
    """Where the warm-up's health check asks it, when not on its traffic port."""


def check_address(address: str) -> str:
    try:
        host, port = parse_host_port(address, port_from=1)
    except ValueError as exc:
        raise RegistrationError(f"--address {address!r}: {exc}") from None
    if not is_ip(host):
        raise RegistrationError(
            f"--address {address!r}: the host must be an IP address (Envoy does not "
            "resolve EDS endpoints)"
        )
    return f"{host}:{port}"


def check_pool(pool: str) -> str:
    if pool not in ("", *POOL_NAMES):
        raise RegistrationError(f"--pool {pool!r}: one of {', '.join(POOL_NAMES)}")
    return pool


class Registration:
    """One instance's registration; `run()` holds it until cancelled, then revokes it."""

    def __init__(self, address: EtcdAddress, instance: InstanceSpec) -> None:
        self.store = address
        self.instance = instance
        self.keys = Keys(address.prefix)
        self.client = async_client(address, timeout=max(1, round(instance.ttl / 3)))
        self.key = self.keys.registry(
            instance.service, instance.region, instance.version, instance.address
        )
        self.registered = asyncio.Event()
        """Set while the key is in the store."""
        self._lease: int | None = None

    async def check(self) -> None:
        """The store is there and its spec has the region and the service; else
        RegistrationError (one line)."""
        i = self.instance
        try:
            got = await self._read_spec()
        except Exception as exc:
            raise RegistrationError(
                f"cannot reach the store {self.store}: {one_line(exc)}"
            ) from None
        if got is None:
            raise RegistrationError(
                f"the store {self.store} holds no spec under {self.store.prefix}"
            )
        try:
            spec = parse_spec(json.loads(got.value)["text"], str(self.store))
        except SpecError as exc:
            raise RegistrationError(f"the store's spec does not parse: {exc}") from None
        if i.region not in spec.regions:
            raise RegistrationError(
                f"--region {i.region!r}: not in the spec (regions: {', '.join(spec.regions)})"
            )
        names = [s.name for s in spec.services]
        if i.service not in names:
            raise RegistrationError(
                f"--service {i.service!r}: not in the spec (services: {', '.join(names)})"
            )

    async def _read_spec(self) -> Any:
        """The spec key, tried once per member while a member does not answer (the
        client moves past it: `FailoverClient.bounded`)."""
        tries = len(self.store.endpoints)
        for attempt in range(tries):
            try:
                return await self.client.bounded(
                    lambda: self.client.get(self.keys.spec.encode()), CALL_DEADLINE, "spec"
                )
            except Exception as exc:
                if attempt == tries - 1 or not moves_on(exc):
                    raise
        raise AssertionError("unreachable")

    async def run(self) -> None:
        """Register, renew, follow the health URL; on cancellation, deregister."""
        i = self.instance
        try:
            while True:
                try:
                    await self._hold()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.registered.clear()
                    log.warning("registration of %s lost (%s); again", i.address, one_line(exc))
                    await asyncio.sleep(min(1.0, i.ttl / 3))  # the store's retry backoff
        finally:
            await self._deregister()

    async def _hold(self) -> None:
        """Register on a new lease and renew it; each call tried again, past an etcd
        member that does not answer, while the lease may last (`ha.etcd.retrying`)."""
        i, client = self.instance, self.client
        ttl = max(1, round(i.ttl))
        alive = time.monotonic() + ttl  # (the lease cannot outlive this)
        lease = await client.bounded(lambda: client.lease(ttl), i.ttl / 3, "lease")
        self._lease = lease.id
        while True:
            healthy = await self._healthy()
            if healthy and not self.registered.is_set():
                doc = Instance(
                    i.service, i.version, i.region, i.address, time.time(), i.ttl,
                    pool=i.pool, health_port=i.health_port,
                )  # fmt: skip
                put = partial(client.put, self.key.encode(), instance_to_json(doc), lease.id)
                await retrying(client, put, alive, "key")
                self.registered.set()
                log.info("registered %s %s %s %s (ttl %gs)", *self._names(), i.ttl)
            elif not healthy and self.registered.is_set():
                await retrying(client, lambda: client.delete(self.key.encode()), alive, "key")
                self.registered.clear()
                log.warning("deregistered %s: %s does not answer 2xx", i.address, i.health_url)
            await asyncio.sleep(i.ttl / 3)  # the renewal period
            sent = time.monotonic()
            reply = await renew(client, lease.id, alive, "registration lease")
            if reply is None or reply.TTL <= 0:
                raise LookupError("its lease expired")
            alive = sent + ttl

    def _names(self) -> tuple[str, str, str, str]:
        i = self.instance
        return i.service, i.version, i.region, i.address

    async def _healthy(self) -> bool:
        url = self.instance.health_url
        if url is None:
            return True
        return await asyncio.to_thread(_answers_2xx, url, max(0.5, self.instance.ttl / 4))

    async def _deregister(self) -> None:
        self.registered.clear()
        with contextlib.suppress(Exception):
            if self._lease is not None:
                await asyncio.wait_for(self.client.revoke_lease(self._lease), 2.0)
                log.info("deregistered %s %s %s %s", *self._names())
        with contextlib.suppress(Exception):
            await self.client.close()


CHECK_DEADLINE = 10.0
"""Seconds `hold_until_stopped` waits for the store to answer its first check."""


async def hold_until_stopped(
    address: EtcdAddress, instance: InstanceSpec, check_deadline: float = CHECK_DEADLINE
) -> None:
    """`xds-server register`: check the instance against the store's spec, then hold its
    registration until SIGTERM or SIGINT and deregister (its lease revoked at once).
    RegistrationError, one line, when the check fails or the store does not answer."""
    registration = Registration(address, instance)
    try:
        await asyncio.wait_for(registration.check(), check_deadline)
    except TimeoutError:
        raise RegistrationError(
            f"the store {address} did not answer within {check_deadline:g} s"
        ) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(registration.run())
    await stop.wait()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _answers_2xx(url: str, timeout: float) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= int(resp.status) < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


@contextlib.asynccontextmanager
async def registered(
    store: str,
    service: str,
    version: str,
    region: str,
    address: str,
    *,
    ttl: float = DEFAULT_TTL,
    health_url: str | None = None,
    prefix: str = DEFAULT_PREFIX,
    pool: str = "",
    health_port: int | None = None,
    security: StoreSecurity | None = None,
) -> AsyncIterator[Registration]:
    """Hold a registration of this instance while the block runs (it is in the store
    when the block starts, unless `health_url` does not answer 2xx yet);
    RegistrationError, one line, for bad input or no store.
    `pool`: only that pool selects it (a baseline deploy of production's version).
    `security`: etcds://'s TLS files and the login (`ha.security.load_security`)."""
    if not ttl >= 2:
        raise RegistrationError(f"ttl {ttl!r}: at least 2 seconds (renewed every third)")
    if health_url is not None and not health_url.startswith(("http://", "https://")):
        raise RegistrationError(f"health_url {health_url!r}: expected an http(s) URL")
    if health_port is not None and not 1 <= health_port <= 65535:
        raise RegistrationError(f"health_port {health_port!r}: expected a port from 1 to 65535")
    instance = InstanceSpec(
        service, version, region, check_address(address), ttl, health_url, check_pool(pool),
        health_port,
    )  # fmt: skip
    try:
        where = parse_store_url(store, prefix, security)
    except ValueError as exc:
        raise RegistrationError(str(exc)) from None
    registration = Registration(where, instance)
    await registration.check()
    task = asyncio.create_task(registration.run())
    try:
        if health_url is None:
            await asyncio.wait_for(registration.registered.wait(), max(5.0, ttl))
        yield registration
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
