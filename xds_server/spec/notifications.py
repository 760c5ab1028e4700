"""Parsing a `notifications:` section (top level, or a service's own, which replaces it).

```yaml
notifications:
  queue: 1000
  targets:
    - {name: team, type: slack, url: "https://hooks.slack.com/...", on: [rolled_back, promoted]}
    - {name: bus, type: webhook, url: "http://127.0.0.1:9000/events"}   # every event
```
"""

from __future__ import annotations

from typing import Any

from xds_server.spec.checker import Checker
from xds_server.spec.model import NOTIFY_EVENTS, Notifications, NotificationTarget, NotifyKind

_SHORT = {e.removeprefix("rollout."): e for e in NOTIFY_EVENTS}
"""Short names for `on:`: `rolled_back` for `rollout.rolled_back`; `apply.failed` as is."""


def parse_notifications(c: Checker, value: Any, path: str) -> Notifications:
    m = c.mapping(value if value is not None else {}, path, ("targets", "queue"))
    queue = 1000
    if "queue" in m and (n := c.whole_number(m["queue"], f"{path}.queue", 1)) is not None:
        queue = n
    raw = m.get("targets", [])
    if not isinstance(raw, list):
        c.fail(f"{path}.targets", "expected a list of {name, type, url, on?, timeout?, retries?}")
        return Notifications((), queue)
    targets: list[NotificationTarget] = []
    for i, item in enumerate(raw):
        target = _target(c, item, f"{path}.targets[{i}]")
        if target is None:
            continue
        if any(t.name == target.name for t in targets):
            c.fail(f"{path}.targets[{i}].name", f"duplicate target {target.name!r}")
            continue
        targets.append(target)
    return Notifications(tuple(targets), queue)


def _target(c: Checker, value: Any, path: str) -> NotificationTarget | None:
    if isinstance(value, dict) and True in value:
        # YAML 1.1 reads a bare `on:` key as the boolean true.
        value = {("on" if k is True else k): v for k, v in value.items()}
    m = c.mapping(value, path, ("name", "type", "url", "on", "timeout", "retries"))
    kind = c.choice(m.get("type"), f"{path}.type", NotifyKind) if "type" in m else None
    if "type" not in m:
        c.fail(f"{path}.type", "required: slack or webhook")
    url = m.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        c.fail(f"{path}.url", f"expected an http(s) URL, got {url!r}")
        return None
    on = _events(c, m["on"], f"{path}.on") if "on" in m else frozenset(NOTIFY_EVENTS)
    timeout = c.duration(m["timeout"], f"{path}.timeout") if "timeout" in m else 5.0
    retries = c.whole_number(m["retries"], f"{path}.retries", 0) if "retries" in m else 3
    if kind is None or on is None or timeout is None or retries is None:
        return None
    name = m.get("name", url)
    return NotificationTarget(str(name), kind, url, on, timeout, retries)


def _events(c: Checker, value: Any, path: str) -> frozenset[str] | None:
    if value == "all" or value == ["all"]:
        return frozenset(NOTIFY_EVENTS)
    if not isinstance(value, list) or not value:
        c.fail(path, f"expected a list of events ({', '.join(_SHORT)}) or all")
        return None
    out: set[str] = set()
    for v in value:
        event = _SHORT.get(v, v) if isinstance(v, str) else v
        if event not in NOTIFY_EVENTS:
            c.fail(path, f"unknown event {v!r} (one of: {', '.join(_SHORT)}, or all)")
            return None
        out.add(event)
    return frozenset(out)
