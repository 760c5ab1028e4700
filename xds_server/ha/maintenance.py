"""Keeping etcd bounded (issue 30), the policy: pure, no I/O (`ha/maintainer.py` runs it).

etcd keeps every revision of every key until it is compacted, and refuses every write
(its NOSPACE alarm, "etcdserver: mvcc: database space exceeded") once its database file
reaches its quota (`--quota-backend-bytes`, 2 GiB by default): then the leader could
not commit even a rollback, and a follower's Envoys only get a rollback that is
committed. So the leader, and only the leader, keeps it bounded:

- **Compaction.** Every replica notes the store's revision as time goes
  (`RevisionClock`, a sample every `sample_every`); the leader compacts to the newest
  revision noted at least `retention` ago (default an hour): history older than that is
  gone, everything newer is kept (a watch that fell further behind reloads its view).
  Physical: the call returns once the member has freed the pages.
- **Defragmentation**, rarely: compaction frees pages inside the file but never shrinks
  it, and etcd checks its quota against the file. Defragmenting a member blocks it
  (reads and writes) while it rewrites the file, so it is done one member at a time,
  and only when it matters (`defrag_due`): the file is past half the quota and at least
  half of it is free; or it is past the high-water mark with anything worth taking back;
  or etcd raised NOSPACE.
- **Headroom for rollbacks.** While the largest member's file is above `high_water` of
  the quota (90%), or NOSPACE is raised, the leader writes rollbacks only
  (`writes_held`): advances, passed checks' audit and spec pushes wait, so what is left
  below the quota stays for rollbacks.
- **NOSPACE.** The leader makes room at once (`make_room`): it compacts to the current
  revision (the retention gives way: the room is worth more than the history),
  defragments every member, and disarms the alarm once the file is below
  `disarm_below` of the quota; then the rollbacks that were pushed but could not be
  written are written first, before anything else gets the room. When the data itself
  fills the quota (nothing to reclaim), the alarm stays: rollbacks are still pushed to
  the leader's own Envoys and written as soon as room is made (an operator deletes data
  or raises the quota); `xdsctl status`, `/metrics` and the XdsStoreAlarm alert say so.
- **CORRUPT** is reported (log, metrics, status, alert), never disarmed here: a member
  whose data differs from the others' needs an operator.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

GIB = 1024**3
DEFAULT_RETENTION = 3600.0
"""Seconds of revision history kept (`serve --store-compaction-retention`)."""
DEFAULT_QUOTA = 2 * GIB
"""etcd's own default `--quota-backend-bytes` (etcd 3.4 does not report its quota)."""
HIGH_WATER = 0.9
"""Above this share of the quota only rollbacks are written."""
DISARM_BELOW = 0.95
"""NOSPACE is disarmed once every member's file is below this share of the quota."""
DEFRAG_AT = 0.5
"""A member whose file is past this share of the quota is defragmented when at least
half of the file is free."""
DEFRAG_GAP = 600.0
"""The least time between two defragmentations of one member (NOSPACE aside)."""
RECOVERY_GAP = 30.0
"""After making room failed (the data itself fills the quota), the next attempt waits
this long; or `RECOVERY_RETRY` once the revision moved: while NOSPACE is raised only
deletions make revisions (an operator removing data, leases running out)."""
RECOVERY_RETRY = 1.0
STATUS_INTERVAL = 1.0
"""How often every replica asks each member for its status and etcd for its alarms."""
SIZE_BAND = 0.1
"""A log line each time the largest file crosses a tenth of the quota, up or down."""

NOSPACE = "NOSPACE"
CORRUPT = "CORRUPT"
ALARMS = (NOSPACE, CORRUPT)
NOSPACE_ERROR = "database space exceeded"
"""In etcd's refusal of a write while NOSPACE is raised (RESOURCE_EXHAUSTED)."""


def is_nospace(error: object) -> bool:
    """Is this error (or its text) etcd refusing a write for NOSPACE?"""
    details = getattr(error, "details", None)
    text = details() if callable(details) else str(error)
    return NOSPACE_ERROR in (text or "")


@dataclass(frozen=True)
class MaintenanceOptions:
    retention: float = DEFAULT_RETENTION
    """Seconds of history kept; 0: never compact."""
    quota_bytes: int = DEFAULT_QUOTA
    """etcd's `--quota-backend-bytes` (`serve --store-quota-bytes`)."""
    high_water: float = HIGH_WATER
    interval: float = STATUS_INTERVAL

    @property
    def sample_every(self) -> float:
        """How often a revision is noted: a tenth of the retention, between the status
        interval and a minute (so compaction lags the retention by that much at most)."""
        return min(60.0, max(self.interval, self.retention / 10))


