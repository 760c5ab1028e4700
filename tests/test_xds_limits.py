"""What one client can make the xDS port hold, log and answer (issue 19, findings 4 and 8).

- Memory: a churn of streams, each subscribing to the most names a stream may, one after
  another and each closed after its answer, leaves the server (a real process, its RSS
  read from /proc) no bigger; a subscription past the limit ends with RESOURCE_EXHAUSTED.
- Hygiene: a 1 MB NACK is kept and logged cut short; a 20,000-character region gets
  INVALID_ARGUMENT with a short message; an empty type_url ends the stream with
  INVALID_ARGUMENT; an unknown type_url gets an empty answer (SotW and delta).

Every client is a real gRPC client over loopback; nothing sleeps to synchronise.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.support import wait_for
from xds_server.lab.procs import Process
from xds_server.spec import validate_spec
from xds_server.xds.publisher import XdsPublisher
from xds_server.xds.snapshot import MAX_LISTEN_ADDRESSES_CACHED
from xds_server.xds.status import NACK_ERROR_LIMIT
from xds_server.xds.stream import MAX_NAMES_PER_TYPE, shared_names
from xds_server.xds.types import CLUSTER, ENDPOINT, LISTENER

from .conftest import AdsClient, DeltaClient, ServerThread, make_spec_doc

SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

# ---- finding 4: memory held per subscription ----

SERVER_SCRIPT = """
import asyncio, json, logging, sys
from xds_server.spec import validate_spec
from xds_server.xds.publisher import XdsPublisher

async def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s %(message)s")
    publisher = XdsPublisher(validate_spec(json.loads(sys.argv[1]), "limits"))
    port = await publisher.start("127.0.0.1:0")
    print(f"listening on port {port}", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""

WARM_UP_STREAMS = 6
CHURN_STREAMS = 30
GROWTH_BOUND_MB = 30


class ServerProcess:
    """The publisher in a process of its own, so its RSS is its alone."""

    def __init__(self, workdir: Path) -> None:
        doc = make_spec_doc({("us-east", "production"): 9}, ("production",), ("us-east",))
        script = workdir / "serve.py"
        script.write_text(SERVER_SCRIPT)
        self.process = Process(
            "xds-server", [sys.executable, str(script), json.dumps(doc)], workdir / "server.log"
        )
        self.port = int(
            wait_for(
                lambda: self._log_word("listening on port "), "the server to listen", timeout=30
            )
        )

    def _log_word(self, after: str) -> str | None:
        assert self.process.alive(), self.process.tail()
        text = self.log()
        return text.split(after, 1)[1].split()[0] if after in text else None

    def log(self) -> str:
        return self.process.log_path.read_text(errors="replace")

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        (line,) = [x for x in status.splitlines() if x.startswith("VmRSS:")]
        return int(line.split()[1]) / 1024

    def wait_disconnects(self, count: int) -> None:
        wait_for(
            lambda: self.log().count("node disconnected:") >= count,
            f"the server to see {count} streams end",
            timeout=30,
        )


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path)
    yield server
    server.process.stop()


def subscribe_once(port: int, index: int, delta: bool) -> None:
    """One stream: the most endpoint names a stream may ask for, none of which exists
    (distinct per stream: every stream makes the server build a new name set); wait for
    the answer, close."""
    names = [f"stream-{index:03d}/cluster-{j:05d}/{'x' * 40}" for j in range(MAX_NAMES_PER_TYPE)]
    if delta:
        d = DeltaClient(port, node_id=f"churn-{index}")
        try:
            d.send(ENDPOINT, subscribe=names)
            r = d.recv(timeout=20)
            assert r.type_url == ENDPOINT and len(r.removed_resources) == len(names)
        finally:
            d.close()
    else:
        c = AdsClient(port, node_id=f"churn-{index}")
        try:
            c.send(ENDPOINT, names)
            r = c.recv(timeout=20)
            assert r.type_url == ENDPOINT and len(r.resources) == 0
        finally:
            c.close()


def churn(server: ServerProcess, first: int, count: int) -> None:
    """`count` streams one after another, alternately state of the world and delta."""
    for i in range(first, first + count):
        subscribe_once(server.port, i, delta=i % 2 == 1)
    server.wait_disconnects(first + count)


