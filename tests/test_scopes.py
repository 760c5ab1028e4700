"""Least privilege for operators (issue 30): token scopes (`NAME:TOKEN:verbs=...;
services=...`) at every door, verb by verb, and `serve` secure by default off loopback.

One real `xds-server serve` for the module (no Prometheus behind it: only operators move
the rollouts), with the rollout group `ranking` (features + recommender) and `search`
(test_group_operator's spec) and reads guarded (`--admin-auth-reads`). Raw gRPC calls
carry each token; `xdsctl` is the real command; the dashboard runs in the real headless
Chromium of tests/test_dashboard.py.
"""

from __future__ import annotations

import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from playwright.sync_api import Browser, expect

from tests.support import wait_for
from tests.test_admin_auth import CLI, Server, one_line_error, xdsctl
from tests.test_dashboard import browser, new_page, request
from tests.test_group_operator import spec_doc
from xds_server.admin.auth import FULL, Scope, TokenFileError, Verb, parse_grants, parse_tokens
from xds_server.admin.v1 import admin_pb2 as pb
from xds_server.admin.v1 import admin_pb2_grpc
from xds_server.lab.procs import Process, free_port

from .conftest import write_spec

__all__ = ["browser"]  # the dashboard tests' Chromium, a fixture of this module too

ROOT = Path(__file__).resolve().parents[1]
TOKENS = {
    "admin": ("admin-t0ken-0001", ""),
    "pauser": ("pauser-t0ken-0002", "verbs=read,pause,resume;services=features,recommender"),
    "ranker": ("ranker-t0ken-0003", "verbs=read,promote,set-weights,pause;services=recomm*"),
    "reader": ("reader-t0ken-0004", "verbs=read"),
    "blind": ("blind-t0ken-0005", "verbs=pause;services=search"),
}
"""name -> (token, scope): admin has full power (a line without a scope)."""


def token_file_text() -> str:
    return "".join(f"{n}:{t}{':' + s if s else ''}\n" for n, (t, s) in TOKENS.items())


class Mesh:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        spec = workdir / "mesh.yaml"
        write_spec(spec, spec_doc())
        tokens = workdir / "tokens"
        tokens.write_text(token_file_text())
        self.ui = f"http://127.0.0.1:{free_port()}/"
        port = free_port()
        argv = [*CLI, "serve", "--spec", str(spec),
                "--xds-address", f"127.0.0.1:{free_port()}",
                "--admin-address", f"127.0.0.1:{port}",
                "--admin-token-file", str(tokens), "--admin-auth-reads",
                "--metrics-address", "127.0.0.1:0",
                "--ui-address", self.ui.removeprefix("http://").rstrip("/"),
                "--state-dir", str(workdir / "state"),
                "--prometheus-url", f"http://127.0.0.1:{free_port()}"]  # fmt: skip
        self.server = Server(Process("xds-server", argv, workdir / "serve.log"), port)

    def token_path(self, name: str) -> Path:
        path = self.workdir / f"{name}.token"
        path.write_text(TOKENS[name][0] + "\n")
        return path

    def call(self, who: str | None, method: str, request: Any) -> tuple[str, str]:
        """A raw admin call with `who`'s token: ("OK", "") or (status name, details)."""
        metadata = [("authorization", f"Bearer {TOKENS[who][0]}")] if who else []
        with grpc.insecure_channel(self.server.address) as ch:
            try:
                getattr(admin_pb2_grpc.AdminStub(ch), method)(
                    request, metadata=metadata, timeout=10
                )
            except grpc.RpcError as err:
                return err.code().name, err.details() or ""
        return "OK", ""

    def phases(self) -> dict[str, str]:
        reply = self.call_reply("ListRollouts", pb.ListRolloutsRequest())
        return {r.service: r.phase for r in reply.rollouts if r.phase}

    def call_reply(self, method: str, request: Any) -> Any:
        metadata = [("authorization", f"Bearer {TOKENS['admin'][0]}")]
        with grpc.insecure_channel(self.server.address) as ch:
            return getattr(admin_pb2_grpc.AdminStub(ch), method)(
                request, metadata=metadata, timeout=10
            )


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    m = Mesh(tmp_path_factory.mktemp("scopes"))
    try:
        wait_for(
            lambda: m.server.process.alive() and {"features", "recommender"} <= m.phases().keys(),
            "the group's rollouts to start",
            timeout=30,
        )
        yield m
    finally:
        m.server.process.stop()


