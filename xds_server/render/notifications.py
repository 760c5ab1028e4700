"""Rollout notifications: what a committed decision means to the people and systems
watching it, and the bodies sent to them. Pure: no I/O, no clock.

`events(view)` turns one `Committed` view into `NotifyEvent`s, each of a type of
`spec.NOTIFY_EVENTS`:

| type                  | when                                                              |
| --------------------- | ----------------------------------------------------------------- |
| `rollout.started`     | a rollout-wide transition out of `pending`                        |
| `rollout.step`        | regions moved up a step while progressing (one per decision)      |
| `rollout.paused`      | a rollout-wide transition to `paused`                             |
| `rollout.resumed`     | a rollout-wide transition from `paused` to `progressing`          |
| `rollout.rolled_back` | a rollout-wide transition to `rolled_back`, with the evidence     |
| `rollout.promoted`    | a rollout-wide transition to `promoted`                           |
| `apply.failed`        | a region's data plane did not apply a step (NACK, no ACK in time) |

Check entries (judgements that moved nothing) are not events; nor is a view without a
decision (a restore, a spec change). `body(event, kind)` renders an event for a target:
Slack incoming-webhook JSON (`text` and `blocks`), or a CloudEvents 1.0 event in
structured mode whose `type` is `io.xds-server.<event type>`.

The weights before a decision are not part of the view; they are derived from the
decision's transitions: a rolled-back region's state before the rollback is its state
after it with the transition's `phase_from` and `step_from` (a rollback changes nothing
else), and the weights of a state are `rollout.state.region_split`'s.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from xds_server.rollout.audit import PoolNumbers, Weights, audit_weights, failed_metric
from xds_server.rollout.audit_codec import Doc, pool_doc, verdict_doc, weights_doc
from xds_server.rollout.decide import Decision, EntryKind, Observation, Transition
from xds_server.rollout.evidence import HIGH, LOW, Measurement, Verdict
from xds_server.rollout.ports import Committed
from xds_server.rollout.state import (
    PAUSED,
    PENDING,
    PROGRESSING,
    PROMOTED,
    ROLLED_BACK,
    RolloutState,
    region_split,
    step_label,
)
from xds_server.spec import MeshSpec, NotificationTarget, NotifyKind, RolloutPlan

CE_TYPE_PREFIX = "io.xds-server."
"""A CloudEvent's `type` is this prefix and the event type: `io.xds-server.rollout.step`."""
CE_SOURCE_PREFIX = "xds-server/"
"""A CloudEvent's `source` is this prefix and the service: `xds-server/recommender`."""
CLOUDEVENTS_CONTENT_TYPE = "application/cloudevents+json"
JSON_CONTENT_TYPE = "application/json"
_ID_NAMESPACE = uuid.UUID("3f6c1c2e-6b0a-5d55-9a57-3c3f0e0b8a11")

# Slack's Block Kit limits (characters).
_HEADER_MAX = 150
_SECTION_MAX = 3000
_FIELD_MAX = 2000
_FIELDS_MAX = 10


@dataclass(frozen=True)
class NotifyEvent:
    type: str
    """One of `spec.NOTIFY_EVENTS`, e.g. `rollout.rolled_back`."""
    service: str
    canary_version: str
    time: float
    actor: str
    title: str
    """A few words: `recommender v2: rolled back`."""
    summary: str
    """One line for people: what happened and why."""
    facts: tuple[tuple[str, str], ...]
    """(label, value) pairs a chat message shows as fields."""
    data: Mapping[str, Any]
    """The details, JSON-ready: a CloudEvent's `data`."""

    @property
    def id(self) -> str:
        """Unique per event, and the same every time the same event is rendered (a
        retried delivery keeps its id, so receivers can drop duplicates)."""
        key = json.dumps(
            [self.type, self.service, self.canary_version, self.time, self.data],
            sort_keys=True,
            default=str,
        )
        return str(uuid.uuid5(_ID_NAMESPACE, key))


# ---- which events a decision is ----


@dataclass(frozen=True)
class _View:
    committed: Committed
    decision: Decision
    plan: RolloutPlan | None
    """None when the spec no longer has the service."""
    has_baseline: bool

    @property
    def state(self) -> RolloutState:
        return self.decision.state

    def weights_after(self, region: str) -> Weights:
        return audit_weights(self.committed.traffic.split(self.state.service, region))

    def canary_after(self, region: str) -> float:
        return self.weights_after(region).canary