def test_a_churn_of_large_subscriptions_leaves_the_server_no_bigger(
    server_process: ServerProcess,
) -> None:
    start = time.monotonic()
    churn(server_process, 0, WARM_UP_STREAMS)
    settled = server_process.rss_mb()
    churn(server_process, WARM_UP_STREAMS, CHURN_STREAMS)
    after = server_process.rss_mb()
    print(f"server RSS: {settled:.1f} MB after {WARM_UP_STREAMS} streams, {after:.1f} MB after")
    # Before the fix each of these streams left its names behind (some 2.5 MB of them:
    # an interning cache and the snapshot's encodings keyed by name set); the 30 add
    # up to about 75 MB.
    assert after - settled < GROWTH_BOUND_MB, (
        f"RSS grew {after - settled:.1f} MB over {CHURN_STREAMS} streams "
        f"({settled:.1f} -> {after:.1f} MB)"
    )
    assert time.monotonic() - start < 60


def test_a_subscription_past_the_limit_is_refused_clearly(
    server: ServerThread,
    ads_clients: Callable[..., AdsClient],
    delta_clients: Callable[..., DeltaClient],
) -> None:
    too_many = [f"cluster-{j}" for j in range(MAX_NAMES_PER_TYPE + 1)]
    # State of the world, in the stream's first request and in a later one.
    first = ads_clients(server.port, node_id="greedy-first")
    first.send(ENDPOINT, too_many)
    later = ads_clients(server.port, node_id="greedy-later")
    later.send(CLUSTER)
    later.ack(later.recv())
    later.send(ENDPOINT, too_many)
    # Delta: the subscriptions of a stream count together.
    d = delta_clients(server.port, node_id="greedy-delta")
    half = MAX_NAMES_PER_TYPE // 2 + 1
    d.send(ENDPOINT, subscribe=too_many[:half])
    d.ack(d.recv())
    d.send(ENDPOINT, subscribe=too_many[half:])
    for client in (first, later, d):
        with pytest.raises(grpc.RpcError) as err:
            client.recv()
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.value.details() == (
            f"endpoint: the stream subscribes to {len(too_many)} resource names; this server "
            f"serves at most {MAX_NAMES_PER_TYPE} names per type on one stream"
        )
    wait_for(
        lambda: not server.call(lambda: server.server.nodes.nodes()),
        "the refused streams to be gone from the registry",
        timeout=5,
    )


def test_a_snapshot_caches_only_what_streams_hold() -> None:
    """The mechanism under the churn test: an encoding for a name set goes with the last
    holder of the set, and listeners are cached for a bounded number of addresses."""
    doc = make_spec_doc({("us-east", "production"): 9}, ("production",), ("us-east",))
    snap = XdsPublisher(validate_spec(doc, "limits")).snapshot("us-east")
    names = shared_names(["recommender|production", "no-such-cluster"])
    assert shared_names(["no-such-cluster", "recommender|production"]) is names
    encoded = snap.encoded(ENDPOINT, names)
    assert encoded.names == {"recommender|production"}
    assert snap.encoded(ENDPOINT, names) is encoded
    assert len(snap._by_names[ENDPOINT]) == 1
    del names
    assert len(snap._by_names[ENDPOINT]) == 0
    for port in range(1, MAX_LISTEN_ADDRESSES_CACHED + 101):
        snap.encoded(LISTENER, None, ("127.0.0.1", port))
        snap.delta_names(LISTENER, ("127.0.0.1", port))
    per_listen = MAX_LISTEN_ADDRESSES_CACHED
    assert len(snap._encoded) == len(snap._delta_out) == len(snap._delta_names) == per_listen


# ---- finding 8: log and error hygiene ----


def server_records(caplog: pytest.LogCaptureFixture, contains: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if contains in r.getMessage()]


