"""`xds-server`: check a spec, serve it over ADS, print Envoy bootstraps and Istio manifests."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import fcntl
import json
import logging
import re
import sqlite3
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from xds_server.config import SpecError, load_spec, validate_spec
from xds_server.render.bootstrap import BootstrapOptions, render_bootstrap
from xds_server.server import XdsServer, serve_forever

if TYPE_CHECKING:
    from xds_server.rollout.decide import RolloutState

log = logging.getLogger("xds_server")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class UsageError(Exception):
    """A command-line mistake; printed as one line, exit code 2."""


def split_host_port(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise UsageError(f"{what}: expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # grpc's own debug lines (event loop plumbing) drown ours at debug level.
    logging.getLogger("grpc").setLevel(max(logging.INFO, root.level))
    logging.getLogger("asyncio").setLevel(max(logging.INFO, root.level))


def cmd_check(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    pools = sum(len(s.pools) for s in spec.services)
    print(
        f"{args.spec}: ok: {len(spec.regions)} regions, {len(spec.services)} services, "
        f"{pools} pools"
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from xds_server.admin.service import AdminService, run_admin_server
    from xds_server.rollout.controller import RolloutController
    from xds_server.rollout.metrics import PrometheusSource
    from xds_server.rollout.store import Store
    from xds_server.telemetry import Telemetry

    setup_logging(args.log_level, args.log_format)
    split_host_port(args.xds_address, "--xds-address")
    metrics_host, metrics_port = split_host_port(args.metrics_address, "--metrics-address")
    spec = load_spec(args.spec)
    state_dir = Path(args.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    server = XdsServer(
        spec, spec_path=args.spec, tls=_load_tls(args.xds_tls_cert, args.xds_tls_key, "--xds-tls")
    )
    controller = None
    lock = _try_lock(state_dir / "controller.lock")
    if lock is None:
        log.warning(
            "another xds-server holds %s: serving xDS only, not deciding rollouts",
            state_dir / "controller.lock",
        )
    else:
        controller = RolloutController(
            server, Store.in_dir(state_dir), PrometheusSource(args.prometheus_url)
        )
        controller.restore()
    telemetry = Telemetry()
    telemetry.attach(server, controller)
    applier = None
    if controller is not None and spec.istio is not None and spec.istio.apply:
        # The istio output mode: only the process that decides applies (one writer).
        from xds_server.render.kube_apply import IstioApplier, follow_controller

        applier = IstioApplier(spec.istio)
        follow_controller(applier, controller)
        telemetry.attach_istio(applier)
        log.info(
            "istio output: applying to %s",
            ", ".join(f"{st.region} ({st.target})" for st in applier.status()),
        )
    if metrics_port:
        telemetry.serve(metrics_host, metrics_port)
        log.info("metrics on http://%s:%d/metrics", metrics_host, metrics_port)
    admin = AdminService(server, controller, _read_secret(args.admin_token_file), applier)
    tls = _load_tls(args.admin_tls_cert, args.admin_tls_key, "--admin-tls")
    split_host_port(args.admin_address, "--admin-address")
    companions: list[Callable[[], Coroutine[Any, Any, None]]] = [
        lambda: run_admin_server(admin, args.admin_address, tls),
        lambda: telemetry.sample_nodes_forever(server),
    ]
    if controller is not None:
        companions.append(controller.run)
    if applier is not None:
        companions.append(applier.run)
    asyncio.run(serve_forever(server, args.xds_address, companions))
    return 0


def _load_tls(cert: str | None, key: str | None, flag: str) -> tuple[bytes, bytes] | None:
    """(certificate chain, private key) from a pair of PEM files, or None for plaintext."""
    if not cert and not key:
        return None
    if not (cert and key):
        raise UsageError(f"{flag}-cert and {flag}-key go together")
    return Path(cert).read_bytes(), Path(key).read_bytes()


def _read_secret(path: str | None) -> str | None:
    if not path:
        return None
    token = Path(path).read_text().strip()
    if not token:
        raise UsageError(f"{path}: the token file is empty")
    return token


def _try_lock(path: Path) -> IO[str] | None:
    """One writer: the process holding this lock is the only one deciding rollouts."""
    handle = open(path, "a")  # noqa: SIM115 (held for the life of the process)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def cmd_bootstrap(args: argparse.Namespace) -> int:
    host, port = split_host_port(args.xds_address, "--xds-address")
    if args.listen:
        split_host_port(args.listen, "--listen")
    opts = BootstrapOptions(
        region=args.region,
        node_id=args.node_id,
        xds_host=host,
        xds_port=port,
        admin_port=args.admin_port,
        admin_host=args.admin_host,
        listen=args.listen,
        delta=args.delta,
        xds_tls_ca=args.xds_tls_ca,
    )
    sys.stdout.write(render_bootstrap(opts))
    return 0


def cmd_manifests_istio(args: argparse.Namespace) -> int:
    from xds_server.render.istio import all_objects, current_rollouts, to_yaml

    spec = load_spec(args.spec)
    if spec.istio is None:
        # Check the spec as if it had an empty istio section: versions must be label values.
        spec = validate_spec({**spec.raw, "istio": {}}, spec.source)
    istio = spec.istio
    assert istio is not None
    if args.namespace:
        if not _DNS_LABEL.match(args.namespace):
            raise UsageError(f"--namespace: bad namespace {args.namespace!r}")
        istio = dataclasses.replace(istio, namespace=args.namespace)
    regions = args.region or list(spec.regions)
    unknown = [r for r in regions if r not in spec.regions]
    if unknown:
        raise UsageError(
            f"--region: unknown region {unknown[0]!r} (regions: {', '.join(spec.regions)})"
        )
    stored = read_rollouts(Path(args.state_dir)) if args.state_dir else []
    objects = all_objects(spec, current_rollouts(spec, stored), regions, istio)
    sys.stdout.write(to_yaml(objects))
    return 0


def read_rollouts(state_dir: Path) -> list[RolloutState]:
    """Rollout states from a state dir's SQLite store, opened read-only: a running
    server may own it, and printing manifests must never change it."""
    from xds_server.rollout.store import state_from_json

    path = state_dir / "rollouts.sqlite3"
    if not path.is_file():
        raise UsageError(f"--state-dir: {path} does not exist (is it serve's --state-dir?)")
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT state FROM rollouts ORDER BY updated_at").fetchall()
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise UsageError(f"--state-dir: cannot read {path}: {exc}") from None
    return [state_from_json(r[0]) for r in rows]


def cmd_lab_run(args: argparse.Namespace) -> int:
    from xds_server.lab.run import run_lab

    if args.regions < 1 or args.envoys_per_region < 1:
        raise UsageError("--regions and --envoys-per-region must be at least 1")
    return run_lab(
        args.scenario,
        args.regions,
        args.envoys_per_region,
        args.keep,
        Path(args.out) if args.out else None,
        args.timeout,
    )


def cmd_lab_down(args: argparse.Namespace) -> int:
    from xds_server.lab.run import lab_down

    return lab_down(Path(args.out) if args.out else None)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xds-server", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("check", help="validate a mesh spec; exit non-zero on error")
    c.add_argument("--spec", required=True, metavar="FILE")
    c.set_defaults(func=cmd_check)

    s = sub.add_parser("serve", help="serve the mesh spec to Envoys over ADS")
    s.add_argument("--spec", required=True, metavar="FILE")
    s.add_argument("--xds-address", default="127.0.0.1:18000", metavar="HOST:PORT")
    s.add_argument(
        "--state-dir",
        default="xds-state",
        metavar="DIR",
        help="rollout state and audit log (SQLite)",
    )
    s.add_argument(
        "--prometheus-url", default="http://127.0.0.1:9090", help="where canary health is read from"
    )
    s.add_argument(
        "--metrics-address",
        default="127.0.0.1:18002",
        metavar="HOST:PORT",
        help="this server's own /metrics (port 0: off)",
    )
    s.add_argument(
        "--admin-address",
        default="127.0.0.1:18001",
        metavar="HOST:PORT",
        help="the admin API (xdsctl) and CSDS",
    )
    s.add_argument(
        "--admin-token-file",
        metavar="FILE",
        help="require this bearer token for changes through the admin API",
    )
    s.add_argument("--xds-tls-cert", metavar="PEM", help="serve xDS over TLS")
    s.add_argument("--xds-tls-key", metavar="PEM")
    s.add_argument("--admin-tls-cert", metavar="PEM", help="serve the admin API over TLS")
    s.add_argument("--admin-tls-key", metavar="PEM")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.add_argument("--log-format", default="text", choices=["text", "json"])
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser("bootstrap", help="print an Envoy bootstrap for one node")
    b.add_argument("--region", required=True)
    b.add_argument("--node-id", required=True)
    b.add_argument("--xds-address", default="127.0.0.1:18000", metavar="HOST:PORT")
    b.add_argument("--admin-port", type=int, default=9901)
    b.add_argument(
        "--admin-host",
        default="127.0.0.1",
        help="Envoy admin's address (0.0.0.0 so that Prometheus can scrape it in a cluster)",
    )
    b.add_argument(
        "--listen",
        metavar="ADDR:PORT",
        help="this node's listener address (several Envoys on one host)",
    )
    b.add_argument("--delta", action="store_true", help="use delta (incremental) xDS")
    b.add_argument(
        "--xds-tls-ca",
        metavar="PEM",
        help="talk TLS to the xDS server, trusting this CA (an absolute path)",
    )
    b.set_defaults(func=cmd_bootstrap)
    m = sub.add_parser("manifests", help="print generated manifests")
    m_sub = m.add_subparsers(dest="manifests_command", required=True)
    mi = m_sub.add_parser(
        "istio",
        help="a DestinationRule and a VirtualService per service and region (multi-doc YAML)",
    )
    mi.add_argument("--spec", required=True, metavar="FILE")
    mi.add_argument(
        "--state-dir",
        metavar="DIR",
        help="serve's state dir: weights from its rollouts (read-only); "
        "without it: production 100%%",
    )
    mi.add_argument("--region", action="append", help="only this region (repeatable)")
    mi.add_argument("--namespace", help="override the spec's istio.namespace")
    mi.set_defaults(func=cmd_manifests_istio)
    lab = sub.add_parser("lab", help="a local multi-region mesh with a live canary rollout")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True)
    run = lab_sub.add_parser("run", help="start the lab and run one rollout scenario")
    run.add_argument(
        "--scenario", default="healthy", choices=["healthy", "bad-canary", "slow-canary"]
    )
    run.add_argument("--regions", type=int, default=3)
    run.add_argument("--envoys-per-region", type=int, default=2)
    run.add_argument("--keep", action="store_true", help="leave the lab running at the end")
    run.add_argument("--out", metavar="DIR", help="output folder (default: under .lab/)")
    run.add_argument("--timeout", type=float, default=240, help="seconds before giving up")
    run.set_defaults(func=cmd_lab_run)
    down = lab_sub.add_parser("down", help="stop a lab left running with --keep")
    down.add_argument("--out", metavar="DIR", help="the lab's folder (default: the last one)")
    down.set_defaults(func=cmd_lab_down)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except SpecError as exc:
        print(exc.render(), file=sys.stderr)
        return 1
    except UsageError as exc:
        print(f"xds-server: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"xds-server: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
