"""`xds-server`: check a spec, serve it over ADS, print Envoy bootstraps and Istio manifests."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from xds_server.render.bootstrap import (
    BootstrapOptions,
    GrpcBootstrapOptions,
    render_bootstrap,
    render_grpc_bootstrap,
)
from xds_server.spec import (
    MeshSpec,
    SpecError,
    load_spec,
    parse_host_port,
    parse_spec,
    validate_spec,
)
from xds_server.spec.values import NAME_RE

if TYPE_CHECKING:
    from xds_server.app import ServeOptions
    from xds_server.ha.etcd import EtcdAddress
    from xds_server.ha.store import EtcdStore, StoredSpec
    from xds_server.rollout.state import RolloutState

T = TypeVar("T")

log = logging.getLogger("xds_server")


class UsageError(Exception):
    """A command-line mistake; printed as one line, exit code 2."""


LAB_SCENARIOS = (
    "healthy",
    "bad-canary",
    "slow-canary",
    "drifting-canary",
    "tenant-regression",
    "stalling-canary",
    "leader-failover",
    "canary-instance-loss",
    "etcd-member-loss",
)
"""`lab run --scenario` (xds_server.lab.run.SCENARIOS, which a test keeps equal)."""


def split_host_port(text: str, what: str) -> tuple[str, int]:
    try:
        return parse_host_port(text)
    except ValueError as exc:
        raise UsageError(f"{what}: {exc}, got {text!r}") from None


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
    from xds_server.app import ServeOptions, local

    setup_logging(args.log_level, args.log_format)
    split_host_port(args.xds_address, "--xds-address")
    split_host_port(args.admin_address, "--admin-address")
    metrics_host, metrics_port = split_host_port(args.metrics_address, "--metrics-address")
    if args.ui_address:
        split_host_port(args.ui_address, "--ui-address")
    if not args.store:
        if not args.spec:
            raise UsageError("--spec FILE is required (without --store, it is the only spec)")
        for flag in ("regions", "replica_id"):
            if getattr(args, flag):
                raise UsageError(f"--{flag.replace('_', '-')} goes with --store etcd://...")
    regions = tuple(r.strip() for r in args.regions.split(",") if r.strip()) if args.regions else ()
    if args.leader_ttl < 2:
        raise UsageError(f"--leader-ttl: at least 2 seconds, got {args.leader_ttl}")
    options = ServeOptions(
        spec_path=Path(args.spec) if args.spec else None,
        xds_address=args.xds_address,
        state_dir=Path(args.state_dir),
        prometheus_url=args.prometheus_url,
        metrics_address=(metrics_host, metrics_port) if metrics_port else None,
        admin_address=args.admin_address,
        admin_tokens=_read_secret(args.admin_token_file, args.admin_auth_reads),
        admin_auth_reads=args.admin_auth_reads,
        xds_tls=_load_tls(args.xds_tls_cert, args.xds_tls_key, "--xds-tls"),
        xds_client_ca=_client_ca(args),
        xds_trust_domain=args.xds_trust_domain,
        admin_tls=_load_tls(args.admin_tls_cert, args.admin_tls_key, "--admin-tls"),
        ui_address=args.ui_address,
        store_url=args.store,
        store_prefix=args.store_prefix,
        leader_ttl=args.leader_ttl,
        regions=regions,
        replica_id=args.replica_id or "",
    )
    if args.store:
        _store_address(args)  # a bad --store is one line, before anything starts
        asyncio.run(_serve_replica(options))
    else:
        asyncio.run(local(options).serve())
    return 0


async def _serve_replica(options: ServeOptions) -> None:
    from xds_server.app import StoreError, replica

    try:
        server = await replica(options)
    except (StoreError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    await server.serve()


def _store_address(args: argparse.Namespace) -> EtcdAddress:
    from xds_server.ha.etcd import StoreAddressError, parse_store_url

    try:
        return parse_store_url(args.store, args.store_prefix)
    except StoreAddressError as exc:
        raise UsageError(str(exc)) from None


def cmd_spec_push(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)  # SpecError: the file, the field, what is wrong
    text = Path(args.spec).read_text()
    address = _store_address(args)

    async def push() -> StoredSpec | None:
        async with _spec_store(address) as store:
            return await store.push_spec(text, args.spec)

    stored = _run_on_store(push(), address)
    if stored is None:
        print(f"{args.spec}: unchanged: the store's current spec is the same")
    else:
        print(
            f"{args.spec}: pushed as spec {stored.number} (revision {stored.revision}): "
            f"{len(spec.regions)} regions, {len(spec.services)} services"
        )
    return 0


def cmd_spec_get(args: argparse.Namespace) -> int:
    address = _store_address(args)
    history = _spec_history(address)
    if not history:
        raise UsageError(f"the store {address} holds no spec under {address.prefix}")
    if args.number is None:
        chosen = history[-1]
    else:
        found = [s for s in history if s.number == args.number]
        if not found:
            raise UsageError(f"--number {args.number}: no such spec (1 to {history[-1].number})")
        chosen = found[0]
    sys.stdout.write(chosen.text if chosen.text.endswith("\n") else chosen.text + "\n")
    return 0


def cmd_spec_history(args: argparse.Namespace) -> int:
    history = _spec_history(_store_address(args))
    print(f"{'SPEC':>4}  {'REVISION':>8}  {'PUSHED':<20}  {'SHA256':<12}  SOURCE")
    for s in history:
        pushed = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(s.pushed_at))
        digest = hashlib.sha256(s.text.encode()).hexdigest()[:12]
        print(f"{s.number:>4}  {s.revision:>8}  {pushed:<20}  {digest:<12}  {s.source}")
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    """Hold one instance's registration until SIGTERM or SIGINT, then deregister."""
    from xds_server.ha.registry import (
        InstanceSpec,
        Registration,
        RegistrationError,
        check_address,
        check_pool,
    )

    setup_logging(args.log_level)
    ttl = _seconds(args.ttl, "--ttl")
    if ttl < 2:
        raise UsageError(f"--ttl: at least 2s, got {args.ttl}")
    if args.health_url and not args.health_url.startswith(("http://", "https://")):
        raise UsageError(f"--health-url: expected an http(s) URL, got {args.health_url!r}")
    address = _store_address(args)
    try:
        instance = InstanceSpec(
            args.service, args.version, args.region, check_address(args.address), ttl,
            args.health_url, check_pool(args.pool or ""),
        )  # fmt: skip
    except RegistrationError as exc:
        raise UsageError(str(exc)) from None

    async def hold() -> None:
        registration = Registration(address, instance)
        try:
            await asyncio.wait_for(registration.check(), 10)
        except RegistrationError as exc:
            raise UsageError(str(exc)) from None
        except TimeoutError:
            raise UsageError(f"the store {address} did not answer within 10 s") from None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        task = asyncio.create_task(registration.run())
        await stop.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(hold())
    return 0