@pytest.mark.parametrize("variant", ["sotw", "delta"])
def test_a_huge_nack_is_kept_and_logged_short(
    variant: str,
    server: ServerThread,
    ads_clients: Callable[..., AdsClient],
    delta_clients: Callable[..., DeltaClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="xds_server")
    huge = "no: " + "x" * 1_000_000
    c: Any = (ads_clients if variant == "sotw" else delta_clients)(server.port, node_id="fuzz")
    c.send(CLUSTER)
    r = c.recv()
    if variant == "sotw":
        c.send(CLUSTER, version="", nonce=r.nonce, error=huge)
    else:
        c.send(CLUSTER, nonce=r.nonce, error=huge)
    node = wait_for(
        lambda: next(
            (n for n in server.call(lambda: server.server.nodes.nodes()) if n.node_id == "fuzz"),
            None,
        ),
        "the node",
        timeout=5,
    )
    error = wait_for(lambda: node.types[CLUSTER].nack_error, "the NACK to be recorded", timeout=5)
    more = len(huge) - NACK_ERROR_LIMIT
    assert error == f"{huge[:NACK_ERROR_LIMIT]}... ({more} more characters)"
    (record,) = wait_for(
        lambda: server_records(caplog, "NACK from fuzz"), "the NACK log", timeout=5
    )
    assert len(record.getMessage()) < NACK_ERROR_LIMIT + 300
    assert record.getMessage().endswith(f"... ({more} more characters)")


@pytest.mark.parametrize("variant", ["sotw", "delta"])
def test_a_huge_region_or_node_id_gets_a_short_invalid_argument(
    variant: str,
    server: ServerThread,
    ads_clients: Callable[..., AdsClient],
    delta_clients: Callable[..., DeltaClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="xds_server")
    make: Any = ads_clients if variant == "sotw" else delta_clients
    region = "r" * 20_000
    c = make(server.port, region=region, node_id="n" * 20_000)
    c.send(CLUSTER)
    with pytest.raises(grpc.RpcError) as err:
        c.recv()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details()
    assert len(details) < 500, details
    assert f"region '{'r' * 100}'... (19900 more characters)" in details
    assert "which the mesh spec does not have (regions: us-east, eu-west, ap-south)" in details
    (record,) = wait_for(lambda: server_records(caplog, "refused stream"), "the log", timeout=5)
    assert len(record.getMessage()) < 600


@pytest.mark.parametrize("variant", ["sotw", "delta"])
def test_an_empty_type_url_ends_the_stream(
    variant: str,
    server: ServerThread,
    ads_clients: Callable[..., AdsClient],
    delta_clients: Callable[..., DeltaClient],
) -> None:
    """In the first request (delta) or a later one (state of the world)."""
    c: Any = (ads_clients if variant == "sotw" else delta_clients)(server.port)
    if variant == "sotw":
        c.send(CLUSTER)
        c.ack(c.recv())
    c.send("")
    with pytest.raises(grpc.RpcError) as err:
        for _ in range(2):  # (bounded: at most one answer may come before the status)
            c.recv()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "empty type_url" in err.value.details()
    assert "must name the resource type" in err.value.details()


def test_an_unknown_type_url_gets_an_empty_response_sotw(
    server: ServerThread, ads_clients: Callable[..., AdsClient], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="xds_server")
    c = ads_clients(server.port, node_id="asks-secrets")
    c.send(SECRET, ["server-cert"])
    r = c.recv()
    assert (r.type_url, r.version_info, len(r.resources)) == (SECRET, "0", 0)
    assert r.nonce
    # The ACK of the empty answer gets no answer: the next response is the clusters.
    c.ack(r, ["server-cert"])
    c.send(CLUSTER)
    assert c.recv().type_url == CLUSTER
    # Re-asking (no nonce) is answered again, with a nonce of its own.
    c.send(SECRET, ["other-cert"])
    again = c.recv()
    assert again.type_url == SECRET and again.nonce != r.nonce
    _logged_once(caplog, "asks-secrets")


def test_an_unknown_type_url_gets_its_names_removed_delta(
    server: ServerThread,
    delta_clients: Callable[..., DeltaClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="xds_server")
    d = delta_clients(server.port, node_id="asks-secrets")
    d.send(SECRET, subscribe=["server-cert", "ca"])
    r = d.recv()
    assert (r.type_url, r.system_version_info, len(r.resources)) == (SECRET, "0", 0)
    assert sorted(r.removed_resources) == ["ca", "server-cert"]
    # A plain ACK gets no answer; a request naming more names gets those removed too.
    d.ack(r)
    d.send(SECRET, subscribe=["client-cert"], nonce=r.nonce)
    nxt = d.recv()
    assert nxt.type_url == SECRET and list(nxt.removed_resources) == ["client-cert"]
    d.ack(nxt)
    d.send(CLUSTER)
    assert d.recv().type_url == CLUSTER
    _logged_once(caplog, "asks-secrets")


def _logged_once(caplog: pytest.LogCaptureFixture, node_id: str) -> None:
    """The unknown type is logged at info once per stream, later requests at debug."""
    records = server_records(caplog, f"{node_id} asked for {SECRET}")
    assert [r.levelno for r in records][:1] == [logging.INFO]
    assert all(r.levelno == logging.DEBUG for r in records[1:]) and len(records) >= 2


def test_a_long_unknown_type_url_is_answered_and_logged_short(
    server: ServerThread, ads_clients: Callable[..., AdsClient], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="xds_server")
    long_type = "type.googleapis.com/" + "x" * 20_000
    c = ads_clients(server.port, node_id="long-type")
    c.send(long_type)
    r = c.recv()
    assert r.type_url == long_type and len(r.resources) == 0
    (record,) = server_records(caplog, "long-type asked for")
    assert len(record.getMessage()) < 400
