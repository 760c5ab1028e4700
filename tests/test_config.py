"""The mesh spec: the documented shape loads; each mistake gets one clear line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from xds_server.config import SpecError, load_spec, parse_spec

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
