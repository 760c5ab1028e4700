"""What the lab shows while a rollout runs: a live table (rich) or, off a terminal, one
plain line per decision. Both read the audit log, so they show what was decided."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from xds_server.lab.mesh import LocalMesh
from xds_server.lab.traffic import envoy_weights
from xds_server.rollout.audit import AuditEntry, PoolNumbers

BAR = 24


class _AuditFollower:
    def __init__(self, mesh: LocalMesh) -> None:
        self.mesh = mesh
        self.last_id = 0

    def new_entries(self) -> list[AuditEntry]:
        fresh = self.mesh.state.audit(after_id=self.last_id)
        if fresh:
            self.last_id = fresh[-1].id
        return fresh


class PlainLog:
    """One line per decision, for logs and CI."""

    def __init__(self, mesh: LocalMesh) -> None:
        self.follower = _AuditFollower(mesh)
        self.services = len(mesh.layout.services()) > 1

    def __enter__(self) -> PlainLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.update(None)

    def note(self, text: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} lab: {text}", flush=True)

    def update(self, state: dict[str, Any] | None) -> None:
        for e in self.follower.new_entries():
            stamp = time.strftime("%H:%M:%S", time.localtime(e.time))
            where = e.region or "all regions"
            who = f"{e.service:<12} " if self.services else ""
            print(
                f"{stamp} {who}{where:<11} {e.kind:<10} {e.phase_from} -> {e.phase_to} "
                f"step {e.step}: {e.reason}",
                flush=True,
            )


class LiveView:
    """A table refreshed about once a second: per region, the step, the weights as bars,
    canary against baseline, requests/s and the last decision."""

    def __init__(self, mesh: LocalMesh) -> None:
        self.mesh = mesh
        self.follower = _AuditFollower(mesh)
        self.last: dict[str, AuditEntry] = {}
        self.notes: list[str] = []
        self.live = Live(console=Console(), refresh_per_second=4, transient=False)
        self._drawn = 0.0

    def __enter__(self) -> LiveView:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.__exit__(None, None, None)

    def note(self, text: str) -> None:
        self.notes.append(f"{time.strftime('%H:%M:%S')} {text}")

    def update(self, state: dict[str, Any] | None) -> None:
        for e in self.follower.new_entries():
            for region in [e.region] if e.region else self.mesh.opts.regions:
                self.last[region] = e
        if time.monotonic() - self._drawn < 1.0:
            return
        self._drawn = time.monotonic()
        self.live.update(self.render(state))

    def render(self, state: dict[str, Any] | None) -> Group:
        table = Table(title="canary rollout: recommender v1 -> v2", expand=True)
        for col in (
            "region",
            "step",
            "weights (production / baseline / canary)",
            "canary err / p99",
            "baseline err / p99",
            "req/s",
            "last decision",
        ):
            table.add_column(col, overflow="fold")
        rates = self._rates()
        for region in self.mesh.opts.regions:
            rs = (state or {}).get("regions", {}).get(region, {})
            weights = self._weights(region)
            last = self.last.get(region)
            measured = last.measurements if last else None
            canary = _pair(measured.canary if measured else None)
            baseline = _pair(measured.comparator if measured else None)
            table.add_row(
                region,
                f"{rs.get('phase', 'pending')} {rs.get('step', '-')}",
                _bars(weights),
                canary,
                baseline,
                f"{rates.get(region, 0):.0f}",
                (last.reason if last else "")[:90],
            )
        phase = (state or {}).get("phase", "waiting for the rollout to start")
        footer = Text(f"rollout: {phase}  " + ("  |  ".join(self.notes[-2:])))
        if not self.mesh.processes.proxyless:
            return Group(table, footer)
        return Group(table, Text(_proxyless_line(self.mesh.traffic.proxyless_counts())), footer)

    def _weights(self, region: str) -> dict[str, int]:
        envoy = next(e for e in self.mesh.processes.envoys if e.opts.region == region)
        try:
            return envoy_weights(envoy)
        except Exception:
            return {}

    def _rates(self) -> dict[str, float]:
        load = self.mesh.processes.load
        if load is None:
            return {}
        now = time.time()
        recent = [r for r in load.snapshot()[-2000:] if r.time > now - 2]
        out: dict[str, float] = {}
        for r in recent:
            region = r.target.rsplit("-envoy-", 1)[0]
            out[region] = out.get(region, 0) + 0.5
        return out


def _proxyless_line(counts: dict[str, Any]) -> str:
    """The proxyless gRPC clients' calls, apart from the load through the Envoys."""
    versions = ", ".join(f"{v} {n}" for v, n in sorted(counts.get("by_version", {}).items()))
    return (
        f"proxyless gRPC clients (xds:///, no Envoy): {counts.get('sent', 0)} calls"
        f" ({versions or 'none answered yet'}), {counts.get('failed', 0)} failed"
    )


def _bars(weights: dict[str, int]) -> Text:
    total = sum(weights.values()) or 1
    text = Text()
    for pool, style in (("production", "blue"), ("baseline", "cyan"), ("canary", "magenta")):
        n = round(weights.get(pool, 0) * BAR / total)
        text.append("#" * n, style=style)
    pct = "/".join(
        f"{weights.get(p, 0) * 100 / total:.0f}" for p in ("production", "baseline", "canary")
    )
    text.append(f" {pct}")
    return text


def _pair(m: PoolNumbers | None) -> str:
    """A pool's error rate and p99 as the last check measured them (the comparator's in
    the baseline column, whichever pool it was)."""
    if m is None:
        return "-"
    err = f"{m.error_rate * 100:.1f}%" if m.error_rate is not None else "?"
    p99 = f"{m.p99_ms:.0f}ms" if m.p99_ms is not None else "?"
    return f"{err} / {p99}"
