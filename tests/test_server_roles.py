"""The one server of both deployments, on the one-process deployment (SQLite, a lock
file): leadership comes with a `LeaderRuntime` that runs the controller and every
leader-only sink, goes with it, and the read-only view follows.

A leader sink is added by one entry in `app.leader.LEADER_SINKS`; here a recording sink
is added the same way (to the process's builders) and must be followed, run and closed
with the leadership term, with nothing else wired."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

from tests.support import wait_for_async
from xds_server.app import ServeOptions, local
from xds_server.app.leader import LeaderSink
from xds_server.rollout.ports import Committed
from xds_server.spec import MeshSpec

from .conftest import REGIONS, make_spec_doc, write_spec


class RecordingSink:
    def __init__(self) -> None:
        self.followed: list[Committed] = []
        self.running = asyncio.Event()
        self.cancelled = False
        self.closed: list[float] = []

    def follow(self, event: Committed) -> None:
        self.followed.append(event)

    async def run(self) -> None:
        self.running.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise

    def close(self, timeout: float) -> None:
        self.closed.append(timeout)


def options(tmp_path: Path) -> ServeOptions:
    spec = tmp_path / "mesh.yaml"
    write_spec(spec, make_spec_doc({(r, p): 9 for r in REGIONS for p in ("production", "canary")}))
    return ServeOptions(spec_path=spec, state_dir=tmp_path / "state", metrics_address=None)


def test_a_leader_sink_lives_and_dies_with_the_leadership_term(tmp_path: Path) -> None:
    server = local(options(tmp_path))
    built: list[RecordingSink] = []

    def recording(spec: MeshSpec) -> LeaderSink:
        del spec
        built.append(RecordingSink())
        return built[-1]

    server.metrics = replace(server.metrics, sinks=(*server.metrics.sinks, recording))

    async def main() -> None:
        assert server.view.controller is None and built == []
        server.elected()
        assert server.view.controller is not None
        (sink,) = built
        assert len(sink.followed) == 1, "the committed state restored once, before any tick"
        await asyncio.wait_for(sink.running.wait(), 5)
        assert sink.followed, "restore tells the sinks what it serves"
        seen = len(sink.followed)
        server.view.controller.spec_changed()
        assert len(sink.followed) == seen + 1
        server.deposed("test: another process leads")
        await wait_for_async(lambda: sink.cancelled, "the sink's run cancelled", timeout=5)
        assert sink.closed == [0]
        assert server.view.controller is None and server.leader is None
        server.elected()  # a new term builds new sinks
        assert len(built) == 2 and built[1] is not sink
        server.deposed("test: done")

    asyncio.run(main())


def test_only_one_process_on_a_state_directory_leads(tmp_path: Path) -> None:
    opts = options(tmp_path)
    first, second = local(opts), local(opts)
    assert first.deployment.elector.lead_now()
    assert not second.deployment.elector.lead_now()
    assert first.deployment.elector.lead_now()  # held, and asking again keeps it
