"""Two `xds-server serve` processes on one state directory, a real Envoy on each.

The first takes the state directory's lock and runs the rollout controller; the second
cannot take it and follows: it reads the committed rollout state from the SQLite store
and serves exactly the weights the leader committed, so the two Envoys of one region
route by one split whichever replica each is connected to.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support import wait_for
from xds_server.lab.layout import SERVICE
from xds_server.lab.procs import Envoy, Process, free_port
from xds_server.lab.traffic import envoy_weights
from xds_server.lab.upstream import ModelServer
from xds_server.render.bootstrap import BootstrapOptions

from .conftest import make_spec_doc, write_spec

CLI = [sys.executable, "-m", "xds_server.cli"]
CTL = [sys.executable, "-m", "xds_server.ctl"]
REGIONS = ("us-east", "eu-west")
REGION = "eu-west"
"""Where both Envoys run."""
FOLLOWING = "serving the committed state, not deciding"
ACTOR = "test-operator"
AUDITED_ACTOR = f"{ACTOR} (unauthenticated)"
"""No token file: the claimed actor is recorded, marked as not authenticated."""


@dataclass
class Serve:
    """One `xds-server serve` process and its ports."""

    process: Process
    xds_port: int
    admin_port: int

    @property
    def admin(self) -> str:
        return f"127.0.0.1:{self.admin_port}"

    def messages(self) -> list[str]:
        lines = self.process.log_path.read_text().splitlines()
        return [json.loads(line)["message"] for line in lines if line.startswith("{")]


@dataclass
class Replicas:
    workdir: Path
    spec_path: Path
    state_dir: Path
    started: list[Process] = field(default_factory=list)

    def serve(self, name: str) -> Serve:
        xds_port, admin_port = free_port(), free_port()
        argv = [*CLI, "serve", "--spec", str(self.spec_path),
                "--xds-address", f"127.0.0.1:{xds_port}",
                "--admin-address", f"127.0.0.1:{admin_port}",
                "--metrics-address", "127.0.0.1:0", "--ui-address", "",
                "--state-dir", str(self.state_dir),
                # Nothing listens there: the test steers the rollout by hand.
                "--prometheus-url", f"http://127.0.0.1:{free_port()}",
                "--log-format", "json"]  # fmt: skip
        process = Process(name, argv, self.workdir / f"{name}.log")
        self.started.append(process)
        return Serve(process, xds_port, admin_port)

    def envoy(self, node_id: str, server: Serve) -> Envoy:
        envoy = Envoy(
            BootstrapOptions(
                region=REGION,
                node_id=node_id,
                xds_port=server.xds_port,
                admin_port=free_port(),
                listen=f"127.0.0.1:{free_port()}",
            ),
            self.workdir / "envoy",
        )
        self.started.append(envoy)
        return envoy

    def stop(self) -> None:
        for p in reversed(self.started):  # Envoys before their servers
            p.stop()


@pytest.fixture
def replicas(tmp_path: Path, upstreams: dict[tuple[str, str], ModelServer]) -> Iterator[Replicas]:
    ports = {k: s.port for k, s in upstreams.items()}
    doc = make_spec_doc(ports, pools=("production", "baseline", "canary"), regions=REGIONS)
    # Steps far apart: nothing moves the rollout but the operator (Prometheus is absent
    # anyway, so no check can pass).
    doc["rollout"] = {"step_duration": "10m", "max_hold": "10m"}
    spec_path = tmp_path / "mesh.yaml"
    write_spec(spec_path, doc)
    r = Replicas(tmp_path, spec_path, tmp_path / "state")
    try:
        yield r
    finally:
        r.stop()


def xdsctl(server: Serve, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CTL, "--server", server.admin, "--timeout", "5", *args],
        capture_output=True,
        text=True,
        timeout=20,
    )


def ctl_json(server: Serve, *args: str) -> Any:
    res = xdsctl(server, "--output", "json", *args)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def committed(doc: Any) -> Any:
    """An xdsctl answer without what only the deciding process knows (`signals.nodes_*`)."""
    if isinstance(doc, dict):
        return {k: committed(v) for k, v in doc.items() if not k.startswith("nodes_")}
    if isinstance(doc, list):
        return [committed(v) for v in doc]
    return doc


def set_weights(server: Serve, canary: int, baseline: int, *regions: str) -> dict[str, Any]:
    where = [arg for r in regions for arg in ("--region", r)]
    out: dict[str, Any] = ctl_json(
        server, "--actor", ACTOR, "rollout", "set-weights", SERVICE, "--canary", str(canary),
        "--baseline", str(baseline), *where, "--reason", f"test: canary {canary}%",
    )  # fmt: skip
    return out


def split(rollout: dict[str, Any]) -> dict[str, tuple[float, float, float]]:
    """Each region's production/baseline/canary percent, as `rollout get` reports them."""
    return {
        r["region"]: (r["production_percent"], r["baseline_percent"], r["canary_percent"])
        for r in rollout["regions"]
    }


def routed(envoy: Envoy) -> dict[str, int]:
    """The weights Envoy routes by, pools with no weight left out."""
    return {pool: w for pool, w in envoy_weights(envoy).items() if w}


def wait_both(envoys: tuple[Envoy, Envoy], expected: dict[str, int], what: str) -> None:
    def applied() -> bool:
        return all(routed(e) == expected for e in envoys)

    try:
        wait_for(applied, what, timeout=10, interval=0.1)
    except TimeoutError as exc:
        seen = {e.name: routed(e) for e in envoys}
        raise AssertionError(f"{exc}: expected {expected}, Envoys route by {seen}") from None


