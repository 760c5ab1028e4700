"""The audit log's one encoding: an `AuditEntry` (its `Weights`, `Measurements` and the
judge's `Verdict`) to the JSON the stores keep, and back. Pure.

What is kept is what the code before the typed record wrote, byte for byte, so every
log ever written reads back (tests/data holds a SQLite store and an etcd dump made then;
tests/test_audit_records.py reads them and writes them again, to the byte):

- SQLite (`rollout/store.py`): a row per entry (`to_row`, `from_row`); the weights,
  the measurements and the verdict are JSON text columns, NULL for none;
- etcd (`ha/store.py`): a JSON document per entry (`to_document`, `from_document`) whose
  snapshot version is the mark "commit": the transaction's revision, known only once it
  commits, which the reader supplies;
- the admin API's `*_json` fields, which `xdsctl` decodes again: one part's JSON
  (`weights_json`, `weights_from_json`, ...);
- the dashboard: the whole entry as one JSON object (`entry_doc`).

The JSON keys of the measurements are `canary`, `canary_step`, `comparator` (the
comparator's pool name: `Measurements.comparator_pool`) and `baseline` (the comparator's
numbers, whichever pool it is: `Measurements.comparator`). A key added to the record
after an entry was written reads as its default (`floor`, `alpha`, `problem`, ...).

An entry's rollout group (issue 31) is written only when it has one: in the etcd
document and the dashboard's row as `group`, in SQLite as the `GROUP_COLUMN` column
(added to stores made before it; NULL, like a missing key, reads as no group). Every
entry without a group keeps its bytes.

An entry's place in its rollout's hash chain (issue 30, `audit_chain.py`) is written
only when it has one, the same way: SQLite's `CHAIN_COLUMNS`, the etcd document's
`prev_hash` and `hash`. What the hash covers is `canonical(entry)`: `entry_doc` without
the id, its snapshot version as the store keeps it (SQLite: the number; etcd: the
COMMIT_MARK), keys sorted, no spaces, ASCII. So a field added to the record later must
stay out of `entry_doc` while it has its default (as `group` does), or every chain
written before it breaks (tests/test_audit_chain.py pins one entry's hash).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import replace
from enum import StrEnum
from typing import TypeAlias, TypeVar

from xds_server.rollout.audit import AuditEntry, Measurements, PoolNumbers, Weights
from xds_server.rollout.audit_chain import Link, link
from xds_server.rollout.decision import EntryKind
from xds_server.rollout.evidence import (
    Check,
    MetricClass,
    MetricResult,
    Outcome,
    Signals,
    Verdict,
    finite,
)
from xds_server.rollout.state import Phase
from xds_server.spec import NoDataRule

JSON: TypeAlias = dict[str, "JSON"] | list["JSON"] | str | int | float | bool | None
Doc: TypeAlias = dict[str, JSON]
SQLValue: TypeAlias = str | int | float | None

COLUMNS = (
    "time",
    "service",
    "canary_version",
    "region",
    "kind",
    "step",
    "phase_from",
    "phase_to",
    "weights_before",
    "weights_after",
    "measurements",
    "verdict",
    "reason",
    "snapshot_version",
    "actor",
)
"""An entry's SQLite columns (and its etcd document's keys), in the order they are kept;
the row's `id` is the store's."""
GROUP_COLUMN = "rollout_group"
"""SQLite: the column of an entry's rollout group (`group` is an SQL keyword), after
COLUMNS; present in a row only when the entry has a group."""
CHAIN_COLUMNS = ("prev_hash", "hash")
"""SQLite: an entry's link in its rollout's hash chain, after COLUMNS (and the etcd
document's keys); present only when the entry has one."""
COMMIT_MARK = "commit"
"""etcd: the snapshot version is the committing transaction's revision."""

E = TypeVar("E", bound=StrEnum)
T = TypeVar("T")
R = TypeVar("R")


class AuditDecodeError(ValueError):
    """Stored text that is not an audit entry; the message says where and what."""


# ---- the parts, to JSON ----


def weights_doc(w: Weights) -> Doc:
    doc: Doc = {"production": w.production, "baseline": w.baseline, "canary": w.canary}
    if w.shadow is not None:
        doc["shadow"] = w.shadow
    return doc


def pool_doc(p: PoolNumbers) -> Doc:
    return {
        "requests": p.requests,
        "errors": p.errors,
        "error_rate": p.error_rate,
        "p99_ms": p.p99_ms,
        "problem": p.problem,
    }


def measurements_doc(m: Measurements) -> Doc:
    return {
        "canary": pool_doc(m.canary),
        "canary_step": _opt(pool_doc, m.canary_step),
        "comparator": m.comparator_pool,
        "baseline": _opt(pool_doc, m.comparator),
    }


def verdict_doc(v: Verdict) -> Doc:
    doc: Doc = {
        "outcome": str(v.outcome),
        "reason": v.reason,
        "checks": [_check_doc(c) for c in v.checks],
        "score": v.score,
        "conclusive": v.conclusive,
        "metrics": [_metric_doc(m) for m in v.metrics],
    }
    # Written only when there is something to say: entries without them (every entry
    # before issue 27) keep their bytes.
    if v.untrusted:
        doc["untrusted"] = v.untrusted
    if v.signals is not None:
        doc["signals"] = signals_doc(v.signals)
    return doc


def signals_doc(s: Signals) -> Doc:
    return {
        "age_s": finite(s.age_s),
        "scrape_interval": s.scrape_interval,
        "targets": s.targets,
        "targets_up": s.targets_up,
        "resets": s.resets,
        "problem": s.problem,
        "sent": {k: finite(v) for k, v in s.sent.items()},
        "configured": {k: finite(v) for k, v in s.configured.items()},
        "srm_p": finite(s.srm_p),
        "srm_skipped": s.srm_skipped,
    }


def _check_doc(c: Check) -> Doc:
    return {"metric": c.metric, "value": c.value, "limit": c.limit, "ok": c.ok, "floor": c.floor}


def _metric_doc(m: MetricResult) -> Doc:
    return {
        "name": m.name,
        "classification": str(m.classification),
        "effect": m.effect,
        "p_value": m.p_value,
        "detail": m.detail,
        "group": m.group,
        "critical": m.critical,
        "on_no_data": str(m.on_no_data),
        "alpha": m.alpha,
    }


# ---- the parts, from JSON ----


_REQUIRED = object()
"""A key that has no default: missing, it is an error."""


class _Fields:
    """One JSON object being read: each getter checks its key's type and names it when
    it is wrong. A missing key with a default reads as the default."""

    def __init__(self, value: object, path: str) -> None:
        if not isinstance(value, dict):
            raise AuditDecodeError(f"{path}: expected an object, got {_kind(value)}")
        self.doc: dict[str, object] = value
        self.path = path

    def _get(self, key: str, ok: Callable[[object], bool], what: str, default: object) -> object:
        if key not in self.doc and default is not _REQUIRED:
            return default
        value = self.doc.get(key, _REQUIRED)
        if value is _REQUIRED or not ok(value):
            got = "nothing" if value is _REQUIRED else _kind(value)
            raise AuditDecodeError(f"{self.path}.{key}: expected {what}, got {got}")
        return value

    def number(self, key: str, default: object = None) -> float | None:
        """A number or null (None when missing, unless `default` says otherwise)."""
        value = self._get(key, _is_number_or_null, "a number or null", default)
        return value if isinstance(value, int | float) else None

    def real(self, key: str, default: object = _REQUIRED) -> float:
        value = self._get(key, _is_number, "a number", default)
        assert isinstance(value, int | float)
        return value

    def integer(self, key: str) -> int | None:
        value = self._get(key, _is_int_or_null, "an integer or null", None)
        return value if isinstance(value, int) else None

    def text(self, key: str) -> str:
        value = self._get(key, _is_str, "a string", _REQUIRED)
        assert isinstance(value, str)
        return value

    def opt_text(self, key: str) -> str | None:
        value = self._get(key, _is_str_or_null, "a string or null", None)
        return value if isinstance(value, str) else None

    def flag(self, key: str, default: object = _REQUIRED) -> bool:
        value = self._get(key, _is_bool, "true or false", default)
        assert isinstance(value, bool)
        return value

    def word(self, key: str, enum: type[E]) -> E:
        return _enum(enum, self.text(key), f"{self.path}.{key}")

    def opt_word(self, key: str, enum: type[E]) -> E | None:
        value = self.opt_text(key)
        return None if value is None else _enum(enum, value, f"{self.path}.{key}")

    def objects(self, key: str) -> list[_Fields]:
        value = self._get(key, _is_list_or_null, "a list", [])
        assert value is None or isinstance(value, list)
        return [_Fields(v, f"{self.path}.{key}[{i}]") for i, v in enumerate(value or ())]

    def nested(self, key: str) -> _Fields | None:
        value = self.doc.get(key)
        return None if value is None else _Fields(value, f"{self.path}.{key}")

    def part(self, key: str, decode: Callable[[object, str], T]) -> T | None:
        """A nested record (weights, measurements, a verdict), or None for null."""
        value = self.doc.get(key)
        return None if value is None else decode(value, f"{self.path}.{key}")


def weights_from_doc(value: object, path: str = "weights") -> Weights:
    f = _Fields(value, path)
    return Weights(
        production=f.real("production"),
        baseline=f.real("baseline"),
        canary=f.real("canary"),
        shadow=f.number("shadow"),
    )


def _pool(f: _Fields) -> PoolNumbers:
    return PoolNumbers(
        requests=f.number("requests"),
        errors=f.number("errors"),
        error_rate=f.number("error_rate"),
        p99_ms=f.number("p99_ms"),
        problem=f.opt_text("problem"),
    )


def measurements_from_doc(value: object, path: str = "measurements") -> Measurements:
    f = _Fields(value, path)
    canary = f.nested("canary")
    if canary is None:
        raise AuditDecodeError(f"{path}.canary: expected an object, got nothing")
    return Measurements(
        canary=_pool(canary),
        canary_step=_opt(_pool, f.nested("canary_step")),
        comparator_pool=f.opt_text("comparator"),
        comparator=_opt(_pool, f.nested("baseline")),
    )


def verdict_from_doc(value: object, path: str = "verdict") -> Verdict:
    f = _Fields(value, path)
    return Verdict(
        outcome=f.word("outcome", Outcome),
        reason=f.text("reason"),
        checks=tuple(_check(c) for c in f.objects("checks")),
        metrics=tuple(_metric(m) for m in f.objects("metrics")),
        score=f.number("score"),
        conclusive=f.flag("conclusive", False),
        untrusted=f.text("untrusted") if "untrusted" in f.doc else "",
        signals=f.part("signals", signals_from_doc),
    )


def signals_from_doc(value: object, path: str = "signals") -> Signals:
    f = _Fields(value, path)
    return Signals(
        age_s=f.number("age_s"),
        scrape_interval=f.number("scrape_interval"),
        targets=int(f.real("targets", 0)),
        targets_up=int(f.real("targets_up", 0)),
        resets=int(f.real("resets", 0)),
        problem=f.text("problem") if "problem" in f.doc else "",
        sent=_numbers(f, "sent"),
        configured=_numbers(f, "configured"),
        srm_p=f.number("srm_p"),
        srm_skipped=f.text("srm_skipped") if "srm_skipped" in f.doc else "",
    )


def _numbers(f: _Fields, key: str) -> dict[str, float]:
    """A {name: number} object (pools' counts or shares); nulls are left out."""
    inner = f.nested(key)
    if inner is None:
        return {}
    return {k: v for k in inner.doc if (v := inner.number(k)) is not None}


def _check(f: _Fields) -> Check:
    return Check(
        metric=f.text("metric"),
        value=f.real("value"),
        limit=f.real("limit"),
        ok=f.flag("ok"),
        floor=f.flag("floor", False),
    )


def _metric(f: _Fields) -> MetricResult:
    return MetricResult(
        name=f.text("name"),
        classification=f.word("classification", MetricClass),
        effect=f.number("effect"),
        p_value=f.number("p_value"),
        detail=f.text("detail"),
        group=f.text("group"),
        critical=f.flag("critical"),
        on_no_data=f.word("on_no_data", NoDataRule),
        alpha=f.real("alpha", 0.0),
    )


# ---- one part as JSON text (the admin API's *_json fields, xdsctl) ----


def weights_json(w: Weights | None) -> str | None:
    return _dumps(_opt(weights_doc, w))


def measurements_json(m: Measurements | None) -> str | None:
    return _dumps(_opt(measurements_doc, m))


def verdict_json(v: Verdict | None) -> str | None:
    return _dumps(_opt(verdict_doc, v))


def weights_from_json(text: str | None) -> Weights | None:
    """None for no text, "" or `null`."""
    return _opt(weights_from_doc, _loads(text, "weights"))


def measurements_from_json(text: str | None) -> Measurements | None:
    return _opt(measurements_from_doc, _loads(text, "measurements"))


def verdict_from_json(text: str | None) -> Verdict | None:
    return _opt(verdict_from_doc, _loads(text, "verdict"))


# ---- whole entries ----


def entry_doc(e: AuditEntry) -> Doc:
    """Every field, its parts as JSON objects (the dashboard's rows); `group` only when
    the entry has one."""
    doc: Doc = {
        "time": e.time,
        "service": e.service,
        "canary_version": e.canary_version,
        "region": e.region,
        "kind": str(e.kind),
        "step": e.step,
        "phase_from": _opt(str, e.phase_from),
        "phase_to": _opt(str, e.phase_to),
        "weights_before": _opt(weights_doc, e.weights_before),
        "weights_after": _opt(weights_doc, e.weights_after),
        "measurements": _opt(measurements_doc, e.measurements),
        "verdict": _opt(verdict_doc, e.verdict),
        "reason": e.reason,
        "snapshot_version": e.snapshot_version,
        "actor": e.actor,
        "id": e.id,
    }
    if e.group is not None:
        doc["group"] = e.group
    return doc


def to_row(e: AuditEntry) -> dict[str, SQLValue]:
    """SQLite: the COLUMNS, the parts as JSON text; GROUP_COLUMN only when the entry has
    a group (the store inserts the row's own columns)."""
    doc = entry_doc(e)
    row: dict[str, SQLValue] = {}
    for column in COLUMNS:
        value = doc[column]
        row[column] = _dumps(value) if column in _PARTS else _scalar(value)
    if e.group is not None:
        row[GROUP_COLUMN] = e.group
    if e.chain is not None:
        row.update(zip(CHAIN_COLUMNS, (e.chain.prev, e.chain.hash), strict=True))
    return row


def from_row(row: Mapping[str, object]) -> AuditEntry:
    """SQLite: a row of the audit table (COLUMNS and `id`)."""
    where = f"audit row {row.get('id')}"
    doc = dict(row)
    for column in _PARTS:
        text = row.get(column)
        if text is not None and not isinstance(text, str):
            raise AuditDecodeError(f"{where}.{column}: expected JSON text, got {_kind(text)}")
        doc[column] = _loads(text, f"{where}.{column}")
    doc["group"] = doc.pop(GROUP_COLUMN, None)
    f = _Fields(doc, where)
    id_ = f.integer("id")
    return _entry(f, id_ or 0, f.integer("snapshot_version"), _link(f, snapshot_mark=False))


def to_document(e: AuditEntry) -> str:
    """etcd: the entry without its id (the key's); its snapshot version the COMMIT_MARK."""
    doc = entry_doc(e)
    del doc["id"]
    doc["snapshot_version"] = None if e.snapshot_version is None else COMMIT_MARK
    if e.chain is not None:
        doc.update(zip(CHAIN_COLUMNS, (e.chain.prev, e.chain.hash), strict=True))
    return json.dumps(doc)


def from_document(text: str | bytes, id_: int, committed_version: int) -> AuditEntry:
    """etcd: the entry of key `id_`; `committed_version`, the version its commit gave."""
    where = f"audit {id_}"
    f = _Fields(_loads(text, where), where)
    mark = f.doc.get("snapshot_version")
    if mark is not None and mark != COMMIT_MARK:
        raise AuditDecodeError(f"{where}.snapshot_version: expected {COMMIT_MARK!r} or null")
    link_ = _link(f, snapshot_mark=True)
    return _entry(f, id_, None if mark is None else committed_version, link_)


# ---- the hash chain ----


def canonical(e: AuditEntry, snapshot_mark: bool | None = None) -> bytes:
    """The bytes an entry's hash covers: `entry_doc` without the id, the snapshot version
    as the store keeps it (`snapshot_mark`: as the COMMIT_MARK, etcd's; None: as the
    entry's chain says), `json.dumps(sort_keys=True, separators=(",", ":"))`, ASCII."""
    if snapshot_mark is None:
        snapshot_mark = e.chain is not None and e.chain.snapshot_mark
    doc = entry_doc(e)
    del doc["id"]
    if snapshot_mark and e.snapshot_version is not None:
        doc["snapshot_version"] = COMMIT_MARK
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("ascii")


def chained(e: AuditEntry, prev: str, *, snapshot_mark: bool) -> AuditEntry:
    """The entry linked after `prev` (the hash of its rollout's entry before it, or the
    rollout's `audit_chain.genesis`): what a store writes, under its write."""
    digest = link(prev, canonical(e, snapshot_mark))
    return replace(e, chain=Link(prev, digest, snapshot_mark))


def _link(f: _Fields, *, snapshot_mark: bool) -> Link | None:
    prev, digest = (f.opt_text(key) for key in CHAIN_COLUMNS)
    if prev is None and digest is None:
        return None
    if prev is None or digest is None:
        missing = CHAIN_COLUMNS[0] if prev is None else CHAIN_COLUMNS[1]
        raise AuditDecodeError(f"{f.path}.{missing}: expected a hash with the other one")
    return Link(prev, digest, snapshot_mark)


_PARTS = frozenset({"weights_before", "weights_after", "measurements", "verdict"})
"""The columns kept as JSON text."""


def _entry(
    f: _Fields, id_: int, snapshot_version: int | None, chain: Link | None = None
) -> AuditEntry:
    return AuditEntry(
        time=f.real("time"),
        service=f.text("service"),
        canary_version=f.text("canary_version"),
        region=f.opt_text("region"),
        kind=f.word("kind", EntryKind),
        step=f.integer("step"),
        phase_from=f.opt_word("phase_from", Phase),
        phase_to=f.opt_word("phase_to", Phase),
        weights_before=f.part("weights_before", weights_from_doc),
        weights_after=f.part("weights_after", weights_from_doc),
        measurements=f.part("measurements", measurements_from_doc),
        verdict=f.part("verdict", verdict_from_doc),
        reason=f.text("reason"),
        snapshot_version=snapshot_version,
        actor=f.text("actor"),
        id=id_,
        group=f.opt_text("group"),
        chain=chain,
    )


# ---- helpers ----


def _opt(fn: Callable[[T], R], value: T | None) -> R | None:
    return None if value is None else fn(value)


def _dumps(doc: JSON) -> str | None:
    return None if doc is None else json.dumps(doc)


def _loads(text: str | bytes | None, where: str) -> object:
    """None for no text, "" and `null`."""
    if not text:
        return None
    try:
        value: object = json.loads(text)
    except ValueError as exc:
        raise AuditDecodeError(f"{where}: not JSON: {exc}") from None
    return value


def _scalar(value: JSON) -> SQLValue:
    assert value is None or isinstance(value, str | int | float)
    return value


def _enum(enum: type[E], value: str, where: str) -> E:
    try:
        return enum(value)
    except ValueError:
        known = ", ".join(str(m) for m in enum)
        raise AuditDecodeError(f"{where}: {value!r} is not one of {known}") from None


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_number_or_null(v: object) -> bool:
    return v is None or _is_number(v)


def _is_int_or_null(v: object) -> bool:
    return v is None or (isinstance(v, int) and not isinstance(v, bool))


def _is_str(v: object) -> bool:
    return isinstance(v, str)


def _is_str_or_null(v: object) -> bool:
    return v is None or isinstance(v, str)


def _is_bool(v: object) -> bool:
    return isinstance(v, bool)


def _is_list_or_null(v: object) -> bool:
    return v is None or isinstance(v, list)
