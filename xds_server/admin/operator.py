"""What an operator may do to a rollout, whichever door they come in by: `xdsctl`
(the admin gRPC API) or the dashboard (its HTTP API).

Both doors go through `Operator`: who is asking (the token's name), whether the request
makes sense (a known service or rollout group, a reason, weights in range), and then the
controller's own method, so every change lands in the audit log the same way. A rollout
group (`rollout_groups:`) is paused, resumed, aborted or promoted as one: every member by
one controller call (`RolloutController.act_on_group`), one push. A refusal is a `Refused`
with a `Refusal` code that each door turns into its own status (gRPC, HTTP).

Least privilege (issue 30): a change is done by a `Caller` (the token's name and its
`Scope`), and needs its verb on every service it touches: a group's action every
member, and so does a member's pause, resume, abort or promote (they act on the group). A
refusal is PERMISSION_DENIED naming the part of the scope that is missing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

from xds_server.admin.auth import FULL, Credentials, Scope, Verb
from xds_server.admin.views import leader_hint
from xds_server.admin.wire import ACTOR_KEY
from xds_server.ha.replicas import Directory
from xds_server.rollout.controller import NotLeader, RolloutController, StoreUnavailable
from xds_server.rollout.state import RolloutState
from xds_server.spec import MeshSpec
from xds_server.traffic import WeightError

MAX_REASON = 1000
MAX_ACTOR = 200
T = TypeVar("T")


class Refusal(StrEnum):
    """Why a request was refused; the names are gRPC's status codes."""

    NOT_FOUND = "NOT_FOUND"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    UNAVAILABLE = "UNAVAILABLE"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"


