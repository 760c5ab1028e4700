"""The command line of replicas on etcd: `xds-server spec push|get|history --store`, the
checks `serve --store/--regions/--leader-ttl` makes before it starts, and `bootstrap
--xds-address A,B,C` (an Envoy that falls back to the next xDS server)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REGIONS, ServerThread, make_spec_doc
from tests.support import wait_for
from xds_server.cli import main
from xds_server.lab.etcd import EtcdCluster
from xds_server.lab.procs import Envoy, free_port
from xds_server.render.bootstrap import XDS_CLUSTER, BootstrapOptions, render_bootstrap

CLI = [sys.executable, "-m", "xds_server.cli"]


def write_spec(path: Path, port: int = 18100, regions: tuple[str, ...] = REGIONS) -> str:
    ports = {(r, p): port for r in regions for p in ("production", "canary")}
    text = yaml.safe_dump(make_spec_doc(ports, regions=regions), sort_keys=False)
    path.write_text(text)
    return text


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`xds-server ARGV` in this process: (exit code, stdout, stderr)."""
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def run_process(argv: list[str], timeout: float = 15) -> tuple[int, str, str, float]:
    """`xds-server ARGV` as its own process: (exit code, stdout, stderr, seconds)."""
    (result,) = run_processes([argv], timeout)
    return result


