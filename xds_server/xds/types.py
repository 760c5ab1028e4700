"""xDS type URLs and the order in which they are sent (make before break)."""

from __future__ import annotations

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"

SEND_ORDER: tuple[str, ...] = (CLUSTER, ENDPOINT, LISTENER, ROUTE)
"""Clusters, then their endpoints, then listeners, then the routes that use them."""

WILDCARD_TYPES = frozenset({CLUSTER, LISTENER})
"""Types Envoy asks for as a whole (naming nothing, or `*`); endpoints and routes are
asked for by name. Proxyless gRPC clients ask for these by name too: a listener per
target, the clusters their routes use; they get only what they name."""

WILDCARD = "*"
"""The name that subscribes to every resource of a wildcard type."""

PROXYLESS_TYPES = frozenset({LISTENER, ROUTE})
"""Types with resources that only proxyless gRPC clients ask for (by name): API
listeners and per-service route configurations, which Envoy never gets."""

SHORT_NAMES = {CLUSTER: "cluster", ENDPOINT: "endpoint", LISTENER: "listener", ROUTE: "route"}
BY_SHORT_NAME = {v: k for k, v in SHORT_NAMES.items()}


def short(type_url: str) -> str:
    return SHORT_NAMES.get(type_url, type_url.rsplit(".", 1)[-1])


LISTEN_METADATA_KEY = "xds_server.listen"
"""Node metadata key naming the address the node's listener should bind to (bootstraps
set it; the server builds that node's listener on it)."""
