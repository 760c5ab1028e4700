"""Traffic weights: how each service's requests split between its pools, per region.

Weights are integers out of WEIGHT_TOTAL (10,000, so 0.01% steps) and always sum to it.
The state is immutable; every change makes a new TrafficState, so a snapshot builder can
hold one without copying and compare old with new cheaply.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from xds_server.spec import POOL_NAMES, Service

WEIGHT_TOTAL = 10_000


class WeightError(ValueError):
    """A requested split that cannot be applied; the message says why."""


@dataclass(frozen=True)
class Split:
    """Shares of one service in one region, in units of 1/WEIGHT_TOTAL."""

    production: int = WEIGHT_TOTAL
    baseline: int = 0
    canary: int = 0
    shadow: int = 0
    """Share of production's requests that Envoy also mirrors to canary and baseline (whose
    answers nobody sees). Not a weight: it is not part of the sum."""

    def __post_init__(self) -> None:
        parts = (self.production, self.baseline, self.canary)
        if any(p < 0 for p in parts):
            raise WeightError(f"weights must not be negative: {self.as_dict()}")
        if sum(parts) != WEIGHT_TOTAL:
            raise WeightError(f"weights must sum to {WEIGHT_TOTAL}, got {sum(parts)}")
        if not 0 <= self.shadow <= WEIGHT_TOTAL:
            raise WeightError(f"shadow share must be 0 to {WEIGHT_TOTAL}, got {self.shadow}")

    @classmethod
    def from_percent(cls, shares: Mapping[str, float]) -> Split:
        """Build a split from percentages; any pool left out takes what remains of 100."""
        unknown = set(shares) - set(POOL_NAMES)
        if unknown:
            raise WeightError(f"unknown pool(s): {', '.join(sorted(unknown))}")
        units = {k: round(v * WEIGHT_TOTAL / 100) for k, v in shares.items()}
        if "production" not in units:
            units["production"] = WEIGHT_TOTAL - units.get("baseline", 0) - units.get("canary", 0)
        return cls(units["production"], units.get("baseline", 0), units.get("canary", 0))

    @classmethod
    def at_canary_percent(cls, canary_percent: float, has_baseline: bool) -> Split:
        """The rollout's split rule: canary = w; baseline = min(w, 100 - w) when there is
        one; production the rest (5 -> 90/5/5, 20 -> 60/20/20, 75 -> 0/25/75)."""
        canary = round(canary_percent * WEIGHT_TOTAL / 100)
        baseline = min(canary, WEIGHT_TOTAL - canary) if has_baseline else 0
        return cls(WEIGHT_TOTAL - canary - baseline, baseline, canary)

    def get(self, pool: str) -> int:
        return int(getattr(self, pool))

    def as_dict(self) -> dict[str, int]:
        return {p: self.get(p) for p in POOL_NAMES}

    def percent(self) -> dict[str, float]:
        return {p: self.get(p) * 100 / WEIGHT_TOTAL for p in POOL_NAMES}

    def within(self, service: Service) -> Split:
        """This split with the shares of pools the service lacks given to production."""
        baseline = self.baseline if "baseline" in service.pools else 0
        canary = self.canary if "canary" in service.pools else 0
        if (baseline, canary) == (self.baseline, self.canary):
            return self
        return Split(WEIGHT_TOTAL - baseline - canary, baseline, canary, self.shadow)

    def check_pools(self, service: Service) -> None:
        for pool in POOL_NAMES:
            if self.get(pool) and pool not in service.pools:
                raise WeightError(f"service {service.name!r} has no {pool} pool")


PRODUCTION_ONLY = Split()


@dataclass(frozen=True)
class TrafficState:
    """Splits per (service, region); anything not listed sends all traffic to production."""

    splits: Mapping[tuple[str, str], Split] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "splits", MappingProxyType(dict(self.splits)))

    def split(self, service: str, region: str) -> Split:
        return self.splits.get((service, region), PRODUCTION_ONLY)

    def with_split(self, service: str, regions: Iterable[str], split: Split) -> TrafficState:
        new = dict(self.splits)
        for region in regions:
            new[(service, region)] = split
        return TrafficState(new)

    def regions_changed(self, other: TrafficState) -> set[str]:
        keys = set(self.splits) | set(other.splits)
        return {r for (s, r) in keys if self.split(s, r) != other.split(s, r)}

    def effective(self, service: Service, region: str) -> Split:
        """The split to apply: pools the spec no longer has give their share to production."""
        return self.split(service.name, region).within(service)
