"""`xds-server serve`: its flags, checked and read into `ServeOptions`, then the server
run (one process on a state directory, or a replica on etcd with `--store`).

Every mistake is one line (`UsageError`) before anything starts: addresses, flags that
go together, the token file, the TLS files. The server itself (`xds_server.app`) is
imported only when `serve` runs.

Secure by default off loopback (issue 30): an xDS, admin or dashboard address that is
not loopback needs TLS (mTLS for xDS) and, for the admin API and the dashboard, tokens,
which then guard reads too; or `--insecure`, which serves it as asked (`off_loopback`).
So does the store: etcd off loopback is reached over TLS (`etcds://`) with a client
certificate or a login, or `--insecure` (`store_off_loopback`).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from xds_server.cli_flags import (
    LOG_LEVELS,
    UsageError,
    add_store_flags,
    check_store,
    is_loopback,
    setup_logging,
    split_host_port,
    store_address,
)
from xds_server.spec import load_spec
from xds_server.spec.values import parse_duration

if TYPE_CHECKING:
    from xds_server.admin.auth import Scope
    from xds_server.app import ServeOptions
    from xds_server.app.supervisor import WorkerId
    from xds_server.ha.etcd import EtcdAddress


def add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("serve", help="serve the mesh spec to Envoys over ADS")
    _add_sources(s)
    _add_addresses(s)
    _add_security(s)
    s.add_argument(
        "--workers",
        type=_count,
        default=1,
        metavar="N",
        help="N processes serve the xDS port (SO_REUSEPORT) and one of them decides: a "
        "push's work spread over N cores; a supervisor restarts a worker that dies "
        "(default 1: this process alone)",
    )
    s.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    s.add_argument("--log-format", default="text", choices=["text", "json"])
    s.set_defaults(func=cmd_serve)


def _add_sources(s: argparse.ArgumentParser) -> None:
    """Where the spec comes from: a file, or the store that replicas share."""
    s.add_argument(
        "--spec",
        metavar="FILE",
        help="the mesh spec (required without --store; with it, its valid changes are "
        "pushed to the store)",
    )
    add_store_flags(s)
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
    s.add_argument(
        "--store-compaction-retention",
        default="1h",
        metavar="DURATION",
        help="with --store: the leader compacts etcd's revisions older than this (30s, 1h; "
        "0: never)",
    )
    s.add_argument(
        "--store-quota-bytes",
        type=int,
        default=2 * 1024**3,
        metavar="BYTES",
        help="with --store: etcd's --quota-backend-bytes (etcd's default: 2 GiB); above 90%% "
        "of it the leader writes only rollbacks",
    )


def _add_addresses(s: argparse.ArgumentParser) -> None:
    """What it listens on, where it keeps state, where it reads canary health."""
    s.add_argument("--xds-address", default="127.0.0.1:18000", metavar="HOST:PORT")
    s.add_argument(
        "--state-dir",
        default="xds-state",
        metavar="DIR",
        help="rollout state and audit log (SQLite)",
    )
    s.add_argument(
        "--audit-retention",
        default="30d",
        metavar="DURATION",
        help="a finished rollout's audit moves to the archive (compressed; xdsctl audit "
        "still reads it) this long after its last change: 30d, 12h, 90s (default 30d)",
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


def _add_security(s: argparse.ArgumentParser) -> None:
    """Who may use the admin API, and TLS on the xDS and admin ports."""
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
    s.add_argument("--ui-tls-cert", metavar="PEM", help="serve the dashboard over HTTPS")
    s.add_argument("--ui-tls-key", metavar="PEM")
    s.add_argument(
        "--insecure",
        action="store_true",
        help="allow xDS, admin or dashboard addresses off loopback without TLS and tokens, "
        "and etcd off loopback in plaintext (without it, serve refuses them and names the "
        "flags to add)",
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from xds_server.app import ServeOptions

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
    retention, quota = _store_upkeep(args)
    address = _store(args)
    exposed = off_loopback(args)
    auth_reads = args.admin_auth_reads or bool(exposed and not args.insecure)
    options = ServeOptions(
        spec_path=Path(args.spec) if args.spec else None,
        xds_address=args.xds_address,
        state_dir=Path(args.state_dir),
        prometheus_url=args.prometheus_url,
        metrics_address=(metrics_host, metrics_port) if metrics_port else None,
        admin_address=args.admin_address,
        admin_tokens=_read_secret(args.admin_token_file, args.admin_auth_reads),
        admin_auth_reads=auth_reads,
        admin_scopes=_read_scopes(args.admin_token_file),
        xds_tls=_load_tls(args.xds_tls_cert, args.xds_tls_key, "--xds-tls"),
        xds_client_ca=_client_ca(args),
        xds_trust_domain=args.xds_trust_domain,
        admin_tls=_load_tls(args.admin_tls_cert, args.admin_tls_key, "--admin-tls"),
        ui_address=args.ui_address,
        ui_tls=_load_tls(args.ui_tls_cert, args.ui_tls_key, "--ui-tls"),
        store_url=args.store,
        store_prefix=args.store_prefix,
        store_security=address.security if address is not None else None,
        leader_ttl=args.leader_ttl,
        regions=regions,
        replica_id=args.replica_id or "",
        store_retention=retention,
        store_quota_bytes=quota,
        audit_retention=audit_retention(args.audit_retention),
        workers=args.workers,
    )
    return _run(options, address)


def _run(options: ServeOptions, address: EtcdAddress | None) -> int:
    """Serve: this process alone, or (`--workers N`) the supervisor or one of its workers."""
    if address is not None:
        check_store(address)  # etcd refusing this process: one line, before anything starts
    if options.workers > 1:
        return _workers(options, address is not None)
    if address is not None:
        asyncio.run(_serve_replica(options))
    else:
        from xds_server.app import local

        asyncio.run(local(options).serve())
    return 0


def audit_retention(text: str) -> float:
    """`--audit-retention`: a duration (30d, 12h, 90s, a number of seconds), over 0."""
    days = text.strip().removesuffix("d")
    seconds = (
        float(days) * 86400 if days != text.strip() and days.replace(".", "", 1).isdigit()
        else parse_duration(text)
    )  # fmt: skip
    if seconds is None or not seconds > 0:
        raise UsageError(f"--audit-retention: a duration like 30d, 12h or 90s, got {text!r}")
    return seconds


def _store_upkeep(args: argparse.Namespace) -> tuple[float, int]:
    """`--store-compaction-retention` (seconds) and `--store-quota-bytes`, checked."""
    retention = parse_duration(args.store_compaction_retention)
    if retention is None or retention < 0:
        raise UsageError(
            "--store-compaction-retention: a duration like 30s or 1h (0: never), got "
            f"{args.store_compaction_retention!r}"
        )
    if args.store_quota_bytes <= 0:
        raise UsageError(f"--store-quota-bytes: a number of bytes, got {args.store_quota_bytes}")
    return retention, args.store_quota_bytes


def _count(text: str) -> int:
    """`--workers`: a whole number, at least 1."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"a whole number of processes, at least 1, got {text!r}")
    return n