def events(view: Committed) -> list[NotifyEvent]:
    """The notification events of one committed view, in the order they happened."""
    decision = view.decision
    if decision is None:
        return []
    plan, has_baseline = _plan(view.spec, decision.state.service)
    v = _View(view, decision, plan, has_baseline)
    out = [
        _apply_failed(v, region, obs)
        for region, obs in decision.observations.items()
        if obs.apply_error
    ]
    wide = [t for t in decision.transitions if t.region is None and t.kind == EntryKind.TRANSITION]
    if started := [t for t in wide if t.phase_from == PENDING]:
        out.append(_started(v, started[0]))
    else:
        stepped = [
            t
            for t in decision.transitions
            if t.region is not None
            and t.kind == EntryKind.TRANSITION
            and t.phase_to == PROGRESSING
            and t.step_to > t.step_from
        ]
        if stepped:
            out.append(_step(v, stepped))
    for t in wide:
        if t.phase_to == PAUSED:
            out.append(_simple(v, "rollout.paused", "paused", t.reason))
        elif t.phase_from == PAUSED and t.phase_to == PROGRESSING:
            out.append(_simple(v, "rollout.resumed", "resumed", t.reason))
        elif t.phase_to == PROMOTED:
            out.append(_simple(v, "rollout.promoted", "promoted", t.reason))
        elif t.phase_to == ROLLED_BACK:
            out.append(_rolled_back(v, t))
    return out


def for_target(found: Iterable[NotifyEvent], target: NotificationTarget) -> list[NotifyEvent]:
    """The events a target asked for (its `on:`)."""
    return [e for e in found if e.type in target.on]


def _plan(spec: MeshSpec, service: str) -> tuple[RolloutPlan | None, bool]:
    try:
        svc = spec.service(service)
    except KeyError:
        return None, False
    return svc.rollout, svc.has_baseline


def _event(
    v: _View,
    type_: str,
    title: str,
    summary: str,
    data: Mapping[str, Any],
    facts: Sequence[tuple[str, str]] = (),
) -> NotifyEvent:
    """`data` adds to (and may override) what every event carries: the rollout's
    service, version, phase and reason, the actor, and each region's phase, step and
    weights after the decision."""
    state = v.state
    base: dict[str, Any] = {
        "event": type_,
        "service": state.service,
        "canary_version": state.canary_version,
        "phase": str(state.phase),
        "reason": state.reason,
        "actor": v.committed.actor,
        "title": f"{state.service} {state.canary_version}: {title}",
        "summary": summary,
        "regions": {
            r: {"phase": str(rs.phase), "step": rs.step, "weights": weights_doc(v.weights_after(r))}
            for r, rs in state.regions.items()
        },
    }
    return NotifyEvent(
        type=type_,
        service=state.service,
        canary_version=state.canary_version,
        time=v.committed.time,
        actor=v.committed.actor,
        title=base["title"],
        summary=summary,
        facts=tuple(facts),
        data=_finite({**base, **data}),
    )


def _label(v: _View, step: int) -> str:
    if v.plan is None or step >= len(v.plan.steps):
        return f"step {step}"
    return step_label(v.plan, step)


def _started(v: _View, wide: Transition) -> NotifyEvent:
    state = v.state
    live = {r: rs for r, rs in state.regions.items() if rs.phase != PENDING}
    steps = list(v.plan.steps) if v.plan is not None else []
    where = ", ".join(f"{r} ({_label(v, rs.step)})" for r, rs in live.items())
    summary = f"canary {state.canary_version} starts in {where or 'no region yet'}"
    if steps:
        summary += f"; steps {', '.join(f'{s:g}%' for s in steps)}"
    return _event(
        v,
        "rollout.started",
        "rollout started",
        summary,
        {"reason": wide.reason, "steps": steps, "first_regions": list(live)},
        [("Regions", where or "none yet"), ("Steps", ", ".join(f"{s:g}%" for s in steps))],
    )


def _step(v: _View, stepped: Sequence[Transition]) -> NotifyEvent:
    moved: list[dict[str, Any]] = []
    for t in stepped:
        assert t.region is not None
        moved.append(
            {
                "region": t.region,
                "step_from": t.step_from,
                "step_to": t.step_to,
                "canary_percent": v.canary_after(t.region),
                "weights": weights_doc(v.weights_after(t.region)),
            }
        )
    percents = sorted({m["canary_percent"] for m in moved})
    at = f"canary at {percents[0]:g}%" if len(percents) == 1 else "canary advanced"
    by_step: dict[int, list[str]] = {}
    for t in stepped:
        assert t.region is not None
        by_step.setdefault(t.step_to, []).append(t.region)
    where = "; ".join(f"{', '.join(rs)}: {_label(v, s)}" for s, rs in by_step.items())
    data: dict[str, Any] = {"reason": stepped[0].reason, "advanced": moved}
    if len(percents) == 1:
        data["canary_percent"] = percents[0]
    return _event(
        v,
        "rollout.step",
        at,
        f"{where}; {stepped[0].reason}",
        data,
        [(m["region"], f"canary {m['canary_percent']:g}%") for m in moved],
    )


