"""An operator acts on a rollout group (issue 31) through every door: the admin API,
`xdsctl rollout ... --group NAME` and the dashboard (a real headless Chromium); and sees
each rollout's group, and why a canary waits to start, wherever rollouts are shown.

One real `xds-server serve` for the module, with no Prometheus behind it (nothing moves
a rollout but the operator), runs group `ranking` (features + recommender) and `search`,
which starts only after recommender is promoted. The tests run in file order and each
leaves the group live, but the last, which aborts it.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from playwright.sync_api import Browser, expect

from tests.support import wait_for
from tests.test_admin_auth import CLI, Server, one_line_error, xdsctl
from tests.test_dashboard import browser, new_page, request
from xds_server.admin.v1 import admin_pb2, admin_pb2_grpc
from xds_server.lab.procs import Process, free_port

from .conftest import make_spec_doc, write_spec

__all__ = ["browser"]  # the dashboard tests' Chromium, a fixture of this module too

REGIONS = ("us-east", "eu-west")
MEMBERS = ("features", "recommender")
TOKEN = "group-operator-t0ken"
LIVE = {"warming", "progressing"}


def spec_doc() -> dict[str, Any]:
    """Three services (each with a canary), their hosts on free ports nothing serves."""
    pools = ("production", "canary")
    doc = make_spec_doc({(r, p): free_port() for r in REGIONS for p in pools}, regions=REGIONS)
    template = doc["services"][0]
    doc["services"] = []
    for name in ("features", "recommender", "search"):
        svc = json.loads(json.dumps(template))
        svc["name"], svc["domains"] = name, [f"{name}.example"]
        for pool in svc["pools"].values():
            pool["endpoints"] = {r: [f"127.0.0.1:{free_port()}"] for r in REGIONS}
        doc["services"].append(svc)
    doc["services"][2]["after"] = ["recommender"]
    doc["rollout_groups"] = [{"name": "ranking", "services": list(MEMBERS)}]
    doc["rollout"] = {"step_duration": "10m", "max_hold": "10m"}  # only the operator moves it
    return doc


class Mesh:
    """The server: its admin API (gRPC), its dashboard, the token file xdsctl reads."""

    def __init__(self, workdir: Path) -> None:
        spec = workdir / "mesh.yaml"
        write_spec(spec, spec_doc())
        tokens = workdir / "tokens"
        tokens.write_text(f"alice:{TOKEN}\n")
        self.token = workdir / "alice.token"
        self.token.write_text(TOKEN + "\n")
        self.ui = f"http://127.0.0.1:{free_port()}/"
        port = free_port()
        argv = [*CLI, "serve", "--spec", str(spec),
                "--xds-address", f"127.0.0.1:{free_port()}",
                "--admin-address", f"127.0.0.1:{port}",
                "--admin-token-file", str(tokens),
                "--metrics-address", "127.0.0.1:0",
                "--ui-address", self.ui.removeprefix("http://").rstrip("/"),
                "--state-dir", str(workdir / "state"),
                "--prometheus-url", f"http://127.0.0.1:{free_port()}"]  # fmt: skip
        self.server = Server(Process("xds-server", argv, workdir / "serve.log"), port)

    def ctl(self, *args: str, token: bool = True) -> subprocess.CompletedProcess[str]:
        return xdsctl(self.server, *args, token=self.token if token else None, actor="alice")

    def json(self, *args: str) -> Any:
        res = self.ctl("--output", "json", *args)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    def rollouts(self) -> dict[str, dict[str, Any]]:
        return {r["service"]: r for r in self.json("rollout", "list")}

    def phases(self) -> dict[str, str]:
        return {name: r["phase"] for name, r in self.rollouts().items() if name in MEMBERS}

    def call(self, method: str, request: Any, token: bool = True) -> grpc.RpcError:
        """A raw admin API call that must fail: its error."""
        metadata = [("authorization", f"Bearer {TOKEN}")] if token else []
        with grpc.insecure_channel(self.server.address) as ch:
            stub = admin_pb2_grpc.AdminStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                getattr(stub, method)(request, metadata=metadata, timeout=10)
        return err.value

    def wait_live(self) -> None:
        wait_for(
            lambda: (p := self.phases()).keys() == set(MEMBERS) and set(p.values()) <= LIVE,
            "both members of the group to be live",
            timeout=30,
        )


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    m = Mesh(tmp_path_factory.mktemp("groups"))
    try:
        m.wait_live()
        yield m
    finally:
        m.server.process.stop()


def test_xdsctl_pauses_and_resumes_the_group_as_one(mesh: Mesh) -> None:
    answer = mesh.json("rollout", "pause", "--group", "ranking", "--reason", "look at both")
    assert answer["group"] == "ranking"
    members = {r["service"]: r for r in answer["group_rollouts"]}
    assert members.keys() == set(MEMBERS)
    assert {r["phase"] for r in members.values()} == {"paused"}
    assert {r["group"] for r in members.values()} == {"ranking"}
    assert mesh.phases() == {"features": "paused", "recommender": "paused"}

    # Each rollout names its group; search, not started, says what it waits for.
    listed = mesh.rollouts()
    assert listed["search"]["phase"] == "" and listed["search"]["group"] == ""
    assert "recommender" in listed["search"]["waiting"]
    search = mesh.json("rollout", "get", "search")
    assert search["waiting"] == listed["search"]["waiting"]
    table = mesh.ctl("rollout", "list").stdout.splitlines()
    assert table[0].split()[:4] == ["SERVICE", "GROUP", "CANARY", "PHASE"]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert rows["features"][1:4] == ["ranking", "v2", "paused"]
    assert rows["search"][1:4] == ["-", "v2", "waiting"]
    got = mesh.ctl("rollout", "get", "features").stdout
    assert got.startswith("features v2 [group ranking]: paused"), got
    status = mesh.ctl("status").stdout
    assert "waiting" in status and "ranking" in status, status

    # Resumed as one too; the table answer shows every member.
    res = mesh.ctl("rollout", "resume", "--group", "ranking", "--reason", "both look fine")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("group ranking: 2 member rollout(s)"), res.stdout
    assert "features v2 [group ranking]" in res.stdout
    assert "recommender v2 [group ranking]" in res.stdout
    mesh.wait_live()

    # Promoted as one: both members a step on in every region.
    answer = mesh.json("rollout", "promote", "--group", "ranking", "--reason", "next step")
    steps = {(r["service"], g["region"]): g["step"] for r in answer["group_rollouts"]
             for g in r["regions"]}  # fmt: skip
    assert steps == {(m, region): 1 for m in MEMBERS for region in REGIONS}

    # The audit log names the group on every member's entries of the operator's action.
    for service in MEMBERS:
        mine = [
            e
            for e in mesh.json("audit", "--service", service)
            if e["actor"] == "alice" and e["phase_to"] == "paused"
        ]
        assert mine and {e["group"] for e in mine} == {"ranking"}, mine
    assert " ranking " in mesh.ctl("audit", "--service", "features").stdout


def test_bad_group_requests_get_statuses_that_say_why(mesh: Mesh) -> None:
    def refused(method: str, request: Any, token: bool = True) -> tuple[str, str]:
        err = mesh.call(method, request, token)
        return err.code().name, err.details() or ""

    both = admin_pb2.RolloutActionRequest(service="features", group="ranking", reason="r")
    code, details = refused("PauseRollout", both)
    assert code == "INVALID_ARGUMENT" and "not both" in details
    code, details = refused("PauseRollout", admin_pb2.RolloutActionRequest(reason="r"))
    assert code == "INVALID_ARGUMENT" and "name the service" in details
    unknown = admin_pb2.RolloutActionRequest(group="rankin", reason="r")
    code, details = refused("AbortRollout", unknown)
    assert code == "NOT_FOUND" and details == "unknown rollout group 'rankin' (groups: ranking)"
    everything = admin_pb2.PromoteRolloutRequest(group="ranking", reason="r", all=True)
    code, details = refused("PromoteRollout", everything)
    assert code == "INVALID_ARGUMENT" and "a step at a time" in details
    no_reason = admin_pb2.RolloutActionRequest(group="ranking", reason=" ")
    code, details = refused("PauseRollout", no_reason)
    assert code == "INVALID_ARGUMENT" and "reason is required" in details
    # The phase does not allow it: nothing is paused.
    resume = admin_pb2.RolloutActionRequest(group="ranking", reason="r")
    code, details = refused("ResumeRollout", resume)
    assert code == "FAILED_PRECONDITION" and details, details
    # Credentials first: a caller without a token learns nothing of the request.
    code, details = refused("PauseRollout", unknown, token=False)
    assert code == "UNAUTHENTICATED", details
    assert set(mesh.phases().values()) <= LIVE

    # xdsctl: the service or --group, one line each, before anything is sent.
    res = mesh.ctl("rollout", "pause", "features", "--group", "ranking", "--reason", "r")
    assert "not both" in one_line_error(res, code=2)
    res = mesh.ctl("rollout", "get", "--group", "ranking")
    assert "--group works with pause, resume, abort, promote" in one_line_error(res, code=2)
    res = mesh.ctl("rollout", "promote", "--group", "ranking", "--all", "--reason", "r")
    assert "a step at a time" in one_line_error(res, code=2)
    res = mesh.ctl("rollout", "pause", "--reason", "r")
    assert one_line_error(res) == "xdsctl: rollout pause: name the service (or --group NAME)"
    res = mesh.ctl("rollout", "pause", "--group", "nope", "--reason", "r")
    assert one_line_error(res).startswith("xdsctl: NOT_FOUND: unknown rollout group 'nope'")


def test_the_dashboard_shows_the_group_and_acts_on_it(mesh: Mesh, browser: Browser) -> None:
    page, errors = new_page(browser)
    page.goto(mesh.ui)
    for service in MEMBERS:
        card = page.locator(f'.service[data-service="{service}"]')
        expect(card.locator(".group")).to_have_text("group ranking")
    search = page.locator('.service[data-service="search"]')
    expect(search.locator("h2")).to_contain_text("waiting")
    expect(search.locator(".waiting")).to_contain_text("recommender")
    expect(search.locator(".group")).to_have_count(0)
    page.goto(f"{mesh.ui}#/rollout/search")
    expect(page.locator("#waiting")).to_contain_text("waiting: after recommender")

    # A group action needs the token like any other.
    url = f"{mesh.ui}api/groups/ranking/pause"
    status, body = request(url, "POST", {"reason": "x"}, {"Content-Type": "application/json"})
    assert status == 401, body
    bearer = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}
    status, body = request(f"{mesh.ui}api/groups/nope/pause", "POST", {"reason": "x"}, bearer)
    assert status == 404 and "unknown rollout group 'nope'" in body["error"], body

    page.goto(f"{mesh.ui}#/rollout/features")
    expect(page.locator("h1 .group")).to_have_text("group ranking")
    members = page.locator("#group .member")
    expect(members).to_have_count(2)
    page.fill("#token", TOKEN)
    page.click("#token-use")
    page.fill("#action-reason", "pause the whole group from the page")
    page.click("#group-action-pause")
    expect(page.locator("#action-message")).to_have_text("group ranking pause: done")
    expect(page.locator('#group .member[data-service="recommender"] .phase')).to_have_text("paused")
    expect(page.locator("h1 .phase")).to_have_text("paused")
    assert mesh.phases() == {"features": "paused", "recommender": "paused"}
    row = page.locator('#audit tr[data-kind="transition"]', has_text="paused").first
    expect(row.locator(".audit-group")).to_have_text("ranking")

    page.fill("#action-reason", "resume the whole group from the page")
    page.click("#group-action-resume")
    expect(page.locator("#action-message")).to_have_text("group ranking resume: done")
    expect(page.locator('#group .member[data-service="recommender"] .phase')).not_to_have_text(
        "paused"
    )
    mesh.wait_live()
    assert errors == []


def test_aborting_the_group_rolls_back_every_member(mesh: Mesh) -> None:
    # Pausing one member pauses the group: the answer shows every member.
    answer = mesh.json("rollout", "pause", "recommender", "--reason", "one member")
    assert answer["service"] == "recommender" and answer["group"] == "ranking"
    assert [(r["service"], r["phase"]) for r in answer["group_rollouts"]] == [
        ("recommender", "paused"),
        ("features", "paused"),
    ]
    answer = mesh.json("rollout", "abort", "--group", "ranking", "--reason", "stop both")
    assert {r["service"]: r["phase"] for r in answer["group_rollouts"]} == {
        "features": "rolled_back",
        "recommender": "rolled_back",
    }
    assert mesh.phases() == {"features": "rolled_back", "recommender": "rolled_back"}
    # Nothing left to act on: the phase does not allow it, and the answer says so.
    res = mesh.ctl("rollout", "abort", "--group", "ranking", "--reason", "again")
    assert one_line_error(res).startswith("xdsctl: FAILED_PRECONDITION: ")
