"""Who a node is, by its client certificate: xDS over mTLS.

With `serve --xds-tls-client-ca`, every xDS client presents a certificate signed by that
CA whose SPIFFE identity (its URI SAN) names the node:

    spiffe://TRUST_DOMAIN/region/REGION/node/NODE_ID

A stream is served only when the node's own claims (node.id and its region, from the
first request) are the ones its certificate names, so a client holding one node's
certificate can neither read another region's configuration nor speak for another node
(its ACKs and NACKs move rollouts). `hack/make-certs.sh` makes such certificates.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

_SPIFFE = re.compile(r"^spiffe://(?P<domain>[^/]+)/region/(?P<region>[^/]+)/node/(?P<node>[^/]+)$")
MAX_ECHO = 100
"""Characters of a client-supplied string that go into a message."""


class IdentityError(ValueError):
    """The node may not be served as what it claims; the message says why."""


@dataclass(frozen=True)
class PeerIdentity:
    spiffe_id: str
    trust_domain: str
    region: str
    node_id: str


@dataclass(frozen=True)
class IdentityPolicy:
    """What the server requires of a client certificate's identity."""

    trust_domain: str | None = None
    """Accept only this SPIFFE trust domain; None: any the CA signed."""

    def check(
        self, auth_context: Mapping[str, Sequence[bytes]], node_id: str, region: str
    ) -> PeerIdentity:
        """The peer's identity if it names this node and region; IdentityError if not."""
        ids = [v.decode(errors="replace") for v in auth_context.get("peer_spiffe_id", ())]
        if not ids:
            sans = auth_context.get("x509_subject_alternative_name", ())
            ids = [v.decode(errors="replace") for v in sans if v.startswith(b"spiffe://")]
        if len(ids) != 1:
            raise IdentityError(
                "the client certificate must carry exactly one SPIFFE identity "
                "(spiffe://DOMAIN/region/REGION/node/NODE_ID) as its URI SAN"
            )
        m = _SPIFFE.match(ids[0])
        if m is None:
            raise IdentityError(
                f"certificate identity {_short(ids[0])!r} is not "
                "spiffe://DOMAIN/region/REGION/node/NODE_ID"
            )
        peer = PeerIdentity(ids[0], m["domain"], m["region"], m["node"])
        if self.trust_domain is not None and peer.trust_domain != self.trust_domain:
            raise IdentityError(
                f"certificate identity {_short(peer.spiffe_id)!r} is not of trust domain "
                f"{self.trust_domain!r}"
            )
        if (peer.node_id, peer.region) != (node_id, region):
            raise IdentityError(
                f"node {_short(node_id)!r} in region {_short(region)!r} presents the "
                f"certificate of {_short(peer.spiffe_id)!r}"
            )
        return peer


def _short(text: str) -> str:
    return text if len(text) <= MAX_ECHO else f"{text[:MAX_ECHO]}..."
