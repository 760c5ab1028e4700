"""etcd full (issue 30), end to end: the rollback path still works when etcd raises NOSPACE.

One mesh on replicas (`tests/test_ha_faults.py`'s kind, at its smallest: two regions, an
Envoy each, the rollout tests' fast plan) on a three-member etcd started with an 8 MiB
`--quota-backend-bytes`. Mid-rollout a writer outside the replicas' prefix fills etcd
with data of its own until NOSPACE: data that compaction and defragmentation cannot take
back, so the leader cannot make room by itself. The alarm shows on a follower's
`/metrics` and in `xdsctl status`, and no replica steps aside (each reaches etcd, which
only refuses writes). The canary of the leader's region then fails: the rollback is
pushed at once to the Envoys the leader serves, though it cannot be written; the
follower's Envoy, which gets only what is committed, keeps the canary. An operator
deletes the data: the leader makes room (compaction, defragmentation, the alarm
disarmed), writes the rollback before anything else, and the follower's Envoy follows.
(The leader making room by itself, when history fills etcd: tests/test_store_maintenance.py.)
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from aetcd import rpc

from tests.support import wait_for, wait_shares
from tests.test_ha_faults import ha_options, placement, recent, start_load, wait_step
from xds_server.ha.maintenance import is_nospace
from xds_server.lab.etcd import EtcdCluster
from xds_server.lab.mesh import LocalMesh
from xds_server.lab.procs import http_get
from xds_server.lab.traffic import canary_share

MIB = 1024**2
QUOTA = 8 * MIB
REGIONS = ("us-east", "eu-west")
ALARM = 'xds_etcd_alarm{alarm="NOSPACE"} 1.0'
FILLER = b"/filler/"


def fill(etcd: EtcdCluster) -> int:
    """New 64 KiB keys under FILLER until etcd's data itself is 97% of its quota (no
    compaction or defragmentation can make room then); how many. Each time etcd refuses
    one for NOSPACE before that, the filler makes room itself (compacts, defragments
    each member, disarms), as the leader would."""
    members = [grpc.insecure_channel(m.client_address) for m in etcd.members]
    try:
        kv = rpc.KVStub(members[0])
        for n in range(1000):
            try:
                kv.Put(rpc.PutRequest(key=FILLER + b"%d" % n, value=b"x" * 65536), timeout=5)
            except grpc.RpcError as exc:
                assert is_nospace(exc), exc
                if make_room(kv, [rpc.MaintenanceStub(c) for c in members]) >= 0.97 * QUOTA:
                    return n
    finally:
        for channel in members:
            channel.close()
    raise AssertionError("etcd took 64 MiB: is its quota set?")


def make_room(kv: rpc.KVStub, members: list[rpc.MaintenanceStub]) -> int:
    """Compact, defragment every member and disarm; the largest member's data in use."""
    revision = members[0].Status(rpc.StatusRequest(), timeout=5).header.revision
    with contextlib.suppress(grpc.RpcError):  # (compacted there already: the leader)
        kv.Compact(rpc.CompactionRequest(revision=revision, physical=True), timeout=10)
    used = 0
    for member in members:
        member.Defragment(rpc.DefragmentRequest(), timeout=10)
        used = max(used, member.Status(rpc.StatusRequest(), timeout=5).dbSizeInUse)
    if used < 0.97 * QUOTA:
        raised = members[0].Alarm(rpc.AlarmRequest(action=rpc.AlarmRequest.GET), timeout=5)
        for a in raised.alarms:
            request = rpc.AlarmRequest(
                action=rpc.AlarmRequest.DEACTIVATE, memberID=a.memberID, alarm=a.alarm
            )
            members[0].Alarm(request, timeout=5)
    return int(used)


def delete_filler(etcd: EtcdCluster) -> None:
    """What an operator does (etcd takes deletions under NOSPACE)."""
    with grpc.insecure_channel(etcd.members[0].client_address) as channel:
        end = FILLER[:-1] + b"0"
        rpc.KVStub(channel).DeleteRange(rpc.DeleteRangeRequest(key=FILLER, range_end=end))


