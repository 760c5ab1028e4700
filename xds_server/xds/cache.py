"""The snapshot cache: the newest snapshot per region, and the streams waiting on it."""

from __future__ import annotations

import asyncio
from collections import defaultdict

from xds_server.xds.snapshot import Snapshot


class SnapshotCache:
    """Holds one snapshot per region; setting one wakes every stream of that region.

    Streams re-read the newest snapshot when woken (level-triggered), so several quick
    updates cost each stream one wake-up and it never sees an intermediate snapshot.
    """

    def __init__(self) -> None:
        self._snapshots: dict[str, Snapshot] = {}
        self._watchers: defaultdict[str, set[asyncio.Event]] = defaultdict(set)

    def get(self, region: str) -> Snapshot | None:
        return self._snapshots.get(region)

    def regions(self) -> list[str]:
        return list(self._snapshots)

    def set(self, snapshot: Snapshot) -> None:
        old = self._snapshots.get(snapshot.region)
        if old is not None and snapshot.version <= old.version:
            raise ValueError(
                f"region {snapshot.region}: version {snapshot.version} is not "
                f"newer than {old.version}"
            )
        self._snapshots[snapshot.region] = snapshot
        for event in self._watchers[snapshot.region]:
            event.set()

    def watch(self, region: str, event: asyncio.Event) -> None:
        self._watchers[region].add(event)

    def unwatch(self, region: str, event: asyncio.Event) -> None:
        self._watchers[region].discard(event)
