"""FakeKubeApiServer: a small stand-in for a Kubernetes API server, for tests only.

It is a fake because no real API server can run on this build machine (no Docker daemon
for kind, no etcd); `hack/kind-e2e.sh` runs the same paths against a real cluster. It
serves just enough, over plain HTTP on 127.0.0.1, for two real clients:

- the `kubernetes` Python client's server-side apply of Istio objects: it checks what a
  real API server checks for an apply (the `application/apply-patch+yaml` content type,
  a `fieldManager`, that the body's kind/name/namespace match the URL) and validates the
  object against Istio's CRD schema (tests/istio_schema.py), then stores it; lists
  them by an equality label selector and deletes them, for the applier's pruning;
- `kubectl apply --dry-run=client`: API discovery for the kinds in manifests/, and
  404 for every GET of an object (so kubectl "creates" it, without sending anything).

Each fake has its own bearer token, checked on writes of Istio objects, so a test can tell
which kubeconfig context a request came through (discovery is open: kubectl does not send
a token to a plain-HTTP server). Tests can make PATCHes hang (`hold`) and make PATCHes or
lists fail (`fail_next`).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

from tests.istio_schema import problems as schema_problems

# group/version -> [(plural, kind, namespaced)]; "" is the core group.
RESOURCES: dict[str, list[tuple[str, str, bool]]] = {
    "v1": [
        ("namespaces", "Namespace", False),
        ("configmaps", "ConfigMap", True),
        ("services", "Service", True),
        ("serviceaccounts", "ServiceAccount", True),
        ("secrets", "Secret", True),
    ],
    "apps/v1": [("deployments", "Deployment", True)],
    "policy/v1": [("poddisruptionbudgets", "PodDisruptionBudget", True)],
    "rbac.authorization.k8s.io/v1": [
        ("roles", "Role", True),
        ("rolebindings", "RoleBinding", True),
        ("clusterroles", "ClusterRole", False),
        ("clusterrolebindings", "ClusterRoleBinding", False),
    ],
    "networking.k8s.io/v1": [("networkpolicies", "NetworkPolicy", True)],
    "networking.istio.io/v1": [
        ("virtualservices", "VirtualService", True),
        ("destinationrules", "DestinationRule", True),
    ],
}
ISTIO_KINDS = {p: k for p, k, _ in RESOURCES["networking.istio.io/v1"]}


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


@dataclass
class _Faults:
    fail: list[tuple[int, str]] = field(default_factory=list)
    """Answers for the next PATCHes."""
    fail_list: list[tuple[int, str]] = field(default_factory=list)
    """Answers for the next lists."""
    gate: threading.Event = field(default_factory=threading.Event)


class FakeKubeApiServer:
    """A fake Kubernetes API server (see the module docstring for why and how much)."""

    def __init__(self, token: str = "token") -> None:
        self.token = token
        self.requests: list[Request] = []
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        """(plural, namespace, name) -> stored object."""
        self._faults = _Faults()
        self._faults.gate.set()
        self._lock = threading.Lock()
        self._version = 0
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._http.daemon_threads = True
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._http.server_address[1]}"

    def start(self) -> FakeKubeApiServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._faults.gate.set()
        self._http.shutdown()
        self._http.server_close()

    # ---- what tests steer and read ----

    def fail_next(
        self,
        count: int,
        status: int = 503,
        message: str = "etcd unavailable",
        lists: bool = False,
    ) -> None:
        """The next `count` PATCHes (or lists) answer `status` with a Kubernetes Status."""
        with self._lock:
            queue = self._faults.fail_list if lists else self._faults.fail
            queue += [(status, message)] * count

    @contextmanager
    def hold(self) -> Iterator[None]:
        """PATCHes wait inside the block (a cluster that stopped answering)."""
        self._faults.gate.clear()
        try:
            yield
        finally:
            self._faults.gate.set()

    def patches(self) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.method == "PATCH"]

    def put(self, plural: str, namespace: str, name: str, labels: dict[str, str]) -> None:
        """Store an Istio object directly, as someone else (or an earlier run) made it."""
        obj = {
            "apiVersion": "networking.istio.io/v1",
            "kind": ISTIO_KINDS[plural],
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"host": name},
        }
        with self._lock:
            self.objects[(plural, namespace, name)] = obj

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            return self.objects.get((plural, namespace, name))

    # ---- serving ----

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _reply(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                url = urlsplit(self.path)
                req = Request(
                    self.command,
                    url.path,
                    parse_qs(url.query),
                    {k.lower(): v for k, v in self.headers.items()},
                    self.rfile.read(length) if length else b"",
                )
                with fake._lock:
                    fake.requests.append(req)
                istio = req.path.startswith("/apis/networking.istio.io/v1/namespaces/")
                listing = req.method == "GET" and req.path.count("/") == 6
                if (
                    istio
                    and (req.method in ("PATCH", "DELETE") or listing)
                    and req.headers.get("authorization") != f"Bearer {fake.token}"
                ):
                    self._reply(401, status(401, "Unauthorized", "Unauthorized"))
                    return
                code, body = fake._route(req)
                self._reply(code, body)

            do_GET = do_PATCH = do_POST = do_PUT = do_DELETE = _handle

        return Handler

    def _route(self, req: Request) -> tuple[int, dict[str, Any]]:
        parts = [p for p in req.path.split("/") if p]
        if req.method == "GET" and req.path == "/version":
            return 200, {"major": "1", "minor": "32", "gitVersion": "v1.32.0-fake"}
        if req.method == "GET" and (parts in (["api"], ["apis"]) or len(parts) in (2, 3)):
            found = self._discovery(parts)
            if found is not None:
                return 200, found
        if parts[:1] == ["apis"] and parts[1:3] == ["networking.istio.io", "v1"]:
            return self._istio(req, parts[3:])
        if req.method == "GET":
            return 404, status(404, "NotFound", f"the object at {req.path} does not exist")
        return 405, status(405, "MethodNotAllowed", f"{req.method} is not served by this fake")

    def _discovery(self, parts: list[str]) -> dict[str, Any] | None:
        if parts == ["api"]:
            return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
        if parts == ["apis"]:
            groups = [gv.split("/") for gv in RESOURCES if "/" in gv]
            return {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [
                    {
                        "name": g,
                        "versions": [{"groupVersion": f"{g}/{v}", "version": v}],
                        "preferredVersion": {"groupVersion": f"{g}/{v}", "version": v},
                    }
                    for g, v in groups
                ],
            }
        gv = "/".join(parts[1:]) if parts[0] == "apis" else parts[1] if parts[0] == "api" else ""
        if gv not in RESOURCES or (parts[0] == "api") != (gv == "v1"):
            return None
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": gv,
            "resources": [
                {
                    "name": plural,
                    "singularName": kind.lower(),
                    "namespaced": namespaced,
                    "kind": kind,
                    "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
                }
                for plural, kind, namespaced in RESOURCES[gv]
            ],
        }

    def _istio(self, req: Request, rest: list[str]) -> tuple[int, dict[str, Any]]:
        if len(rest) == 3 and rest[0] == "namespaces" and rest[2] in ISTIO_KINDS:
            if req.method != "GET":
                return 405, status(405, "MethodNotAllowed", f"{req.method} is not served here")
            with self._lock:
                if self._faults.fail_list:
                    code, message = self._faults.fail_list.pop(0)
                    return code, status(code, "Forbidden", message)
            return 200, self._list(rest[2], rest[1], req)
        if len(rest) != 4 or rest[0] != "namespaces" or rest[2] not in ISTIO_KINDS:
            return 404, status(404, "NotFound", f"no such resource path {req.path}")
        _, namespace, plural, name = rest
        if req.method == "GET":
            obj = self.get(plural, namespace, name)
            if obj is None:
                return 404, status(404, "NotFound", f'{plural} "{name}" not found')
            return 200, obj
        if req.method == "DELETE":
            with self._lock:
                gone = self.objects.pop((plural, namespace, name), None)
            if gone is None:
                return 404, status(404, "NotFound", f'{plural} "{name}" not found')
            return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success"}
        if req.method != "PATCH":
            return 405, status(405, "MethodNotAllowed", f"{req.method} is not served here")
        self._faults.gate.wait()
        with self._lock:
            if self._faults.fail:
                code, message = self._faults.fail.pop(0)
                return code, status(code, "InternalError", message)
        return self._apply(req, plural, namespace, name)

    def _list(self, plural: str, namespace: str, req: Request) -> dict[str, Any]:
        """Equality-based label selectors only (`a=b,c=d`), which is all the applier sends."""
        selector = (req.query.get("labelSelector") or [""])[0]
        wanted = dict(term.split("=", 1) for term in selector.split(",") if term)
        with self._lock:
            items = [
                obj
                for (p, ns, _), obj in sorted(self.objects.items())
                if p == plural
                and ns == namespace
                and all(obj["metadata"].get("labels", {}).get(k) == v for k, v in wanted.items())
            ]
        return {
            "apiVersion": "networking.istio.io/v1",
            "kind": f"{ISTIO_KINDS[plural]}List",
            "metadata": {"resourceVersion": str(self._version)},
            "items": json.loads(json.dumps(items)),
        }

    def _apply(
        self, req: Request, plural: str, namespace: str, name: str
    ) -> tuple[int, dict[str, Any]]:
        ctype = req.headers.get("content-type", "")
        if ctype != "application/apply-patch+yaml":
            return 415, status(415, "UnsupportedMediaType", f"not an apply patch: {ctype!r}")
        manager = (req.query.get("fieldManager") or [""])[0]
        if not manager:
            return 422, status(422, "Invalid", "fieldManager is required for apply requests")
        try:
            obj = yaml.safe_load(req.body)
        except yaml.YAMLError as exc:
            return 400, status(400, "BadRequest", f"body is not YAML: {exc}")
        meta = (obj.get("metadata") or {}) if isinstance(obj, dict) else {}
        if (
            not isinstance(obj, dict)
            or obj.get("kind") != ISTIO_KINDS[plural]
            or meta.get("name") != name
            or meta.get("namespace", namespace) != namespace
        ):
            return 400, status(400, "BadRequest", "body kind/name/namespace do not match the URL")
        invalid = schema_problems(obj)
        if invalid:
            return 422, status(422, "Invalid", "; ".join(invalid))
        with self._lock:
            self._version += 1
            created = (plural, namespace, name) not in self.objects
            stored = json.loads(json.dumps(obj))
            stored["metadata"]["resourceVersion"] = str(self._version)
            stored["metadata"]["managedFields"] = [
                {
                    "manager": manager,
                    "operation": "Apply",
                    "force": (req.query.get("force") or [""])[0] == "true",
                }
            ]
            self.objects[(plural, namespace, name)] = stored
        return (201 if created else 200), stored


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def write_kubeconfig(path: Path, servers: dict[str, FakeKubeApiServer]) -> Path:
    """A kubeconfig with one context (and cluster, and user) per fake, named by key."""
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": n, "cluster": {"server": s.url}} for n, s in servers.items()],
        "users": [{"name": n, "user": {"token": s.token}} for n, s in servers.items()],
        "contexts": [
            {"name": n, "context": {"cluster": n, "user": n, "namespace": "default"}}
            for n in servers
        ],
        "current-context": next(iter(servers)),
    }
    path.write_text(yaml.safe_dump(doc))
    return path
