"""The audit log's hash chain (issue 30): each entry carries the hash of the one before it
in its rollout, so an entry edited in the store (by whoever can write the store) no
longer matches its hash, and an entry removed breaks the link of the next.

Dependency-free (hashlib only): `xdsctl audit verify` checks chains with it on the admin
API's messages, without the server's modules.

- A chain is one rollout's (service + canary version), not the store's: retention and
  archives move a finished rollout's entries as one piece, and each piece keeps a whole
  chain that verifies on its own (a store-wide chain would break at every archived gap).
- `link(prev, canonical)`: SHA-256 over the previous hash (64 hex digits, ASCII), a
  newline, then the entry's canonical encoding (`audit_codec.canonical`: the entry's
  JSON without its id and its hashes, keys sorted, no spaces, ASCII).
- The first entry of a rollout chains from `genesis(service, version)`: a fixed hash of
  the rollout's identity, so an entry cannot be moved to another rollout's chain.
- Entries written before the chain carry no hash: "unchained". They may only come
  before a rollout's first chained entry (a rollout that was live across the upgrade);
  an unchained entry after a chained one had its hashes removed, and is reported broken.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

GENESIS_TAG = b"xds-server audit chain v1"


@dataclass(frozen=True)
class Link:
    """Where an entry sits in its rollout's chain."""

    prev: str
    """The hash of the rollout's entry before it (its genesis for the first)."""
    hash: str
    """`link(prev, canonical)`, computed under the store's write."""
    snapshot_mark: bool = False
    """The hash covers the snapshot version as the commit mark, not as a number (etcd:
    the number is the committing transaction's revision, unknown before it commits)."""


def genesis(service: str, version: str) -> str:
    """The hash a rollout's first entry chains from."""
    ident = GENESIS_TAG + b"\0" + service.encode() + b"\0" + version.encode()
    return hashlib.sha256(ident).hexdigest()


def link(prev: str, canonical: bytes) -> str:
    return hashlib.sha256(prev.encode("ascii") + b"\n" + canonical).hexdigest()


@dataclass(frozen=True)
class Chained:
    """One entry as a verifier sees it: its place and what its hash covers."""

    id: int
    service: str
    version: str
    prev: str
    """"" for an unchained entry (and then `hash` is "" too)."""
    hash: str
    canonical: bytes


@dataclass(frozen=True)
class ChainReport:
    """One rollout's chain: intact (`broken_at` 0), or the first entry that breaks it."""

    service: str
    version: str
    entries: int
    unchained: int
    """Entries written before the chain (only ever at the start)."""
    broken_at: int = 0
    """The id of the first broken entry; 0: none."""
    why: str = ""

    @property
    def intact(self) -> bool:
        return self.broken_at == 0


def verify(entries: Iterable[Chained]) -> list[ChainReport]:
    """Every rollout's chain among `entries` (any order; each rollout's in id order)."""
    rollouts: dict[tuple[str, str], list[Chained]] = {}
    for e in sorted(entries, key=lambda e: e.id):
        rollouts.setdefault((e.service, e.version), []).append(e)
    return [verify_rollout(s, v, chain) for (s, v), chain in sorted(rollouts.items())]


def verify_rollout(service: str, version: str, entries: Sequence[Chained]) -> ChainReport:
    """One rollout's entries, in id order."""
    unchained = 0
    expected = genesis(service, version)
    last_chained = 0
    for e in entries:
        why = ""
        if not e.hash:
            if last_chained:
                why = f"carries no hash, but entry {last_chained} before it does (removed?)"
            else:
                unchained += 1
                continue
        elif e.prev != expected:
            why = (
                "does not chain from the rollout's genesis (an entry before it was removed, "
                "or it was moved from another rollout)"
                if not last_chained
                else f"does not chain from entry {last_chained} (an entry between them was "
                f"removed, or entry {last_chained} was replaced)"
            )
        elif link(e.prev, e.canonical) != e.hash:
            why = "its content does not match its hash (it was edited)"
        if why:
            return ChainReport(service, version, len(entries), unchained, e.id, why)
        expected, last_chained = e.hash, e.id
    return ChainReport(service, version, len(entries), unchained)
