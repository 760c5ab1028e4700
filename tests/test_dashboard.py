"""The web dashboard, in a real headless Chromium (Debian's, driven by Playwright),
against a real rollout: `xds-server serve`, real Envoys, a real Prometheus, model
servers whose faults the test controls, steady bounded load.

Every wait polls the DOM with a deadline (Playwright's `expect`); screenshots of each
page go in the test's temporary folder. `XDS_UPDATE_SCREENSHOTS=1` also copies the
rollout page's to docs/images/ for the README.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.support import wait_for
from xds_server.lab.layout import MeshOptions
from xds_server.lab.mesh import LocalMesh
from xds_server.lab.procs import Process, free_port
from xds_server.lab.scenarios import FAST_PLAN
from xds_server.rollout.audit import AuditEntry, rollback_cause
from xds_server.rollout.decision import EntryKind
from xds_server.rollout.evidence import FAIL, HIGH, Check, MetricResult, Verdict
from xds_server.rollout.state import Phase
from xds_server.spec import NoDataRule

from .conftest import make_spec_doc, write_spec

CHROMIUM = "/usr/bin/chromium"  # Debian's package: `make` installs it
CHROMIUM_ARGS = [
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",  # no calls to the outside world
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "dashboard-test-token"
XSS = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2">'
README_SHOT = Path(__file__).resolve().parents[1] / "docs" / "images" / "dashboard-rollout.png"
PLAN = {**FAST_PLAN, "steps": [5, 20, 50, 100], "step_duration": "6s"}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), (
        f"{CHROMIUM} is missing: `make setup` installs Debian's chromium"
    )
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    opts = MeshOptions(
        regions=("us-east", "eu-west"),
        envoys_per_region=1,
        rollout=PLAN,
        load_rate=40,
        admin_token=TOKEN,
    )
    m = LocalMesh(tmp_path_factory.mktemp("dashboard") / "mesh", opts)
    with m:
        load = m.processes.start_load(max_seconds=400)
        wait_for(lambda: len(load.snapshot()) >= 20, "load through every Envoy", timeout=15)
        yield m


def new_page(browser: Browser) -> tuple[Page, list[str]]:
    """A page, and the errors its scripts raise or log (a CSP violation among them)."""
    page = browser.new_page(viewport={"width": 1300, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    return page, errors


def canary(page: Page, region: str) -> Any:
    return page.locator(
        f'.service[data-service="recommender"] [data-region="{region}"][data-pool="canary"]'
    )


def request(
    url: str,
    method: str = "GET",
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_an_operator_follows_and_steers_a_rollout_in_the_browser(
    mesh: LocalMesh, browser: Browser, tmp_path: Path
) -> None:
    page, errors = new_page(browser)
    page.goto(mesh.layout.dashboard_url)
    expect(page.locator('.service[data-service="recommender"] h2')).to_contain_text("no rollout")

    # The overview follows the steps as they advance, with no reload.
    mesh.spec.add_canary()
    for region in mesh.opts.regions:
        expect(canary(page, region)).to_have_text("canary 5%", timeout=30_000)
    for region in mesh.opts.regions:
        expect(canary(page, region)).to_have_text("canary 20%", timeout=30_000)
    expect(page.locator("#live")).to_contain_text("decision at")  # pushed, not polled
    expect(page.locator("#sync tr[data-region=us-east] td.sync-SYNCED")).to_have_text("1")
    page.screenshot(path=str(tmp_path / "overview.png"), full_page=True)

    # Without the token: no buttons, and the API refuses.
    page.goto(f"{mesh.layout.dashboard_url}#/rollout/recommender")
    expect(page.locator("#actions-off")).to_be_visible()
    expect(page.locator("#action-pause")).to_have_count(0)
    # Each region's signals panel: its node applied, its Envoy target up, fresh evidence.
    panel = page.locator('.signals[data-region="us-east"]')
    expect(panel.locator('tr[data-signal="nodes"] td')).to_have_text(
        "1 applied / 0 unknown / 0 lagging"
    )
    expect(panel.locator('tr[data-signal="targets up"] td')).to_have_text("1 of 1")
    expect(panel.locator('tr[data-signal="verdict"] td')).to_have_text("trusted")
    expect(panel.locator('tr[data-signal="canary routed"] td')).to_contain_text(
        "% of 20% configured"
    )
    status, body = request(
        f"{mesh.layout.dashboard_url}api/rollouts/recommender/pause",
        "POST",
        {"reason": "no token"},
        {"Content-Type": "application/json"},
    )
    assert status == 401, body
    assert mesh.state.rollout()["phase"] == "progressing"

    # With it: pause, with a reason that tries to be HTML; it lands in the audit log,
    # with the token's name as the actor, and shows as text.
    page.fill("#token", TOKEN)
    page.click("#token-use")
    page.fill("#action-reason", XSS)
    page.click("#action-pause")
    expect(page.locator("#action-message")).to_have_text("pause: done")
    paused = page.locator('#audit tr[data-kind="transition"]', has_text="paused").first
    expect(paused.locator("pre.reason")).to_have_text(f"paused: {XSS}")
    expect(paused.locator(".actor")).to_have_text("admin")
    assert page.evaluate("window.__xss") is None
    assert page.locator('img[src="x"]').count() == 0
    assert page.locator("script").count() == 1  # app.js, nothing the reason brought
    entries = [e for e in mesh.state.audit() if e.phase_to == "paused" and e.region is None]
    assert entries and entries[-1].actor == "admin" and XSS in entries[-1].reason
    assert mesh.state.rollout()["phase"] == "paused"

    # A bad canary in eu-west: resume, and the page shows the rollback, its region and
    # its metric, in the same document (no reload: the marker survives).
    page.evaluate("window.__sameDocument = true")
    mesh.faults.set("eu-west", "canary", error_rate=0.6)
    page.fill("#action-reason", "fault injected by the test; judge it")
    page.click("#action-resume")
    cause = page.locator("#rollback-cause")
    expect(cause).to_be_visible(timeout=60_000)
    expect(cause).to_have_attribute("data-region", "eu-west")
    expect(cause).to_have_attribute("data-metric", re.compile(r"error_rate"))
    assert page.evaluate("window.__sameDocument") is True
    expect(page.locator("h1 .phase")).to_have_text("rolled_back")
    expect(page.locator('#checks tr[data-region="eu-west"]').first).to_be_visible()
    shot = tmp_path / "rollout.png"
    page.screenshot(path=str(shot))
    page.screenshot(path=str(tmp_path / "rollout-full.png"), full_page=True)
    if os.environ.get("XDS_UPDATE_SCREENSHOTS") == "1":
        README_SHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, README_SHOT)

    # The audit log filters by region and kind.
    page.select_option("#audit-region", "eu-west")
    page.select_option("#audit-kind", "transition")
    rows = page.locator("#audit tr[data-id]")
    expect(rows.first).to_be_visible()
    assert set(rows.evaluate_all("rs => rs.map(r => r.dataset.region)")) == {"eu-west"}
    assert set(rows.evaluate_all("rs => rs.map(r => r.dataset.kind)")) == {"transition"}

    # The nodes page: every Envoy, its client type and region.
    page.goto(f"{mesh.layout.dashboard_url}#/nodes")
    for envoy in mesh.processes.envoys:
        row = page.locator(f'#nodes tr[data-node="{envoy.opts.node_id}"]')
        expect(row.locator(".client-type")).to_have_text("envoy")
        expect(row).to_contain_text(envoy.opts.region)
    page.screenshot(path=str(tmp_path / "nodes.png"), full_page=True)
    assert errors == []
    for name in ("overview.png", "rollout.png", "nodes.png"):
        assert (tmp_path / name).stat().st_size > 10_000


def test_the_api_refuses_what_a_foreign_page_or_a_mistake_sends(mesh: LocalMesh) -> None:
    base = mesh.layout.dashboard_url
    json_type = {"Content-Type": "application/json"}
    bearer = {**json_type, "Authorization": f"Bearer {TOKEN}"}
    # DNS rebinding: a page on another name that resolves here cannot read.
    status, body = request(f"{base}api/overview", headers={"Host": "evil.example"})
    assert status == 403 and "Host" in body["error"]
    # A cross-origin page cannot act, even if it had the token.
    status, body = request(
        f"{base}api/rollouts/recommender/pause",
        "POST",
        {"reason": "x"},
        {**bearer, "Origin": "http://evil.example"},
    )
    assert status == 403, body
    # A form post (no preflight) is not JSON: refused before anything else.
    status, body = request(
        f"{base}api/rollouts/recommender/pause",
        "POST",
        {"reason": "x"},
        {"Content-Type": "text/plain", "Authorization": f"Bearer {TOKEN}"},
    )
    assert status == 400 and "application/json" in body["error"]
    status, body = request(
        f"{base}api/rollouts/recommender/pause",
        "POST",
        {"reason": "x"},
        {**json_type, "Authorization": "Bearer wrong"},
    )
    assert status == 401 and "matches none" in body["error"]
    status, body = request(f"{base}api/rollouts/nope/pause", "POST", {"reason": "x"}, bearer)
    assert status == 404 and "unknown service 'nope'" in body["error"]
    status, body = request(
        f"{base}api/rollouts/recommender/explode", "POST", {"reason": "x"}, bearer
    )
    assert status == 404 and "no action 'explode'" in body["error"]
    status, body = request(f"{base}api/rollouts/recommender/pause", "POST", {"reason": " "}, bearer)
    assert status == 400 and "reason is required" in body["error"]
    status, body = request(f"{base}api/rollouts/recommender/pause", "POST", {"why": "x"}, bearer)
    assert status == 400 and '"reason"' in body["error"]
    # Every answer forbids inline scripts.
    req = urllib.request.Request(base)
    with urllib.request.urlopen(req, timeout=5) as resp:
        csp = resp.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp


def test_without_tokens_the_dashboard_is_read_only(tmp_path: Path, browser: Browser) -> None:
    spec = tmp_path / "mesh.yaml"
    ports = {(r, pool): free_port() for r in ("us-east",) for pool in ("production", "canary")}
    write_spec(spec, make_spec_doc(ports, regions=("us-east",)))
    ui = free_port()
    argv = [sys.executable, "-m", "xds_server.cli", "serve", "--spec", str(spec),
            "--xds-address", f"127.0.0.1:{free_port()}",
            "--admin-address", f"127.0.0.1:{free_port()}",
            "--metrics-address", "127.0.0.1:0",
            "--ui-address", f"127.0.0.1:{ui}",
            "--state-dir", str(tmp_path / "state"),
            "--prometheus-url", f"http://127.0.0.1:{free_port()}"]  # fmt: skip
    server = Process("xds-server", argv, tmp_path / "serve.log")
    try:
        url = f"http://127.0.0.1:{ui}/"
        overview = wait_for(lambda: request(f"{url}api/overview")[1], "the dashboard", timeout=20)
        assert overview["server"]["actions"] is False
        status, body = request(
            f"{url}api/rollouts/recommender/pause",
            "POST",
            {"reason": "x"},
            {"Content-Type": "application/json", "Authorization": "Bearer anything"},
        )
        assert status == 403 and "read-only" in body["error"], body
        page, _ = new_page(browser)
        page.goto(f"{url}#/rollout/recommender")
        expect(page.locator("#actions-off")).to_contain_text("read-only")
        expect(page.locator("#action-pause")).to_have_count(0)
    finally:
        server.stop()


# ---- the cause of a rollback (pure) ----


def entry(i: int, region: str | None, phase_to: str, **kw: Any) -> AuditEntry:
    fields: dict[str, Any] = {
        "time": 100.0 + i,
        "service": "svc",
        "canary_version": "v2",
        "region": region,
        "kind": EntryKind.TRANSITION,
        "step": 1,
        "phase_from": Phase.PROGRESSING,
        "phase_to": Phase(phase_to),
        "weights_before": None,
        "weights_after": None,
        "measurements": None,
        "verdict": None,
        "reason": "r",
        "snapshot_version": None,
        "actor": "controller",
        "id": i,
    }
    fields.update(kw)
    return AuditEntry(**fields)


def test_the_cause_is_the_region_with_the_evidence_and_its_failed_metric() -> None:
    breach = Verdict(FAIL, "p99", checks=(Check("p99_ms", 900.0, 500.0, ok=False),))
    entries = [
        entry(1, "us-east", "progressing"),
        entry(2, "us-east", "rolled_back", reason="eu-west: p99"),
        entry(3, "eu-west", "rolled_back", reason="eu-west: p99", verdict=breach),
        entry(4, None, "rolled_back", reason="everywhere", verdict=breach),
    ]
    cause = rollback_cause(entries)
    assert cause is not None
    assert (cause.region, cause.metric, cause.entry_id) == ("eu-west", "p99_ms", 3)
    latency = MetricResult("latency", HIGH, 1.5, 1e-6, "", "latency", False, NoDataRule.PASS)
    judged = Verdict(FAIL, "latency high", metrics=(latency,), conclusive=True)
    assert rollback_cause([entry(1, "ap", "rolled_back", verdict=judged)]).metric == "latency"  # type: ignore[union-attr]


def test_an_operators_abort_has_no_metric_and_names_the_actor() -> None:
    entries = [
        entry(1, "us-east", "rolled_back", reason="aborted: bad feeling", actor="alice"),
        entry(2, None, "rolled_back", actor="alice"),
    ]
    cause = rollback_cause(entries)
    assert cause is not None and cause.metric is None and cause.actor == "alice"
    assert rollback_cause([entry(1, "us-east", "promoted")]) is None