def _seconds(text: str, flag: str) -> float:
    from xds_server.spec import parse_duration

    seconds = parse_duration(text)
    if seconds is None:
        raise UsageError(f"{flag}: expected a duration like 10s or 500ms, got {text!r}")
    return seconds


def _spec_history(address: EtcdAddress) -> list[StoredSpec]:
    async def get() -> list[StoredSpec]:
        async with _spec_store(address) as store:
            return await store.spec_history()

    return _run_on_store(get(), address)


@contextlib.asynccontextmanager
async def _spec_store(address: EtcdAddress) -> AsyncIterator[EtcdStore]:
    from xds_server.ha.etcd import async_client
    from xds_server.ha.store import EtcdStore

    client = async_client(address, timeout=5)
    store = EtcdStore(address, client)
    try:
        yield store
    finally:
        store.close()
        with contextlib.suppress(Exception):
            await client.close()


def _run_on_store(work: Coroutine[Any, Any, T], address: EtcdAddress) -> T:
    from xds_server.rollout.ports import StoreWriteError

    try:
        return asyncio.run(asyncio.wait_for(work, 10))
    except StoreWriteError as exc:
        raise UsageError(str(exc)) from None
    except TimeoutError:
        raise UsageError(f"the store {address} did not answer within 10 s") from None
    except Exception as exc:
        if isinstance(exc, SpecError | UsageError):
            raise
        from xds_server.ha.etcd import one_line

        raise UsageError(f"cannot use the store {address}: {one_line(exc)}") from None


