"""The lab's credentials: the admin token's file, and with `mtls` a CA and certificates.

The server (or each replica) is started with `server_args()`; each Envoy and proxyless
client's bootstrap names `client_tls(...)`'s files. The certificates come from the
repository's `hack/make-certs.sh` (the lab runs from a checkout), one per node, naming
its region and node id as the server checks them.

With `ha` too, etcd runs with TLS and users (issue 30): `make_etcd_credentials` makes
etcd's own CA (the store's trust is not the mesh's), a certificate per member (for
clients and peers, naming the member's address), a client certificate for the lab's
processes, and the users' credential files (`EtcdCredentials`). The certificate's CN
is no etcd user (`CLIENT_CN`): etcd takes a certificate's CN for the user of a call
without a token, so with it every call must carry the login's token, or fail.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from xds_server.ha.security import StoreSecurity, load_security
from xds_server.lab.layout import MeshLayout

ETCD_USER = "xds-replica"
"""The etcd user the lab's replicas, registrations and driver log in as: read and
write on `ETCD_PREFIX` only (root is kept for the operator)."""
CLIENT_CN = "xds-server lab client"
"""The client certificate's subject: what a machine is, not who logs in."""
ETCD_PREFIX = "/xds-server/"
"""What the lab's etcd user may read and write (every mesh prefix under it)."""
_OPENSSL_CONFIG = "[req]\ndistinguished_name=dn\n[dn]\n"
"""No default extensions: a leaf is no CA (openssl's own config would say it is)."""


@dataclass(frozen=True)
class EtcdCredentials:
    """The files of an etcd cluster with TLS and users, under `directory`."""

    directory: Path
    user: str = ETCD_USER

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    def member(self, name: str) -> tuple[Path, Path]:
        """A member's certificate and key (its client port's and its peers')."""
        return self.directory / f"{name}.pem", self.directory / f"{name}.key"

    @property
    def client(self) -> tuple[Path, Path]:
        """The lab's client certificate and key (CN: `CLIENT_CN`, no etcd user)."""
        return self.directory / "client.pem", self.directory / "client.key"

    def credentials(self, user: str = "") -> Path:
        """`user:password`'s file (`--store-credentials`); default: the lab's user."""
        return self.directory / f"{user or self.user}.credentials"

    def password(self, user: str = "") -> str:
        return self.credentials(user).read_text().strip().partition(":")[2]

    def flags(self) -> list[str]:
        """The store flags of every command the lab runs against this etcd."""
        cert, key = self.client
        return ["--store-ca", str(self.ca), "--store-cert", str(cert), "--store-key", str(key),
                "--store-credentials", str(self.credentials())]  # fmt: skip

    def security(self) -> StoreSecurity:
        """The same, for the lab's own clients (its driver reads the store)."""
        cert, key = self.client
        return load_security(True, str(self.ca), str(cert), str(key), str(self.credentials()))


def make_etcd_credentials(
    directory: Path, members: Sequence[tuple[str, str]], user: str = ETCD_USER
) -> EtcdCredentials:
    """etcd's CA, a certificate per (member name, address) and the client's (openssl),
    and a random password for root and for `user` (files mode 600)."""
    made = EtcdCredentials(directory, user)
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "openssl.cnf"
    config.write_text(_OPENSSL_CONFIG)
    key = directory / "ca.key"
    ca_extensions = ["basicConstraints=critical,CA:TRUE", "keyUsage=critical,keyCertSign,cRLSign"]
    _openssl(config, made.ca, key, "/CN=xds-server lab etcd CA", ca_extensions)
    for name, host in members:
        names = dict.fromkeys([f"IP:{host}", "IP:127.0.0.1", "DNS:localhost"])
        pem, pem_key = made.member(name)
        _openssl(config, pem, pem_key, f"/CN={name}",
                 [f"subjectAltName={','.join(names)}", "extendedKeyUsage=serverAuth,clientAuth",
                  "basicConstraints=critical,CA:FALSE"], signer=(made.ca, key))  # fmt: skip
    cert, cert_key = made.client
    _openssl(config, cert, cert_key, f"/CN={CLIENT_CN}",
             ["extendedKeyUsage=clientAuth", "basicConstraints=critical,CA:FALSE"],
             signer=(made.ca, key))  # fmt: skip
    for who in ("root", user):
        path = made.credentials(who)
        path.write_text(f"{who}:{secrets.token_urlsafe(18)}\n")
        path.chmod(0o600)
    return made


def _openssl(
    config: Path,
    cert: Path,
    key: Path,
    subject: str,
    extensions: list[str],
    signer: tuple[Path, Path] | None = None,
) -> None:
    """One P-256 key and its certificate (self-signed without `signer`), 30 days."""
    sign = ["-CA", str(signer[0]), "-CAkey", str(signer[1])] if signer else []
    argv = ["openssl", "req", "-x509", "-config", str(config), "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key),
            "-out", str(cert), "-subj", subject, "-days", "30", *sign]  # fmt: skip
    for extension in extensions:
        argv += ["-addext", extension]
    subprocess.run(argv, check=True, capture_output=True, timeout=30)
    key.chmod(0o600)


MAKE_CERTS = Path(__file__).resolve().parents[2] / "hack" / "make-certs.sh"
"""The repository's certificate script (the lab runs from a checkout)."""


class Credentials:
    def __init__(self, layout: MeshLayout) -> None:
        self.layout = layout

    @property
    def certs(self) -> Path:
        """The folder of the CA and every certificate (with `mtls`)."""
        return self.layout.workdir / "certs"

    @property
    def token_file(self) -> Path | None:
        """The admin token's file (for `xdsctl --token-file`), when there is a token."""
        if self.layout.opts.admin_token is None:
            return None
        return self.layout.workdir / "admin-token"

    def make_certs(self) -> None:
        """A CA, the server's certificate and one per Envoy and proxyless client
        (hack/make-certs.sh)."""
        nodes = [f"{e.region}/{e.node_id}" for e in self.layout.envoys]
        nodes += [f"{r}/{node}" for r, node in self.layout.proxyless_nodes()]
        subprocess.run(
            ["bash", str(MAKE_CERTS), str(self.certs), *nodes],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def client_tls(self, region: str, node_id: str) -> tuple[str | None, ...]:
        """(CA, certificate, key) files for a node's bootstrap; Nones without mTLS."""
        if not self.layout.opts.mtls:
            return None, None, None
        node = self.certs / region / node_id
        return str(self.certs / "ca.pem"), f"{node}.pem", f"{node}.key"

    def server_args(self) -> list[str]:
        """`serve`'s flags for the admin token (its file written now) and for xDS over
        mTLS, when the lab has them."""
        return [*self._token_args(), *self._mtls_args()]

    def _mtls_args(self) -> list[str]:
        if not self.layout.opts.mtls:
            return []
        return ["--xds-tls-cert", str(self.certs / "server.pem"),
                "--xds-tls-key", str(self.certs / "server.key"),
                "--xds-tls-client-ca", str(self.certs / "ca.pem")]  # fmt: skip

    def _token_args(self) -> list[str]:
        path = self.token_file
        if path is None or self.layout.opts.admin_token is None:
            return []
        path.write_text(self.layout.opts.admin_token)
        path.chmod(0o600)
        return ["--admin-token-file", str(path)]
