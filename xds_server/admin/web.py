"""The dashboard: the page an on-call engineer opens when a rollout pages them.

`serve` runs it on `--ui-address` (default 127.0.0.1:18080; "" turns it off) with
aiohttp, on the server's own event loop. What it serves:

- the page itself: plain HTML, JS and CSS from `admin/ui/`, shipped in the package (no
  CDN, no build step; the charts are SVG drawn by `app.js`);
- a JSON API that renders the admin gRPC API's own messages (`admin/views.py`) through
  protobuf's JSON mapping, so the page and `xdsctl` never disagree;
- `/api/events`: the controller's stream of committed decisions, the one `xdsctl rollout
  watch` reads, as server-sent events (a replica that does not decide sends the
  committed state whenever it changes);
- the operator's actions (pause, resume, abort, promote) on a service or on a whole
  rollout group, through `admin/operator.py`: the same checks and controller calls as
  `xdsctl`'s, the token's scope included (a refusal is a 403 naming what it lacks);
  `/api/scope` tells the page what its token may do, and the page shows only that.

Safe by default: it binds to loopback (off loopback, `serve` asks for HTTPS,
`--ui-tls-cert`, and tokens for reads too, or `--insecure`); every action needs an
admin token, sent as an `Authorization: Bearer` header (never a URL or a cookie), so
without `--admin-token-file` the page is read-only; requests must name this server in `Host`
(a DNS-rebinding page cannot read it) and, when they carry an `Origin`, come from it;
every response forbids inline scripts (Content-Security-Policy), and the page writes
every string from the spec or the audit log as text.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from google.protobuf import json_format, message

from xds_server.admin.auth import VERBS, Verb
from xds_server.admin.operator import (
    Caller,
    Operator,
    Refusal,
    Refused,
    pushes_first,
    unauthenticated,
)
from xds_server.admin.v1 import admin_pb2 as pb
from xds_server.admin.views import (
    AdminView,
    WatchQueue,
    event_message,
    group_name,
    node_message,
    rollout_message,
    service_rollout,
    store_message,
    stragglers_by_node,
)
from xds_server.rollout.audit import AuditEntry, rollback_cause
from xds_server.rollout.audit_codec import Doc, entry_doc
from xds_server.rollout.state import RolloutState

log = logging.getLogger("xds_server.dashboard")

UI_DIR = Path(__file__).parent / "ui"
ASSETS = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "style.css": "text/css",
}
AUDIT_LIMIT = 5000
"""The newest entries of a rollout the rollout page gets."""
HTTP_STATUS = {
    Refusal.NOT_FOUND: 404,
    Refusal.INVALID_ARGUMENT: 400,
    Refusal.FAILED_PRECONDITION: 409,
    Refusal.UNAVAILABLE: 503,
    Refusal.UNAUTHENTICATED: 401,
    Refusal.PERMISSION_DENIED: 403,
}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
BEARER = "send it as Authorization: Bearer"
"""How a caller of this door sends the admin token."""
READ_ONLY = (
    "the dashboard is read-only: its actions need an admin token, and this server has "
    "none (serve --admin-token-file)"
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def to_json(msg: message.Message) -> dict[str, Any]:
    return dict(
        json_format.MessageToDict(
            msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
    )


def audit_json(entry: AuditEntry) -> Doc:
    """The entry as the page reads it: every field, the parts as the log keeps them."""
    return entry_doc(entry)


class Dashboard:
    def __init__(self, view: AdminView, operator: Operator, heartbeat: float = 10.0) -> None:
        self.view = view
        self.operator = operator
        self.heartbeat = heartbeat
        self.hosts: set[str] = set()
        """Accepted `Host` values: this server's address, by name and number."""
        self.scheme = "http"

    # ---- the app ----

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=64 * 1024)
        app.router.add_get("/", self.page)
        app.router.add_get("/ui/{name}", self.asset)
        app.router.add_get("/api/scope", self.scope)
        app.router.add_get("/api/overview", self.overview)
        app.router.add_get("/api/nodes", self.nodes)
        app.router.add_get("/api/rollouts/{service}", self.rollout)
        app.router.add_get("/api/events", self.events)
        app.router.add_post("/api/rollouts/{service}/{action}", self.action)
        app.router.add_post("/api/groups/{group}/{action}", self.group_action)
        return app

    async def run(self, address: str, tls: tuple[bytes, bytes] | None = None) -> None:
        """Serve on HOST:PORT until cancelled; over HTTPS with `tls` (certificate chain,
        key: PEM)."""
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        context = _ssl_context(tls) if tls is not None else None
        self.scheme = "https" if tls is not None else "http"
        try:
            await web.TCPSite(runner, host, int(port), ssl_context=context).start()
        except OSError as exc:  # the dashboard is a window on serve, not a part of it
            log.error("dashboard off: cannot listen on %s: %s", address, exc.strerror or exc)
            await runner.cleanup()
            return
        bound = runner.addresses[0][1] if runner.addresses else int(port)
        self.hosts = _host_names(host, bound)
        log.info(
            "dashboard on %s://%s:%d/ (%s)",
            self.scheme,
            host,
            bound,
            "actions with an admin token" if self.operator.auth.configured else READ_ONLY,
        )
        try:
            await asyncio.Future()  # until cancelled
        finally:
            await runner.cleanup()

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            self._admit(request)
            response = await handler(request)
        except Refused as exc:
            response = web.json_response(
                {"error": exc.message, "code": str(exc.code)}, status=HTTP_STATUS[exc.code]
            )
        response.headers.update(SECURITY_HEADERS)
        return response

    def _admit(self, request: web.Request) -> None:
        if self.hosts and request.host.lower() not in self.hosts:
            raise Refused(
                Refusal.PERMISSION_DENIED,
                f"Host {request.host[:100]!r} is not this server's address",
            )
        origin = request.headers.get("Origin")
        if origin is not None and origin.lower() not in {
            f"{self.scheme}://{h}" for h in self.hosts
        }:
            raise Refused(Refusal.PERMISSION_DENIED, "cross-origin requests are refused")
        auth = self.operator.auth
        reading = request.path.startswith("/api/") and auth.auth_reads
        if not reading:
            return
        name = auth.identify(request.headers)
        if name is None:
            raise unauthenticated("reads as well as changes", request.headers, BEARER)
        scope = auth.scope(name)
        if request.method == "GET" and request.path != "/api/scope" and not scope.may(Verb.READ):
            raise Refused(
                Refusal.PERMISSION_DENIED,
                f"the token {name} may not read: its scope lacks verbs=read "
                f"(it has {scope.describe()})",
            )

    # ---- the page ----

    async def page(self, request: web.Request) -> web.StreamResponse:
        return _asset("index.html")

    async def asset(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in ASSETS:
            raise Refused(Refusal.NOT_FOUND, f"no asset {name[:100]!r}")
        return _asset(name)

    # ---- reads ----

    async def scope(self, request: web.Request) -> web.StreamResponse:
        """What the request's token may do, for the page to show only that: its name,
        verbs and services (None: every service). No token: `name` null; a token that
        matches none: 401."""
        auth = self.operator.auth
        name = auth.identify(request.headers)
        if name is None and request.headers.get("Authorization"):
            raise unauthenticated("this", request.headers, BEARER)
        scope = auth.scope(name)
        verbs = [v for v in VERBS if scope.may(v)] if name is not None else []
        return web.json_response(
            {
                "name": name,
                "verbs": [str(v) for v in verbs],
                "services": list(scope.services) if scope.services is not None else None,
                "scope": scope.describe() if name is not None else "",
            }
        )

    async def overview(self, request: web.Request) -> web.StreamResponse:
        """Every service with its rollout and last decision; nodes by sync state per
        region; this replica's role and its store."""
        view, store = self.view, self.view.store
        services = []
        for svc in view.spec.services:
            rollout = service_rollout(view, svc.name)
            # (a store read: etcd pages it, off the loop)
            last = (
                await asyncio.to_thread(store.audit, service=svc.name, kind="transition", limit=1)
                if store
                else []
            )
            services.append(
                {
                    "name": svc.name,
                    "group": group_name(view, svc.name),
                    "rollout": to_json(rollout) if rollout else None,
                    "last_decision": audit_json(last[-1]) if last else None,
                }
            )
        sync: dict[str, dict[str, int]] = {region: {} for region in view.spec.regions}
        for node in view.nodes(None):
            state_name = node_message(view.publisher, node).sync_state
            counts = sync.setdefault(node.region, {})
            counts[state_name] = counts.get(state_name, 0) + 1
        return web.json_response(
            {
                "server": self._server_info(),
                "services": services,
                "groups": [self._group(g.name) for g in view.spec.rollout_groups],
                "regions": [{"region": r, "nodes": n} for r, n in sync.items()],
            }
        )

    def _group(self, name: str) -> dict[str, Any]:
        """A rollout group and where each member stands: its phase, or why it waits."""
        group = self.view.spec.group(name)
        members = []
        for service in group.services:
            rollout = service_rollout(self.view, service) or pb.Rollout(service=service)
            members.append(
                {
                    "service": service,
                    "canary_version": rollout.canary_version,
                    "phase": rollout.phase,
                    "waiting": rollout.waiting,
                }
            )
        return {
            "name": group.name,
            "services": list(group.services),
            "consistent": group.consistent,
            "members": members,
        }

    def _server_info(self) -> dict[str, Any]:
        auth = self.operator.auth
        return {
            "role": "leader" if self.view.controller is not None else "follower",
            "role_detail": (
                "runs the rollout controller"
                if self.view.controller is not None
                else f"serves the committed state; {self.operator.not_deciding()}"
            ),
            "store": to_json(store_message(self.view)),
            "actions": auth.configured,
            "actions_detail": "need an admin token" if auth.configured else READ_ONLY,
        }

    async def nodes(self, request: web.Request) -> web.StreamResponse:
        missed = stragglers_by_node(self.view)
        nodes = [
            to_json(node_message(self.view.publisher, n, missed.get((n.region, n.node_id), "")))
            for n in self.view.nodes(None)
        ]
        return web.json_response({"nodes": nodes})

    async def rollout(self, request: web.Request) -> web.StreamResponse:
        """One rollout (the current one, or `?version=V` from the store) with its audit
        log, the cause of its rollback, its guardrails and the service's past rollouts."""
        service = request.match_info["service"]
        self.operator.check_service(service)
        state = self._find(service, request.query.get("version", ""))
        store = self.view.store
        entries = (  # (its live log or its archive, off the loop)
            await asyncio.to_thread(
                store.audit, service=service, version=state.canary_version, limit=AUDIT_LIMIT
            )
            if store
            else []
        )
        cause = rollback_cause(entries) if state.phase == "rolled_back" else None
        plan = self.view.spec.service(service).rollout
        history = [s for s in (store.load_rollouts() if store else []) if s.service == service]
        group = group_name(self.view, service)
        return web.json_response(
            {
                "rollout": to_json(rollout_message(self.view, state)),
                "group": self._group(group) if group else None,
                "started_at": state.started_at,
                "updated_at": state.updated_at,
                "guardrails": dataclasses.asdict(plan.guardrails),
                "cause": dataclasses.asdict(cause) if cause else None,
                "audit": [audit_json(e) for e in entries],
                "history": [
                    {
                        "canary_version": s.canary_version,
                        "phase": str(s.phase),
                        "reason": s.reason,
                        "started_at": s.started_at,
                        "updated_at": s.updated_at,
                    }
                    for s in sorted(history, key=lambda s: s.started_at, reverse=True)
                ],
            }
        )

    def _find(self, service: str, version: str) -> RolloutState:
        current = self.view.rollouts().get(service)
        if current is not None and version in ("", current.canary_version):
            return current
        store = self.view.store
        if version and store is not None and (stored := store.rollout(service, version)):
            return stored
        if version:
            raise Refused(Refusal.NOT_FOUND, f"no rollout of {service} {version[:100]!r}")
        raise Refused(
            Refusal.NOT_FOUND,
            f"service {service!r} has no rollout (it has no canary pool, or its canary "
            "is its production version)",
        )

    # ---- live ----

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: `decision` (a committed decision, as `xdsctl rollout watch`
        gets it) from the controller; from a replica that does not decide, `state` each
        time the committed rollouts change. A comment line every `heartbeat` seconds."""
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", **SECURITY_HEADERS}
        )
        await response.prepare(request)
        controller = self.view.controller
        try:
            if controller is not None:
                await self._decisions(response, controller)
            else:
                await self._states(response)
        except (ConnectionResetError, asyncio.CancelledError):
            pass  # the page went away (or the server stops)
        return response

    async def _decisions(self, response: web.StreamResponse, controller: Any) -> None:
        sink = WatchQueue()
        unsubscribe = controller.subscribe(sink)
        try:
            await _send(response, "hello", {"role": "leader"})
            while True:
                try:
                    event = await asyncio.wait_for(sink.queue.get(), self.heartbeat)
                except TimeoutError:
                    await response.write(b": keep-alive\n\n")
                    continue
                await _send(response, "decision", to_json(event_message(self.view, event)))
        finally:
            unsubscribe()

    async def _states(self, response: web.StreamResponse, interval: float = 0.5) -> None:
        await _send(response, "hello", {"role": "follower"})
        seen: dict[str, Any] | None = None
        quiet = 0.0
        while True:
            now = {
                name: to_json(rollout_message(self.view, state))
                for name, state in self.view.rollouts().items()
            }
            if now != seen:
                seen, quiet = now, 0.0
                await _send(response, "state", {"rollouts": now})
            elif quiet >= self.heartbeat:
                quiet = 0.0
                await response.write(b": keep-alive\n\n")
            await asyncio.sleep(interval)  # the follower's own poll period
            quiet += interval

    # ---- actions ----

    async def action(self, request: web.Request) -> web.StreamResponse:
        """POST /api/rollouts/SERVICE/ACTION with {"reason": "..."} and the admin token
        as `Authorization: Bearer TOKEN`."""
        caller, reason = await self._caller_and_reason(request)
        service, name = request.match_info["service"], request.match_info["action"]
        state = self.operator.change(name, service, reason, caller)
        await _acted(name, service, caller, reason)
        return web.json_response({"rollout": to_json(rollout_message(self.view, state))})

    async def group_action(self, request: web.Request) -> web.StreamResponse:
        """POST /api/groups/GROUP/ACTION (pause, resume, abort, promote) with
        {"reason": "..."}: every member of the rollout group at once, by the same
        controller call as `xdsctl rollout ACTION --group GROUP`."""
        caller, reason = await self._caller_and_reason(request)
        group, name = request.match_info["group"], request.match_info["action"]
        states = self.operator.named(caller, name, reason, group=group)
        await _acted(name, f"group {group}", caller, reason)
        return web.json_response(
            {"group": group, "rollouts": [to_json(rollout_message(self.view, s)) for s in states]}
        )

    async def _caller_and_reason(self, request: web.Request) -> tuple[Caller, str]:
        """An action's caller (its token checked) and the reason its JSON body gives."""
        if not self.operator.auth.configured:
            raise Refused(Refusal.PERMISSION_DENIED, READ_ONLY)
        if request.content_type != "application/json":
            raise Refused(Refusal.INVALID_ARGUMENT, "send the reason as application/json")
        caller = self.operator.caller(request.headers, door=BEARER)
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError):
            raise Refused(Refusal.INVALID_ARGUMENT, "the body is not JSON") from None
        reason = body.get("reason") if isinstance(body, dict) else None
        if not isinstance(reason, str):
            raise Refused(Refusal.INVALID_ARGUMENT, 'expected {"reason": "..."}')
        return caller, reason