class Refused(Exception):
    def __init__(self, code: Refusal, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


NOT_DECIDING = (
    "this server does not run the rollout controller (another process holds the state "
    "directory's lock)"
)
"""One process (no store) that does not decide; a replica names the leader instead."""
REPLICA_NOT_DECIDING = "this replica does not decide rollouts"

Act = Callable[[RolloutController, str], RolloutState]
"""A controller call, given the actor."""
GroupAct = Callable[[RolloutController, str], list[RolloutState]]
"""A controller call on a rollout group, given the actor: every member's state after it."""
NAMED_CHANGES = ("pause", "resume", "abort", "promote")
GROUP_WIDE = ("pause", "resume", "abort", "promote")
"""The named changes that, on a member of a rollout group, act on the whole group (a
member promoted alone would stay on its canary when its partner rolls back)."""


@dataclass(frozen=True)
class Caller:
    """Who asks for a change: the actor the audit log records, the token's name (None:
    no tokens configured) and what that token may do."""

    actor: str
    name: str | None = None
    scope: Scope = FULL


def permit(caller: Caller, verb: Verb, services: Sequence[str], what: str) -> None:
    """Refuse (PERMISSION_DENIED) unless the caller's scope allows `verb` on every one
    of `services`; `what` names the target in the message ("recommender", "rollout
    group G"). The message names the scope part that is missing."""
    lacks = caller.scope.lacks(verb, services)
    if lacks:
        raise Refused(
            Refusal.PERMISSION_DENIED,
            f"the token {caller.name or '?'} may not {verb} {what}: its scope lacks {lacks} "
            f"(it has {caller.scope.describe()})",
        )


def named_change(name: str, service: str, reason: str, promote_all: bool = False) -> Act:
    """The controller call of a named change (pause, resume, abort, promote): the one
    table behind xdsctl's RPCs and the dashboard's buttons. `promote_all`: straight to
    100%."""
    calls: dict[str, Act] = {
        "pause": lambda c, who: c.pause(service, reason, who),
        "resume": lambda c, who: c.resume(service, reason, who),
        "abort": lambda c, who: c.abort(service, reason, who),
        "promote": lambda c, who: c.promote(service, reason, who, promote_all),
    }
    if name not in calls:
        raise Refused(Refusal.NOT_FOUND, f"no action {name!r} (one of: {', '.join(calls)})")
    return calls[name]


def group_change(name: str, group: str, reason: str) -> GroupAct:
    """The controller call of a named change of a whole rollout group: the same four
    actions as a service's, each acting on every member at once."""
    if name not in NAMED_CHANGES:
        raise Refused(Refusal.NOT_FOUND, f"no action {name!r} (one of: {', '.join(NAMED_CHANGES)})")
    return lambda c, who: c.act_on_group(group, name, reason, who)


def check_target(service: str, group: str) -> None:
    """A named change names exactly one of a service and a rollout group."""
    if service and group:
        raise Refused(
            Refusal.INVALID_ARGUMENT,
            f"name a service or a rollout group, not both (service {service[:100]!r}, "
            f"group {group[:100]!r})",
        )
    if not service and not group:
        raise Refused(Refusal.INVALID_ARGUMENT, "name the service (or the rollout group) to act on")


def check_weights(canary: float, baseline: float) -> None:
    """Weights set by hand: each a percentage, together at most 100."""
    if not (0 <= canary <= 100 and 0 <= baseline <= 100 and canary + baseline <= 100):
        raise Refused(
            Refusal.INVALID_ARGUMENT,
            f"bad weights: canary {canary:g}% and baseline {baseline:g}% "
            "must each be 0-100 and together at most 100",
        )


class Operator:
    """Operator actions on rollouts, checked the same way for every door."""

    def __init__(
        self,
        credentials: Credentials,
        spec: Callable[[], MeshSpec],
        controller: Callable[[], RolloutController | None],
        directory: Callable[[], Directory | None] = lambda: None,
    ) -> None:
        self.auth = credentials
        self._spec = spec
        self._controller = controller
        self._directory = directory
        """Replicas on etcd: who leads, for the refusals that send a caller there."""

    def actor(self, headers: Mapping[str, Any], door: str = "") -> str:
        """Check the credential of a change; return the actor for the audit log: the
        token's name, with the actor the caller claims beside it when it differs
        ("alice (claims: bob)"); without tokens configured, the claim marked as such
        ("bob (unauthenticated)"). `door`: how a caller of this door sends a token."""
        name = self.auth.identify(headers)
        if self.auth.configured and name is None:
            raise unauthenticated("changes", headers, door or XDSCTL_TOKEN)
        claim = str(headers.get(ACTOR_KEY, "")).strip()
        if len(claim) > MAX_ACTOR:
            raise Refused(
                Refusal.INVALID_ARGUMENT, f"actor is {len(claim)} characters; at most {MAX_ACTOR}"
            )
        if name is None:
            return f"{claim or 'unknown'} (unauthenticated)"
        return name if claim in ("", name) else f"{name} (claims: {claim})"

    def caller(self, headers: Mapping[str, Any], door: str = "") -> Caller:
        """`actor` (the credential checked), with the token's name and scope."""
        actor = self.actor(headers, door)
        name = self.auth.identify(headers)
        return Caller(actor, name, self.auth.scope(name))

    def members(self, service: str, name: str) -> tuple[list[str], str]:
        """The services a named change of `service` touches, and how to name them: the
        whole group for a member's pause, resume, abort or promote."""
        group = self._spec().group_of(service) if name in GROUP_WIDE else None
        if group is None:
            return [service], service
        return list(group.services), f"{service} (its rollout group {group.name}: every member)"

    def check_service(self, service: str) -> None:
        spec = self._spec()
        try:
            spec.service(service)
        except KeyError:
            names = ", ".join(s.name for s in spec.services)
            raise Refused(
                Refusal.NOT_FOUND, f"unknown service {service!r} (services: {names})"
            ) from None

    def check_group(self, group: str) -> None:
        spec = self._spec()
        try:
            spec.group(group)
        except KeyError:
            names = ", ".join(g.name for g in spec.rollout_groups)
            known = f"groups: {names}" if names else "the spec has no rollout_groups"
            raise Refused(
                Refusal.NOT_FOUND, f"unknown rollout group {group[:100]!r} ({known})"
            ) from None

    def not_deciding(self) -> str:
        """Why this server refuses changes, and where to go instead (a replica's leader)."""
        directory = self._directory()
        if directory is None:
            return NOT_DECIDING
        return f"{REPLICA_NOT_DECIDING}; {leader_hint(directory)}"

    def controller(self) -> RolloutController:
        controller = self._controller()
        if controller is None:
            raise Refused(Refusal.UNAVAILABLE, self.not_deciding())
        return controller

    def act(self, actor: str, reason: str, act: Callable[[RolloutController, str], T]) -> T:
        """`actor`: from `actor()`, which each change calls before looking at its request
        (an unauthenticated caller learns nothing from validation errors)."""
        if not reason.strip():
            raise Refused(
                Refusal.INVALID_ARGUMENT,
                "a reason is required for every change (it goes in the audit log)",
            )
        if len(reason) > MAX_REASON:
            raise Refused(
                Refusal.INVALID_ARGUMENT,
                f"reason is {len(reason)} characters; at most {MAX_REASON}",
            )
        controller = self.controller()
        try:
            return act(controller, actor)
        except KeyError as exc:
            raise Refused(Refusal.NOT_FOUND, _message(exc)) from None
        except WeightError as exc:
            raise Refused(Refusal.INVALID_ARGUMENT, _message(exc)) from None
        except ValueError as exc:
            raise Refused(Refusal.FAILED_PRECONDITION, _message(exc)) from None
        except StoreUnavailable as exc:
            raise Refused(Refusal.UNAVAILABLE, _message(exc)) from None
        except NotLeader as exc:
            raise Refused(Refusal.UNAVAILABLE, self._no_longer_leads(exc)) from None

    def _no_longer_leads(self, exc: NotLeader) -> str:
        """The store fenced this replica's write: another replica won the leader key."""
        directory = self._directory()
        where = leader_hint(directory) if directory is not None else "try again"
        return f"this replica no longer leads ({_message(exc)}): nothing was changed; {where}"

    def submit(
        self,
        headers: Mapping[str, Any],
        service: str,
        reason: str,
        act: Act,
        check: Callable[[], None] = lambda: None,
        verb: Verb = Verb.SET_WEIGHTS,
    ) -> RolloutState:
        """A change from a caller's headers, in the order every change is checked: the
        credential first (an unauthenticated caller learns nothing from validation
        errors), then a known service, then the caller's scope (`verb` on it), then the
        request's own `check`, then the reason and the controller call (`act`). The one
        change submitted this way is set-weights; the named ones go through `named`."""
        caller = self.caller(headers)
        self.check_service(service)
        permit(caller, verb, [service], service)
        check()
        return self.act(caller.actor, reason, act)

    def change(
        self, name: str, service: str, reason: str, caller: Caller, promote_all: bool = False
    ) -> RolloutState:
        """One of the named changes the dashboard offers (pause, resume, abort, promote),
        by the same controller path as xdsctl's, if the caller's scope allows it."""
        act = named_change(name, service, reason, promote_all)
        self.check_service(service)
        permit(caller, Verb(name), *self.members(service, name))
        return self.act(caller.actor, reason, act)

    def named(
        self,
        caller: Caller,
        name: str,
        reason: str,
        *,
        service: str = "",
        group: str = "",
        promote_all: bool = False,
    ) -> list[RolloutState]:
        """A named change (pause, resume, abort, promote) of one service, or of every
        member of a rollout group: exactly one of `service` and `group`. The states the
        change left: the service's, or each member's. `caller`: from `caller()`; a
        group's change needs its scope on every member."""
        check_target(service, group)
        if not group:
            return [self.change(name, service, reason, caller, promote_all)]
        if promote_all:
            raise Refused(
                Refusal.INVALID_ARGUMENT,
                "promote all the way acts on one service; a group is promoted a step at a time",
            )
        act = group_change(name, group, reason)
        self.check_group(group)
        members = list(self._spec().group(group).services)
        permit(caller, Verb(name), members, f"rollout group {group} (every member)")
        return self.act(caller.actor, reason, act)


XDSCTL_TOKEN = "pass --token-file to xdsctl"


async def pushes_first() -> None:
    """Turn the event loop once after a change, before its answer is built (both doors:
    `xdsctl`'s RPCs and the dashboard's buttons), so that the streams the change woke
    (its push, an abort's rollback) write first. A rollout's answer counts every node of
    every replica (`signal_health`), tens of ms at thousands of nodes, and the leader's
    own streams waited for it (py-spy at 3 replicas x 3,000 streams: in one push, 40 of
    the leader's 115 busy samples)."""
    await asyncio.sleep(0)  # (one turn of the loop: see above)


def unauthenticated(what: str, headers: Mapping[str, Any], door: str = XDSCTL_TOKEN) -> Refused:
    if headers.get("authorization"):
        message = "the bearer token matches none of this server's (--admin-token-file)"
    else:
        message = f"this admin API needs a bearer token for {what}: {door}"
    return Refused(Refusal.UNAUTHENTICATED, message)


def _message(exc: Exception) -> str:
    return str(exc.args[0] if exc.args else exc)
