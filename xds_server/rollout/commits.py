"""Writing decisions to the `StateStore`, and what the controller knows of its health.

The commit discipline lives in the controller (what may go ahead when a write fails);
this keeps the books it needs: rollbacks that were pushed but not yet written (saved
first, in order, before anything newer), when to try again, and a `StoreHealth` that
`/metrics`, `xdsctl status` and the dashboard show.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace

from xds_server.rollout.audit import AuditEntry
from xds_server.rollout.ports import StateStore, StoreFenced, StoreWriteError
from xds_server.rollout.state import RolloutState

log = logging.getLogger("xds_server.rollout")

STORE_RETRY_SECONDS = 1.0


class NotLeader(Exception):
    """The store refused a write because another replica leads: this controller stops
    (the server turns the replica into a follower); what it decided was not pushed."""


@dataclass(frozen=True)
class StoreHealth:
    ok: bool = True
    error: str = ""
    """The last write error, while failing."""
    since: float | None = None
    """When the current run of failed writes began."""
    failed_writes: int = 0
    """Every failed write since start (retries included)."""
    unsaved_rollbacks: int = 0
    """Rollbacks pushed to the data plane but not committed yet."""


@dataclass(frozen=True)
class Unsaved:
    """A rollback that was pushed while the store could not be written."""

    state: RolloutState
    entries: list[AuditEntry]
    regions: frozenset[str]


class CommitLog:
    """The controller's writer: every write goes through `save`."""

    def __init__(self, store: StateStore, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        self.health = StoreHealth()
        self._watchers: list[Callable[[StoreHealth], None]] = []
        self._unsaved: list[Unsaved] = []
        """Rollbacks pushed but not committed, oldest first."""
        self._retry_at = 0.0

    def watch(self, listener: Callable[[StoreHealth], None]) -> None:
        """Call `listener` on every failed write and on recovery."""
        self._watchers.append(listener)

    def save(
        self,
        state: RolloutState,
        entries: list[AuditEntry],
        *,
        critical: bool,
        regions: Collection[str] = (),
    ) -> bool:
        """Write unsaved rollbacks first (in order), then this; False if anything failed.
        NotLeader when the store says another replica leads."""
        if not self.save_unsaved():
            return False
        if not self._record(state, entries, critical, regions):
            return False
        self._ok()
        return True

    def keep_unsaved(
        self, state: RolloutState, entries: list[AuditEntry], regions: Collection[str]
    ) -> None:
        """A rollback pushed although it could not be written: saved before anything else."""
        self._unsaved.append(Unsaved(state, entries, frozenset(regions)))
        self._publish(replace(self.health, unsaved_rollbacks=len(self._unsaved)))

    def retry_due(self) -> bool:
        return bool(self._unsaved) and self.clock() >= self._retry_at

    def save_unsaved(self) -> bool:
        if not self._unsaved:
            return True
        while self._unsaved:
            first = self._unsaved[0]
            if not self._record(first.state, first.entries, True, first.regions):
                return False
            self._unsaved.pop(0)
            log.warning(
                "saved the rollback of %s %s pushed while the store was failing",
                first.state.service,
                first.state.canary_version,
            )
        self._ok()
        return True

    def _record(
        self,
        state: RolloutState,
        entries: list[AuditEntry],
        critical: bool,
        regions: Collection[str],
    ) -> bool:
        try:
            self.store.record(state, entries, critical=critical, regions=regions)
        except StoreFenced as exc:
            raise NotLeader(str(exc)) from None
        except StoreWriteError as exc:
            self._failed(str(exc))
            return False
        return True

    def _failed(self, error: str) -> None:
        now = self.clock()
        self._retry_at = now + STORE_RETRY_SECONDS
        health = self.health
        if health.ok:
            log.error("the state store cannot be written: %s", error)
        self._publish(
            replace(
                health,
                ok=False,
                error=error,
                since=health.since if not health.ok else now,
                failed_writes=health.failed_writes + 1,
            )
        )

    def _ok(self) -> None:
        health = self.health
        if health.ok and health.unsaved_rollbacks == len(self._unsaved):
            return
        if not health.ok:
            log.warning("the state store works again (failing since %.0f)", health.since or 0)
        self._publish(
            replace(health, ok=True, error="", since=None, unsaved_rollbacks=len(self._unsaved))
        )

    def _publish(self, health: StoreHealth) -> None:
        self.health = health
        for listener in list(self._watchers):
            listener(health)
