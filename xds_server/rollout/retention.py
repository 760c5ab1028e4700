"""The leader's audit retention (issue 30): every so often, each finished rollout whose
last change is older than `serve --audit-retention` has its audit moved to its archive
(`rollout/archive.py`), one rollout at a time, under the store's write. Only the leader
runs it (`app/leader.py`, for its term): the archive is written under its fence.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from xds_server.rollout.archive import ArchiveError, Archiving
from xds_server.rollout.ports import StoreFenced, StoreWriteError

log = logging.getLogger("xds_server.rollout.retention")

SWEEP_MIN, SWEEP_MAX = 0.25, 60.0
"""A sweep every quarter of the retention, within these bounds (seconds)."""


class AuditRetention:
    """Archives what is due, a sweep at a time, for one leadership term."""

    def __init__(
        self,
        store: Archiving,
        retention: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.retention = retention
        self.clock = clock
        self.interval = min(SWEEP_MAX, max(SWEEP_MIN, retention / 4))
        self.archived = 0
        """Rollouts archived this term."""
        self.unreadable: set[tuple[str, str]] = set()
        """Rollouts left live this term: an entry of theirs does not decode (logged once)."""

    async def run(self) -> None:
        """Sweep until cancelled (the term's end) or fenced."""
        while True:
            try:
                await self.sweep()
            except StoreFenced as exc:
                log.warning("audit retention stopped: %s", exc)
                return
            await asyncio.sleep(self.interval)  # the sweep's period, not a wait for state

    async def sweep(self) -> int:
        """Archive every rollout due now; how many were. A write that fails is tried
        again at the next sweep (StoreFenced goes up: this process no longer leads)."""
        now = self.clock()
        done = 0
        for service, version in self.store.archivable(now, self.retention):
            if (service, version) in self.unreadable:
                continue
            try:
                if await self.store.archive(service, version, now):
                    done += 1
            except StoreFenced:
                raise
            except StoreWriteError as exc:
                log.warning("audit of %s %s not archived yet: %s", service, version, exc)
                break
            except ArchiveError as exc:
                log.error("audit not archived: %s", exc)
                self.unreadable.add((service, version))
        self.archived += done
        return done
