"""What many test files share: one way to wait for something, one way to watch that
something stays true, the rollout readings tests compare (the steps its regions are at,
the Envoys' canary share), a plan with one metric changed, a lab mesh under load, and
`xdsctl xds fetch`, and an earlier release's code to run processes of (upgrade tests).

No test sleeps to synchronise: every wait polls with a deadline. `wait_for` polls from
the test's thread; `wait_for_async` polls on a running event loop, between the turns of
the tasks whose state the predicate reads. Both take the same arguments in the same
order, `(predicate, what, timeout=..., interval=...)`, and fail the same way.

The lab is imported inside the helpers that use it: a test of the control plane imports
this module without the lab's optional extra.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from xds_server.lab.polling import INTERVAL
from xds_server.lab.polling import wait_for as wait_for
from xds_server.lab.polling import wait_for_async as wait_for_async

if TYPE_CHECKING:
    from xds_server.lab.background import BackgroundServer
    from xds_server.lab.mesh import LocalMesh
    from xds_server.lab.procs import Envoy
    from xds_server.rollout.state import RolloutState
    from xds_server.spec import RolloutPlan

T = TypeVar("T")


def holds_for(check: Callable[[], None], seconds: float, *, interval: float = 0.2) -> None:
    """A bounded observation: run `check` (it asserts) every `interval` for `seconds`.
    For what must *not* happen for a while: nothing advances, no weight moves."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        check()
        time.sleep(interval)  # the poll period of the observation, bounded by its deadline


def wait_shares(
    envoys: Iterable[Envoy], share: float, *, timeout: float = 10, interval: float = INTERVAL
) -> None:
    """Wait until each of these Envoys routes `share` percent to the canary, by the
    routes it applied (its config dump)."""
    from xds_server.lab.traffic import canary_share

    envoys = list(envoys)
    wait_for(
        lambda: all(canary_share(e) == share for e in envoys),
        f"{share:g}% canary in {[e.opts.node_id for e in envoys]}",
        timeout=timeout,
        interval=interval,
    )


def set_canary(server: BackgroundServer, percent: float, *, urgent: bool = True) -> None:
    """Weights by hand on an in-process server: `percent` of the recommender's requests
    to its canary, the rest to production (urgent: pushed at once, as a rollout's step)."""
    from xds_server.traffic import Split

    split = Split.from_percent({"canary": percent})
    server.call(lambda: server.server.set_split("recommender", split, urgent=urgent))


def xds_fetch(
    xds_address: str, region: str, kind: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`xdsctl xds fetch`: what the xDS server at `xds_address` sends `region`'s Envoys
    (of one `kind`: cluster, endpoint, route...), as JSON on stdout."""
    argv = [sys.executable, "-m", "xds_server.ctl", "xds", "fetch", "--region", region]
    argv += ["--xds-server", xds_address, *(["--type", kind] if kind else [])]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def with_metric(plan: RolloutPlan, name: str, **changes: Any) -> RolloutPlan:
    """`plan` with one of its analysis metrics changed (`on_no_data="fail"`, say)."""
    metrics = tuple(replace(m, **changes) if m.name == name else m for m in plan.analysis.metrics)
    return replace(plan, analysis=replace(plan.analysis, metrics=metrics))


def steps(state: RolloutState) -> set[int]:
    """The steps a rollout's regions are at: one element while they move in lockstep."""
    return {rs.step for rs in state.regions.values()}


def mesh_steps(mesh: LocalMesh) -> set[int]:
    """The steps of a lab mesh's rollout, as its committed state says (empty before the
    rollout starts)."""
    state = mesh.state.rollout()
    return {r["step"] for r in state["regions"].values()} if state else set()


@contextmanager
def mesh_under_load(workdir: Path, plan: Mapping[str, Any]) -> Iterator[LocalMesh]:
    """A lab mesh whose rollouts follow `plan`, with 50 requests/s through its Envoys
    (30 of them seen before it is handed over)."""
    from xds_server.lab.layout import MeshOptions
    from xds_server.lab.mesh import LocalMesh

    with LocalMesh(workdir, MeshOptions(rollout=dict(plan), load_rate=50)) as mesh:
        load = mesh.processes.start_load()
        wait_for(lambda: len(load.snapshot()) >= 30, "load through every Envoy", timeout=10)
        yield mesh


# ---- an earlier release (rolling upgrades) ----

REPO = Path(__file__).resolve().parents[1]


def release_tree(commit: str, into: Path) -> Path:
    """The package as it was at `commit`, unpacked under `into` (returned): an earlier
    release to upgrade from, taken from this clone's history (`git archive`), so a test
    needs no recorded copy. A shallow clone lacks it: the error says so."""
    got = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", commit, "xds_server"],
        capture_output=True,
        timeout=60,
    )
    if got.returncode != 0:
        raise RuntimeError(
            f"git archive {commit}: {got.stderr.decode(errors='replace').strip()} "
            "(the upgrade test needs the repository's history: not a shallow clone)"
        )
    into.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(got.stdout)) as tar:
        tar.extractall(into, filter="data")
    return into


def release_env(tree: Path) -> dict[str, str]:
    """What makes `python -m xds_server...` (this venv's interpreter) run `tree`'s code:
    `tree` first on the path, and no current directory there (PYTHONSAFEPATH: `-m`
    would put a checkout's own package first when run from it)."""
    return {"PYTHONPATH": str(tree), "PYTHONSAFEPATH": "1"}


@contextmanager
def started_with(env: Mapping[str, str]) -> Iterator[None]:
    """Processes started inside get `env` on top of this process's environment (the lab
    starts its processes with this process's: an older release's replicas, say)."""
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