def _client_ca(args: argparse.Namespace) -> bytes | None:
    if not args.xds_tls_client_ca:
        if args.xds_trust_domain:
            raise UsageError("--xds-trust-domain goes with --xds-tls-client-ca")
        return None
    if not args.xds_tls_cert:
        raise UsageError("--xds-tls-client-ca needs --xds-tls-cert and --xds-tls-key")
    return Path(args.xds_tls_client_ca).read_bytes()


def _load_tls(cert: str | None, key: str | None, flag: str) -> tuple[bytes, bytes] | None:
    """(certificate chain, private key) from a pair of PEM files, or None for plaintext."""
    if not cert and not key:
        return None
    if not (cert and key):
        raise UsageError(f"{flag}-cert and {flag}-key go together")
    return Path(cert).read_bytes(), Path(key).read_bytes()


def _read_secret(path: str | None, for_reads: bool = False) -> dict[str, str] | None:
    """The admin API's credentials, {name: token}, from `--admin-token-file`."""
    from xds_server.admin.auth import TokenFileError, parse_tokens

    if not path:
        if for_reads:
            raise UsageError("--admin-auth-reads needs --admin-token-file")
        return None
    try:
        text = Path(path).read_bytes().decode()
    except UnicodeDecodeError:
        raise UsageError(f"--admin-token-file {path}: not UTF-8 text") from None
    try:
        return parse_tokens(text, f"--admin-token-file {path}")
    except TokenFileError as exc:
        raise UsageError(str(exc)) from None


def cmd_bootstrap(args: argparse.Namespace) -> int:
    if bool(args.xds_tls_cert) != bool(args.xds_tls_key):
        raise UsageError("--xds-tls-cert and --xds-tls-key go together")
    if args.xds_tls_cert and not args.xds_tls_ca:
        raise UsageError("--xds-tls-cert needs --xds-tls-ca (mTLS is TLS first)")
    if args.proxyless:
        return _bootstrap_proxyless(args)
    servers = [split_host_port(a.strip(), "--xds-address") for a in args.xds_address.split(",")]
    (host, port), fallbacks = servers[0], tuple(servers[1:])
    if args.listen:
        split_host_port(args.listen, "--listen")
    opts = BootstrapOptions(
        region=args.region,
        node_id=args.node_id,
        xds_host=host,
        xds_port=port,
        admin_port=9901 if args.admin_port is None else args.admin_port,
        admin_host=args.admin_host or "127.0.0.1",
        listen=args.listen,
        delta=args.delta,
        xds_tls_ca=args.xds_tls_ca,
        xds_tls_cert=args.xds_tls_cert,
        xds_tls_key=args.xds_tls_key,
        xds_fallbacks=fallbacks,
    )
    sys.stdout.write(render_bootstrap(opts))
    return 0


def _bootstrap_proxyless(args: argparse.Namespace) -> int:
    """A gRPC application's bootstrap; Envoy's own options make no sense there."""
    envoy_only = {
        "--listen": args.listen,
        "--delta": args.delta,  # gRPC speaks state of the world only
        "--admin-port": args.admin_port is not None,
        "--admin-host": args.admin_host,
    }
    given = [flag for flag, value in envoy_only.items() if value]
    if given:
        raise UsageError(f"{', '.join(given)}: Envoy options, not for --proxyless")
    for flag, value in (("--region", args.region), ("--node-id", args.node_id)):
        if not value.strip():
            raise UsageError(f"{flag}: must not be empty")
    servers = []
    for part in args.xds_address.split(","):
        try:
            servers.append(parse_host_port(part.strip(), port_from=1))
        except ValueError as exc:
            raise UsageError(f"--xds-address: {exc}, got {part.strip()!r}") from None
    opts = GrpcBootstrapOptions(
        region=args.region,
        node_id=args.node_id,
        xds_servers=tuple(servers),
        xds_tls_ca=args.xds_tls_ca,
        xds_tls_cert=args.xds_tls_cert,
        xds_tls_key=args.xds_tls_key,
    )
    sys.stdout.write(render_grpc_bootstrap(opts))
    return 0