def off_loopback(args: argparse.Namespace) -> list[str]:
    """The addresses bound off loopback. Without `--insecure`, each must be secured, or
    `serve` stops with one line naming the flags to add: xDS needs mTLS (a server
    certificate and the clients' CA), the admin API and the dashboard TLS and a token
    file (reads then need a token too)."""
    exposed: list[str] = []
    missing: list[str] = []
    token = [] if args.admin_token_file else ["--admin-token-file"]
    ports = [
        (
            "--xds-address",
            args.xds_address,
            ["--xds-tls-cert", "--xds-tls-key", "--xds-tls-client-ca"],
            [],
        ),
        ("--admin-address", args.admin_address, ["--admin-tls-cert", "--admin-tls-key"], token),
        ("--ui-address", args.ui_address, ["--ui-tls-cert", "--ui-tls-key"], token),
    ]
    for flag, address, tls, tokens in ports:
        if not address or is_loopback(split_host_port(address, flag)[0]):
            continue
        exposed.append(f"{flag} {address}")
        need = [f for f in tls if not getattr(args, f[2:].replace("-", "_"))] + tokens
        missing += [f for f in need if f not in missing]
    if missing and not args.insecure:
        raise UsageError(
            f"{', '.join(exposed)}: not loopback, so serve needs TLS and tokens there: "
            f"add {' '.join(missing)} (or --insecure to serve it unprotected)"
        )
    return exposed