def test_follower_serves_the_weights_the_leader_commits(replicas: Replicas) -> None:
    leader = replicas.serve("leader")
    # The leader has the lock (it takes it before serving) and has started the rollout.
    rollouts = wait_for(
        lambda: ctl_json(leader, "rollout", "list"), "the leader to start the rollout", timeout=20
    )
    assert [(r["service"], r["canary_version"]) for r in rollouts] == [(SERVICE, "v2")]
    first = split(rollouts[0])
    assert first[REGION][2] > 0, first  # the first step sends the canary some traffic

    follower = replicas.serve("follower")
    wait_for(
        lambda: any(FOLLOWING in m for m in follower.messages()), "the follower's log", timeout=20
    )
    assert not any(FOLLOWING in m for m in leader.messages())

    envoys = (replicas.envoy("via-leader", leader), replicas.envoy("via-follower", follower))
    for e in envoys:
        e.wait_ready()
    # Whatever the first step is, both Envoys route by it (production-only would be
    # {"production": 10000} on the follower's Envoy).
    at_first_step = routed(envoys[0])
    assert at_first_step.get("canary", 0) > 0, at_first_step
    wait_both(envoys, at_first_step, "both Envoys at the rollout's first step")

    # Two changes through the leader: a follower that read the state once would miss them.
    after = set_weights(leader, 30, 10)
    assert split(after) == {r: (60, 10, 30) for r in REGIONS}
    wait_both(
        envoys, {"production": 6000, "baseline": 1000, "canary": 3000}, "canary 30% baseline 10%"
    )
    after = set_weights(leader, 70, 0, REGION)
    assert split(after) == {"us-east": (60, 10, 30), REGION: (30, 0, 70)}
    wait_both(envoys, {"production": 3000, "canary": 7000}, "canary 70% in eu-west")

    # Reads from the follower give what the leader committed (polled: the follower reads
    # the store every 0.5 s, and the leader may record something between the two reads).
    # Only the deciding process counts the nodes on the current routes (every replica's),
    # so a signals row's node counts are the leader's own.
    def same(*args: str) -> bool:
        return bool(committed(ctl_json(follower, *args)) == committed(ctl_json(leader, *args)))

    wait_for(
        lambda: same("rollout", "get", SERVICE), "the same `rollout get` from both", timeout=10
    )
    wait_for(lambda: same("rollout", "list"), "the same `rollout list` from both", timeout=10)
    by_hand = [
        (e["reason"], e["actor"])
        for e in ctl_json(follower, "audit", "--service", SERVICE, "--region", REGION)
        if e["kind"] == "transition" and e["reason"].startswith("weights set by hand")
    ]
    assert by_hand == [
        ("weights set by hand to canary 30%, baseline 10%: test: canary 30%", AUDITED_ACTOR),
        ("weights set by hand to canary 70%, baseline 0%: test: canary 70%", AUDITED_ACTOR),
    ]

    # Changes through the follower are refused, in one line, and change nothing.
    refused = xdsctl(
        follower, "rollout", "set-weights", SERVICE, "--canary", "50", "--reason", "test"
    )
    assert refused.returncode == 1
    assert refused.stdout == ""
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert lines[0].startswith("xdsctl: "), lines[0]
    assert "does not run the rollout controller" in lines[0], lines[0]
    assert split(ctl_json(leader, "rollout", "get", SERVICE))[REGION] == (30, 0, 70)
    assert all(routed(e) == {"production": 3000, "canary": 7000} for e in envoys)

    # Both servers stop cleanly on SIGTERM; only the leader ever decided anything.
    for server in (follower, leader):
        assert server.process.stop(10) == 0, server.process.tail()
    decided = [m for m in follower.messages() if m.startswith(f"{SERVICE} v2")]
    assert decided == [], decided
    assert any(m.startswith(f"{SERVICE} v2 eu-west: paused -> paused") for m in leader.messages())


def test_a_follower_takes_over_when_the_leader_dies(replicas: Replicas) -> None:
    """The lock is released by the kernel when its holder dies: the follower takes it,
    restores the committed state and decides from then on, with no weights lost."""
    leader = replicas.serve("leader")
    wait_for(
        lambda: ctl_json(leader, "rollout", "list"), "the leader to start the rollout", timeout=20
    )
    follower = replicas.serve("follower")
    wait_for(
        lambda: any(FOLLOWING in m for m in follower.messages()), "the follower's log", timeout=20
    )
    envoy = replicas.envoy("via-follower", follower)
    envoy.wait_ready()
    set_weights(leader, 30, 10)
    wait_both((envoy, envoy), {"production": 6000, "baseline": 1000, "canary": 3000}, "30/10")

    leader.process.signal(signal.SIGKILL)
    wait_for(
        lambda: any("took over the rollout controller" in m for m in follower.messages()),
        "the follower to take over",
        timeout=20,
    )
    # It serves what was committed, and now it decides.
    assert routed(envoy) == {"production": 6000, "baseline": 1000, "canary": 3000}
    after = set_weights(follower, 50, 0)
    assert split(after) == {r: (50, 0, 50) for r in REGIONS}
    wait_both((envoy, envoy), {"production": 5000, "canary": 5000}, "50% set via the new leader")
    assert follower.process.stop(10) == 0, follower.process.tail()