def metrics(mesh: LocalMesh, region: str) -> str:
    port = mesh.layout.replica_ports[region]["metrics"]
    return http_get(f"http://127.0.0.1:{port}/metrics")[1].decode()


def xdsctl_status(mesh: LocalMesh, region: str) -> dict[str, object]:
    admin = f"127.0.0.1:{mesh.layout.replica_ports[region]['admin']}"
    argv = [sys.executable, "-m", "xds_server.ctl", "--server", admin, "-o", "json", "status"]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return dict(json.loads(res.stdout))


def alarms(status: dict[str, object]) -> list[str]:
    etcd = status.get("etcd")
    return [a["alarm"] for a in etcd.get("alarms", [])] if isinstance(etcd, dict) else []


def alarmed(status: dict[str, object]) -> dict[str, object] | None:
    return status if alarms(status) else None


@pytest.mark.timeout(180)
def test_a_canary_fault_is_rolled_back_while_etcd_is_full(tmp_path: Path) -> None:
    with LocalMesh(tmp_path / "mesh", replace(ha_options(REGIONS), etcd_quota_bytes=QUOTA)) as mesh:
        etcd = mesh.processes.etcd
        assert etcd is not None
        load = start_load(mesh)
        leader = mesh.state.wait_leader()
        (follower,) = [r for r in REGIONS if r != leader]
        mesh.spec.add_canary()
        wait_step(mesh, 1, 60)
        wait_shares(mesh.processes.envoys, 20)
        where = placement(mesh)
        leaders = [e for e in mesh.processes.envoys if where[e.opts.node_id] == leader]
        followers = [e for e in mesh.processes.envoys if where[e.opts.node_id] == follower]
        assert leaders and followers, where

        # etcd full of data not ours: seen at once, on a follower too.
        keys = fill(etcd)
        wait_for(
            lambda: ALARM in metrics(mesh, follower),
            "NOSPACE on a follower's /metrics",
            timeout=10,
            interval=0.05,
        )
        status = wait_for(
            lambda: alarmed(xdsctl_status(mesh, follower)), "NOSPACE in xdsctl status", timeout=20
        )
        assert set(alarms(status)) == {"NOSPACE"}, status  # (one per member that raised it)

        # The canary fails: the rollback reaches the leader's Envoys though it cannot be
        # written; the follower's Envoy (what is committed) keeps the canary meanwhile.
        mesh.faults.set(leader, "canary", error_rate=1.0)
        fault_at = time.monotonic()
        wait_shares(leaders, 0, timeout=30)
        pushed = time.monotonic() - fault_at
        assert {canary_share(e) for e in followers} == {20}, recent(mesh)
        assert mesh.state.rollout()["phase"] == "progressing"  # (not written)
        held = xdsctl_status(mesh, leader)
        assert held["store"]["unsaved_rollbacks"] == 1, held["store"]  # type: ignore[index]
        assert "no room made" in held["etcd"]["last_recovery"], held["etcd"]  # type: ignore[index]

        # An operator deletes the data: room is made, the rollback written first.
        delete_filler(etcd)
        deleted = time.monotonic()
        wait_shares(followers, 0, timeout=20)
        written = time.monotonic() - deleted
        assert mesh.state.rollout()["phase"] == "rolled_back", recent(mesh)
        wait_for(lambda: ALARM not in metrics(mesh, follower), "NOSPACE cleared", timeout=10)
        assert not alarms(xdsctl_status(mesh, follower))
        print(f"\n{keys} keys of 64 KiB to a NOSPACE no compaction clears; the rollback at "
              f"the leader's Envoys {pushed:.2f}s after the fault, at the follower's "
              f"{written:.2f}s after the data went")  # fmt: skip
        logs = {r: p.log_path.read_text() for r, p in mesh.processes.replicas.items()}
        for region, text in logs.items():  # (each reached etcd: none stepped aside)
            assert "stepping aside" not in text, (region, text[-2000:])
        assert "NOSPACE disarmed" in logs[leader]
        assert "saved the rollback of recommender v2 pushed while" in logs[leader]
        failed = load.failures()  # (only the failing canary's requests, in its region)
        assert all(f.target.startswith(leader) for f in failed), failed[:5]