def cmd_manifests_istio(args: argparse.Namespace) -> int:
    from xds_server.render.istio import all_objects, to_yaml
    from xds_server.rollout.state import current_rollouts

    if args.store and args.state_dir:
        raise UsageError("--store and --state-dir: the state is in one or the other")
    stored: list[RolloutState] = []
    if args.store:
        spec, stored = _read_store(args)
    elif not args.spec:
        raise UsageError("--spec FILE is required (or --store etcd://...)")
    else:
        spec = load_spec(args.spec)
        stored = read_rollouts(Path(args.state_dir)) if args.state_dir else []
    if spec.istio is None:
        # Check the spec as if it had an empty istio section: versions must be label values.
        spec = validate_spec({**spec.raw, "istio": {}}, spec.source)
    istio = spec.istio
    assert istio is not None
    if args.namespace:
        if not NAME_RE.match(args.namespace):
            raise UsageError(f"--namespace: bad namespace {args.namespace!r}")
        istio = dataclasses.replace(istio, namespace=args.namespace)
    regions = args.region or list(spec.regions)
    unknown = [r for r in regions if r not in spec.regions]
    if unknown:
        raise UsageError(
            f"--region: unknown region {unknown[0]!r} (regions: {', '.join(spec.regions)})"
        )
    objects = all_objects(spec, current_rollouts(spec, stored), regions, istio)
    sys.stdout.write(to_yaml(objects))
    return 0


def _read_store(args: argparse.Namespace) -> tuple[MeshSpec, list[RolloutState]]:
    """The spec (`--spec`, else the store's) and the rollouts, read from etcd once."""
    from xds_server.ha.store import EtcdStore, StoreReadError

    address = _store_address(args)
    store = EtcdStore(address)
    try:
        store.read()
    except StoreReadError as exc:
        raise UsageError(str(exc)) from None
    finally:
        store.close()
    if args.spec:
        spec = load_spec(args.spec)
    elif store.view.spec is None:
        raise UsageError(f"the store {address} holds no spec under {address.prefix}")
    else:
        spec = parse_spec(store.view.spec.text, f"{address}{store.keys.spec}")
    return spec, store.load_rollouts()


def read_rollouts(state_dir: Path) -> list[RolloutState]:
    """Rollout states from serve's state dir, read-only: printing never changes it."""
    from xds_server.rollout.store import Store, StoreUnreadable

    try:
        store = Store.read_only(state_dir)
    except StoreUnreadable as exc:
        raise UsageError(f"--state-dir: {exc}") from None
    try:
        return store.load_rollouts()
    finally:
        store.close()


