"""Undecodable xDS requests (issue 30): each ends its stream with INVALID_ARGUMENT and
one short log line, never a traceback (grpc's own handler used to log a `DecodeError`
traceback for each).

The requests are raw bytes over a real gRPC channel to the real ADS methods of the
in-process server: a garbage first request, and garbage after a good one (the stream
already identified, so the line names the node).
"""

from __future__ import annotations

import logging

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from tests.support import wait_for
from xds_server.xds.types import CLUSTER

from .conftest import ServerThread

ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"
GARBAGE = (b"\xff\xff\xff\xff\xff", b"\x0a\x05ab", b"\x00")
"""Bytes no request message decodes from: an unterminated tag, a truncated string, field 0."""
ROUNDS = 5


def send_raw(port: int, method: str, *messages: bytes) -> grpc.RpcError:
    """Send `messages` as one stream's requests; the status the server ends it with."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(ADS + method)  # no serializers: bytes as they are
        with pytest.raises(grpc.RpcError) as err:
            for _ in call(iter(messages), timeout=10):
                pass
    return err.value


def refusals(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The refusal lines (not the node's disconnect line, which quotes the refusal)."""
    return [
        r
        for r in caplog.records
        if "does not decode" in r.getMessage() and r.getMessage().startswith("refused stream")
    ]


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("StreamAggregatedResources", "DiscoveryRequest"),
        ("DeltaAggregatedResources", "DeltaDiscoveryRequest"),
    ],
)
def test_garbage_first_requests_get_one_log_line_each_and_no_traceback(
    method: str, message: str, server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sent = 0
    for _ in range(ROUNDS):
        for garbage in GARBAGE:
            error = send_raw(server.port, method, garbage)
            sent += 1
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
            details = error.details() or ""
            assert f"does not decode as a {message} ({len(garbage)} bytes)" in details
            assert len(details) < 300
    lines = wait_for(lambda: len(refusals(caplog)) == sent and refusals(caplog), "the log")
    for record in lines:
        assert record.exc_info is None and "\n" not in record.getMessage()
        assert record.getMessage().startswith("refused stream from ")
    tracebacks = [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert tracebacks == []
    assert not [
        r for r in caplog.records if r.name.startswith("grpc") and r.levelno >= logging.WARNING
    ]


def test_garbage_after_a_good_request_names_the_node(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    """The first request identified the node; garbage later ends its stream the same way."""
    caplog.set_level(logging.DEBUG)
    node = base_pb2.Node(id="garbled", locality=base_pb2.Locality(region="us-east"))
    good = discovery_pb2.DiscoveryRequest(node=node, type_url=CLUSTER).SerializeToString()
    error = send_raw(server.port, "StreamAggregatedResources", good, b"\x0a\x05ab")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    (line,) = wait_for(lambda: refusals(caplog), "the log")
    assert line.getMessage().startswith("refused stream of garbled: the request does not decode")
    assert line.exc_info is None
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