def _store(args: argparse.Namespace) -> EtcdAddress | None:
    """`--store` and its flags, read (etcd not asked yet: `check_store`); off loopback
    only secured or with `--insecure`."""
    if not args.store:
        return None
    address = store_address(args, check=False)
    store_off_loopback(address, args.insecure)
    return address


def store_off_loopback(address: EtcdAddress, insecure: bool) -> None:
    """etcd holds every region's configuration and decides who leads: off loopback,
    `serve` reaches it over TLS (`etcds://`) and proves who it is (a client certificate
    or a login), or is told `--insecure`; else one line naming what to add."""
    if insecure or all(is_loopback(host) for host, _ in address.endpoints):
        return
    if not address.security.tls:
        raise UsageError(
            f"--store {address}: not loopback, so serve reaches etcd over TLS with a client "
            "identity: use etcds:// with --store-ca (unless a public CA signed etcd's "
            "certificates), --store-cert and --store-key and/or --store-credentials FILE "
            "(or --insecure to reach it in plaintext)"
        )
    if not address.security.identity:
        raise UsageError(
            f"--store {address}: not loopback, so serve proves who it is to etcd: add "
            "--store-cert and --store-key, or --store-credentials FILE (or --insecure)"
        )


def _workers(options: ServeOptions, replicated: bool) -> int:
    """`--workers N`: this process is the supervisor of N workers (the same command line
    again), or one of them (`app/workers.py`)."""
    from xds_server.app.supervisor import bind_to_parent, tag_log_lines, worker_id

    me = worker_id()
    if me is None:
        return _supervise(options)
    bind_to_parent(me)
    tag_log_lines(me)
    if replicated:
        asyncio.run(_serve_replica(options, me))
    else:
        from xds_server.app.worker_server import local_worker

        asyncio.run(local_worker(options, me).serve())
    return 0


def _supervise(options: ServeOptions) -> int:
    from xds_server.app.board import Board
    from xds_server.app.supervisor import WorkerId, supervise

    argv = sys.argv[1:]
    if "serve" not in argv:
        raise UsageError(
            "--workers starts its workers with its command line: run `xds-server serve`"
        )
    on_death: Callable[[int], None] = lambda index: None  # noqa: E731
    if options.spec_path is not None and options.store_url is None:
        load_spec(options.spec_path)  # a bad spec: one report, before any worker starts
        board = Board.in_dir(options.state_dir)
        on_death = lambda index: board.gone(WorkerId(index, 0, 0).name)  # noqa: E731
    return supervise(argv, options.workers, on_death)


async def _serve_replica(options: ServeOptions, me: WorkerId | None = None) -> None:
    from xds_server.app import StoreError, replica
    from xds_server.app.worker_server import replica_worker

    try:
        server = await (replica(options) if me is None else replica_worker(options, me))
    except (StoreError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    await server.serve()


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


def _read_scopes(path: str | None) -> dict[str, Scope] | None:
    """What each token may do (`NAME:TOKEN:SCOPE`); the file was checked by `_read_secret`."""
    from xds_server.admin.auth import parse_scopes

    return parse_scopes(Path(path).read_bytes().decode(), path) if path else None


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