def run_processes(argvs: list[list[str]], timeout: float = 15) -> list[tuple[int, str, str, float]]:
    """Several `xds-server` processes at once (each takes a second or two to start)."""
    began = time.monotonic()
    procs = [
        subprocess.Popen([*CLI, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for argv in argvs
    ]
    out = []
    try:
        for proc in procs:
            left = max(0.1, began + timeout - time.monotonic())
            stdout, stderr = proc.communicate(timeout=left)
            out.append((proc.returncode, stdout, stderr, time.monotonic() - began))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return out


def one_line(err: str) -> str:
    """The single line a failed command prints (no traceback, no log lines)."""
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err
    assert lines[0].startswith("xds-server: "), lines[0]
    return lines[0]


def history_rows(store: list[str], capsys: pytest.CaptureFixture[str]) -> list[list[str]]:
    code, out, err = run(["spec", "history", *store], capsys)
    assert code == 0, err
    header, *rows = out.splitlines()
    assert header.split() == ["SPEC", "REVISION", "PUSHED", "SHA256", "SOURCE"]
    return [row.split() for row in rows]


# ---- spec push / get / history ----


def test_spec_push_get_history_round_trip(
    shared_etcd: EtcdCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = ["--store", shared_etcd.url, "--store-prefix", "/cli/round-trip"]
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first_text, second_text = write_spec(first), write_spec(second, port=18200)
    assert history_rows(store, capsys) == []

    code, out, err = run(["spec", "push", "--spec", str(first), *store], capsys)
    assert (code, err) == (0, "")
    assert out.startswith(f"{first}: pushed as spec 1 (revision ") and "3 regions" in out
    code, out, _ = run(["spec", "push", "--spec", str(first), *store], capsys)
    assert code == 0 and "unchanged" in out
    code, out, _ = run(["spec", "push", "--spec", str(second), *store], capsys)
    assert code == 0 and out.startswith(f"{second}: pushed as spec 2 (revision ")

    code, out, _ = run(["spec", "get", *store], capsys)
    assert (code, out) == (0, second_text)
    code, out, _ = run(["spec", "get", "--number", "1", *store], capsys)
    assert (code, out) == (0, first_text)
    code, out, err = run(["spec", "get", "--number", "3", *store], capsys)
    assert code == 2 and out == "" and "--number 3" in one_line(err)

    rows = history_rows(store, capsys)
    assert [(r[0], r[-1]) for r in rows] == [("1", str(first)), ("2", str(second))]
    assert int(rows[0][1]) < int(rows[1][1])  # revisions, in order
    assert rows[0][3] != rows[1][3]  # the texts' digests

    # Another prefix is another mesh: empty.
    code, out, err = run(
        ["spec", "get", "--store", shared_etcd.url, "--store-prefix", "/other"], capsys
    )
    assert code == 2 and "holds no spec under /other" in one_line(err)


def test_spec_push_of_a_bad_spec_stores_nothing(
    shared_etcd: EtcdCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = ["--store", shared_etcd.url, "--store-prefix", "/cli/bad-spec"]
    good = tmp_path / "good.yaml"
    write_spec(good)
    assert run(["spec", "push", "--spec", str(good), *store], capsys)[0] == 0
    before = history_rows(store, capsys)
    assert len(before) == 1

    bad = tmp_path / "bad.yaml"
    doc = yaml.safe_load(good.read_text())
    doc["listener"]["port"] = 99999
    bad.write_text(yaml.safe_dump(doc))
    code, out, err = run(["spec", "push", "--spec", str(bad), *store], capsys)
    assert code == 1 and out == ""
    assert str(bad) in err and "listener.port" in err and "99999" in err
    assert "Traceback" not in err
    assert history_rows(store, capsys) == before
    code, out, _ = run(["spec", "get", *store], capsys)
    assert (code, out) == (0, good.read_text())


# ---- --store mistakes and an unreachable store ----


@pytest.mark.parametrize(
    ("store", "says"),
    [
        ("http://x:1", "expected etcd://HOST:PORT"),
        ("etcd://127.0.0.1", "is not HOST:PORT"),
        ("etcd://h:99999", "is not HOST:PORT"),
    ],
)
def test_a_bad_store_address_is_one_line(store: str, says: str) -> None:
    code, out, err, _ = run_process(["spec", "history", "--store", store])
    assert code == 2 and out == ""
    line = one_line(err)
    assert says in line and repr(store) in line


def test_an_unreachable_store_is_one_line_within_seconds(tmp_path: Path) -> None:
    url = f"etcd://127.0.0.1:{free_port()}"  # nothing listens there
    spec = tmp_path / "mesh.yaml"
    write_spec(spec)
    for argv in (["spec", "history"], ["spec", "push", "--spec", str(spec)]):
        code, out, err, took = run_process([*argv, "--store", url])
        assert code == 2 and out == "", err
        assert f"the store {url}" in one_line(err)
        assert took < 5, f"{argv}: {took:.1f} s to give up"


# ---- serve's checks ----


def serve_argv(tmp_path: Path, *extra: str) -> list[str]:
    """`serve` on free ports (in case a check that should stop it does not)."""
    return [
        "serve",
        *extra,
        "--xds-address", f"127.0.0.1:{free_port()}",
        "--admin-address", f"127.0.0.1:{free_port()}",
        "--metrics-address", f"127.0.0.1:{free_port()}",
        "--ui-address", "",
        "--state-dir", str(tmp_path / "state"),
    ]  # fmt: skip


def test_serve_checks_its_replica_flags_before_starting(
    shared_etcd: EtcdCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, prefix = shared_etcd.url, "/cli/serve"
    spec = tmp_path / "mesh.yaml"
    write_spec(spec, regions=("us-east", "eu-west"))
    pushed = run(
        ["spec", "push", "--spec", str(spec), "--store", url, "--store-prefix", prefix], capsys
    )
    assert pushed[0] == 0, pushed
    cases = {
        # replica flags without a store
        "regions without store": (
            ["--spec", str(spec), "--regions", "x"],
            ["--regions", "--store"],
        ),
        "no spec, no store": (["--regions", "x"], ["--spec"]),
        "short ttl": (["--store", url, "--leader-ttl", "1"], ["--leader-ttl", "at least 2"]),
        "bad store": (["--store", "http://x:1", "--regions", "x"], ["--store", "etcd://"]),
        # a region the stored spec lacks: named, with the spec's regions
        "unknown region": (
            ["--store", url, "--store-prefix", prefix, "--regions", "us-east,nope"],
            ["--regions", "nope", "us-east, eu-west"],
        ),
        "unreachable store": (
            ["--store", f"etcd://127.0.0.1:{free_port()}"],
            ["cannot reach the store etcd://127.0.0.1:"],
        ),
        # a prefix that holds no spec
        "empty prefix": (["--store", url, "--store-prefix", "/empty"], ["no spec under /empty"]),
    }
    results = run_processes([serve_argv(tmp_path, *argv) for argv, _ in cases.values()])
    for (name, (_, says)), (code, _, err, _) in zip(cases.items(), results, strict=True):
        assert code == 2, f"{name}: exit {code}:\n{err}"
        line = one_line(err)
        assert all(s in line for s in says), f"{name}: {line!r} does not say {says}"


# ---- bootstrap with several xDS servers ----


def xds_cluster(doc: dict[str, Any]) -> dict[str, Any]:
    (cluster,) = [c for c in doc["static_resources"]["clusters"] if c["name"] == XDS_CLUSTER]
    return dict(cluster)


def test_bootstrap_lists_the_xds_servers_in_priority_order(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["bootstrap", "--region", "r", "--node-id", "n"]
    code, out, err = run([*argv, "--xds-address", "127.0.0.1:1,127.0.0.1:2, 127.0.0.1:3"], capsys)
    assert (code, err) == (0, "")
    cluster = xds_cluster(json.loads(out))
    endpoints = cluster["load_assignment"]["endpoints"]
    assert [
        (e.get("priority", 0), e["lb_endpoints"][0]["endpoint"]["address"]["socket_address"])
        for e in endpoints
    ] == [
        (0, {"address": "127.0.0.1", "port_value": 1}),
        (1, {"address": "127.0.0.1", "port_value": 2}),
        (2, {"address": "127.0.0.1", "port_value": 3}),
    ]
    (check,) = cluster["health_checks"]
    # grpc.health.v1 (a frozen server still accepts TCP); its failure ends the stream.
    assert "grpc_health_check" in check and check["unhealthy_threshold"] == 1
    assert cluster["close_connections_on_host_health_failure"] is True
    options = cluster["typed_extension_protocol_options"]
    (http,) = options.values()
    keepalive = http["explicit_http_config"]["http2_protocol_options"]["connection_keepalive"]
    assert keepalive == {"interval": "0.5s", "timeout": "0.5s"}

    # One server: one endpoint, the same check (it steps aside when it loses the store).
    code, out, _ = run([*argv, "--xds-address", "127.0.0.1:1"], capsys)
    single = xds_cluster(json.loads(out))
    assert code == 0 and len(single["load_assignment"]["endpoints"]) == 1
    assert single["health_checks"] == cluster["health_checks"]

    code, out, err = run([*argv, "--xds-address", "127.0.0.1:1,nonsense"], capsys)
    assert code == 2 and out == "" and "--xds-address" in one_line(err)


def test_an_envoy_falls_back_to_the_next_xds_server(
    server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first address has nothing listening: the Envoy gets its config from the second
    (the priority-1 endpoint of its xDS cluster, once the health check fails the first)."""
    dead = free_port()
    admin, listen = free_port(), free_port()
    opts = BootstrapOptions(
        region="us-east",
        node_id="fallback-1",
        xds_port=dead,
        admin_port=admin,
        listen=f"127.0.0.1:{listen}",
        xds_fallbacks=(("127.0.0.1", server.port),),
    )
    # What the CLI prints for these addresses is what this Envoy runs.
    code, out, _ = run(
        [
            "bootstrap", "--region", "us-east", "--node-id", "fallback-1",
            "--xds-address", f"127.0.0.1:{dead},127.0.0.1:{server.port}",
            "--admin-port", str(admin), "--listen", f"127.0.0.1:{listen}",
        ],
        capsys,
    )  # fmt: skip
    assert code == 0 and out == render_bootstrap(opts)

    envoy = Envoy(opts, tmp_path / "envoy")
    try:
        envoy.wait_ready(timeout=15)

        def applied() -> dict[str, str] | None:
            versions = envoy.applied_versions()
            return versions if versions.get("listener") and versions.get("route") else None

        versions = wait_for(
            applied, "the Envoy to report its listener and routes applied", timeout=5
        )
        assert versions["listener"] and versions["cluster"]
        dump = json.dumps(envoy.config_dump())
        assert f'"port_value": {listen}' in dump  # the listener this server made for it
        hosts = envoy.admin_get("/clusters?format=json")
        (xds,) = [c for c in hosts["cluster_statuses"] if c["name"] == XDS_CLUSTER]
        health = {
            h["address"]["socket_address"]["port_value"]: h["health_status"]
            for h in xds["host_statuses"]
        }
        assert set(health) == {dead, server.port}
        assert health[dead].get("failed_active_health_check") is True, health
        assert not health[server.port].get("failed_active_health_check"), health
    finally:
        envoy.stop()
