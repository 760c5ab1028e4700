"""How `xdsctl` prints: `-o table` (aligned columns for a person), `-o json` and `-o yaml`
(the admin API's messages as documents, for scripts), and the few words times and
states become in a table.

The commands (ctl.py) fetch; the tables of their answers are drawn here.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from google.protobuf import json_format, message

from xds_server.admin.v1 import admin_pb2 as pb
from xds_server.rollout.audit_chain import ChainReport

Document = Any
"""What `-o json|yaml` prints: JSON-ready dicts, lists and scalars."""


def to_dict(msg: message.Message) -> dict[str, Any]:
    return dict(
        json_format.MessageToDict(
            msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
    )


def in_field_order(msg: message.Message) -> dict[str, Any]:
    """`to_dict`, its keys in the message's field order (defaults are not moved last)."""
    data = to_dict(msg)
    return {f.name: data[f.name] for f in msg.DESCRIPTOR.fields if f.name in data}


def emit(args: argparse.Namespace, data: Document, table: Callable[[], str]) -> None:
    if args.output == "json":
        print(json.dumps(data, indent=2))
    elif args.output == "yaml":
        print(as_yaml(data), end="")
    else:
        print(table())


def emit_document(args: argparse.Namespace, data: Document) -> None:
    """A document that has no table (a node's config, an xDS response): YAML with
    `-o yaml`, else JSON."""
    if args.output == "yaml":
        print(as_yaml(data), end="")
    else:
        print(json.dumps(data, indent=2))


def as_yaml(data: Document) -> str:
    """YAML of what JSON would print: protobuf's JSON mapping hands back OrderedDicts for
    packed `Any` fields (an xDS response's resources), which the safe dumper refuses."""
    return yaml.safe_dump(json.loads(json.dumps(data)), sort_keys=False)


def render_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    rows = [[str(c) for c in r] for r in rows]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def ago(ts: float) -> str:
    return seconds(time.time() - ts) if ts else "-"


def seconds(s: float) -> str:
    """A duration in seconds, as `ago` writes one: 42s, 7m, 3h."""
    s = max(0.0, s)
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.0f}h"