def _simple(v: _View, type_: str, what: str, reason: str) -> NotifyEvent:
    regions = v.state.regions
    facts = [(r, f"{rs.phase}, canary {v.canary_after(r):g}%") for r, rs in regions.items()]
    return _event(v, type_, what, reason, {"reason": reason}, facts)


def _apply_failed(v: _View, region: str, obs: Observation) -> NotifyEvent:
    before = v.decision.transitions
    step = next((t.step_from for t in before if t.region == region), None)
    if step is None:
        step = v.state.regions[region].step if region in v.state.regions else -1
    error = obs.apply_error or ""
    label = _label(v, step)
    return _event(
        v,
        "apply.failed",
        f"{region} did not apply {label}",
        f"{region}: {label} not applied by the data plane: {error}",
        {"reason": f"{label} not applied: {error}", "region": region, "step": step, "error": error},
        [("Region", region), ("Step", label), ("Error", error)],
    )


# ---- a rollback and its evidence ----


def _rolled_back(v: _View, wide: Transition) -> NotifyEvent:
    region, verdict = _culprit(v, wide)
    cause = _cause(verdict)
    obs = v.decision.observations.get(region) if region else None
    measured = _measurements(obs)
    before, after = _weights_around(v)
    data: dict[str, Any] = {
        "region": region,
        "metric": cause["metric"],
        "p_value": cause["p_value"],
        "cause": cause,
        **measured,
        "weights_before": before,
        "weights_after": after,
        "verdict": verdict_doc(verdict) if verdict else None,
    }
    facts = [("Region", region or "none (not a region's evidence)")]
    if cause["metric"]:
        facts.append(("Metric", str(cause["metric"])))
    if cause["p_value"] is not None:
        facts.append(("p-value", f"{cause['p_value']:.3g}"))
    if cause["guardrail"] is not None:
        g = cause["guardrail"]
        facts.append(("Guardrail", f"{g['value']:.4g} (limit {g['limit']:.4g})"))
    if measured.get("canary") is not None:
        facts.append(("Canary (window)", _describe(measured["canary"])))
    if measured.get("canary_step") is not None:
        facts.append(("Canary (step)", _describe(measured["canary_step"])))
    if measured.get("comparator") is not None:
        pool = measured.get("comparator_pool") or "comparator"
        facts.append((f"{pool.capitalize()} (step)", _describe(measured["comparator"])))
    if before:
        moves = [f"{r}: {before[r]['canary']:g}% → {after[r]['canary']:g}%" for r in before]
        facts.append(("Canary weight", "\n".join(moves)))
    return _event(v, "rollout.rolled_back", "rolled back", v.state.reason, data, facts)


def _culprit(v: _View, wide: Transition) -> tuple[str | None, Verdict | None]:
    """The region whose evidence rolled back (and its verdict): the transition carrying
    the verdict, else a region that failed to apply, else the one the reason names."""
    for t in v.decision.transitions:
        if t.region is not None and t.verdict is not None:
            return t.region, t.verdict
    for region, obs in v.decision.observations.items():
        if obs.apply_error:
            return region, wide.verdict
    for region in v.state.regions:
        if v.state.reason.startswith(f"{region}: "):
            return region, wide.verdict
    return None, wide.verdict


def _cause(verdict: Verdict | None) -> dict[str, Any]:
    """The metric that failed (as the audit log names it), its guardrail numbers or its
    analysis result, and the analysis's p-value."""
    metric = failed_metric(verdict)
    checks = verdict.checks if verdict else ()
    check = next((c for c in checks if not c.ok and c.metric == metric), None)
    bad = [m for m in verdict.metrics if m.classification in (HIGH, LOW)] if verdict else []
    analysed = next((m for m in bad if m.name == metric), bad[0] if bad else None)
    return {
        "metric": metric,
        "guardrail": {"value": check.value, "limit": check.limit} if check else None,
        "analysis": (
            {
                "name": analysed.name,
                "classification": str(analysed.classification),
                "effect": analysed.effect,
                "p_value": analysed.p_value,
                "alpha": analysed.alpha,
                "detail": analysed.detail,
            }
            if analysed
            else None
        ),
        "p_value": analysed.p_value if analysed else None,
    }