def action(service: str = "", group: str = "") -> pb.RolloutActionRequest:
    return pb.RolloutActionRequest(service=service, group=group, reason="scoped test")


# ---- the token file ----


def test_lines_without_a_scope_keep_full_power_and_scopes_parse() -> None:
    old = "alice:a-t0ken:with:colons\nbob:b-t0ken\n"
    assert parse_tokens(old, "f") == {"alice": "a-t0ken:with:colons", "bob": "b-t0ken"}
    assert {g.scope for g in parse_grants(old, "f").values()} == {FULL}
    grants = parse_grants(token_file_text(), "f")
    assert grants["admin"].scope == FULL
    pauser = grants["pauser"].scope
    assert pauser.may(Verb.PAUSE) and not pauser.may(Verb.ABORT)
    assert pauser.covers("features") and not pauser.covers("search")
    ranker = grants["ranker"].scope
    assert ranker.covers("recommender") and not ranker.covers("features")
    assert ranker.lacks(Verb.PAUSE, ["recommender", "features"]) == "services=features"
    assert ranker.lacks(Verb.ABORT, ["recommender"]) == "verbs=abort"
    assert Scope(services=("feat*",)).describe() == "services=feat*"
    assert parse_grants("x:t:services=*\n", "f")["x"].scope == FULL


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("ops:t0k:verbs=pause,explode", "unknown verb 'explode' (verbs: read, pause"),
        ("ops:t0k:verbs=", "expected verbs=V1,V2 or services=NAME,PREFIX*"),
        ("ops:t0k:verbs=read;verbs=pause", "verbs= given twice"),
        ("ops:t0k:services=re*c", "'re*c' is not a service name or a prefix ending in '*'"),
    ],
)
def test_a_bad_scope_is_one_line_naming_the_file_and_line(line: str, says: str) -> None:
    with pytest.raises(TokenFileError) as err:
        parse_grants(f"ok:fine-t0ken\n{line}\n", "tokens.txt")
    assert str(err.value).startswith("tokens.txt line 2: scope")
    assert says in str(err.value) and "t0k" not in str(err.value)


