"""The operator's actions on rollouts (the admin API's, through `admin.operator`):
pause, resume, abort, promote, weights by hand, and the same four on a whole rollout
group (`act_on_group`). A mixin of `RolloutController`, kept apart so the loop and its
commit discipline read on their own; every action ends in the controller's `commit` or
`commit_all`, so it is committed, audited and pushed like any decision.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from xds_server.rollout import decide as sm
from xds_server.rollout.decide import Decision
from xds_server.rollout.groups import group_decisions
from xds_server.rollout.observe import Observer
from xds_server.rollout.state import RolloutState
from xds_server.spec import MeshSpec, Service
from xds_server.traffic import WeightError


class OperatorActions:
    """What an operator may do, on `RolloutController`'s state and commits."""

    rollouts: dict[str, RolloutState]
    observer: Observer
    clock: Callable[[], float]

    if TYPE_CHECKING:  # RolloutController's own

        @property
        def spec(self) -> MeshSpec: ...

        def commit(self, svc: Service, decision: Decision, actor: str = "controller") -> None: ...

        def commit_all(
            self, decisions: Sequence[tuple[Service, Decision]], actor: str = "controller"
        ) -> None: ...

    # Each raises KeyError for an unknown service or region, ValueError when the rollout's
    # phase does not allow it, WeightError for weights that cannot be applied. Pause,
    # resume and abort of a member of a rollout group act on the whole group.

    def pause(self, service: str, reason: str, actor: str) -> RolloutState:
        return self._operate(
            service, actor, lambda st, now: sm.pause(st, now, reason), ("pause", reason)
        )

    def resume(self, service: str, reason: str, actor: str) -> RolloutState:
        self.observer.forget_failed_webhooks(service)
        return self._operate(
            service, actor, lambda st, now: sm.resume(st, now, reason), ("resume", reason)
        )

    def abort(self, service: str, reason: str, actor: str) -> RolloutState:
        return self._operate(
            service, actor, lambda st, now: sm.abort(st, now, reason), ("abort", reason)
        )

    def promote(
        self, service: str, reason: str, actor: str, all_the_way: bool = False
    ) -> RolloutState:
        plan = self.spec.service(service).rollout
        group = self.spec.group_of(service)
        if all_the_way and group is not None:
            # One member at 100% while its partner may still roll back: never.
            raise ValueError(
                f"{service} is in rollout group {group.name}: promote the group a step at "
                "a time (promote --group), not one member all the way"
            )
        return self._operate(
            service,
            actor,
            lambda st, now: sm.promote(plan, st, now, reason, all_the_way),
            ("promote", reason),
        )

    def act_on_group(self, group: str, action: str, reason: str, actor: str) -> list[RolloutState]:
        """An operator's `action` (pause, resume, abort, promote) on every member of the
        rollout group `group` that has a rollout it applies to, as one decision: each
        member's state and audit committed, then one push. Returns those members' new
        states. KeyError: no such group; ValueError: an unknown action, no member has a
        rollout, or no member's phase allows it."""
        decisions = group_decisions(self.spec, group, action, reason, self.rollouts, self.clock())
        if action == "resume":
            for svc, _ in decisions:
                self.observer.forget_failed_webhooks(svc.name)
        self.commit_all(decisions, actor)
        return [self.rollouts[svc.name] for svc, _ in decisions]

    def set_weights(
        self,
        service: str,
        regions: tuple[str, ...],
        canary: float,
        baseline: float,
        reason: str,
        actor: str,
    ) -> RolloutState:
        svc = self.spec.service(service)
        if baseline and not svc.has_baseline:
            raise WeightError(f"service {service!r} has no baseline pool")
        return self._operate(
            service,
            actor,
            lambda st, now: sm.set_weights(st, regions, canary, baseline, now, reason),
        )

    def _operate(
        self,
        service: str,
        actor: str,
        act: Callable[[RolloutState, float], Decision],
        as_group: tuple[str, str] | None = None,
    ) -> RolloutState:
        """`act` on one rollout; `as_group` (action, reason): on a member of a rollout
        group, checked on this member, then done to the whole group (`act_on_group`)."""
        state = self.rollouts.get(service)
        if state is None:
            self.spec.service(service)  # KeyError: unknown service
            raise ValueError(f"service {service!r} has no rollout")
        decision = act(state, self.clock())  # (ValueError: its phase does not allow it)
        group = self.spec.group_of(service)
        if as_group is not None and group is not None:
            self.act_on_group(group.name, as_group[0], f"{as_group[1]} (via {service})", actor)
            return self.rollouts[service]
        self.commit(self.spec.service(service), decision, actor=actor)
        return decision.state
