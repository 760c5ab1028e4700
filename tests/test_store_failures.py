"""A full state disk, for real: the SQLite store on a small tmpfs that the test fills.

The controller runs over the in-memory data plane and metric source of
tests/test_controller.py; the disk, the file system and SQLite are real. What must hold:
the in-memory state never runs ahead of the store, a step forward is never pushed
without its commit, a rollback is pushed whatever the store says (and committed with
the room the store keeps for it, or as soon as the disk has room again), and a restart
never brings back canary weights after such a rollback.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import wait_for
from xds_server.lab.procs import Process, free_port
from xds_server.rollout.controller import StoreUnavailable
from xds_server.rollout.state import PROGRESSING, ROLLED_BACK, RolloutState
from xds_server.rollout.store import RESERVE_NAME
from xds_server.traffic import PRODUCTION_ONLY

from .test_controller import AT_20, CANARY, SERVICE, STEP_DURATION, Rig, everywhere, make_rig, run

DISK = "24m"


def _privileged(*argv: str) -> None:
    cmd = list(argv) if os.geteuid() == 0 else ["sudo", "-n", *argv]
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A fresh 24 MiB tmpfs: a disk the test can fill (mounting needs root, as CI is)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    _privileged("mount", "-t", "tmpfs", "-o", f"size={DISK},mode=0777", "tmpfs", str(mount))
    try:
        yield mount
    finally:
        _privileged("umount", "-l", str(mount))


def fill(disk: Path) -> Path:
    """Take every free byte of the disk; returns the file to delete to give them back."""
    filler = disk / "filler"
    chunk = b"\0" * 65536
    with open(filler, "wb", buffering=0) as f:
        for _ in range(100_000):  # far more than the disk: bounded, ends at ENOSPC
            try:
                f.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
        else:
            raise AssertionError("the disk never filled up")
    with contextlib.suppress(OSError), open(disk / "crumbs", "wb", buffering=0) as f:
        for _ in range(1000):
            f.write(b"\0" * 512)
            f.flush()
    return filler


def where(state: RolloutState) -> tuple[object, ...]:
    """Where a rollout stands: what it announces and serves."""
    return (state.phase, {r: (rs.phase, rs.step) for r, rs in state.regions.items()})


def at_step_one(disk: Path) -> Rig:
    r = make_rig(disk / "state")

    async def body() -> None:
        await r.start()
        await r.tick_until(lambda: r.state().regions["us-east"].step == 1)

    run(body())
    assert r.dataplane.traffic == everywhere(AT_20)
    return r


async def tick_until(r: Rig, done: Callable[[], bool], limit: int = 60) -> None:
    """Tick until `done()`; a tick whose decision the store refused changes nothing."""
    for _ in range(limit):
        if done():
            return
        with contextlib.suppress(StoreUnavailable):
            await r.tick()
    raise AssertionError(f"not done after {limit} ticks: {r.state()}")


async def tick_until_the_store_fails(r: Rig) -> None:
    """Every tick writes its checks; the first write that needs a new block fails."""
    await tick_until(r, lambda: not r.controller.store_health.ok)


def test_a_full_disk_never_lets_a_step_run_ahead_of_its_commit(small_disk: Path) -> None:
    r = at_step_one(small_disk)
    filler = fill(small_disk)

    async def body() -> None:
        await tick_until_the_store_fails(r)
        pushes = len(r.pushes)
        for _ in range(int(STEP_DURATION) * 3):  # the step has long passed, in memory
            with contextlib.suppress(StoreUnavailable):
                await r.tick()
        # Nothing announced, nothing pushed; in memory, the rollout stands where the
        # store says (only the step's books, its clock and checks, may be newer).
        stored = r.store.rollout(SERVICE, CANARY)
        assert stored is not None and where(r.state()) == where(stored)
        assert {rs.step for rs in r.state().regions.values()} == {1}
        assert len(r.pushes) == pushes and r.dataplane.traffic == everywhere(AT_20)
        health = r.controller.store_health
        assert not health.ok and "full" in health.error and health.failed_writes >= 2
        with pytest.raises(StoreUnavailable, match="nothing was changed"):
            r.controller.pause(SERVICE, "while the disk is full", "test")
        assert r.state().phase == PROGRESSING
        # Space comes back: the next tick catches up, level-triggered.
        filler.unlink()
        (small_disk / "crumbs").unlink()
        await tick_until(r, lambda: r.state().regions["us-east"].step == 2, limit=10)
        assert r.controller.store_health.ok
        assert r.store.rollout(SERVICE, CANARY) == r.state()
        assert (small_disk / "state" / RESERVE_NAME).exists()

    run(body())
    r.store.close()


def test_a_rollback_on_a_full_disk_is_pushed_and_committed_from_the_reserve(
    small_disk: Path,
) -> None:
    r = at_step_one(small_disk)
    fill(small_disk)

    async def body() -> None:
        await tick_until_the_store_fails(r)
        r.metrics.bad.add("eu-west")
        await tick_until(r, lambda: r.state().phase == ROLLED_BACK, limit=5)
        assert r.dataplane.traffic == everywhere(PRODUCTION_ONLY)
        stored = r.store.rollout(SERVICE, CANARY)
        assert stored is not None and stored.phase == ROLLED_BACK
        assert not (small_disk / "state" / RESERVE_NAME).exists()  # spent on it
        assert r.controller.store_health.unsaved_rollbacks == 0

    run(body())
    r.store.close()


def test_an_unsaved_rollback_is_saved_when_space_returns_and_survives_a_restart(
    small_disk: Path,
) -> None:
    r = at_step_one(small_disk)
    (small_disk / "state" / RESERVE_NAME).unlink()  # no reserve: nothing can be written
    filler = fill(small_disk)

    async def body() -> None:
        await tick_until_the_store_fails(r)
        r.metrics.bad.add("eu-west")
        await tick_until(r, lambda: r.state().phase == ROLLED_BACK, limit=5)
        assert r.dataplane.traffic == everywhere(PRODUCTION_ONLY)  # safety first
        stored = r.store.rollout(SERVICE, CANARY)
        assert stored is not None and stored.phase == PROGRESSING  # not written yet
        assert r.controller.store_health.unsaved_rollbacks == 1
        r.controller.retry_store()
        assert r.controller.store_health.unsaved_rollbacks == 1  # still full
        filler.unlink()
        (small_disk / "crumbs").unlink()
        r.clock.advance(5)
        r.controller.retry_store()
        assert r.controller.store_health.ok
        assert r.controller.store_health.unsaved_rollbacks == 0
        again = r.store.rollout(SERVICE, CANARY)
        assert again is not None and again.phase == ROLLED_BACK
        rollback = [e for e in r.store.audit(SERVICE) if e.phase_to == ROLLED_BACK]
        assert rollback and all("eu-west" in e.reason for e in rollback)

    run(body())
    r.store.close()
    restarted = make_rig(small_disk / "state")
    run(restarted.start())
    assert restarted.state().phase == ROLLED_BACK
    assert all(split.canary == 0 for split in restarted.dataplane.traffic.splits.values())
    restarted.store.close()


def test_serve_on_a_full_disk_says_so_and_refuses_changes(
    small_disk: Path, tmp_path: Path, spec_file: Path
) -> None:
    """Through the real `xds-server serve` and `xdsctl`: `status` names the failing store,
    a pause is refused with UNAVAILABLE and changes nothing; once the disk has room, both
    work again."""
    doc = yaml.safe_load(spec_file.read_text())
    doc["rollout"] = {"interval": "500ms", "step_duration": "10m", "max_hold": "10m"}
    spec_file.write_text(yaml.safe_dump(doc))
    admin = free_port()
    server = Process(
        "server",
        [sys.executable, "-m", "xds_server.cli", "serve", "--spec", str(spec_file),
         "--state-dir", str(small_disk / "state"),
         "--xds-address", f"127.0.0.1:{free_port()}",
         "--admin-address", f"127.0.0.1:{admin}", "--metrics-address", "127.0.0.1:0",
         "--prometheus-url", f"http://127.0.0.1:{free_port()}"],
        tmp_path / "server.log",
    )  # fmt: skip

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "xds_server.ctl", "--server", f"127.0.0.1:{admin}", *args],
            capture_output=True,
            text=True,
            timeout=30,
        )

    def status() -> dict[str, Any]:
        res = ctl("--output", "json", "status")
        return json.loads(res.stdout) if res.returncode == 0 else {}

    try:
        wait_for(lambda: status().get("rollouts"), "the rollout to start", timeout=30)
        filler = fill(small_disk)
        failing = wait_for(
            lambda: (s := status()) and not s["store"]["writable"] and s,
            "a failing store",
            timeout=30,
        )
        assert "full" in failing["store"]["error"]
        assert "state store: FAILING" in ctl("status").stdout
        refused = ctl("rollout", "pause", "recommender", "--reason", "disk full")
        assert refused.returncode == 1
        assert refused.stderr.startswith("xdsctl: UNAVAILABLE: the state store cannot be written")
        assert "nothing was changed" in refused.stderr
        assert status()["rollouts"][0]["phase"] == "progressing"
        filler.unlink()
        (small_disk / "crumbs").unlink()
        wait_for(lambda: status()["store"]["writable"], "the store to work again", timeout=30)
        assert ctl("rollout", "pause", "recommender", "--reason", "room again").returncode == 0
        assert status()["rollouts"][0]["phase"] == "paused"
    finally:
        server.stop()
