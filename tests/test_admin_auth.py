"""Admin API hygiene (issue 19, finding 7): who a change is recorded as, what a request
may carry, who may read, and what garbage does to the server's log.

The tests run the real `xds-server serve` and the real `xdsctl` as subprocesses; raw
gRPC calls (garbage, requests xdsctl cannot send) go over a real channel. The last one
plants a bug in the real admin API, served in-process, to see what a handler's
exception turns into.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.status.v3 import csds_pb2

from tests.support import wait_for
from xds_server.admin.service import AdminService, run_admin_server
from xds_server.admin.v1 import admin_pb2, admin_pb2_grpc
from xds_server.app import Running
from xds_server.lab.procs import Process, free_port

from .conftest import ServerThread, make_spec_doc, write_spec

CLI = [sys.executable, "-m", "xds_server.cli"]
CTL = [sys.executable, "-m", "xds_server.ctl"]
SERVICE = "recommender"
REGIONS = ("us-east", "eu-west")
TOKENS = {"alice": "alice-t0ken-0123456789", "bob": "bob-t0ken-9876543210"}
FOLLOWING = "serving the committed state, not deciding"
METHODS = [
    (f"/{service.full_name}/{m.name}", m)
    for service in (
        admin_pb2.DESCRIPTOR.services_by_name["Admin"],
        csds_pb2.DESCRIPTOR.services_by_name["ClientStatusDiscoveryService"],
    )
    for m in service.methods
]
"""Every method on the admin port: (path, descriptor)."""
GARBAGE = (b"\xff\xff\xff\xff\xff", b"\x0a\x05ab", b"\x00")
"""Bytes no request message decodes from: an unterminated tag, a truncated string, field 0."""


@dataclass
class Server:
    process: Process
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.process.log_path.read_text(errors="replace")


@dataclass
class Servers:
    workdir: Path
    spec_path: Path
    started: list[Server] = field(default_factory=list)

    def token_file(self, name: str, text: str) -> Path:
        path = self.workdir / name
        path.write_text(text)
        return path

    def start(self, *extra: str, name: str = "server", state_dir: Path | None = None) -> Server:
        port = free_port()
        argv = [*CLI, "serve", "--spec", str(self.spec_path),
                "--xds-address", f"127.0.0.1:{free_port()}",
                "--admin-address", f"127.0.0.1:{port}",
                "--metrics-address", "127.0.0.1:0", "--ui-address", "",
                "--state-dir", str(state_dir or self.workdir / f"{name}-state"),
                # Nothing listens there: only the operator moves the rollout.
                "--prometheus-url", f"http://127.0.0.1:{free_port()}",
                *extra]  # fmt: skip
        server = Server(Process(name, argv, self.workdir / f"{name}.log"), port)
        self.started.append(server)
        metadata = [("authorization", f"Bearer {TOKENS['alice']}")]

        def answers() -> bool:
            if not server.process.alive():
                raise AssertionError(f"{name} exited:\n{server.process.tail()}")
            with grpc.insecure_channel(server.address) as ch:
                stub = admin_pb2_grpc.AdminStub(ch)
                stub.ListRollouts(admin_pb2.ListRolloutsRequest(), timeout=1, metadata=metadata)
            return True

        wait_for(answers, f"{name}'s admin API to answer", timeout=20)
        return server

    def stop(self) -> None:
        for s in reversed(self.started):
            s.process.stop()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    ports = {(r, p): free_port() for r in REGIONS for p in ("production", "baseline", "canary")}
    doc = make_spec_doc(ports, pools=("production", "baseline", "canary"), regions=REGIONS)
    doc["rollout"] = {"step_duration": "10m", "max_hold": "10m"}  # only the operator moves it
    spec_path = tmp_path / "mesh.yaml"
    write_spec(spec_path, doc)
    s = Servers(tmp_path, spec_path)
    try:
        yield s
    finally:
        s.stop()


def xdsctl(
    server: Server | str, *args: str, token: Path | None = None, actor: str = "test-operator"
) -> subprocess.CompletedProcess[str]:
    address = server if isinstance(server, str) else server.address
    argv = [*CTL, "--server", address, "--timeout", "5", "--actor", actor]
    if token is not None:
        argv += ["--token-file", str(token)]
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=30)


def ctl_json(server: Server, *args: str, token: Path | None = None, actor: str = "x") -> Any:
    res = xdsctl(server, "--output", "json", *args, token=token, actor=actor)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def one_line_error(res: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


def operator_actors(server: Server, token: Path | None = None) -> list[tuple[str, str]]:
    """(actor, reason) of each audit entry a person made (not the controller)."""
    entries = ctl_json(server, "audit", "--service", SERVICE, token=token)
    return [(e["actor"], e["reason"]) for e in entries if e["actor"] != "controller"]


def wait_for_rollout(server: Server, token: Path | None = None) -> None:
    wait_for(
        lambda: ctl_json(server, "rollout", "list", token=token), "the rollout to start", timeout=20
    )


# ---- 1. the actor is bound to the credential ----


def test_the_audit_log_records_whose_token_made_a_change(servers: Servers) -> None:
    tokens = servers.token_file("tokens", "".join(f"{n}:{t}\n" for n, t in TOKENS.items()))
    alice = servers.token_file("alice.token", TOKENS["alice"] + "\n")
    bob = servers.token_file("bob.token", TOKENS["bob"] + "\n")
    wrong = servers.token_file("wrong.token", "not-a-token-of-this-server\n")
    server = servers.start("--admin-token-file", str(tokens))
    wait_for_rollout(server)  # reads stay open without --admin-auth-reads

    # Bob claims to be mallory: the log says bob, with the claim beside it.
    res = xdsctl(
        server, "rollout", "pause", SERVICE, "--reason", "look", token=bob, actor="mallory"
    )
    assert res.returncode == 0, res.stderr
    res = xdsctl(server, "rollout", "resume", SERVICE, "--reason", "ok", token=alice, actor="alice")
    assert res.returncode == 0, res.stderr
    # No token, or one the server does not know: refused, and nothing recorded.
    for token in (None, wrong):
        res = xdsctl(server, "rollout", "abort", SERVICE, "--reason", "x", token=token)
        assert one_line_error(res).startswith("xdsctl: UNAUTHENTICATED: "), res.stderr
    assert operator_actors(server) == [
        ("bob (claims: mallory)", "paused: look"),
        ("alice", "resumed: ok"),
    ]
    assert ctl_json(server, "rollout", "get", SERVICE)["phase"] == "progressing"


def test_without_a_token_file_the_claimed_actor_is_marked_unauthenticated(
    servers: Servers,
) -> None:
    server = servers.start()
    wait_for_rollout(server)
    res = xdsctl(server, "rollout", "pause", SERVICE, "--reason", "look", actor="bob")
    assert res.returncode == 0, res.stderr
    assert operator_actors(server) == [("bob (unauthenticated)", "paused: look")]


def test_a_bare_token_is_named_admin(servers: Servers) -> None:
    bare = servers.token_file("token", TOKENS["alice"] + "\n")
    server = servers.start("--admin-token-file", str(bare))
    wait_for_rollout(server)
    res = xdsctl(server, "rollout", "pause", SERVICE, "--reason", "r", token=bare, actor="carol")
    assert res.returncode == 0, res.stderr
    assert operator_actors(server) == [("admin (claims: carol)", "paused: r")]


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("", None, "the token file is empty"),
        ("alice:a-token\n\nbob:b-token\n", 2, "empty line"),
        ("alice:\n", 1, "the token is empty"),
        (":a-token\n", 1, "the name before ':'"),
        ("alice:a-token\nalice:b-token\n", 2, "the name 'alice' is already on an earlier line"),
        ("alice:a-token\nbob:a-token\n", 2, "the same token as line 1"),
        ("alice:a-token\nb-token\n", 2, "expected NAME:TOKEN"),
        ("alice:a token\n", 1, "printable ASCII without spaces"),
    ],
)
def test_a_bad_token_file_stops_serve_with_one_line(
    servers: Servers, text: str, line: int | None, message: str
) -> None:
    path = servers.token_file("tokens", text)
    res = subprocess.run(
        [*CLI, "serve", "--spec", str(servers.spec_path), "--admin-token-file", str(path),
         "--xds-address", f"127.0.0.1:{free_port()}", "--admin-address",
         f"127.0.0.1:{free_port()}", "--state-dir", str(servers.workdir / "state")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    err = one_line_error(res, code=2)
    where = f"--admin-token-file {path}" + (f" line {line}" if line else "")
    assert err.startswith(f"xds-server: {where}: "), err
    assert message in err, err
    for secret in ("a-token", "b-token", "a token"):
        assert secret not in err  # a token is never echoed


def test_admin_auth_reads_needs_a_token_file(servers: Servers) -> None:
    res = subprocess.run(
        [*CLI, "serve", "--spec", str(servers.spec_path), "--admin-auth-reads"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert one_line_error(res, code=2) == "xds-server: --admin-auth-reads needs --admin-token-file"


# ---- 2. the reason (and the claimed actor) are capped ----


def test_a_reason_longer_than_1000_characters_is_refused(servers: Servers) -> None:
    server = servers.start()
    wait_for_rollout(server)
    huge = "x" * 100_000  # argv takes at most 128 KiB per argument; 1 MB needs raw gRPC
    res = xdsctl(server, "rollout", "pause", SERVICE, "--reason", huge)
    assert one_line_error(res) == (
        "xdsctl: INVALID_ARGUMENT: reason is 100000 characters; at most 1000"
    )
    with grpc.insecure_channel(server.address) as ch, pytest.raises(grpc.RpcError) as err:
        admin_pb2_grpc.AdminStub(ch).PauseRollout(
            admin_pb2.RolloutActionRequest(service=SERVICE, reason="y" * 1_000_000), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "reason is 1000000 characters; at most 1000"
    res = xdsctl(server, "rollout", "pause", SERVICE, "--reason", "z", actor="a" * 201)
    assert one_line_error(res) == "xdsctl: INVALID_ARGUMENT: actor is 201 characters; at most 200"
    assert operator_actors(server) == []
    # At the limit it is fine, and `rollout get` returns it.
    at_limit = "r" * 1000
    res = xdsctl(server, "rollout", "pause", SERVICE, "--reason", at_limit)
    assert res.returncode == 0, res.stderr
    assert ctl_json(server, "rollout", "get", SERVICE)["reason"] == at_limit


# ---- 3. reads can require a credential ----


def test_admin_auth_reads_refuses_every_method_without_a_token(servers: Servers) -> None:
    tokens = servers.token_file("tokens", "".join(f"{n}:{t}\n" for n, t in TOKENS.items()))
    alice = servers.token_file("alice.token", TOKENS["alice"] + "\n")
    wrong = servers.token_file("wrong.token", "not-a-token-of-this-server\n")
    server = servers.start("--admin-token-file", str(tokens), "--admin-auth-reads")
    for argv in (("status",), ("nodes",), ("rollout", "list"), ("rollout", "get", SERVICE),
                 ("audit",), ("config", "us-east-1"), ("rollout", "watch")):  # fmt: skip
        err = one_line_error(xdsctl(server, *argv))
        assert err == (
            "xdsctl: UNAUTHENTICATED: this admin API needs a bearer token for reads as well "
            "as changes: pass --token-file to xdsctl"
        ), (argv, err)
        err = one_line_error(xdsctl(server, *argv, token=wrong))
        assert err.startswith("xdsctl: UNAUTHENTICATED: "), (argv, err)
    # Every method on the port, CSDS included, with a well-formed request.
    callers = [
        ((), True),
        ((("authorization", "Bearer x"),), True),
        ((("authorization", f"Bearer {TOKENS['bob']}"),), False),
    ]
    with grpc.insecure_channel(server.address) as ch:
        for path, method in METHODS:
            for metadata, refused in callers:
                code = raw_call(ch, path, method, b"", metadata)
                assert (code == grpc.StatusCode.UNAUTHENTICATED) == refused, (path, metadata, code)
    # With a token, reads work as before.
    wait_for_rollout(server, token=alice)
    assert "reachable" in xdsctl(server, "status", token=alice).stdout
    assert ctl_json(server, "audit", token=alice)


def raw_call(
    channel: grpc.Channel,
    path: str,
    method: Any,
    body: bytes,
    metadata: Any = (),
    watch_for: float = 1.0,
) -> grpc.StatusCode:
    """Call `path` with raw bytes (no serializer): the status it ends with. A watch that
    has nothing to report within `watch_for` seconds counts as OK."""
    try:
        if method.client_streaming:
            call = channel.stream_stream(path)(iter([body]), timeout=5, metadata=metadata)
            next(call)
            call.cancel()
        elif method.server_streaming:
            call = channel.unary_stream(path)(body, timeout=watch_for, metadata=metadata)
            next(call)
            call.cancel()
        else:
            channel.unary_unary(path)(body, timeout=5, metadata=metadata)
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        # A watch with nothing to report runs until its deadline: it was admitted.
        return grpc.StatusCode.OK if code == grpc.StatusCode.DEADLINE_EXCEEDED else code
    return grpc.StatusCode.OK


# ---- 4. the audit limit ----


def test_audit_limit_is_checked_by_xdsctl_and_by_the_server(servers: Servers) -> None:
    server = servers.start()
    wait_for_rollout(server)
    for limit, message in (
        ("-1", "--limit -1: expected 1 to 2147483647 entries"),
        ("0", "--limit 0: expected 1 to 2147483647 entries"),
        ("99999999999", "--limit 99999999999: expected 1 to 2147483647 entries"),
        ("ten", "--limit 'ten': expected a number of entries"),
    ):
        assert one_line_error(xdsctl(server, "audit", "--limit", limit), code=2) == (
            f"xdsctl: {message}"
        )
    assert len(ctl_json(server, "audit", "--limit", "2")) == 2
    # Another client can send what xdsctl refuses: the server says INVALID_ARGUMENT.
    with grpc.insecure_channel(server.address) as ch:
        stub = admin_pb2_grpc.AdminStub(ch)
        for request, details in (
            (admin_pb2.GetAuditRequest(limit=-1), "limit is -1; expected 0 (every entry) or more"),
            (admin_pb2.GetAuditRequest(since=float("nan")), "since is nan; expected seconds"),
            (admin_pb2.GetAuditRequest(since=-5), "since is -5.0; expected seconds"),
        ):
            with pytest.raises(grpc.RpcError) as err:
                stub.GetAudit(request, timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details().startswith(details), err.value.details()


# ---- 5. garbage requests ----


def test_garbage_requests_get_invalid_argument_and_one_log_line_each(servers: Servers) -> None:
    tokens = servers.token_file("tokens", "".join(f"{n}:{t}\n" for n, t in TOKENS.items()))
    server = servers.start("--admin-token-file", str(tokens))
    with grpc.insecure_channel(server.address) as ch:
        for path, method in METHODS:
            for body in GARBAGE:
                code = raw_call(ch, path, method, body)
                assert code == grpc.StatusCode.INVALID_ARGUMENT, (path, body, code)
        # And random bytes, as a fuzzer sends (some of them decode: any status will do).
        rng = random.Random(7)
        for _ in range(300):
            path, method = rng.choice(METHODS)
            raw_call(ch, path, method, rng.randbytes(rng.randrange(1, 64)), watch_for=0.2)
    undecodable = len(METHODS) * len(GARBAGE)

    def logged() -> list[str] | None:
        lines = [line for line in server.log().splitlines() if "undecodable request" in line]
        return lines if len(lines) >= undecodable else None

    lines = wait_for(logged, f"{undecodable} log lines about undecodable requests", timeout=10)
    assert all(" WARNING xds_server.admin: admin API /" in line for line in lines), lines[0]
    log = server.log()
    assert "Traceback" not in log, log[log.index("Traceback") - 300 :][:3000]
    assert " ERROR " not in log, [line for line in log.splitlines() if " ERROR " in line][:5]
    assert "reachable" in xdsctl(server, "status").stdout


# ---- 6. a follower's refusal is not "cannot reach" ----


def test_a_follower_refusing_a_change_says_so(servers: Servers) -> None:
    state = servers.workdir / "shared-state"
    leader = servers.start(name="leader", state_dir=state)
    wait_for_rollout(leader)
    follower = servers.start(name="follower", state_dir=state)
    assert FOLLOWING in follower.log()
    res = xdsctl(follower, "rollout", "pause", SERVICE, "--reason", "test")
    assert one_line_error(res) == (
        "xdsctl: UNAVAILABLE: this server does not run the rollout controller "
        "(another process holds the state directory's lock)"
    )
    assert ctl_json(leader, "rollout", "get", SERVICE)["phase"] == "progressing"
    # A port nothing listens on is still "cannot reach".
    port = free_port()
    assert one_line_error(xdsctl(f"127.0.0.1:{port}", "status")) == (
        f"xdsctl: cannot reach admin API at 127.0.0.1:{port}: connection refused"
    )


# ---- a handler's bug: INTERNAL and one log line ----


class _BrokenAdmin(AdminService):
    """The real admin API with a bug planted in one method."""

    async def ListRollouts(self, request: Any, context: Any) -> Any:
        raise RuntimeError("a planted bug,\non two lines")


def test_a_handler_bug_is_internal_and_one_log_line(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    admin = _BrokenAdmin(Running(server.server))
    asyncio.run_coroutine_threadsafe(run_admin_server(admin, f"127.0.0.1:{port}"), server.loop)

    def failed() -> str | None:
        res = xdsctl(f"127.0.0.1:{port}", "rollout", "list")
        return res.stderr.strip() if "cannot reach" not in res.stderr else None

    assert wait_for(failed, "the admin API to answer", timeout=15) == (
        "xdsctl: INTERNAL: /xds_server.admin.v1.Admin/ListRollouts failed: RuntimeError "
        "(the server's log has the details)"
    )
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        "admin API /xds_server.admin.v1.Admin/ListRollouts failed: RuntimeError: "
        "a planted bug, on two lines (test_admin_auth.py:"
        f"{_BrokenAdmin.ListRollouts.__code__.co_firstlineno + 1})"
    ]
    assert errors[0].exc_info is None
