"""A pause step and the bake window end to end: `xds-server serve`, real Envoys, a real
Prometheus, model servers whose faults the test controls, `xdsctl` for the promote."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import wait_for
from xds_server.lab.layout import MeshOptions
from xds_server.lab.mesh import LocalMesh
from xds_server.lab.procs import Envoy, http_get
from xds_server.lab.scenarios import FAST_PLAN
from xds_server.lab.traffic import envoy_weights

CTL = [sys.executable, "-m", "xds_server.ctl"]
PLAN = {**FAST_PLAN, "steps": [5, {"pause": "until_promoted"}, 50, 100], "bake": "10m"}


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[LocalMesh]:
    opts = MeshOptions(regions=("us-east", "eu-west"), rollout=PLAN, load_rate=40)
    m = LocalMesh(tmp_path / "mesh", opts)
    with m:
        load = m.processes.start_load(max_seconds=300)
        wait_for(lambda: len(load.snapshot()) >= 20, "load through every Envoy", timeout=15)
        yield m


def checks_since(mesh: LocalMesh, entry_id: int, text: str) -> int:
    return sum(1 for e in mesh.state.audit(after_id=entry_id) if text in e.reason)


def production_cluster_kept(envoy: Envoy) -> bool:
    """The old production cluster is still in this Envoy's config, with healthy hosts."""
    status, body, _ = http_get(f"{envoy.admin}/clusters")
    prefix = "recommender|production::"
    return status == 200 and any(
        line.startswith(prefix) and line.endswith("::health_flags::healthy")
        for line in body.decode().splitlines()
    )


def every_envoy(mesh: LocalMesh, weights: dict[str, int]) -> bool:
    return all(envoy_weights(e) == weights for e in mesh.processes.envoys)


def test_a_pause_step_holds_until_promoted_and_a_breach_in_the_bake_rolls_back(
    mesh: LocalMesh,
) -> None:
    mesh.spec.add_canary()

    def holding() -> int | None:
        hold = [e for e in mesh.state.audit() if "pause until promoted" in e.reason]
        return hold[-1].id if len(hold) == len(mesh.opts.regions) else None

    hold_id = wait_for(holding, "every region holding at the pause", timeout=60)
    at_5 = {"production": 9000, "baseline": 500, "canary": 500}
    # It holds: the canary keeps being judged at 5% (passing checks pile up), no step.
    wait_for(lambda: checks_since(mesh, hold_id, "step 0 (5%): pass") >= 6, "checks", timeout=30)
    state = mesh.state.rollout()
    assert state is not None and {r["step"] for r in state["regions"].values()} == {0}
    assert every_envoy(mesh, at_5)

    argv = [*CTL, "--server", f"127.0.0.1:{mesh.layout.admin_port}", "rollout", "promote"]
    argv += ["recommender", "--reason", "the testers are happy"]
    promote = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert promote.returncode == 0, promote.stderr
    at_50 = {"baseline": 5000, "canary": 5000}  # (a pool at 0% is not in the route)
    wait_for(lambda: every_envoy(mesh, at_50), "50% on every Envoy", timeout=30)

    # The last step passes; the bake holds at 100% with production kept at weight 0.
    wait_for(
        lambda: sum(1 for e in mesh.state.audit() if e.reason.startswith("baking at 100%")) == 2,
        "every region baking",
        timeout=60,
    )
    assert every_envoy(mesh, {"canary": 10000})
    assert all(production_cluster_kept(e) for e in mesh.processes.envoys), (
        "old production kept warm"
    )
    state = mesh.state.rollout()
    assert state is not None and state["phase"] == "progressing"

    # A breach while baking: back to the old production, in one push, everywhere.
    mesh.faults.set("eu-west", "canary", error_rate=0.6)
    final = mesh.state.wait_phase({"rolled_back", "promoted"}, 60)
    assert final["phase"] == "rolled_back", final
    production = {"production": 10000}
    wait_for(lambda: every_envoy(mesh, production), "production only on every Envoy", timeout=15)
    cause = [e for e in mesh.state.audit() if e.phase_to == "rolled_back" and e.verdict]
    assert cause and cause[0].region == "eu-west" and cause[0].step == 2
