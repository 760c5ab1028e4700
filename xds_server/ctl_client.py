"""`xdsctl`'s client of the admin API: the methods typed by their messages, `--server
A,B,C` tried in order, and a failed call told in one line.

It imports the admin API's generated code and `admin/wire.py`, nothing of the server.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

import grpc

from xds_server.admin.v1 import admin_pb2 as pb
from xds_server.admin.v1.admin_pb2_grpc import AdminStub
from xds_server.admin.wire import ACTOR_KEY, STATUS_MARK

Rq = TypeVar("Rq")
Rs = TypeVar("Rs")


class CtlError(Exception):
    """A failure to report as one line."""


class UsageError(CtlError):
    """A command-line mistake: one line, exit code 2."""


@dataclass(frozen=True)
class Rpc(Generic[Rq, Rs]):
    """One unary method of the admin API, typed by its request and response."""

    name: str
    method: Callable[[AdminStub], grpc.UnaryUnaryMultiCallable[Rq, Rs]]
    change: bool = False
    """It changes a rollout: only the server that decides takes it, and one that timed
    out may have happened (it is not sent again elsewhere)."""


LIST_NODES = Rpc("ListNodes", lambda s: s.ListNodes)
GET_NODE_CONFIG = Rpc("GetNodeConfig", lambda s: s.GetNodeConfig)
LIST_ROLLOUTS = Rpc("ListRollouts", lambda s: s.ListRollouts)
GET_ROLLOUT = Rpc("GetRollout", lambda s: s.GetRollout)
PAUSE_ROLLOUT = Rpc("PauseRollout", lambda s: s.PauseRollout, change=True)
RESUME_ROLLOUT = Rpc("ResumeRollout", lambda s: s.ResumeRollout, change=True)
ABORT_ROLLOUT = Rpc("AbortRollout", lambda s: s.AbortRollout, change=True)
PROMOTE_ROLLOUT = Rpc("PromoteRollout", lambda s: s.PromoteRollout, change=True)
SET_WEIGHTS = Rpc("SetWeights", lambda s: s.SetWeights, change=True)
GET_AUDIT = Rpc("GetAudit", lambda s: s.GetAudit)
GET_ISTIO_APPLY_STATUS = Rpc("GetIstioApplyStatus", lambda s: s.GetIstioApplyStatus)
LIST_REPLICAS = Rpc("ListReplicas", lambda s: s.ListReplicas)
LIST_INSTANCES = Rpc("ListInstances", lambda s: s.ListInstances)


def parse_servers(text: str) -> list[str]:
    """`--server A,B,C`: the admin APIs to try, in order (replicas of one mesh)."""
    targets = [t.strip() for t in text.split(",") if t.strip()]
    if not targets:
        raise UsageError(f"--server {text!r}: expected HOST:PORT[,HOST:PORT...]")
    return targets


class NoneAnswered(CtlError):
    """Every admin API of `--server A,B,...` failed: one line per address and why."""

    def __init__(self, method: str, failures: Sequence[tuple[str, grpc.RpcError]]) -> None:
        lines = [f"no admin API could answer {method} ({len(failures)} tried):"]
        lines += [f"  {target}: {short_rpc_error(exc)}" for target, exc in failures]
        super().__init__("\n".join(lines))


def moves_on(exc: grpc.RpcError, change: bool) -> bool:
    """Should the next address of `--server A,B,...` be tried? Yes when this one cannot be
    reached or says UNAVAILABLE (a replica that does not decide, a store it cannot
    write: nothing was changed); for a read, also when it does not answer in time (a
    change that timed out may have happened: it is not sent again elsewhere)."""
    code = exc.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return True
    return code == grpc.StatusCode.DEADLINE_EXCEEDED and not change and not answered(exc)


class Admin:
    """The admin API at `--server`: one address, or several replicas' tried in order
    (the first that answers is asked first for the rest of the command)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.targets = parse_servers(args.server)
        self.server = self.targets[0]
        """The address asked last: the one that answered, or that failed last."""
        self._credentials = (
            grpc.ssl_channel_credentials(Path(args.tls_ca).read_bytes()) if args.tls_ca else None
        )
        self._stubs: dict[str, AdminStub] = {}
        metadata = [(ACTOR_KEY, str(args.actor))]
        if args.token_file:
            token = Path(args.token_file).read_text().strip()
            if not token or "\n" in token:
                raise UsageError(f"--token-file {args.token_file}: expected one line, the token")
            metadata.append(("authorization", f"Bearer {token}"))
        self.metadata: tuple[tuple[str, str | bytes], ...] = tuple(metadata)
        self.timeout: float = args.timeout

    def stub(self, target: str) -> AdminStub:
        if target not in self._stubs:
            channel = (
                grpc.secure_channel(target, self._credentials)
                if self._credentials is not None
                else grpc.insecure_channel(target)
            )
            self._stubs[target] = AdminStub(channel)
        return self._stubs[target]

    def _order(self) -> list[str]:
        return [self.server, *(t for t in self.targets if t != self.server)]

    def call(self, rpc: Rpc[Rq, Rs], request: Rq) -> Rs:
        failures: list[tuple[str, grpc.RpcError]] = []
        for target in self._order():
            self.server = target
            try:
                return rpc.method(self.stub(target))(
                    request, metadata=self.metadata, timeout=self.timeout
                )
            except grpc.RpcError as exc:
                if len(self.targets) == 1 or not moves_on(exc, rpc.change):
                    raise
                failures.append((target, exc))
        raise NoneAnswered(rpc.name, failures)

    def watch(self, request: pb.WatchRolloutsRequest) -> Generator[pb.RolloutEvent, None, None]:
        """`WatchRollouts`, from the first address that does not refuse it before its
        first message (a replica that does not decide refuses a watch at once)."""
        failures: list[tuple[str, grpc.RpcError]] = []
        for target in self._order():
            self.server = target
            call = self.stub(target).WatchRollouts(request, metadata=self.metadata)
            received = False
            try:
                for item in call:
                    received = True
                    yield item
                return
            except grpc.RpcError as exc:
                if received or len(self.targets) == 1 or not moves_on(exc, change=False):
                    raise
                failures.append((target, exc))
            finally:
                call.cancel()
        raise NoneAnswered("WatchRollouts", failures)


