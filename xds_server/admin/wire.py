"""The admin API's conventions beyond its messages, shared by the server and `xdsctl`.

Dependency-free on purpose: `xdsctl` imports this, and must not pull in the server's
modules (the controller, the stores, the xDS code) to talk to it.
"""

from __future__ import annotations

STATUS_MARK = "x-xds-admin"
"""Trailing metadata on every status the admin API sends itself: a client tells "the
server said UNAVAILABLE" from "the server could not be reached" by it."""

ACTOR_KEY = "x-xds-actor"
"""The header (gRPC metadata) in which a caller may claim who it acts for; the audit log
records it beside the token's name."""
