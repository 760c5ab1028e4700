"""The lab's credentials: the admin token's file, and with `mtls` a CA and certificates.

The server (or each replica) is started with `server_args()`; each Envoy and proxyless
client's bootstrap names `client_tls(...)`'s files. The certificates come from the
repository's `hack/make-certs.sh` (the lab runs from a checkout), one per node, naming
its region and node id as the server checks them.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from xds_server.lab.layout import MeshLayout

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