def answered(exc: grpc.RpcError) -> bool:
    """Did the admin API itself send this status (rather than the transport fail)?"""
    try:
        trailing = exc.trailing_metadata() or ()
    except (AttributeError, ValueError):
        return False
    # grpc's stubs call each item a _Metadatum; at run time it is a (key, value) tuple.
    return any(key == STATUS_MARK for key, _ in cast(Iterable[tuple[str, Any]], trailing))


def _unreachable(details: str) -> str:
    """Why a server could not be reached, from grpc's details: a few words."""
    if "refused" in details.lower():
        return "connection refused"
    return details.split(";")[-1].strip() or "unavailable"


def short_rpc_error(exc: grpc.RpcError) -> str:
    """Why one address of several failed, in a few words."""
    code = exc.code()
    details = " ".join((exc.details() or "").split())
    if code == grpc.StatusCode.UNAVAILABLE and not answered(exc):
        return f"cannot reach it: {_unreachable(details)}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and not answered(exc):
        return "did not answer in time"
    return f"{code.name}: {details}"


def describe_rpc_error(exc: grpc.RpcError, target: str, what: str) -> str:
    """A failed call as xdsctl's one line: cannot reach WHAT at TARGET, or the status."""
    code = exc.code()
    details = exc.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE and not answered(exc):
        return f"cannot reach {what} at {target}: {_unreachable(details)}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"{what} at {target} did not answer in time"
    return f"{code.name}: {details}"
