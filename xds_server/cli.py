"""`xds-server`: check a spec, serve it over ADS, print Envoy bootstraps and Istio manifests."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import importlib
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from xds_server.cli_flags import (
    LOG_LEVELS,
    UsageError,
    add_store_flags,
    seconds_flag,
    setup_logging,
    split_host_port,
    store_address,
)
from xds_server.cli_serve import add_serve
from xds_server.lab.scenarios import SCENARIO_NAMES
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
    from xds_server.ha.etcd import EtcdAddress
    from xds_server.ha.store import StoredSpec
    from xds_server.rollout.state import RolloutState


def cmd_check(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    pools = sum(len(s.pools) for s in spec.services)
    print(
        f"{args.spec}: ok: {len(spec.regions)} regions, {len(spec.services)} services, "
        f"{pools} pools"
    )
    return 0


def cmd_spec_push(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)  # SpecError: the file, the field, what is wrong
    text = Path(args.spec).read_text()
    address = store_address(args)
    from xds_server.ha.oneshot import push_spec

    with _store_errors():
        stored = push_spec(address, text, args.spec)
    if stored is None:
        print(f"{args.spec}: unchanged: the store's current spec is the same")
    else:
        print(
            f"{args.spec}: pushed as spec {stored.number} (revision {stored.revision}): "
            f"{len(spec.regions)} regions, {len(spec.services)} services"
        )
    return 0


def cmd_spec_get(args: argparse.Namespace) -> int:
    address = store_address(args)
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
    history = _spec_history(store_address(args))
    print(f"{'SPEC':>4}  {'REVISION':>8}  {'PUSHED':<20}  {'SHA256':<12}  SOURCE")
    for s in history:
        pushed = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(s.pushed_at))
        digest = hashlib.sha256(s.text.encode()).hexdigest()[:12]
        print(f"{s.number:>4}  {s.revision:>8}  {pushed:<20}  {digest:<12}  {s.source}")
    return 0


def _spec_history(address: EtcdAddress) -> list[StoredSpec]:
    from xds_server.ha.oneshot import spec_history

    with _store_errors():
        return spec_history(address)


@contextlib.contextmanager
def _store_errors() -> Iterator[None]:
    """The store's one-line failures (`ha.oneshot.OneShotError`) as usage errors."""
    from xds_server.ha.oneshot import OneShotError

    try:
        yield
    except OneShotError as exc:
        raise UsageError(str(exc)) from None


def cmd_register(args: argparse.Namespace) -> int:
    """Hold one instance's registration until SIGTERM or SIGINT, then deregister."""
    from xds_server.ha.registry import (
        InstanceSpec,
        RegistrationError,
        check_address,
        check_pool,
        hold_until_stopped,
    )

    setup_logging(args.log_level)
    ttl = seconds_flag(args.ttl, "--ttl")
    if ttl < 2:
        raise UsageError(f"--ttl: at least 2s, got {args.ttl}")
    if args.health_url and not args.health_url.startswith(("http://", "https://")):
        raise UsageError(f"--health-url: expected an http(s) URL, got {args.health_url!r}")
    if args.health_port is not None and not 1 <= args.health_port <= 65535:
        raise UsageError(f"--health-port: expected a port from 1 to 65535, got {args.health_port}")
    address = store_address(args)
    try:
        instance = InstanceSpec(
            args.service, args.version, args.region, check_address(args.address), ttl,
            args.health_url, check_pool(args.pool or ""), args.health_port,
        )  # fmt: skip
        asyncio.run(hold_until_stopped(address, instance))
    except RegistrationError as exc:
        raise UsageError(str(exc)) from None
    return 0


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
    from xds_server.ha.oneshot import read_once

    address = store_address(args)
    with _store_errors():
        stored = read_once(address)
    if args.spec:
        spec = load_spec(args.spec)
    elif stored.spec is None:
        raise UsageError(f"the store {address} holds no spec under {address.prefix}")
    else:
        spec = parse_spec(stored.spec.text, stored.spec_key)
    return spec, stored.rollouts


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


LAB_EXTRA = ("rich", "matplotlib", "grpc_health")
"""The packages `pip install 'xds-server[lab]'` adds (pyproject's lab extra)."""


@contextlib.contextmanager
def _lab_extra() -> Iterator[None]:
    """Around the lab's import (never at this module's: the control plane installs
    without the lab's extra): without the extra, one line that says what to install."""
    try:
        for name in LAB_EXTRA:  # up front: some load late (the plot, at the end of a run)
            importlib.import_module(name)
        yield
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in LAB_EXTRA:
            raise
        raise UsageError(
            f"the lab needs its extra packages (no module named {exc.name!r}): "
            "pip install 'xds-server[lab]'"
        ) from None


def cmd_lab_run(args: argparse.Namespace) -> int:
    with _lab_extra():
        from xds_server.lab.run import run_lab

    if args.regions < 1 or args.envoys_per_region < 1:
        raise UsageError("--regions and --envoys-per-region must be at least 1")
    if args.notify is not None and not args.notify.startswith(("http://", "https://")):
        raise UsageError(f"--notify: expected an http(s) URL, got {args.notify!r}")
    if args.proxyless < 0:
        raise UsageError("--proxyless must be 0 or more")
    if args.proxyless and args.protocol == "http":
        raise UsageError("--proxyless clients speak gRPC: use --protocol grpc (or leave it out)")
    if args.models == "mlserver":
        _check_mlserver(args)
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
        models=args.models,
        netns=args.netns,
        fast=args.fast,
    )


