"""A replica's directory document in parts, when it is too big for one etcd value.

etcd refuses a request over its `--max-request-bytes` (1.5 MiB by default). A replica's
key lists every node it serves, about 250 bytes each, so a replica past some 5,900
nodes could no longer write it: its key went stale, the store looked lost and the
replica stepped aside, moving every one of its nodes onto the others. Past
`INLINE_LIMIT` the nodes go to part keys, `replica-nodes/<id>/<k>`, on the replica's
lease, each node in the part its id hashes to (so a node's ACK rewrites one part, and
a part is rewritten only when it changed); the replica's own key, rewritten last and
at every heartbeat, says how many parts there are (`node_parts`) and lists no node.

Readers (`merged`) put the nodes back into the document, so everything that reads a
replica's nodes sees one list, whichever way it was written. A replica of a release
before parts reads such a document as a replica without nodes (only over the limit,
during a rolling upgrade: its nodes are then neither counted nor waited for).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from typing import Any

INLINE_LIMIT = 1024 * 1024
"""The largest document (bytes of JSON) written whole, under etcd's default request
limit with room for the request's own framing."""
PART_BYTES = 256 * 1024
"""About how big each part is made (their number is a power of two, so it doubles
rather than reshuffles every node when the replica grows)."""

Node = dict[str, Any]


def encode(
    head: dict[str, Any], nodes: list[tuple[str, str]], parts_before: int = 0
) -> tuple[bytes, list[bytes]]:
    """A replica's document: `head` (every field but `nodes`) and its nodes, each as
    (its id, its JSON), as (the replica key's value, the parts' values); no parts when
    it fits in one value. `parts_before`: the number of parts written on this lease so
    far, never taken back (a part left behind would still be read)."""
    size = sum(len(text) + 1 for _, text in nodes)
    if size <= INLINE_LIMIT - 4096 and not parts_before:
        listed = ",".join(text for _, text in nodes)
        return _with_nodes(head, listed), []
    count = max(parts_before, 1)
    while size / count > PART_BYTES:
        count *= 2
    buckets: list[list[str]] = [[] for _ in range(count)]
    for node_id, text in nodes:
        buckets[part_of(node_id, count)].append(text)
    parts = [("[" + ",".join(b) + "]").encode() for b in buckets]
    return json.dumps({**head, "nodes": [], "node_parts": count}).encode(), parts


def _with_nodes(head: dict[str, Any], listed: str) -> bytes:
    """`head` with `"nodes": [listed]`, without decoding `listed` again."""
    text = json.dumps({k: v for k, v in head.items() if k != "nodes"})
    comma = ", " if text != "{}" else ""
    return (text[:-1] + comma + '"nodes": [' + listed + "]}").encode()


def part_of(node_id: str, count: int) -> int:
    return zlib.crc32(node_id.encode()) % count


def merged(doc: dict[str, Any], parts: Mapping[int, list[Node]]) -> dict[str, Any]:
    """The replica's document with its parts' nodes (as read so far) in `nodes`."""
    count = doc.get("node_parts")
    if not isinstance(count, int) or count <= 0:
        return doc
    return {**doc, "nodes": [n for k in range(count) for n in parts.get(k, [])]}


def read_part(value: bytes) -> list[Node]:
    nodes = json.loads(value)
    if not isinstance(nodes, list):
        raise ValueError("a replica's node part is not a list")
    return nodes
