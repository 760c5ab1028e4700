"""`xds-server lab`: the main job, run as a user runs it (no terminal: plain log lines)."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import wait_for
from xds_server.rollout.store import Store

LAB = [sys.executable, "-m", "xds_server.cli", "lab"]


def pids(out: Path) -> list[int]:
    return [p["pid"] for p in json.loads((out / "lab.json").read_text())["processes"]]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_healthy_scenario_promotes_and_leaves_nothing_behind(tmp_path: Path) -> None:
    out = tmp_path / "healthy"
    res = subprocess.run(
        [*LAB, "run", "--scenario", "healthy", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and summary["expected"] == "promoted"
    assert summary["outcome"] == dict.fromkeys(("us-east", "eu-west", "ap-south"), "promoted")
    assert summary["requests"]["by_status"] == {"200": summary["requests"]["total"]}
    width, height = png_size(out / "rollout.png")
    assert width > 300 and height > 300
    # The audit log has one entry per decision, and the plain log one line per entry.
    store = Store.in_dir(out / "state")
    audit = store.audit()
    store.close()
    assert len(audit) == len(summary["decisions"]) > 0
    decision_lines = [
        ln for ln in res.stdout.splitlines() if " check " in ln or " transition " in ln
    ]
    assert len(decision_lines) == len(audit)
    assert "lab: as expected: expected promoted" in res.stdout
    assert len(pids(out)) == 3 * 2 + 3 * 3 + 2  # Envoys, model servers, server, Prometheus
    assert not [p for p in pids(out) if alive(p)]


def test_bad_canary_rolls_back_everywhere_and_keep_then_down(tmp_path: Path) -> None:
    out = tmp_path / "bad"
    res = subprocess.run(
        [
            *LAB,
            "run",
            "--scenario",
            "bad-canary",
            "--fast",
            "--envoys-per-region",
            "1",
            "--keep",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    try:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert set(summary["outcome"].values()) == {"rolled_back"}
        fault = summary["fault"]
        assert fault["region"] == "eu-west" and 0 < fault["to_zero_canary_s"] <= 10
        assert "xds-server lab down --out" in res.stdout
        assert all(alive(p) for p in pids(out))
    finally:
        down = subprocess.run(
            [*LAB, "down"], capture_output=True, text=True, timeout=60, cwd=tmp_path
        )
    assert down.returncode == 0, down.stdout + down.stderr
    wait_for(
        lambda: not [p for p in pids(out) if alive(p)], "every lab process to stop", timeout=15
    )


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP])
def test_interrupt_stops_everything_within_bounded_time(tmp_path: Path, sig: int) -> None:
    """Ctrl-C, or the terminal closing (SIGHUP), ends the lab with nothing left behind."""
    out = tmp_path / "interrupted"
    proc = subprocess.Popen(
        [*LAB, "run", "--envoys-per-region", "1", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )
    try:
        # lab.json is written before anything starts (it records the lab's network), and
        # again once the processes run: wait for those, so the stop has something to stop.
        started = wait_for(lambda: pids(out), "the lab to come up", timeout=60)
        proc.send_signal(sig)
        t0 = time.monotonic()
        assert proc.wait(30) == 130
        assert time.monotonic() - t0 < 30
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not [p for p in started if alive(p)]


def _lab(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    out = tmp_path / "out"
    res = subprocess.run(
        [*LAB, "run", "--regions", "2", "--envoys-per-region", "1", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res, json.loads((out / "summary.json").read_text())


def test_over_grpc_the_bad_canary_fails_unavailable_and_rolls_back(tmp_path: Path) -> None:
    res, summary = _lab(tmp_path, "--protocol", "grpc", "--scenario", "bad-canary", "--fast")
    assert "Open Inference Protocol over GRPC" in res.stdout
    assert set(summary["outcome"].values()) == {"rolled_back"}
    assert summary["cause"].startswith("error_rate in eu-west")
    # The callers saw UNAVAILABLE (an HTTP 200 on the wire), counted as its HTTP peer.
    assert summary["requests"]["by_status"].get("503", 0) > 0
    assert "proxyless" not in summary


def test_proxyless_grpc_clients_follow_the_rollout_counted_apart(tmp_path: Path) -> None:
    res, summary = _lab(tmp_path, "--scenario", "healthy", "--proxyless", "2", "--fast")
    assert set(summary["outcome"].values()) == {"promoted"}
    proxyless = summary["proxyless"]
    assert proxyless["clients_per_region"] == 2 and proxyless["followed"]
    # Both versions answered them during the rollout; after it, only v2, none failed.
    for region in ("us-east", "eu-west"):
        counts = proxyless["by_region"][region]
        assert set(counts["by_version"]) == {"v1", "v2"} and not counts.get("failed")
    assert set(proxyless["after_end"]["by_version"]) == {"v2"}
    # Counted apart from the load through the Envoys.
    assert summary["requests"]["total"] > 0 and proxyless["total"]["sent"] > 0
    assert "proxyless gRPC calls:" in res.stdout


def test_a_registered_canary_instance_lost_mid_rollout_costs_no_request(tmp_path: Path) -> None:
    """Model servers register themselves (`--ha` implied, no endpoints in the spec). At
    5% eu-west gets a second canary instance; at 20% its first is SIGKILLed: its lease
    runs out, every eu-west Envoy drops it within the TTL and a second, the retries of
    requests it refused go to the other instance, and the rollout ends promoted."""
    res, summary = _lab(tmp_path, "--scenario", "canary-instance-loss")
    assert set(summary["outcome"].values()) == {"promoted"}
    fault = summary["replicas"]["fault"]
    assert fault["kind"] == "canary-instance" and fault["region"] == "eu-west"
    assert fault["killed_port"] != fault["new_port"]
    assert 0 < fault["gone_from_envoys_s"] <= fault["registry_ttl"] + 1 + 0.5  # (poll)
    assert fault["failed_after_gone"] == 0
    assert summary["requests"]["by_status"].get("200", 0) > 0
    assert "the killed instance left every eu-west Envoy after" in res.stdout
    spec = yaml.safe_load((tmp_path / "out" / "mesh.yaml").read_text())
    assert all("endpoints" not in p for p in spec["services"][0]["pools"].values())