def test_serve_refuses_a_bad_scope_in_one_line(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("ops:t0ken:verbs=fly\n")
    res = subprocess.run(
        [*CLI, "serve", "--spec", str(tmp_path / "none.yaml"), "--admin-token-file", str(tokens)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip() == (
        f"xds-server: --admin-token-file {tokens} line 1: scope: unknown verb 'fly' "
        "(verbs: read, pause, resume, abort, promote, set-weights, spec-push)"
    )


# ---- verb by verb, on the admin API ----


def test_read_needs_the_read_verb(mesh: Mesh) -> None:
    assert mesh.call("reader", "ListRollouts", pb.ListRolloutsRequest()) == ("OK", "")
    assert mesh.call("pauser", "GetAudit", pb.GetAuditRequest(limit=1)) == ("OK", "")
    code, details = mesh.call("blind", "ListRollouts", pb.ListRolloutsRequest())
    assert code == "PERMISSION_DENIED"
    assert "the token blind may not read" in details and "lacks verbs=read" in details
    assert mesh.call(None, "ListNodes", pb.ListNodesRequest())[0] == "UNAUTHENTICATED"


def test_pause_and_resume_need_their_verbs_on_every_member(mesh: Mesh) -> None:
    code, details = mesh.call("reader", "PauseRollout", action("recommender"))
    assert code == "PERMISSION_DENIED"
    assert details.endswith("its scope lacks verbs=pause (it has verbs=read)"), details
    # A member's pause acts on its whole group: ranker covers recommender, not features.
    code, details = mesh.call("ranker", "PauseRollout", action("recommender"))
    assert code == "PERMISSION_DENIED", details
    assert "may not pause recommender (its rollout group ranking: every member)" in details
    assert "lacks services=features" in details
    code, details = mesh.call("ranker", "PauseRollout", action(group="ranking"))
    assert code == "PERMISSION_DENIED" and "rollout group ranking" in details, details
    assert mesh.phases()["recommender"] != "paused"
    # pauser covers both members: pause and resume go through.
    assert mesh.call("pauser", "PauseRollout", action(group="ranking")) == ("OK", "")
    assert {mesh.phases()[m] for m in ("features", "recommender")} == {"paused"}
    code, details = mesh.call("blind", "ResumeRollout", action(group="ranking"))
    assert code == "PERMISSION_DENIED" and "lacks verbs=resume" in details
    assert mesh.call("pauser", "ResumeRollout", action("features")) == ("OK", "")
    assert "paused" not in {mesh.phases()[m] for m in ("features", "recommender")}


def test_abort_needs_the_abort_verb(mesh: Mesh) -> None:
    for who in ("pauser", "ranker", "reader"):
        code, details = mesh.call(who, "AbortRollout", action("recommender"))
        assert code == "PERMISSION_DENIED", (who, details)
        assert f"the token {who} may not abort" in details and "lacks verbs=abort" in details
    assert mesh.phases()["recommender"] not in ("aborted", "rolled_back")


def test_promote_needs_the_promote_verb_on_every_member(mesh: Mesh) -> None:
    promote = pb.PromoteRolloutRequest(service="recommender", reason="scoped test")
    code, details = mesh.call("pauser", "PromoteRollout", promote)
    assert code == "PERMISSION_DENIED" and "lacks verbs=promote" in details
    # A member's promote moves its whole group (a member promoted alone would stay on
    # its canary when its partner rolls back): ranker's scope on recommender is not enough.
    code, details = mesh.call("ranker", "PromoteRollout", promote)
    assert code == "PERMISSION_DENIED" and "lacks services=features" in details
    group = pb.PromoteRolloutRequest(group="ranking", reason="scoped test")
    code, details = mesh.call("ranker", "PromoteRollout", group)
    assert code == "PERMISSION_DENIED" and "lacks services=features" in details


def test_set_weights_needs_its_verb_and_the_service(mesh: Mesh) -> None:
    def weights(service: str) -> pb.SetWeightsRequest:
        return pb.SetWeightsRequest(
            service=service, canary_percent=150, baseline_percent=0, reason="scoped test"
        )

    code, details = mesh.call("pauser", "SetWeights", weights("recommender"))
    assert code == "PERMISSION_DENIED" and "lacks verbs=set-weights" in details
    code, details = mesh.call("ranker", "SetWeights", weights("search"))
    assert code == "PERMISSION_DENIED" and "lacks services=search" in details
    # In scope, the request itself is checked next (150% is not a weight).
    code, details = mesh.call("ranker", "SetWeights", weights("recommender"))
    assert code == "INVALID_ARGUMENT" and "bad weights" in details


def test_xdsctl_shows_a_refusal_in_one_line_and_acts_in_scope(mesh: Mesh) -> None:
    ranker = mesh.token_path("ranker")
    line = one_line_error(
        xdsctl(mesh.server, "rollout", "abort", "recommender", "--reason", "x", token=ranker)
    )
    assert line == (
        "xdsctl: PERMISSION_DENIED: the token ranker may not abort recommender (its rollout "
        "group ranking: every member): its scope lacks verbs=abort (it has "
        "verbs=read,pause,promote,set-weights;services=recomm*)"
    )
    pauser = mesh.token_path("pauser")
    res = xdsctl(
        mesh.server, "rollout", "pause", "--group", "ranking", "--reason", "x", token=pauser
    )
    assert res.returncode == 0, res.stderr
    res = xdsctl(
        mesh.server, "rollout", "resume", "--group", "ranking", "--reason", "x", token=pauser
    )
    assert res.returncode == 0, res.stderr
    entries = xdsctl(mesh.server, "audit", "--service", "features", token=pauser)
    assert entries.returncode == 0 and "pauser" in entries.stdout


# ---- the dashboard ----


def test_the_dashboard_refuses_out_of_scope_actions_with_403(mesh: Mesh) -> None:
    def post(who: str, path: str) -> tuple[int, dict[str, Any]]:
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKENS[who][0]}"}
        return request(f"{mesh.ui}api/{path}", "POST", {"reason": "scoped test"}, headers)

    status, body = post("pauser", "rollouts/recommender/abort")
    assert status == 403 and "lacks verbs=abort" in body["error"], body
    status, body = post("ranker", "groups/ranking/pause")
    assert status == 403 and "lacks services=features" in body["error"], body
    bearer = {"Authorization": f"Bearer {TOKENS['blind'][0]}"}
    status, body = request(f"{mesh.ui}api/overview", headers=bearer)
    assert status == 403 and "lacks verbs=read" in body["error"], body
    status, scope = request(f"{mesh.ui}api/scope", headers=bearer)
    assert status == 200 and scope["verbs"] == ["pause"] and scope["services"] == ["search"]


def test_the_dashboard_shows_only_what_the_token_may_do(mesh: Mesh, browser: Browser) -> None:
    page, errors = new_page(browser)
    page.goto(f"{mesh.ui}#/rollout/recommender")

    def use(name: str) -> None:
        page.fill("#token", TOKENS[name][0])
        page.click("#token-use")

    use("pauser")  # pause and resume of both members: the service's and the group's
    expect(page.locator("#action-pause")).to_have_count(1)
    expect(page.locator("#action-resume")).to_have_count(1)
    expect(page.locator("#group-action-pause")).to_have_count(1)
    for hidden in ("#action-abort", "#action-promote", "#group-action-promote"):
        expect(page.locator(hidden)).to_have_count(0)
    use("ranker")  # recommender only: every change would take features along
    expect(page.locator("#actions-off")).to_contain_text("The token ranker may not act on")
    for hidden in ("#action-promote", "#action-pause", "#action-abort", "#group-action-pause"):
        expect(page.locator(hidden)).to_have_count(0)
    use("reader")
    expect(page.locator("#actions-off")).to_contain_text("The token reader may not act on")
    expect(page.locator("#action-pause")).to_have_count(0)
    use("admin")
    for shown in ("#action-abort", "#action-promote", "#group-action-abort"):
        expect(page.locator(shown)).to_have_count(1)
    # (reads need a token here: the page's first loads, before one was entered, got 401)
    assert [e for e in errors if "status of 401" not in e] == [], errors


# ---- secure by default off loopback ----


def serve_argv(tmp_path: Path, *extra: str) -> list[str]:
    spec = tmp_path / "mesh.yaml"
    if not spec.exists():
        write_spec(spec, spec_doc())
    return [*CLI, "serve", "--spec", str(spec),
            "--xds-address", f"127.0.0.1:{free_port()}",
            "--admin-address", f"127.0.0.1:{free_port()}",
            "--metrics-address", "127.0.0.1:0", "--ui-address", "",
            "--state-dir", str(tmp_path / "state"),
            "--prometheus-url", f"http://127.0.0.1:{free_port()}", *extra]  # fmt: skip


@pytest.mark.parametrize(
    ("flag", "needs"),
    [
        ("--xds-address", "--xds-tls-cert --xds-tls-key --xds-tls-client-ca"),
        ("--admin-address", "--admin-tls-cert --admin-tls-key --admin-token-file"),
        ("--ui-address", "--ui-tls-cert --ui-tls-key --admin-token-file"),
    ],
)
def test_serve_refuses_a_port_off_loopback_without_tls_and_tokens(
    tmp_path: Path, flag: str, needs: str
) -> None:
    address = f"0.0.0.0:{free_port()}"
    res = subprocess.run(
        [*serve_argv(tmp_path), flag, address], capture_output=True, text=True, timeout=30
    )
    assert res.returncode == 2 and res.stdout == "", res.stderr
    assert res.stderr.strip() == (
        f"xds-server: {flag} {address}: not loopback, so serve needs TLS and tokens there: "
        f"add {needs} (or --insecure to serve it unprotected)"
    )


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    out = tmp_path / "certs"
    make = ["bash", str(ROOT / "hack" / "make-certs.sh"), str(out), "us-east/us-east-1"]
    subprocess.run(make, check=True, capture_output=True, timeout=60)
    return out


def test_off_loopback_with_tls_and_tokens_reads_need_a_token(tmp_path: Path, certs: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(token_file_text())
    port, ui = free_port(), free_port()
    cert, key = str(certs / "server.pem"), str(certs / "server.key")
    argv = serve_argv(tmp_path, "--admin-address", f"0.0.0.0:{port}",
                      "--admin-tls-cert", cert, "--admin-tls-key", key,
                      "--ui-address", f"0.0.0.0:{ui}",
                      "--ui-tls-cert", cert, "--ui-tls-key", key,
                      "--admin-token-file", str(tokens))  # fmt: skip
    server = Process("xds-server", argv, tmp_path / "serve.log")
    creds = grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes())

    def list_rollouts(who: str | None) -> str:
        metadata = [("authorization", f"Bearer {TOKENS[who][0]}")] if who else []
        with grpc.secure_channel(f"127.0.0.1:{port}", creds) as ch:
            try:
                admin_pb2_grpc.AdminStub(ch).ListRollouts(
                    pb.ListRolloutsRequest(), metadata=metadata, timeout=2
                )
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.UNAVAILABLE:
                    assert server.alive(), server.tail()
                return err.code().name
        return "OK"

    try:
        wait_for(lambda: list_rollouts("reader") == "OK", "the admin API over TLS", timeout=20)
        assert list_rollouts(None) == "UNAUTHENTICATED"  # no --admin-auth-reads needed
        assert list_rollouts("blind") == "PERMISSION_DENIED"
        # The dashboard over HTTPS, reads with a token only.
        tls = ssl.create_default_context(cafile=str(certs / "ca.pem"))

        def overview(who: str | None) -> int:
            bearer = {"Authorization": f"Bearer {TOKENS[who][0]}"} if who else {}
            req = urllib.request.Request(f"https://127.0.0.1:{ui}/api/overview", headers=bearer)
            try:
                with urllib.request.urlopen(req, timeout=5, context=tls) as resp:
                    return int(resp.status)
            except urllib.error.HTTPError as exc:
                return exc.code
            except urllib.error.URLError:
                return 0  # not listening yet

        wait_for(lambda: overview("reader") == 200, "the dashboard over HTTPS", timeout=20)
        assert overview(None) == 401
    finally:
        server.stop()


def test_insecure_serves_off_loopback_as_asked(tmp_path: Path) -> None:
    port = free_port()
    argv = serve_argv(tmp_path, "--admin-address", f"0.0.0.0:{port}", "--insecure")
    server = Process("xds-server", argv, tmp_path / "serve.log")

    def reads() -> bool:
        assert server.alive(), server.tail()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            try:
                admin_pb2_grpc.AdminStub(ch).ListRollouts(pb.ListRolloutsRequest(), timeout=2)
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
                return False  # not listening yet
        return True

    try:
        wait_for(reads, "the admin API, open as asked", timeout=20)
    finally:
        server.stop()


def test_the_refusal_is_one_line_from_the_real_command(tmp_path: Path) -> None:
    """Several ports at once: one line naming each and every flag to add."""
    res = subprocess.run(
        [*serve_argv(tmp_path), "--xds-address", "0.0.0.0:18000", "--admin-address", "[::]:1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    line = one_line_error(res, code=2)
    assert line.startswith("xds-server: --xds-address 0.0.0.0:18000, --admin-address [::]:1:")
    assert "--xds-tls-client-ca" in line and "--admin-token-file" in line