def stamp(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


# ---- xdsctl status ----


@dataclass(frozen=True)
class Status:
    """What `xdsctl status` shows: one server's answers to four reads."""

    server: str
    nodes: Sequence[pb.Node]
    listed: pb.ListRolloutsResponse
    istio: pb.GetIstioApplyStatusResponse
    replicas: pb.ListReplicasResponse | None
    """None: one process, nothing more to say (see `ctl.list_replicas`)."""

    def by_region(self) -> dict[str, dict[str, int]]:
        """Per region, how many nodes are in each sync state."""
        out: dict[str, dict[str, int]] = {}
        for n in self.nodes:
            counts = out.setdefault(n.region, {})
            counts[n.sync_state] = counts.get(n.sync_state, 0) + 1
        return out

    def document(self) -> dict[str, Any]:
        store = self.listed.store
        data: dict[str, Any] = {
            "server": self.server,
            "nodes": self.by_region(),
            "rollouts": [
                {
                    "service": r.service,
                    "group": r.group,
                    "canary_version": r.canary_version,
                    "phase": r.phase,
                    "reason": r.reason,
                    "waiting": r.waiting,
                }
                for r in self.listed.rollouts
            ],
        }
        if missed := self.stragglers():
            data["stragglers"] = [
                {"node": n.id, "region": n.region, "why": n.straggler} for n in missed
            ]
        if store.known:
            data["store"] = to_dict(store)
        if self.istio.enabled:
            data["istio_apply"] = [to_dict(r) for r in self.istio.regions]
        if self.replicas is not None:
            data["replica_store"] = self.replicas.store
            data["replicas"] = [in_field_order(r) for r in self.replicas.replicas]
            if self.replicas.etcd.known:
                data["etcd"] = to_dict(self.replicas.etcd)
        return data

    def table(self) -> str:
        store, rollouts, by_region = self.listed.store, self.listed.rollouts, self.by_region()
        out = [f"admin API {self.server}: reachable; {len(self.nodes)} nodes connected"]
        if store.known:
            out[0] += f"; {store_line(store)}"
        if self.replicas is not None:
            out.append(replicas_table(self.replicas))
            if self.replicas.etcd.known:
                out.append(etcd_lines(self.replicas.etcd))
        out.append(
            render_table(
                ["REGION", "NODES"],
                [
                    (region, ", ".join(f"{v} {k}" for k, v in sorted(c.items())))
                    for region, c in sorted(by_region.items())
                ],
            )
            if by_region
            else "no nodes"
        )
        out.append(
            render_table(
                ["SERVICE", "GROUP", "CANARY", "PHASE", "REASON"],
                [
                    (r.service, r.group or "-", r.canary_version, phase_word(r), why(r)[:80])
                    for r in rollouts
                ],
            )
            if rollouts
            else "no rollouts"
        )
        if missed := self.stragglers():
            out.append(
                render_table(
                    ["STRAGGLER", "REGION", "WHY"],
                    [(n.id, n.region, n.straggler[:80]) for n in missed],
                )
            )
        if self.istio.enabled:
            out.append(istio_table(self.istio.regions))
        return "\n\n".join(out)

    def stragglers(self) -> list[pb.Node]:
        """The nodes that missed a live rollout's step (issue 28)."""
        return sorted((n for n in self.nodes if n.straggler), key=lambda n: (n.region, n.id))


def replicas_table(listed: pb.ListReplicasResponse) -> str:
    """Every replica: what it serves, where, and which one decides."""
    rows = []
    for r in listed.replicas:
        counts = ", ".join(f"{region} {n}" for region, n in sorted(r.nodes_by_region.items()))
        rows.append(
            (
                r.id + (" *" if r.this else ""),
                ",".join(r.regions) or "all",
                r.xds_address or "-",
                r.admin_address or "-",
                f"{r.nodes} ({counts})" if len(r.nodes_by_region) > 1 else r.nodes,
                "leader" if r.leader else "follower",
            )
        )
    where = f" on {listed.store}" if listed.store else ""
    head = f"{len(rows)} replica(s){where}; * answered"
    return head + "\n" + render_table(["ID", "REGIONS", "XDS", "ADMIN", "NODES", "ROLE"], rows)


def etcd_lines(etcd: pb.EtcdStatus) -> str:
    """etcd's size against its quota, its alarms first, and the leader's upkeep."""
    answered = [m for m in etcd.members if not m.error]
    db = max((m.db_size for m in answered), default=0)
    used = max((m.db_size_in_use for m in answered), default=0)
    share = f"{db / etcd.quota_bytes:.0%}" if etcd.quota_bytes else "?"
    keys = f", {etcd.keys:,} keys" if etcd.keys >= 0 else ""
    lines = [f"ALARM {a.alarm} on etcd member {a.member_id:x}" for a in etcd.alarms]
    lines.append(
        f"etcd: {size(db)} of its {size(etcd.quota_bytes)} quota ({share}; {size(used)} in "
        f"use){keys}, revision {etcd.revision:,}; polled {ago(etcd.polled_at)} ago"
    )
    if etcd.writes_held:
        lines.append(f"writes held: {etcd.writes_held}")
    retention = seconds(etcd.retention_seconds) if etcd.retention_seconds else "off"
    done = [f"compaction retention {retention}"]
    done += [f"{what} {text}" for what, text in (
        ("last compaction", etcd.last_compaction), ("last defragmentation", etcd.last_defrag),
        ("last NOSPACE recovery", etcd.last_recovery)) if text]  # fmt: skip
    lines.append("; ".join(done))
    lines += [f"etcd member {m.endpoint}: no answer: {m.error}" for m in etcd.members if m.error]
    if etcd.error:
        lines.append(f"etcd alarms and keys unknown: {etcd.error}")
    return "\n".join(lines)


def size(n: float) -> str:
    """Bytes, short: 812 B, 3.1 MiB, 2.0 GiB."""
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def store_line(store: pb.StoreStatus) -> str:
    """The state store's health, in a few words."""
    if store.writable and not store.unsaved_rollbacks:
        return "state store: writable"
    line = f"state store: FAILING for {ago(store.failing_since)}: {store.error}"
    if store.writable:
        line = "state store: writable again"
    if store.unsaved_rollbacks:
        line += f"; {store.unsaved_rollbacks} rollback(s) pushed, not yet saved"
    return line


def istio_table(regions: Sequence[pb.IstioApplyStatus]) -> str:
    """Where each region's Istio objects are: in sync, or how far behind and why."""
    rows = []
    for r in regions:
        state = "pending" if r.pending else "applied"
        if r.next_retry_at:
            state = f"retrying in {max(0.0, r.next_retry_at - time.time()):.0f}s"
        rows.append(
            (
                r.region,
                r.target,
                f"{r.applied_generation}/{r.desired_generation}",
                state,
                r.attempts,
                ago(r.last_success_at),
                (r.last_error or (f"prune: {r.prune_error}" if r.prune_error else ""))[:80] or "-",
            )
        )
    return render_table(
        ["ISTIO REGION", "CLUSTER", "APPLIED/DESIRED", "STATE", "ATTEMPTS", "LAST OK", "ERROR"],
        rows,
    )


# ---- xdsctl nodes, registry ----

NODE_HEADERS = [
    "NODE",
    "REGION",
    "TYPE",
    "SYNC",
    "CLUSTERS",
    "ENDPOINTS",
    "LISTENERS",
    "ROUTES",
    "AGE",
    "LAST NACK",
    "IDENTITY",
    "STRAGGLER",
]


def nodes_table(nodes: Iterable[pb.Node]) -> str:
    """Each node: its sync state per type (with the version it ACKed), its last NACK."""
    rows = []
    for n in sorted(nodes, key=lambda n: (n.region, n.id)):
        types = {t.type: t for t in n.types}
        nack = next((t for t in n.types if t.sync_state == "NACKED"), None)
        rows.append(
            (
                n.id,
                n.region,
                n.client_type or "-",
                n.sync_state,
                *(
                    f"{types[t].sync_state} {types[t].acked_version or '-'}"
                    for t in ("cluster", "endpoint", "listener", "route")
                ),
                ago(n.connected_since),
                f"{nack.type}: {nack.nack_error[:60]}" if nack else "",
                n.identity or "-",
                n.straggler[:60],
            )
        )
    return render_table(NODE_HEADERS, rows)


def instances_table(instances: Sequence[pb.Instance], listed: pb.ListInstancesResponse) -> str:
    """The registry's instances, with each lease's time left ("-": a lease that is gone,
    or that etcd did not tell of: then the last line says why)."""
    out = render_table(
        ["SERVICE", "VERSION", "REGION", "ADDRESS", "AGE", "LEASE-LEFT"],
        [
            (
                i.service,
                i.version,
                i.region,
                i.address,
                seconds(i.age_seconds),
                f"{i.lease_ttl_left:.0f}s" if i.lease_ttl_left >= 0 else "-",
            )
            for i in instances
        ],
    )
    return out + (f"\n{listed.lease_error}" if listed.lease_error else "")


# ---- xdsctl rollout ----

ROLLOUT_HEADERS = [
    "REGION",
    "PHASE",
    "STEP",
    "WEIGHTS P/B/C %",
    "CANARY ERR",
    "CANARY P99",
    "REASON",
]


def rollout_rows(r: pb.Rollout) -> list[tuple[Any, ...]]:
    # Imported here: the audit codec brings the judge's records, and with them scipy,
    # which no other xdsctl command needs.
    from xds_server.rollout.audit_codec import measurements_from_json

    rows = []
    for reg in r.regions:
        measured = measurements_from_json(reg.latest_measurements_json)
        err = measured.canary.error_rate if measured else None
        p99 = measured.canary.p99_ms if measured else None
        rows.append(
            (
                reg.region,
                reg.phase,
                reg.step,
                f"{reg.production_percent:g}/{reg.baseline_percent:g}/"
                f"{reg.canary_percent:g}" + (" (manual)" if reg.manual else ""),
                f"{err * 100:.1f}%" if err is not None else "-",
                f"{p99:.0f}ms" if p99 is not None else "-",
                reg.reason[:70],
            )
        )
    return rows


SIGNAL_HEADERS = [
    "REGION",
    "NODES A/U/L",
    "TARGETS UP",
    "EVIDENCE AGE",
    "CANARY ROUTED",
    "SRM P",
    "SIGNALS",
]


def signal_rows(r: pb.Rollout) -> list[tuple[Any, ...]]:
    """Each region's signal health: nodes applied / unknown / lagging, Prometheus's
    Envoy targets up, the evidence's age, the canary's routed share against its
    configured one and the SRM test's p-value, and whether the evidence is trusted."""
    rows = []
    for reg in r.regions:
        s = reg.signals
        nodes = f"{s.nodes_applied}/{s.nodes_unknown}/{s.nodes_lagging}" if s.nodes_known else "-"
        if not s.read:
            rows.append((reg.region, nodes, "-", "-", "-", "-", "not read yet"))
            continue
        age = f"{s.evidence_age_s:.1f}s" if s.evidence_age_s >= 0 else "none"
        routed = (
            f"{s.canary_routed_percent:.1f}% of {s.canary_configured_percent:g}%"
            if s.canary_routed_percent >= 0
            else "-"
        )
        srm = f"{s.srm_p_value:.2g}" if s.srm_p_value >= 0 else "-"
        health = s.problem or (s.srm_note if not s.trusted else "ok")
        rows.append(
            (reg.region, nodes, f"{s.targets_up}/{s.targets}", age, routed, srm, health[:70])
        )
    return rows


def phase_word(r: pb.Rollout) -> str:
    """A rollout's phase; `waiting` for a canary that has not started."""
    return r.phase or ("waiting" if r.waiting else "-")


def why(r: pb.Rollout) -> str:
    """What a one-line listing says of a rollout: why its new canary waits, or its reason."""
    return f"waiting: {r.waiting}" if r.waiting and r.phase else r.waiting or r.reason


def rollout_table(r: pb.Rollout) -> str:
    """One rollout: its phase (its group, why a new canary waits), then each region's
    step, weights and canary numbers, and each region's signal health. The answer to a
    group's action: every member's, one after another."""
    if r.group_rollouts:
        head = f"group {r.group}: {len(r.group_rollouts)} member rollout(s)"
        return "\n\n".join([head, *(rollout_table(m) for m in r.group_rollouts)])
    group = f" [group {r.group}]" if r.group else ""
    if not r.phase:
        return f"{r.service} {r.canary_version}{group}: waiting: {r.waiting}"
    lines = [f"{r.service} {r.canary_version}{group}: {r.phase} ({r.reason})"]
    if r.waiting:
        lines.append(f"next canary waiting: {r.waiting}")
    if r.regions:
        lines += [
            render_table(ROLLOUT_HEADERS, rollout_rows(r)),
            render_table(SIGNAL_HEADERS, signal_rows(r)),
        ]
    return "\n".join(lines)


def rollouts_table(rollouts: Iterable[pb.Rollout]) -> str:
    return render_table(
        ["SERVICE", "GROUP", "CANARY", "PHASE", "STEPS BY REGION"],
        [
            (
                r.service,
                r.group or "-",
                r.canary_version,
                phase_word(r),
                " ".join(f"{g.region}={g.step}" for g in r.regions) or why(r)[:80],
            )
            for r in rollouts
        ],
    )


# ---- audit verify ----


def chain_docs(reports: Sequence[ChainReport]) -> list[dict[str, Any]]:
    """`xdsctl audit verify -o json`: one object per rollout's chain."""
    return [
        {
            "service": r.service,
            "version": r.version,
            "entries": r.entries,
            "unchained": r.unchained,
            "intact": r.intact,
            "broken_at": r.broken_at or None,
            "why": r.why or None,
        }
        for r in reports
    ]


def chain_result(r: ChainReport) -> str:
    if not r.intact:
        return f"BROKEN at entry {r.broken_at}: {r.why}"
    if r.unchained == r.entries:
        return "unchained (every entry written before the chain)"
    if r.unchained:
        return f"intact after {r.unchained} unchained (written before the chain)"
    return "intact"


def chain_table(reports: Sequence[ChainReport]) -> str:
    if not reports:
        return "no audit entries"
    return render_table(
        ["SERVICE", "VERSION", "ENTRIES", "CHAIN"],
        [(r.service, r.version, r.entries, chain_result(r)) for r in reports],
    )