def _measurements(obs: Observation | None) -> dict[str, Any]:
    """Canary over the window (what the guardrails judged) and over the step, and the
    comparator over the step (what the analysis judged)."""
    if obs is None:
        return {"canary": None, "canary_step": None, "comparator": None, "comparator_pool": None}
    step = obs.step
    return {
        "canary": _numbers(obs.canary),
        "canary_step": _numbers(step.canary if step else None),
        "comparator": _numbers(step.comparator if step else None),
        "comparator_pool": step.comparator_pool if step else None,
    }


def _numbers(m: Measurement | None) -> Doc | None:
    """A pool's numbers as the audit log keeps them."""
    return pool_doc(PoolNumbers.of(m)) if m is not None else None


def _weights_around(v: _View) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per region that rolled back: the weights before (from its state before the
    rollback) and after (as pushed)."""
    before: dict[str, Any] = {}
    after: dict[str, Any] = {}
    if v.plan is None:
        return before, after
    for t in v.decision.transitions:
        if t.region is None or t.phase_to != ROLLED_BACK or t.region not in v.state.regions:
            continue
        prior = replace(v.state.regions[t.region], phase=t.phase_from, step=t.step_from)
        before[t.region] = weights_doc(audit_weights(region_split(v.plan, prior, v.has_baseline)))
        after[t.region] = weights_doc(v.weights_after(t.region))
    return before, after


def _describe(m: Mapping[str, Any]) -> str:
    """`300/1000 errors (30%), p99 50 ms` from a pool's numbers as the audit log keeps them."""
    if m.get("problem"):
        return f"unavailable: {m['problem']}"
    parts = []
    if m.get("requests") is not None:
        parts.append(f"{m.get('errors') or 0:.0f}/{m['requests']:.0f} errors")
        if m.get("error_rate") is not None:
            parts[-1] += f" ({m['error_rate'] * 100:.3g}%)"
    if m.get("p99_ms") is not None:
        parts.append(f"p99 {m['p99_ms']:.4g} ms")
    return ", ".join(parts) or "no data"


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _finite(x) for k, x in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(x) for x in value]
    return value


# ---- the bodies ----


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def cloudevent(event: NotifyEvent) -> dict[str, Any]:
    """A CloudEvents 1.0 event, structured mode (sent as application/cloudevents+json)."""
    return {
        "specversion": "1.0",
        "id": event.id,
        "source": CE_SOURCE_PREFIX + event.service,
        "type": CE_TYPE_PREFIX + event.type,
        "time": rfc3339(event.time),
        "datacontenttype": JSON_CONTENT_TYPE,
        "subject": event.service,
        "data": dict(event.data),
    }


def slack(event: NotifyEvent) -> dict[str, Any]:
    """Incoming-webhook JSON: `text` (what Mattermost, Teams workflows and notifications
    show) and Block Kit `blocks` (what Slack shows)."""
    lines = [f"*{_esc(event.title)}*", _esc(event.summary)]
    lines += [f"*{_esc(k)}:* {_esc(v)}" for k, v in event.facts]
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": _cut(event.title, _HEADER_MAX)}},
        {
            "type": "section",
            "text": {"type": "mrkdwn", "text": _cut(_esc(event.summary) or "-", _SECTION_MAX)},
        },
    ]
    if event.facts:
        fields = [
            {"type": "mrkdwn", "text": _cut(f"*{_esc(k)}*\n{_esc(v)}", _FIELD_MAX)}
            for k, v in event.facts[:_FIELDS_MAX]
        ]
        blocks.append({"type": "section", "fields": fields})
    context = f"{event.type} · {_esc(event.actor)} · {rfc3339(event.time)}"
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": context}]})
    return {"text": _cut("\n".join(lines), _SECTION_MAX), "blocks": blocks}


def body(event: NotifyEvent, kind: NotifyKind) -> tuple[bytes, str]:
    """The request body and its Content-Type for a target of this kind."""
    if kind == NotifyKind.SLACK:
        doc, content_type = slack(event), JSON_CONTENT_TYPE
    else:
        doc, content_type = cloudevent(event), CLOUDEVENTS_CONTENT_TYPE
    return json.dumps(doc, allow_nan=False).encode(), content_type


def _esc(text: str) -> str:
    """Slack's mrkdwn control characters."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


__all__ = [
    "CE_SOURCE_PREFIX",
    "CE_TYPE_PREFIX",
    "CLOUDEVENTS_CONTENT_TYPE",
    "JSON_CONTENT_TYPE",
    "NotifyEvent",
    "body",
    "cloudevent",
    "events",
    "for_target",
    "rfc3339",
    "slack",
]
