"""The server of one worker of `serve --workers N` (`workers.py` has its parts,
`supervisor.py` the parent that runs N of them): on SQLite, a one-process deployment
whose spec, weights and versions go through the workers' board; on etcd, a replica
named after the host's replica id and its index, one of the host's workers."""

from __future__ import annotations

import time
from dataclasses import replace

from xds_server.app.board import Board
from xds_server.app.electors import LockFileElector
from xds_server.app.metrics import ProcessMetrics
from xds_server.app.options import ServeOptions
from xds_server.app.server import Deployment, Server, _default_replica_id, _publisher, replica
from xds_server.app.supervisor import WorkerId
from xds_server.app.workers import (
    BoardDataPlane,
    BoardFollower,
    BoardPeers,
    EtcdSiblings,
    Generations,
    HostLock,
    WorkerRole,
    WorkerSpecSource,
)
from xds_server.rollout.store import Store

TAKEOVER_POLL = 0.25
"""How often a worker tries the controller's lock (a dead leader's successor)."""


def local_worker(options: ServeOptions, me: WorkerId) -> Server:
    """Worker `me` on SQLite under `options.state_dir`. Its first snapshots are the
    board's row (what the leader serves, under its versions) when there is one."""
    assert options.spec_path is not None, "workers on SQLite serve a spec file"
    options.state_dir.mkdir(parents=True, exist_ok=True)
    board = Board.in_dir(options.state_dir)
    read_at = time.time()
    served = board.served()
    servers: list[Server] = []

    def leading() -> bool:
        return bool(servers) and servers[0].leader is not None

    specs = WorkerSpecSource(options.spec_path, served, leading)
    generations = Generations(served, read_at)
    publisher = _publisher(
        options,
        specs.spec,
        traffic=served.traffic if served is not None else None,
        routes_version=generations.version,
    )
    peers = BoardPeers(board, me, publisher, options.xds_address)
    peers.leading = leading
    store = Store.in_dir(options.state_dir)
    follower = BoardFollower(store, publisher, board, specs, generations)
    role = WorkerRole(me, peers)
    role.on_ports.append(lambda admin: setattr(peers, "admin", admin))

    async def close() -> None:
        store.close()
        board.close()

    server = Server(
        options,
        Deployment(
            store=store,
            specs=specs,
            elector=LockFileElector(options.state_dir, TAKEOVER_POLL),
            publisher=publisher,
            metrics=ProcessMetrics.create(),
            leader_dataplane=BoardDataPlane(publisher, peers, specs, generations),
            watched=True,  # (the board is followed, not the store)
            background=[peers.run, lambda: follower.watch(leading)],
            close=close,
            follower=follower,
            worker=role,
        ),
    )
    servers.append(server)
    return server


async def replica_worker(options: ServeOptions, me: WorkerId) -> Server:
    """Worker `me` as a replica on etcd: `REPLICA_ID.wINDEX` (the host's replica id,
    `--replica-id` or host-port); it campaigns only while it holds the host's lock."""
    group = f"{options.replica_id or _default_replica_id(options.xds_address)}.w"
    server = await replica(replace(options, replica_id=f"{group}{me.index}"))
    directory = server.deployment.directory
    assert directory is not None
    role = WorkerRole(me, EtcdSiblings(directory, group), HostLock(options.state_dir))
    server.deployment.worker = role
    server.view.listing = role.listing
    return server
