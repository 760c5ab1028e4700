"""A replica's directory document in parts (`ha/directory_parts.py`): whatever its
nodes, a reader gets every node back exactly once, inline or in parts, and a growing
replica's parts only ever double."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xds_server.ha import directory_parts
from xds_server.ha.directory_parts import encode, merged, read_part

HEAD = {"id": "r1", "regions": [], "leader": False, "heartbeat": 1.0}


def node(i: int, acked: str) -> dict[str, Any]:
    return {"id": f"envoy-{i}", "region": "us-east", "routes": {"acked": acked}}


def read(head: bytes, parts: list[bytes]) -> dict[str, Any]:
    return merged(json.loads(head), {k: read_part(v) for k, v in enumerate(parts)})


@settings(max_examples=60, deadline=None)
@given(
    count=st.integers(0, 400),
    acked=st.text(max_size=8),
    inline_limit=st.sampled_from([200, 5_000, 1024 * 1024]),
    parts_before=st.sampled_from([0, 1, 4]),
)
def test_every_node_is_read_back_once_inline_or_in_parts(
    count: int, acked: str, inline_limit: int, parts_before: int
) -> None:
    nodes = [node(i, acked) for i in range(count)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(directory_parts, "INLINE_LIMIT", inline_limit)
        patch.setattr(directory_parts, "PART_BYTES", 2_000)
        head, parts = encode(HEAD, [(n["id"], json.dumps(n)) for n in nodes], parts_before)
    doc = read(head, parts)
    assert sorted(doc["nodes"], key=lambda n: n["id"]) == sorted(nodes, key=lambda n: n["id"])
    assert {k: v for k, v in doc.items() if k not in ("nodes", "node_parts")} == HEAD
    if parts:
        assert len(parts) >= max(parts_before, 1) and len(parts) & (len(parts) - 1) == 0
        assert all(len(p) <= 4 * 2_000 for p in parts), [len(p) for p in parts]
    else:
        assert parts_before == 0 and len(head) <= inline_limit


def test_a_reader_of_a_part_not_yet_seen_gets_the_nodes_it_has_and_no_others() -> None:
    """Parts arrive one key at a time: a reader between them lists what it has read."""
    nodes = [node(i, "7") for i in range(50)]
    head, parts = encode(HEAD, [(n["id"], json.dumps(n)) for n in nodes], parts_before=4)
    doc = merged(json.loads(head), {0: read_part(parts[0])})
    assert doc["nodes"] == read_part(parts[0]) and doc["node_parts"] == 4
    with pytest.raises(ValueError):
        read_part(b'{"not": "a list"}')


@settings(max_examples=300, deadline=None)
@given(
    texts=st.lists(st.text(), min_size=7, max_size=7),
    times=st.lists(st.none() | st.floats(), min_size=2, max_size=2),
    since=st.floats(),
    subscribed=st.booleans(),
)
def test_a_nodes_json_is_the_very_text_json_dumps_gives(
    texts: list[str], times: list[float | None], since: float, subscribed: bool
) -> None:
    """`node_json` hand-builds what `json.dumps(node_document(n))` gives, for speed: any
    text (quotes, control characters, beyond ASCII) and any time (None, NaN, infinities)
    must come out the same, or peers would read another node than was written."""
    from xds_server.ha.replicas import node_document, node_json
    from xds_server.xds.status import NodeStatus, TypeStatus
    from xds_server.xds.types import ROUTE

    node_id, region, agent, sent, acked, nack, error = texts
    n = NodeStatus(7, node_id, region, since, user_agent=agent)
    n.types[ROUTE] = TypeStatus(
        sent_version=sent,
        sent_at=times[0],
        acked_version=acked,
        acked_at=times[1],
        nack_version=nack,
        nack_error=error,
        subscribed=subscribed,
    )
    assert node_json(n) == json.dumps(node_document(n))