@dataclass(frozen=True)
class MemberStatus:
    """One member's answer to Maintenance.Status (or why it gave none)."""

    endpoint: str
    member_id: int = 0
    db_size: int = 0
    """The database file, bytes: what etcd checks its quota against."""
    in_use: int = 0
    """Bytes in use; the rest of the file is free pages (defragmentation reclaims them)."""
    revision: int = 0
    raft_leader: bool = False
    error: str = ""

    @property
    def answered(self) -> bool:
        return not self.error

    @property
    def free(self) -> int:
        return max(0, self.db_size - self.in_use)


@dataclass(frozen=True)
class Alarm:
    member_id: int
    kind: str
    """NOSPACE or CORRUPT."""


@dataclass(frozen=True)
class EtcdStatus:
    """What one poll of etcd found."""

    at: float
    """Wall clock, seconds."""
    members: tuple[MemberStatus, ...]
    alarms: tuple[Alarm, ...] = ()
    keys: int = -1
    """Keys under the store's prefix; -1: not counted (no member answered)."""
    error: str = ""
    """Why the alarms or the keys could not be read; "" when they were."""

    @property
    def answered(self) -> tuple[MemberStatus, ...]:
        return tuple(m for m in self.members if m.answered)

    @property
    def db_size(self) -> int:
        """The largest member's file (each member checks the quota against its own)."""
        return max((m.db_size for m in self.answered), default=0)

    @property
    def in_use(self) -> int:
        return max((m.in_use for m in self.answered), default=0)

    @property
    def revision(self) -> int:
        return max((m.revision for m in self.answered), default=0)

    def raised(self, kind: str) -> bool:
        return any(a.kind == kind for a in self.alarms)


def fill(status: EtcdStatus, quota: int) -> float:
    """The largest member's file as a share of the quota."""
    return status.db_size / quota if quota > 0 else 0.0


def writes_held(status: EtcdStatus | None, options: MaintenanceOptions) -> str | None:
    """Why only rollbacks may be written now, or None: NOSPACE raised, or the largest
    file above the high-water mark (what is left below the quota is for rollbacks)."""
    if status is None or not status.answered:
        return None  # (nothing known: etcd itself will say)
    quota = options.quota_bytes
    if status.raised(NOSPACE):
        return (
            f"etcd raised NOSPACE ({size(status.db_size)} of its {size(quota)} quota): "
            "only rollbacks are written until room is made"
        )
    if fill(status, quota) >= options.high_water:
        return (
            f"etcd is at {fill(status, quota):.0%} of its {size(quota)} quota (above "
            f"{options.high_water:.0%}): only rollbacks are written until it is below"
        )
    return None


def defrag_due(member: MemberStatus, options: MaintenanceOptions) -> bool:
    """Is reclaiming this member's free pages worth blocking it for the time it takes?"""
    if not member.answered:
        return False
    quota = options.quota_bytes
    if member.db_size >= options.high_water * quota:
        return member.free >= quota / 20  # (near the gate: anything worth having)
    return member.db_size >= DEFRAG_AT * quota and member.free >= member.db_size / 2


def room_made(status: EtcdStatus, options: MaintenanceOptions) -> bool:
    """May NOSPACE be disarmed: every member that answered below `DISARM_BELOW` of the
    quota (a rollback fits, and the alarm is not raised again at the next write)?"""
    answered = status.answered
    return bool(answered) and all(m.db_size < DISARM_BELOW * options.quota_bytes for m in answered)


class RevisionClock:
    """The store's revision as time went, sampled; `due` gives the compaction target."""

    def __init__(self, options: MaintenanceOptions) -> None:
        self.options = options
        self.samples: deque[tuple[float, int]] = deque()
        """(monotonic time, revision), oldest first."""
        self.compacted = 0
        """The newest revision compacted to (by this process, or found compacted)."""

    def note(self, now: float, revision: int) -> None:
        if revision <= 0:
            return
        if not self.samples or now - self.samples[-1][0] >= self.options.sample_every:
            self.samples.append((now, revision))

    def due(self, now: float) -> int | None:
        """The newest revision noted at least `retention` ago, if newer than the last
        compaction; None: nothing to compact (or compaction is off)."""
        if self.options.retention <= 0:
            return None
        old = [rev for t, rev in self.samples if now - t >= self.options.retention]
        target = max(old, default=0)
        return target if target > self.compacted else None

    def done(self, revision: int) -> None:
        """Compacted to `revision`: samples at or below it are spent."""
        self.compacted = max(self.compacted, revision)
        while self.samples and self.samples[0][1] <= self.compacted:
            self.samples.popleft()


