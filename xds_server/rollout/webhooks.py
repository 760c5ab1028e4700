"""Warm-up webhooks: POST the rollout's context to each hook before the pools take traffic.

Like Flagger's pre-rollout hooks: a load test, a cache primer or a smoke test answers 2xx
to let the rollout go on. Anything else, after the retries, blocks the rollout with the
hook's own answer as the reason. Hooks run in a worker thread while the controller loop
goes on, so a slow hook never delays a decision, least of all a rollback.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import requests

from xds_server.spec import Service, Webhook

if TYPE_CHECKING:
    from xds_server.rollout.state import RolloutState


def hook_context(svc: Service, state: RolloutState, region: str) -> dict[str, Any]:
    return {
        "phase": "warmup",
        "service": svc.name,
        "region": region,
        "canary_version": state.canary_version,
        "production_version": svc.pools["production"].version,
        "rollout_started_at": state.started_at,
        "pools": {
            name: [str(e) for e in pool.endpoints.get(region, ())]
            for name, pool in svc.pools.items()
        },
    }


def confirm_context(
    svc: Service, state: RolloutState, regions: Sequence[str], step_from: int
) -> dict[str, Any]:
    """What a `confirm_step` hook is asked about: the next weight of a wave's regions."""
    steps = svc.rollout.steps
    return {
        "phase": "confirm_step",
        "service": svc.name,
        "canary_version": state.canary_version,
        "production_version": svc.pools["production"].version,
        "regions": list(regions),
        "step": step_from,
        "canary_percent": steps[step_from] if step_from >= 0 else 0.0,
        "next_canary_percent": steps[step_from + 1],
    }


def run_confirm_hooks(hooks: Sequence[Webhook], context: Mapping[str, Any]) -> str:
    """Ask every `confirm_step` hook in order: "" when all answered 2xx, else the first
    refusal (its answer) as the reason the step holds."""
    for hook in hooks:
        problem = call(hook, context)
        if problem:
            return f"hook {hook.name!r}: {problem}"
    return ""


def run_webhooks(hooks: Sequence[Webhook], context: Mapping[str, Any]) -> str | None:
    """Call every hook in order; None when all passed, else why the first one failed."""
    for hook in hooks:
        problem = call(hook, context)
        if problem:
            return f"warm-up webhook {hook.name!r} failed: {problem}"
    return None


def call(hook: Webhook, context: Mapping[str, Any]) -> str | None:
    problem = ""
    for attempt in range(hook.retries + 1):
        if attempt:
            time.sleep(min(0.5 * 2 ** (attempt - 1), 5.0))
        try:
            r = requests.post(hook.url, json=dict(context), timeout=hook.timeout)
        except requests.Timeout:
            problem = f"no answer within {hook.timeout:g}s"
            continue
        except Exception as exc:  # refused, TLS, a bad URL: whatever it is, the hook failed
            problem = f"{type(exc).__name__}: {exc}"
            continue
        if 200 <= r.status_code < 300:
            return None
        problem = f"HTTP {r.status_code}: {r.text.strip()[:200]}"
    return f"{problem} (after {hook.retries + 1} attempts)"
