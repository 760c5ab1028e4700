"""Who decides: the process holding a lock file (one host, SQLite), or the holder of the
leader key on an etcd lease (replicas). Either way the server is told when this process
starts deciding and, for replicas, when it must stop; `/metrics` says which it is."""

from __future__ import annotations

import asyncio
import fcntl
import logging
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from xds_server.ha.etcd import compare_mod_revision
from xds_server.ha.leader import Election
from xds_server.ha.store import EtcdStore, StoreReadError
from xds_server.rollout.store import SCHEMA_VERSION, newer_schema

log = logging.getLogger("xds_server.app")


class Elector(Protocol):
    def lead_now(self) -> bool:
        """Take the lead at once if it is free (before the ports open); False to wait."""
        ...

    async def run(self, elected: Callable[[], None], deposed: Callable[[str], None]) -> None:
        """Campaign until cancelled; call `elected` on taking the lead, `deposed` on
        losing it."""
        ...

    async def resign(self) -> None:
        """A clean stop: let another process lead at once."""
        ...


class LeadershipMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.leader = Gauge(
            "xds_leader",
            "1 while this process decides rollouts (holds the lock file, or the leader key "
            "of replicas on etcd), else 0",
            registry=registry,
        )
        self.elections = Counter(
            "xds_leader_elections",
            "Times this replica became the leader (replicas on etcd)",
            registry=registry,
        )

    def leading(self, leads: bool) -> None:
        self.leader.set(1 if leads else 0)
        if leads:
            self.elections.inc()


class LockFileElector:
    """One writer on one host: the process holding `STATE_DIR/controller.lock` decides.
    The kernel frees the lock when its holder dies; the others look every `interval`."""

    def __init__(self, state_dir: Path, interval: float = 0.5) -> None:
        self.path = state_dir / "controller.lock"
        self.interval = interval
        self._handle: IO[str] | None = None

    def lead_now(self) -> bool:
        if self._handle is not None:
            return True
        handle = open(self.path, "a")  # noqa: SIM115 (held for the life of the process)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        self._handle = handle
        return True

    async def run(self, elected: Callable[[], None], deposed: Callable[[str], None]) -> None:
        del deposed  # a lock held is held until the process ends
        if self._handle is not None:
            return
        log.warning(
            "another xds-server holds %s: serving the committed state, not deciding", self.path
        )
        while not self.lead_now():
            await asyncio.sleep(self.interval)  # the lock's poll period
        log.warning("took over the rollout controller: %s is free", self.path)
        elected()

    async def resign(self) -> None:
        """The lock goes with the process."""


class EtcdElector:
    """Replicas: the leader key on a lease (`ha/leader.py`); a write refused by the fence
    or a lease past its deadline deposes this replica at once.

    A replica whose store's schema is newer than it understands (a rolling upgrade's old
    replica, once a new leader migrated the store) does not stand for election, and
    steps down if it leads: it could write nothing, and as leader it would keep a
    replica of the newer release from deciding. It goes on following and serving."""

    def __init__(self, store: EtcdStore, replica_id: str, ttl: float) -> None:
        self.store = store
        self._elected: Callable[[], None] = lambda: None
        self._deposed: Callable[[str], None] = lambda why: None
        self.newer: str | None = None
        """Why this replica does not stand (the store's schema is newer), or None."""
        self.election = Election(
            store.client,
            store.keys,
            replica_id,
            ttl,
            self._on_elected,
            self._on_deposed,
            may_campaign=self._may_campaign,
        )
        store.on_fenced = self.election.step_down
        store.may_write = self.election.valid

    def lead_now(self) -> bool:
        return False

    def store_changed(self, changed: frozenset[str]) -> None:
        """The leader key changed (the store's watch): look now, not at the next poll. The
        schema moved past this release: step down now."""
        if "schema" in changed and (why := self._newer_schema()):
            self.election.step_down(why)
        if "leader" in changed:
            self.election.wake()

    def _may_campaign(self) -> list[Any] | None:
        """None while the store's schema is newer than this release's; else the campaign
        holds only while the schema key is the one judged (a migration in between, seen
        or not yet, makes it fail)."""
        if self._newer_schema() is not None:
            return None
        return [compare_mod_revision(self.store.keys.schema, self.store.view.schema_revision)]

    def _newer_schema(self) -> str | None:
        """The refusal's line when the store's schema is newer than this release's (logged
        once, when it becomes so), else None."""
        view = self.store.view
        why = (
            str(newer_schema(self.store.path + self.store.keys.schema, view.schema))
            if view.schema > SCHEMA_VERSION
            else None
        )
        if why is not None and why != self.newer:
            log.error("not standing for leader: %s", why)
        self.newer = why
        return why

    async def run(self, elected: Callable[[], None], deposed: Callable[[str], None]) -> None:
        self._elected, self._deposed = elected, deposed
        await self.election.run()

    async def resign(self) -> None:
        await self.election.resign()

    def _on_elected(self, fence: int) -> None:
        self.store.fence = fence
        try:  # decide from everything committed, not from where the watch has got to
            self.store.read()
        except StoreReadError as exc:
            log.warning("elected, but the store cannot be read (%s): stepping down", exc)
            self.election.step_down(str(exc))
            return
        if why := self._newer_schema():  # (migrated since the campaign looked)
            self.election.step_down(why)
            return
        self._elected()

    def _on_deposed(self, why: str) -> None:
        self.store.fence = None
        self._deposed(why)