@dataclass
class Defrags:
    """When each member was last defragmented (monotonic), to space them out."""

    last: dict[str, float] = field(default_factory=dict)

    def due(self, status: EtcdStatus, options: MaintenanceOptions, now: float) -> list[str]:
        """Members to defragment now, one at a time in this order (the raft leader last:
        while it is blocked the cluster elects another, which costs a moment)."""
        due = [
            m
            for m in status.answered
            if defrag_due(m, options) and now - self.last.get(m.endpoint, -DEFRAG_GAP) >= DEFRAG_GAP
        ]
        return [m.endpoint for m in sorted(due, key=lambda m: m.raft_leader)]


@dataclass
class Recovery:
    """The NOSPACE recoveries' memory, so that a store whose data itself fills the quota
    is not compacted and defragmented every second for nothing."""

    last_at: float | None = None
    """When the last recovery ended (monotonic)."""
    disarmed: bool = True
    """It disarmed the alarm (else it found no room)."""
    roomy: bool = True
    """It left every file below the high-water mark: history was what filled etcd, and
    a NOSPACE raised after it is a new one, met at once."""
    revision_then: int = 0

    def due(self, status: EtcdStatus, now: float, urgent: bool = False) -> bool:
        """Make room now? At once after a roomy recovery; after one that found no room,
        once something was deleted (while NOSPACE is raised only deletions make
        revisions) or RECOVERY_GAP passed; after one that left little room (the alarm
        came back as writes went in), only for a rollback that waits (`urgent`), or
        after RECOVERY_GAP."""
        if not status.raised(NOSPACE) or not status.answered:
            return False
        if self.last_at is None or self.roomy:
            return True
        waited = now - self.last_at
        if waited >= RECOVERY_GAP:
            return True
        if not self.disarmed:
            return status.revision > self.revision_then and waited >= RECOVERY_RETRY
        return urgent and waited >= RECOVERY_RETRY

    def done(
        self, after: EtcdStatus, options: MaintenanceOptions, now: float, disarmed: bool
    ) -> None:
        self.last_at, self.revision_then, self.disarmed = now, after.revision, disarmed
        self.roomy = disarmed and fill(after, options.quota_bytes) < options.high_water


@dataclass
class Narrator:
    """The log lines worth an operator's attention, once per change: an alarm raised or
    cleared, writes held or let go, the largest file crossing a tenth of the quota."""

    band: int | None = None
    alarms: frozenset[Alarm] = frozenset()
    held: str | None = None

    def lines(self, status: EtcdStatus, options: MaintenanceOptions) -> list[tuple[int, str]]:
        out: list[tuple[int, str]] = []
        if status.answered:
            alarms = frozenset(status.alarms)
            for a in sorted(alarms - self.alarms, key=lambda a: (a.kind, a.member_id)):
                out.append((logging.ERROR, f"etcd raised {a.kind} on member {a.member_id:x}: "
                                           + alarm_meaning(a.kind, status, options)))  # fmt: skip
            for a in sorted(self.alarms - alarms, key=lambda a: (a.kind, a.member_id)):
                out.append((logging.WARNING, f"etcd's {a.kind} alarm on member {a.member_id:x} "
                                             "is cleared"))  # fmt: skip
            self.alarms = alarms
            band = int(fill(status, options.quota_bytes) / SIZE_BAND)
            if band != self.band:
                up = self.band is not None and band > self.band
                out.append((logging.WARNING if up else logging.INFO, describe(status, options)))
            self.band = band
        held = writes_held(status, options)
        if held != self.held and (held is None) != (self.held is None):
            out.append(
                (logging.WARNING, held)
                if held
                else (logging.WARNING, "etcd has room again: every write goes ahead")
            )
        self.held = held
        return out


def alarm_meaning(kind: str, status: EtcdStatus, options: MaintenanceOptions) -> str:
    if kind == NOSPACE:
        return (
            f"every write is refused ({size(status.db_size)} of its {size(options.quota_bytes)}"
            " quota); the leader compacts, defragments and disarms it, then writes the "
            "rollbacks it pushed meanwhile"
        )
    if kind == CORRUPT:
        return "a member's data differs from the others': an operator must restore it"
    return "unknown alarm"


def describe(status: EtcdStatus, options: MaintenanceOptions) -> str:
    """The store's size in one line."""
    keys = f", {status.keys:,} keys" if status.keys >= 0 else ""
    return (
        f"etcd's database is {size(status.db_size)} of its {size(options.quota_bytes)} "
        f"quota ({fill(status, options.quota_bytes):.0%}; {size(status.in_use)} in use)"
        f"{keys}, revision {status.revision:,}"
    )


def size(n: float) -> str:
    """Bytes, short: 812 B, 3.1 MiB, 2.0 GiB."""
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