def _check_mlserver(args: argparse.Namespace) -> None:
    """`lab run --models mlserver`: a scenario its canary models cover, callers it can
    answer, and MLServer's virtual environment there."""
    from xds_server.lab.mlserver import CANARY_MODELS, MLServerMissing, find_venv

    if args.scenario not in CANARY_MODELS:
        raise UsageError(
            f"--models mlserver: scenario {args.scenario!r} needs the built-in servers' "
            f"knobs; with MLServer: {', '.join(CANARY_MODELS)}"
        )
    if args.proxyless:
        raise UsageError("--models mlserver: proxyless clients send the built-in model's inputs")
    try:
        find_venv()
    except MLServerMissing as exc:
        raise UsageError(str(exc)) from None


def cmd_lab_down(args: argparse.Namespace) -> int:
    with _lab_extra():
        from xds_server.lab.run import lab_down

    return lab_down(Path(args.out) if args.out else None)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xds-server", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="validate a mesh spec; exit non-zero on error")
    c.add_argument("--spec", required=True, metavar="FILE")
    c.set_defaults(func=cmd_check)
    add_serve(sub)
    _add_spec(sub)
    _add_register(sub)
    _add_bootstrap(sub)
    _add_manifests(sub)
    _add_lab(sub)
    return p


def _add_spec(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sp = sub.add_parser("spec", help="the mesh spec kept in etcd (replicas)")
    sp_sub = sp.add_subparsers(dest="spec_command", required=True)
    push = sp_sub.add_parser("push", help="validate a spec file, then store it as the next spec")
    push.add_argument("--spec", required=True, metavar="FILE")
    add_store_flags(push, required=True)
    push.set_defaults(func=cmd_spec_push)
    get = sp_sub.add_parser("get", help="print the stored spec (the current one by default)")
    get.add_argument("--number", type=int, help="an earlier spec, by its number in history")
    add_store_flags(get, required=True)
    get.set_defaults(func=cmd_spec_get)
    hist = sp_sub.add_parser("history", help="every spec pushed, oldest first")
    add_store_flags(hist, required=True)
    hist.set_defaults(func=cmd_spec_history)


def _add_register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    r = sub.add_parser(
        "register",
        help="register a model server instance in the shared registry until stopped",
    )
    add_store_flags(r, required=True)
    r.add_argument("--service", required=True)
    r.add_argument("--version", required=True, help="the pool version it serves (v2)")
    r.add_argument("--region", required=True)
    r.add_argument("--address", required=True, metavar="HOST:PORT", help="where Envoy sends")
    r.add_argument("--ttl", default="10s", help="its lease: gone this long after it dies")
    r.add_argument("--health-url", metavar="URL", help="registered only while this answers 2xx")
    r.add_argument(
        "--health-port",
        type=int,
        metavar="PORT",
        help="where the warm-up's health check asks it, if not on --address's port "
        "(a gRPC model server's REST port)",
    )
    r.add_argument(
        "--pool",
        default="",
        help="only this pool selects it (baseline: a fresh deploy of production's version); "
        "default: every pool of its version",
    )
    r.add_argument("--log-level", default="info", choices=LOG_LEVELS)
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
    add_store_flags(mi)
    mi.add_argument("--region", action="append", help="only this region (repeatable)")
    mi.add_argument("--namespace", help="override the spec's istio.namespace")
    mi.set_defaults(func=cmd_manifests_istio)


def _add_lab(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    lab = sub.add_parser("lab", help="a local multi-region mesh with a live canary rollout")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True)
    run = lab_sub.add_parser("run", help="start the lab and run one rollout scenario")
    run.add_argument("--scenario", default="healthy", choices=SCENARIO_NAMES)
    run.add_argument("--regions", type=int, default=3)
    run.add_argument("--envoys-per-region", type=int, default=2)
    run.add_argument("--keep", action="store_true", help="leave the lab running at the end")
    run.add_argument("--out", metavar="DIR", help="output folder (default: under .lab/)")
    run.add_argument("--timeout", type=float, default=240, help="seconds before giving up")
    _add_lab_run_options(run)
    run.set_defaults(func=cmd_lab_run)
    down = lab_sub.add_parser(
        "down", help="stop a lab left running with --keep (and remove its namespaces)"
    )
    down.add_argument("--out", metavar="DIR", help="the lab's folder (default: the last one)")
    down.set_defaults(func=cmd_lab_down)


def _add_lab_run_options(run: argparse.ArgumentParser) -> None:
    """`lab run`'s choices of how the lab is built and run."""
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
    run.add_argument(
        "--models",
        choices=("builtin", "mlserver"),
        default="builtin",
        help="who serves the pools: the lab's built-in model servers (fault knobs) or a "
        "real MLServer per pool with scikit-learn models (`make mlserver` installs it)",
    )
    run.add_argument(
        "--netns",
        action="store_true",
        help="each region in a network namespace of its own, Prometheus and the operator's "
        "side in another, joined by a bridge (needs root; without it: on loopback, as "
        "the lab says)",
    )
    run.add_argument(
        "--fast",
        action="store_true",
        help="short steps (3 s), no warm-up and no output gate, for scenarios on the "
        "lab's default plan: a quicker look at the rollout's mechanics",
    )


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
