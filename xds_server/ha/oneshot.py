"""The store used once, from a command line: `xds-server spec push|get|history` and
`manifests istio --store` connect, do one thing within a deadline, and close (no watch,
no election, no lease).

Whatever goes wrong comes back as `OneShotError`, one line that names the store; a spec
that does not validate stays a `SpecError` (it names the file and the field).

A member that does not answer (silent, or cut off from the majority) costs one try: the
command is tried again on the next member, once per member (a push is safe to repeat:
its transaction holds only on the spec it read, and a push that did land is then found
equal).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from xds_server.ha.etcd import EtcdAddress, async_client, moves_on, one_line, why_left
from xds_server.ha.store import EtcdStore, StoredSpec, StoreReadError
from xds_server.rollout.ports import StoreWriteError
from xds_server.rollout.state import RolloutState
from xds_server.spec import SpecError

T = TypeVar("T")

DEADLINE = 10.0
"""Seconds one command waits for the store before it gives up."""
CALL_DEADLINE = 2.0
"""Seconds one call to a member may take before the next member is tried."""


class OneShotError(Exception):
    """The store could not do what a command asked; the message says why, in one line."""


def push_spec(address: EtcdAddress, text: str, source: str) -> StoredSpec | None:
    """Store a (validated) spec text as the next spec; None when it equals the current."""

    async def push() -> StoredSpec | None:
        async with _spec_store(address) as store:
            return await store.push_spec(text, source)

    return _run(push, address)


def spec_history(address: EtcdAddress) -> list[StoredSpec]:
    """Every spec pushed, oldest first."""

    async def get() -> list[StoredSpec]:
        async with _spec_store(address) as store:
            return await store.spec_history()

    return _run(get, address)


@dataclass(frozen=True)
class Stored:
    """The spec and the rollouts, read from the store at one revision."""

    spec: StoredSpec | None
    spec_key: str
    """Where the spec lives (etcd://...KEY), to name it in a spec error."""
    rollouts: list[RolloutState]


def read_once(address: EtcdAddress) -> Stored:
    """Everything under the prefix, read once (blocking): the spec and the rollouts."""
    store = EtcdStore(address)
    try:
        store.read()
    except StoreReadError as exc:
        raise OneShotError(str(exc)) from None
    finally:
        store.close()
    return Stored(store.view.spec, f"{address}{store.keys.spec}", store.load_rollouts())


@contextlib.asynccontextmanager
async def _spec_store(address: EtcdAddress) -> AsyncIterator[EtcdStore]:
    client = async_client(address, timeout=CALL_DEADLINE)
    store = EtcdStore(address, client)
    try:
        yield store
    finally:
        store.close()
        with contextlib.suppress(Exception):
            await client.close()


def _run(work: Callable[[], Coroutine[Any, Any, T]], address: EtcdAddress) -> T:
    """`work()` within DEADLINE, tried once per member while a member does not answer."""

    async def tries() -> T:
        members = address.members
        for attempt in range(len(address.endpoints)):
            generation, _ = members.current()
            try:
                return await work()
            except Exception as exc:
                if attempt == len(address.endpoints) - 1 or not moves_on(exc):
                    raise
                members.failover(generation, why_left(exc))
        raise AssertionError("unreachable")

    try:
        return asyncio.run(asyncio.wait_for(tries(), DEADLINE))
    except StoreWriteError as exc:
        raise OneShotError(str(exc)) from None
    except TimeoutError:
        raise OneShotError(f"the store {address} did not answer within {DEADLINE:g} s") from None
    except SpecError:
        raise
    except Exception as exc:
        raise OneShotError(f"cannot use the store {address}: {one_line(exc)}") from None
