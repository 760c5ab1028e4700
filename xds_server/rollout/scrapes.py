"""When to look next: just after Prometheus's next scrape of a region's Envoys lands.

The controller looks every `interval`, Prometheus scrapes every `scrape_interval`, and
nothing ties the two: a look that falls just before a scrape lands reads samples almost
a scrape interval old, and the decision that the fresh samples would have made waits a
whole interval for the next look (rollback_latency's audit: ticks reading samples 0.7-0.9
s old at a 1 s scrape, on runs that a look 0.1 s after the scrape would have decided an
interval earlier). Each look's signals (`Signals.age_s`: the age of the region's oldest
Envoy target's newest sample; `scrape_interval`) give the scrape's phase, so the next
look can be moved to just after a scrape lands, never more than half an interval from
when it was due.

Each region has a phase of its own (Prometheus spreads its targets' scrapes over the
interval), so each region is read at its own landing: the look starts with the region
whose scrape lands first, and reads each region when its scrape has landed. One time
for all of them (the last landing) kept a region's fresh errors unread for up to an
interval more (rollback_latency's audit: looks 1.5 s apart, reading samples 0.9 s old,
a 4.9 s decision that reads at each region's landing would have made at about 3.7 s).
Pure: no I/O, no clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from xds_server.rollout.evidence import Signals

MARGIN_SHARE = 0.2
"""Of the scrape interval: how long after a scrape's timestamp its samples are taken as
queryable (the scrape itself takes some time, and then the write)."""
MAX_MARGIN = 1.0


@dataclass(frozen=True)
class Scrapes:
    """A region's Envoy scrapes, on the controller's clock."""

    newest: float
    """When the oldest target's newest sample was taken (the samples a look read)."""
    interval: float
    """Prometheus's scrape interval for them."""

    @classmethod
    def of(cls, signals: Signals | None, read_at: float) -> Scrapes | None:
        """From a look's signals, read (answered) at `read_at`: the age is Prometheus's
        own (its `time()` less the sample's timestamp), so the clocks need not agree; the
        answer's time is a little after the query's, which only makes `newest` late."""
        if signals is None or signals.problem or signals.age_s is None:
            return None
        if not signals.scrape_interval or signals.scrape_interval <= 0:
            return None
        return cls(read_at - signals.age_s, signals.scrape_interval)

    def landing_after(self, t: float) -> float:
        """When the first scrape queryable at or after `t` is (never the one already
        read): scrapes are compared by when they land, not by when they were taken."""
        margin = min(max(self.interval * MARGIN_SHARE, 0.05), MAX_MARGIN)
        k = max(1, math.ceil((t - margin - self.newest) / self.interval))
        return self.newest + k * self.interval + margin


def look_times(due: float, interval: float, regions: Mapping[str, Scrapes]) -> dict[str, float]:
    """When to read each region next: `due` (the last look's start plus `interval`),
    moved to just after the region's next fresh scrape lands, when that is within half
    an interval of `due` (a scrape interval longer than the look's interval keeps `due`:
    the look's own cadence then rules, as without the signals)."""
    times = {}
    for region, s in regions.items():
        # The landing nearest `due`: within half a *scrape* interval of it (half the
        # look's interval would pull a 10 s look 5 s early at 1 s scrapes).
        landing = s.landing_after(due - s.interval / 2)
        times[region] = landing if abs(landing - due) <= interval / 2 else due
    return times


def next_look(due: float, interval: float, regions: Mapping[str, Scrapes]) -> float:
    """When the next look starts: with the first region's read (`due` when no region's
    scrapes are known)."""
    return min(look_times(due, interval, regions).values(), default=due)