def cmd_lab_run(args: argparse.Namespace) -> int:
    from xds_server.lab.run import run_lab

    if args.regions < 1 or args.envoys_per_region < 1:
        raise UsageError("--regions and --envoys-per-region must be at least 1")
    if args.notify is not None and not args.notify.startswith(("http://", "https://")):
        raise UsageError(f"--notify: expected an http(s) URL, got {args.notify!r}")
    if args.proxyless < 0:
        raise UsageError("--proxyless must be 0 or more")
    if args.proxyless and args.protocol == "http":
        raise UsageError("--proxyless clients speak gRPC: use --protocol grpc (or leave it out)")
    return run_lab(
        args.scenario,
        args.regions,
        args.envoys_per_region,
        args.keep,
        Path(args.out) if args.out else None,
        args.timeout,
        mtls=args.mtls,
        notify_url=args.notify,
        protocol=args.protocol or "http",
        proxyless=args.proxyless,
        ha=args.ha,
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
    _add_serve(sub)
    _add_spec(sub)
    _add_register(sub)
    _add_bootstrap(sub)
    _add_manifests(sub)
    _add_lab(sub)
    return p


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("serve", help="serve the mesh spec to Envoys over ADS")
    s.add_argument(
        "--spec",
        metavar="FILE",
        help="the mesh spec (required without --store; with it, its valid changes are "
        "pushed to the store)",
    )
    _add_store_flags(s)
    s.add_argument(
        "--leader-ttl",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="with --store: the leader lease's TTL (a dead leader's rollouts wait this long)",
    )
    s.add_argument(
        "--regions",
        metavar="R1,R2",
        help="with --store: serve only these regions' Envoys (default: every region)",
    )
    s.add_argument("--replica-id", help="with --store: this replica's name (default: host-port)")
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
        "--ui-address",
        default="127.0.0.1:18080",
        metavar="HOST:PORT",
        help="the web dashboard (empty: off); its actions need --admin-token-file",
    )
    s.add_argument(
        "--admin-token-file",
        metavar="FILE",
        help="require a bearer token for changes through the admin API: NAME:TOKEN lines "
        "(the audit log records NAME), or one bare token (named admin)",
    )
    s.add_argument(
        "--admin-auth-reads",
        action="store_true",
        help="require a token from --admin-token-file for reads too (nodes, config, "
        "rollouts, audit, CSDS)",
    )
    s.add_argument("--xds-tls-cert", metavar="PEM", help="serve xDS over TLS")
    s.add_argument("--xds-tls-key", metavar="PEM")
    s.add_argument(
        "--xds-tls-client-ca",
        metavar="PEM",
        help="require xDS clients to present a certificate signed by this CA, naming their "
        "region and node id (spiffe://DOMAIN/region/REGION/node/NODE_ID); needs --xds-tls-cert",
    )
    s.add_argument(
        "--xds-trust-domain",
        metavar="DOMAIN",
        help="with --xds-tls-client-ca: accept only identities of this SPIFFE trust domain",
    )
    s.add_argument("--admin-tls-cert", metavar="PEM", help="serve the admin API over TLS")
    s.add_argument("--admin-tls-key", metavar="PEM")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.add_argument("--log-format", default="text", choices=["text", "json"])
    s.set_defaults(func=cmd_serve)


