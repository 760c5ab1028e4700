"""The mesh spec: the documented shape loads; each mistake gets one clear line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from xds_server.spec import SpecError, load_spec, parse_spec

EXAMPLE = """
regions: [us-east, eu-west, ap-south]
listener: {port: 10000}
services:
  - name: recommender
    domains: ["*"]
    prefix: /
    pools:
      production: {version: v1, endpoints: {us-east: ["127.0.0.1:9101"], eu-west: ["127.0.0.1:9201"], ap-south: ["127.0.0.1:9301"]}}
      canary:     {version: v2, endpoints: {us-east: ["127.0.0.1:9102"], eu-west: ["127.0.0.1:9202"], ap-south: ["127.0.0.1:9302"]}}
"""  # noqa: E501


def problems(text: str) -> list[str]:
    with pytest.raises(SpecError) as err:
        parse_spec(text, "mesh.yaml")
    return err.value.render().splitlines()


def test_example_from_the_issue_loads() -> None:
    spec = parse_spec(EXAMPLE)
    assert spec.regions == ("us-east", "eu-west", "ap-south")
    assert spec.listener.port == 10000
    (svc,) = spec.services
    assert svc.pool_names() == ("production", "canary")
    assert str(svc.pools["canary"].endpoints["eu-west"][0]) == "127.0.0.1:9202"


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            ('us-east: ["127.0.0.1:9102"]', 'mars: ["127.0.0.1:9102"]'),
            "mesh.yaml: services[0].pools.canary.endpoints.mars: unknown region 'mars'",
        ),
        (
            ("127.0.0.1:9201", "127.0.0.1:99999"),
            "mesh.yaml: services[0].pools.production.endpoints.eu-west[0]: bad address "
            "'127.0.0.1:99999': port must be from 1 to 65535",
        ),
        (
            ("127.0.0.1:9201", "model.local:9201"),
            "mesh.yaml: services[0].pools.production.endpoints.eu-west[0]: bad address "
            "'model.local:9201': the host must be an IP address",
        ),
        (("production:", "prod:"), "mesh.yaml: services[0].pools: missing production pool"),
        (("production:", "prod:"), "mesh.yaml: services[0].pools.prod: unknown field"),
        (("prefix: /", "prefix: api"), "mesh.yaml: services[0].prefix: bad prefix 'api'"),
        (("{port: 10000}", "{port: 0}"), "mesh.yaml: listener.port: bad port 0"),
        (
            ("version: v2", "version: [v2]"),
            "mesh.yaml: services[0].pools.canary.version: bad version",
        ),
    ],
)
def test_each_mistake_is_named(edit: tuple[str, str], expected: str) -> None:
    lines = problems(EXAMPLE.replace(*edit))
    assert any(line.startswith(expected) for line in lines), lines


def test_missing_region_endpoints_and_duplicate_service() -> None:
    text = EXAMPLE.replace(', ap-south: ["127.0.0.1:9302"]', "")
    svc = text[text.index("  - name") :]
    lines = problems(text + svc.replace('domains: ["*"]', 'domains: ["b"]'))
    assert (
        "mesh.yaml: services[0].pools.canary.endpoints: no endpoints for region 'ap-south'" in lines
    )
    assert "mesh.yaml: services[1].name: duplicate service 'recommender'" in lines


def test_duplicate_domains_across_services() -> None:
    svc = EXAMPLE[EXAMPLE.index("  - name") :]
    lines = problems(EXAMPLE + svc.replace("name: recommender", "name: ranker"))
    assert any(
        "services[1].domains: domain '*' is already used by service 'recommender'" in line
        for line in lines
    ), lines


def test_all_problems_are_reported_at_once() -> None:
    text = EXAMPLE.replace("127.0.0.1:9101", "nope").replace("regions:", "regionz:")
    lines = problems(text)
    assert len(lines) >= 3
    assert all(line.startswith("mesh.yaml: ") for line in lines)


def test_yaml_syntax_error_names_the_line() -> None:
    (line,) = problems("regions: [us-east\nservices: {")
    assert line.startswith("mesh.yaml: line ")
    assert "not valid YAML" in line


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as err:
        load_spec(tmp_path / "missing.yaml")
    assert "missing.yaml: cannot read file" in str(err.value)


def test_check_command_exits_non_zero_without_a_traceback(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(EXAMPLE)
    bad.write_text(EXAMPLE.replace("127.0.0.1:9101", "127.0.0.1"))
    ok = subprocess.run(
        [sys.executable, "-m", "xds_server.cli", "check", "--spec", str(good)],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert "ok: 3 regions, 1 services, 2 pools" in ok.stdout
    res = subprocess.run(
        [sys.executable, "-m", "xds_server.cli", "check", "--spec", str(bad)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    assert res.stderr.strip() == (
        f"{bad}: services[0].pools.production.endpoints.us-east[0]: "
        "bad address '127.0.0.1': expected 'HOST:PORT'"
    )


ANALYSIS = """
rollout:
  analysis:
    pass_score: 90
    marginal_score: 60
    groups: {errors: 3, latency: 1}
    metrics:
      error_rate: {allowed_change: 1.2, detect_change: 3, confidence: 0.995}
      p90_latency: {kind: latency, quantile: 0.9, direction: either, on_no_data: pause}
  warmup:
    health_check: {path: /ready, interval: 2s, healthy_threshold: 2}
    min_healthy: 0.5
    shadow: {percent: 25, duration: 1m}
    slow_start: 30s
    webhooks:
      - {name: smoke, url: "http://127.0.0.1:8080/hook", timeout: 5s, retries: 3}
