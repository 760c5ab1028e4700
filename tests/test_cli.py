"""The `xds-server` and `xdsctl` commands as a user runs them."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support import wait_for, xds_fetch
from xds_server.lab.procs import Envoy, Process, envoy_binary, free_port, http_get
from xds_server.lab.upstream import ModelServer
from xds_server.render.bootstrap import BootstrapOptions

CLI = [sys.executable, "-m", "xds_server.cli"]


@pytest.mark.parametrize(("node_id", "extra"), [("e1", []), ("n", ["--delta"])])
def test_bootstrap_is_accepted_by_envoy_validate(
    tmp_path: Path, node_id: str, extra: list[str]
) -> None:
    out = subprocess.run(
        [
            *CLI,
            "bootstrap",
            "--region",
            "eu-west",
            "--node-id",
            node_id,
            "--xds-address",
            "127.0.0.1:18000",
            "--admin-port",
            "19001",
            "--listen",
            "127.0.0.1:10001",
            *extra,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    doc = yaml.safe_load(out)
    assert doc["node"]["id"] == node_id  # "n" stays a string (YAML would read a boolean)
    assert doc["node"]["locality"]["region"] == "eu-west"
    assert doc["node"]["metadata"] == {"xds_server.listen": "127.0.0.1:10001"}
    assert doc["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    api = doc["dynamic_resources"]["ads_config"]["api_type"]
    assert api == ("DELTA_GRPC" if extra else "GRPC")
    path = tmp_path / "b.yaml"
    path.write_text(out)
    res = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path)], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "OK" in res.stdout + res.stderr


def test_bad_arguments_get_one_line() -> None:
    res = subprocess.run(
        [*CLI, "bootstrap", "--region", "r", "--node-id", "n", "--xds-address", "nowhere"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2
    assert res.stderr.strip() == "xds-server: --xds-address: expected 'HOST:PORT', got 'nowhere'"


def test_serve_routes_reloads_on_sighup_and_stops_on_sigterm(
    tmp_path: Path, spec_file: Path, upstreams: dict[tuple[str, str], ModelServer]
) -> None:
    # No canary: a rollout would send a share of the requests below to it.
    doc = yaml.safe_load(spec_file.read_text())
    del doc["services"][0]["pools"]["canary"]
    spec_file.write_text(yaml.safe_dump(doc))
    port = free_port()
    server = Process(
        "server",
        [
            *CLI,
            "serve",
            "--spec",
            str(spec_file),
            "--xds-address",
            f"127.0.0.1:{port}",
            "--state-dir",
            str(tmp_path / "state"),
            "--log-format",
            "json",
        ],
        tmp_path / "server.log",
    )
    listen = free_port()
    bootstrap = subprocess.run(
        [
            *CLI,
            "bootstrap",
            "--region",
            "ap-south",
            "--node-id",
            "a1",
            "--xds-address",
            f"127.0.0.1:{port}",
            "--admin-port",
            str(free_port()),
            "--listen",
            f"127.0.0.1:{listen}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    opts = BootstrapOptions(
        **{
            "region": "ap-south",
            "node_id": "a1",
            "admin_port": yaml.safe_load(bootstrap)["admin"]["address"]["socket_address"][
                "port_value"
            ],
            "xds_port": port,
            "listen": f"127.0.0.1:{listen}",
        }
    )
    envoy = Envoy(opts, tmp_path / "envoy")
    try:
        envoy.wait_ready()
        body = json.loads(http_get(f"http://127.0.0.1:{listen}/")[1])
        assert (body["region"], body["pool"]) == ("ap-south", "production")
        # SIGHUP re-reads the file (the watcher would too; SIGHUP is immediate).
        doc = yaml.safe_load(spec_file.read_text())
        doc["services"][0]["pools"]["production"]["endpoints"]["ap-south"] = [
            f"127.0.0.1:{upstreams[('ap-south', 'baseline')].port}"
        ]
        spec_file.write_text(yaml.safe_dump(doc))
        server.signal(signal.SIGHUP)
        wait_for(
            lambda: json.loads(http_get(f"http://127.0.0.1:{listen}/")[1])["pool"] == "baseline",
            "Envoy to follow the reloaded spec",
            timeout=5,
        )
        server.signal(signal.SIGTERM)
        assert server.proc.wait(10) == 0
    finally:
        envoy.stop()
        server.stop()
    lines = [json.loads(line) for line in server.log_path.read_text().splitlines()]
    messages = [line["message"] for line in lines]
    # SIGHUP's push, unless the file watcher read the edit first (a loaded machine can
    # deliver the signal after the watcher's next look): either way, that one file read.
    reloads = ("reason=SIGHUP", "reason=spec file changed")
    assert any(
        m.startswith("push region=ap-south") and any(r in m for r in reloads) for m in messages
    )
    assert any(m.startswith("node connected: a1 region=ap-south") for m in messages)
    assert "stopping: signal received" in messages


def test_serve_with_bad_spec_fails_clearly(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("regions: []\nservices: []\n")
    res = subprocess.run(
        [*CLI, "serve", "--spec", str(bad), "--xds-address", f"127.0.0.1:{free_port()}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 1
    assert f"{bad}: regions: expected a non-empty list of region names" in res.stderr
    assert "Traceback" not in res.stderr


def test_xdsctl_fetch_prints_what_a_region_receives(spec_file: Path, tmp_path: Path) -> None:
    port = free_port()
    server = Process(
        "server",
        [
            *CLI,
            "serve",
            "--spec",
            str(spec_file),
            "--xds-address",
            f"127.0.0.1:{port}",
            "--state-dir",
            str(tmp_path / "state"),
        ],
        tmp_path / "server.log",
    )
    try:

        def fetch() -> dict[str, object]:
            res = xds_fetch(f"127.0.0.1:{port}", "eu-west", "endpoint")
            return json.loads(res.stdout) if res.returncode == 0 else {}

        out = wait_for(fetch, "xdsctl xds fetch to answer", timeout=15)
        names = sorted(r["cluster_name"] for r in out["resources"])  # type: ignore[attr-defined]
        assert names == ["recommender|canary", "recommender|production"]
        res = xds_fetch(f"127.0.0.1:{port}", "mars")
        assert res.returncode == 1
        assert "INVALID_ARGUMENT" in res.stderr and "region 'mars'" in res.stderr
        assert "Traceback" not in res.stderr
        # A second server on the taken xDS port refuses (gRPC would share it by default,
        # SO_REUSEPORT, and split the Envoys between two servers that never met).
        second = subprocess.run(
            [
                *CLI,
                "serve",
                *("--spec", str(spec_file), "--state-dir", str(tmp_path / "two")),
                *("--xds-address", f"127.0.0.1:{port}", "--ui-address", ""),
                *("--admin-address", f"127.0.0.1:{free_port()}"),
                *("--metrics-address", f"127.0.0.1:{free_port()}"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 1, second.stderr[-2000:]
        assert f"xds-server: cannot listen on 127.0.0.1:{port}: in use" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        server.stop()
