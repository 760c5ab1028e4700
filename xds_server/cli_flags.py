"""What `xds-server`'s commands share: the one-line usage error, the flags several of
them take (HOST:PORT, durations, `--store`), and the logging `--log-level` and
`--log-format` set up.

Imports stay light (no server, no store client): every command loads this.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import socket
import sys
import time
from typing import TYPE_CHECKING

from xds_server.spec import parse_duration, parse_host_port

if TYPE_CHECKING:
    from xds_server.ha.etcd import EtcdAddress
    from xds_server.ha.security import StoreSecurity

LOG_LEVELS = ["debug", "info", "warning", "error"]


class UsageError(Exception):
    """A command-line mistake; printed as one line, exit code 2."""


def split_host_port(text: str, what: str) -> tuple[str, int]:
    try:
        return parse_host_port(text)
    except ValueError as exc:
        raise UsageError(f"{what}: {exc}, got {text!r}") from None


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps a port on this machine: a loopback address, or a
    name every address of which is one. Every interface (0.0.0.0, ::, "") is not."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False  # (the bind will fail on its own)
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def seconds_flag(text: str, flag: str) -> float:
    """A duration flag (10s, 500ms) in seconds."""
    seconds = parse_duration(text)
    if seconds is None:
        raise UsageError(f"{flag}: expected a duration like 10s or 500ms, got {text!r}")
    return seconds


def add_store_flags(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument(
        "--store",
        required=required,
        metavar="etcd[s]://HOST:PORT[,...]",
        help="replicas on etcd: the spec, rollout state and audit log live there "
        "(etcds://: over TLS)",
    )
    p.add_argument(
        "--store-prefix",
        default="/xds-server/default",
        metavar="PREFIX",
        help="the keys' prefix in etcd (one mesh per prefix)",
    )
    add_store_security_flags(p)


def add_store_security_flags(p: argparse.ArgumentParser) -> None:
    """TLS and the etcd user, for every command that reaches the store."""
    p.add_argument(
        "--store-ca",
        metavar="PEM",
        help="with etcds://: the CA that signed etcd's certificates (default: the "
        "system's trusted roots)",
    )
    p.add_argument("--store-cert", metavar="PEM", help="with etcds://: a client certificate")
    p.add_argument("--store-key", metavar="PEM", help="with etcds://: its private key")
    p.add_argument(
        "--store-credentials",
        metavar="FILE",
        help="log in to etcd as the user of FILE: one line user:password (chmod 600)",
    )


def store_security(args: argparse.Namespace, url: str) -> StoreSecurity:
    """The store flags' files read and checked (one line naming a flag and file)."""
    from xds_server.ha.security import StoreSecurityError, load_security

    try:
        return load_security(
            url.startswith("etcds://"),
            args.store_ca,
            args.store_cert,
            args.store_key,
            args.store_credentials,
        )
    except StoreSecurityError as exc:
        raise UsageError(str(exc)) from None


def store_address(args: argparse.Namespace, check: bool = True) -> EtcdAddress:
    """`--store`, `--store-prefix` and the TLS and login flags, checked (a bad URL, a
    file that cannot be read, is one line). `check`: then ask etcd, once, whether it
    lets this process read the prefix (a wrong password, a certificate it refuses:
    one line naming the flag, before anything starts)."""
    from xds_server.ha.etcd import StoreAddressError, parse_store_url

    security = store_security(args, args.store)
    try:
        address = parse_store_url(args.store, args.store_prefix, security)
    except StoreAddressError as exc:
        raise UsageError(str(exc)) from None
    if check:
        check_store(address)
    return address


def check_store(address: EtcdAddress) -> None:
    """Does etcd let this process read its prefix? One line naming the flag if not."""
    from xds_server.ha.etcd import check_access
    from xds_server.ha.security import StoreAccessError

    try:
        check_access(address)
    except StoreAccessError as exc:
        raise UsageError(str(exc)) from None


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