"""


def test_analysis_and_warmup_load_with_defaults_filled_in() -> None:
    plan = parse_spec(EXAMPLE + ANALYSIS).services[0].rollout
    a = plan.analysis
    assert (a.pass_score, a.marginal_score) == (90, 60)
    assert dict(a.groups) == {"errors": 3, "latency": 1}
    err, lat = a.metrics
    # A metric named like a default starts from it (critical, its group); others from scratch.
    assert (err.kind, err.critical, err.group) == ("errors", True, "errors")
    assert (err.allowed_change, err.detect_change, err.confidence) == (1.2, 3, 0.995)
    assert (lat.kind, lat.quantile, lat.direction, lat.on_no_data) == (
        "latency",
        0.9,
        "either",
        "pause",
    )
    w = plan.warmup
    assert w.health_check is not None and w.health_check.path == "/ready"
    assert (w.health_check.interval, w.health_check.healthy_threshold) == (2, 2)
    assert (w.min_healthy, w.shadow_percent, w.shadow_duration, w.slow_start) == (0.5, 25, 60, 30)
    (hook,) = w.webhooks
    assert (hook.name, hook.timeout, hook.retries) == ("smoke", 5, 3)
    assert w.needed


def test_analysis_and_warmup_mistakes_each_get_a_line() -> None:
    bad = (
        ANALYSIS.replace("pass_score: 90", "pass_score: 190")
        .replace("detect_change: 3", "detect_change: 1.1")
        .replace("quantile: 0.9", "quantile: 2")
        .replace("direction: either", "direction: sideways")
        .replace("path: /ready", "path: ready")
        .replace("percent: 25", "percent: 0")
        .replace('"http://127.0.0.1:8080/hook"', "ftp://x")
    )
    lines = problems(EXAMPLE + bad)
    at = "mesh.yaml: rollout.analysis."
    assert f"{at}pass_score: expected a score from 0 to 100, got 190" in lines
    assert f"{at}metrics.error_rate.detect_change: must be above allowed_change" in lines
    assert any(line.startswith(f"{at}metrics.p90_latency.quantile: ") for line in lines)
    assert any(
        line.startswith(f"{at}metrics.p90_latency.direction: expected one of") for line in lines
    )
    assert any(line.startswith("mesh.yaml: rollout.warmup.health_check.path: ") for line in lines)
    assert any(line.startswith("mesh.yaml: rollout.warmup.shadow.percent: ") for line in lines)
    hook = "mesh.yaml: rollout.warmup.webhooks[0].url"
    assert f"{hook}: expected an http(s) URL, got 'ftp://x'" in lines


def test_a_date_like_version_is_read_as_its_text() -> None:
    spec = parse_spec(EXAMPLE.replace("version: v2", "version: 2024-05-01"))
    assert spec.services[0].pools["canary"].version == "2024-05-01"