async def _acted(name: str, target: str, caller: Caller, reason: str) -> None:
    """After a button's change: its pushes first (`pushes_first`), then its log line."""
    await pushes_first()
    why = " ".join(reason.split())
    log.info("dashboard: %s %s by %s: %s", name, target, caller.actor, why)


def _ssl_context(tls: tuple[bytes, bytes]) -> ssl.SSLContext:
    """A server context from PEM bytes (ssl loads files only: written to a private
    temporary directory, read, removed)."""
    import tempfile

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        cert.write_bytes(tls[0])
        key.touch(mode=0o600)
        key.write_bytes(tls[1])
        context.load_cert_chain(cert, key)
    return context


def _asset(name: str) -> web.Response:
    return web.Response(
        body=(UI_DIR / name).read_bytes(), content_type=ASSETS[name], charset="utf-8"
    )


async def _send(response: web.StreamResponse, event: str, data: Any) -> None:
    await response.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())


def _host_names(host: str, port: int) -> set[str]:
    """The `Host` values that name this server: the bound address, and `localhost` for
    a loopback one. Bound to every interface (0.0.0.0, ::), any name is accepted."""
    if host in ("0.0.0.0", "::", ""):
        return set()
    names = {f"{host}:{port}", f"[{host}]:{port}"}
    if host.startswith("127.") or host in ("::1", "localhost"):
        names |= {f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"}
    return {n.lower() for n in names}