def _add_store_flags(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument(
        "--store",
        required=required,
        metavar="etcd://HOST:PORT[,...]",
        help="replicas on etcd: the spec, rollout state and audit log live there",
    )
    p.add_argument(
        "--store-prefix",
        default="/xds-server/default",
        metavar="PREFIX",
        help="the keys' prefix in etcd (one mesh per prefix)",
    )


def _add_spec(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sp = sub.add_parser("spec", help="the mesh spec kept in etcd (replicas)")
    sp_sub = sp.add_subparsers(dest="spec_command", required=True)
    push = sp_sub.add_parser("push", help="validate a spec file, then store it as the next spec")
    push.add_argument("--spec", required=True, metavar="FILE")
    _add_store_flags(push, required=True)
    push.set_defaults(func=cmd_spec_push)
    get = sp_sub.add_parser("get", help="print the stored spec (the current one by default)")
    get.add_argument("--number", type=int, help="an earlier spec, by its number in history")
    _add_store_flags(get, required=True)
    get.set_defaults(func=cmd_spec_get)
    hist = sp_sub.add_parser("history", help="every spec pushed, oldest first")
    _add_store_flags(hist, required=True)
    hist.set_defaults(func=cmd_spec_history)


def _add_register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    r = sub.add_parser(
        "register",
        help="register a model server instance in the shared registry until stopped",
    )
    _add_store_flags(r, required=True)
    r.add_argument("--service", required=True)
    r.add_argument("--version", required=True, help="the pool version it serves (v2)")
    r.add_argument("--region", required=True)
    r.add_argument("--address", required=True, metavar="HOST:PORT", help="where Envoy sends")
    r.add_argument("--ttl", default="10s", help="its lease: gone this long after it dies")
    r.add_argument("--health-url", metavar="URL", help="registered only while this answers 2xx")
    r.add_argument(
        "--pool",
        default="",
        help="only this pool selects it (baseline: a fresh deploy of production's version); "
        "default: every pool of its version",
    )
    r.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    r.set_defaults(func=cmd_register)


def _add_bootstrap(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    b = sub.add_parser(
        "bootstrap", help="print an Envoy bootstrap (or a gRPC application's) for one node"
    )
    b.add_argument("--region", required=True)
    b.add_argument("--node-id", required=True)
    b.add_argument(
        "--xds-address",
        default="127.0.0.1:18000",
        metavar="HOST:PORT",
        help="the xDS server; several (replicas) separated by commas, the region's own "
        "first: the others are tried in order when it is down",
    )
    b.add_argument(
        "--proxyless",
        action="store_true",
        help="a proxyless gRPC application's bootstrap (GRPC_XDS_BOOTSTRAP), for "
        "grpc.insecure_channel('xds:///SERVICE')",
    )
    b.add_argument("--admin-port", type=int, default=None, help="Envoy admin's port (9901)")
    b.add_argument(
        "--admin-host",
        default=None,
        help="Envoy admin's address (127.0.0.1; 0.0.0.0 so that Prometheus can scrape it "
        "in a cluster)",
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
    b.add_argument(
        "--xds-tls-cert",
        metavar="PEM",
        help="this node's client certificate, for a server that requires mTLS "
        "(made by hack/make-certs.sh; an absolute path)",
    )
    b.add_argument("--xds-tls-key", metavar="PEM", help="the client certificate's key")
    b.set_defaults(func=cmd_bootstrap)


def _add_manifests(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    m = sub.add_parser("manifests", help="print generated manifests")
    m_sub = m.add_subparsers(dest="manifests_command", required=True)
    mi = m_sub.add_parser(
        "istio",
        help="a DestinationRule and a VirtualService per service and region (multi-doc YAML)",
    )
    mi.add_argument(
        "--spec", metavar="FILE", help="the mesh spec (with --store: default the store's)"
    )
    mi.add_argument(
        "--state-dir",
        metavar="DIR",
        help="serve's state dir: weights from its rollouts (read-only); "
        "without it (or --store): production 100%%",
    )
    _add_store_flags(mi)
    mi.add_argument("--region", action="append", help="only this region (repeatable)")
    mi.add_argument("--namespace", help="override the spec's istio.namespace")
    mi.set_defaults(func=cmd_manifests_istio)


def _add_lab(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    lab = sub.add_parser("lab", help="a local multi-region mesh with a live canary rollout")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True)
    run = lab_sub.add_parser("run", help="start the lab and run one rollout scenario")
    run.add_argument("--scenario", default="healthy", choices=LAB_SCENARIOS)
    run.add_argument("--regions", type=int, default=3)
    run.add_argument("--envoys-per-region", type=int, default=2)
    run.add_argument("--keep", action="store_true", help="leave the lab running at the end")
    run.add_argument("--out", metavar="DIR", help="output folder (default: under .lab/)")
    run.add_argument("--timeout", type=float, default=240, help="seconds before giving up")
    run.add_argument(
        "--mtls",
        action="store_true",
        help="xDS over mTLS: a certificate per Envoy naming its region and node id",
    )
    run.add_argument(
        "--notify",
        metavar="URL",
        help="also POST every rollout event to URL as a CloudEvent (a webhook target)",
    )
    run.add_argument(
        "--protocol",
        choices=("http", "grpc"),
        help="what Envoy and callers speak to the model servers: the Open Inference "
        "Protocol over REST (http, the default) or gRPC",
    )
    run.add_argument(
        "--proxyless",
        type=int,
        default=0,
        metavar="N",
        help="N proxyless gRPC clients per region, routing by xDS themselves (xds:///); "
        "implies --protocol grpc",
    )
    run.add_argument(
        "--ha",
        action="store_true",
        help="replicas on etcd: a three-member etcd cluster and one xds-server per region "
        "(implied by leader-failover and etcd-member-loss)",
    )
    run.set_defaults(func=cmd_lab_run)
    down = lab_sub.add_parser("down", help="stop a lab left running with --keep")
    down.add_argument("--out", metavar="DIR", help="the lab's folder (default: the last one)")
    down.set_defaults(func=cmd_lab_down)


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
