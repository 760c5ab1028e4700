"""Leader election on an etcd lease, with a fence and a deadline.

A replica campaigns by creating the leader key on its own lease (a transaction that
holds only while the key does not exist). Winning gives it the key's create revision,
the fence every state write is guarded by (`EtcdStore.record`). It then renews the
lease every third of its TTL. It stops deciding on its own:

- when a renewal says the lease is gone, or
- when no renewal has succeeded for TTL - `margin` seconds (counted from when the last
  successful renewal was *sent*, so before etcd can have let the lease run out), or
- when a write is refused by the fence.

A paused process (SIGSTOP) that wakes up past its TTL is deposed by whichever comes
first: the deadline check or the fence. Either way it commits nothing.

A renewal that does not answer within `CALL_TIMEOUT` (its etcd member gone silent) is
tried again at once, the client then dialling the next member (`ha.etcd.renew`): a
leader whose member goes silent keeps its lease through the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from aetcd import rpc

from xds_server.ha.etcd import (
    LONGEST_CALL,
    Keys,
    compare_create_revision,
    one_line,
    put_op,
    renew,
)

log = logging.getLogger("xds_server.ha.leader")

CAMPAIGN_INTERVAL = 0.25
"""How often a follower looks whether the leader key is free (besides the watch)."""


class Election:
    def __init__(
        self,
        client: Any,
        keys: Keys,
        replica_id: str,
        ttl: float,
        on_elected: Callable[[int], None],
        on_deposed: Callable[[str], None],
        may_campaign: Callable[[], list[Any] | None] = lambda: [],
    ) -> None:
        self.client = client
        self.keys = keys
        self.replica_id = replica_id
        self.ttl = max(2, round(ttl))
        self.margin = min(1.0, self.ttl / 4)
        self.on_elected = on_elected
        self.on_deposed = on_deposed
        self.may_campaign = may_campaign
        """None: this replica does not stand for election now (it follows a store whose
        schema is newer than it understands); else what the campaign's transaction also
        compares: the store as this replica judged it (a campaign from a stale view of
        it fails, and the next one judges afresh)."""
        self.fence: int | None = None
        self.lease: int | None = None
        self._renewed_at = 0.0
        self._wake = asyncio.Event()
        self._deposed = asyncio.Event()

    @property
    def leading(self) -> bool:
        return self.fence is not None

    def wake(self) -> None:
        """The leader key changed (the store's watch): look now, not at the next poll."""
        self._wake.set()

    def valid(self) -> bool:
        """May this replica still decide? False once the deadline has passed."""
        return self.leading and time.monotonic() < self._renewed_at + self.ttl - self.margin

    def step_down(self, why: str) -> None:
        if self.fence is None:
            return
        log.warning("stepping down as leader: %s", why)
        self.fence = None
        self._deposed.set()
        self.on_deposed(why)

    async def run(self) -> None:
        """Campaign, lead while the lease holds, campaign again; until cancelled."""
        while True:
            try:
                if await self._campaign():
                    await self._lead()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.leading:
                    self.step_down(f"the store failed: {one_line(exc)}")
                log.debug("campaign failed: %s", one_line(exc))
            self._wake.clear()
            await wait_event(self._wake, CAMPAIGN_INTERVAL)

    async def _campaign(self) -> bool:
        conditions = self.may_campaign()
        if conditions is None:
            return False
        await self.client.connect()
        current = await self.client.get(self.keys.leader.encode())
        if current is not None:
            return False
        sent = time.monotonic()
        lease = await self.client.lease(self.ttl)
        request = rpc.TxnRequest(
            compare=[compare_create_revision(self.keys.leader, 0), *conditions],
            success=[put_op(self.keys.leader, self.replica_id.encode(), lease.id)],
        )
        reply = await self.client.kvstub.Txn(request, timeout=min(self.ttl / 2, LONGEST_CALL))
        if not reply.succeeded:
            with contextlib.suppress(Exception):
                await self.client.revoke_lease(lease.id)
            return False
        self.lease = lease.id
        self.fence = reply.header.revision
        self._renewed_at = sent
        self._deposed.clear()
        log.warning(
            "elected leader (fence revision %d, lease %x, ttl %ds)",
            self.fence,
            lease.id,
            self.ttl,
        )
        self.on_elected(self.fence)
        return True

    async def _lead(self) -> None:
        """Renew until the lease is lost, the deadline passes or the fence refuses."""
        assert self.lease is not None
        lease = self.lease
        try:
            while self.leading:
                wait = min(self.ttl / 3, max(0.0, self._deadline() - time.monotonic()))
                await wait_event(self._deposed, wait)
                if not self.leading:
                    return
                if time.monotonic() >= self._deadline():
                    self.step_down(f"no renewal of its lease for {self.ttl - self.margin:.1f} s")
                    return
                sent = time.monotonic()
                try:
                    reply = await renew(self.client, lease, self._deadline(), "leader lease")
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("cannot renew the leader lease: %s", one_line(exc))
                    continue
                if reply is None or reply.TTL <= 0:
                    self.step_down("its lease has expired")
                    return
                self._renewed_at = sent
        finally:
            if not self.leading:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.client.revoke_lease(lease), 0.5)

    def _deadline(self) -> float:
        return self._renewed_at + self.ttl - self.margin

    async def resign(self) -> None:
        """Give the key up at once (a clean stop), so another replica need not wait."""
        if self.lease is not None and self.leading:
            self.fence = None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.client.revoke_lease(self.lease), 1.0)


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait for `event` at most `timeout` seconds. Not `asyncio.wait_for`: on Python
    3.11 it drops a cancellation that lands in the tick the event is set, and a replica
    stopped then went on campaigning."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True
