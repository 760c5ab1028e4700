"""What `xds-server serve` was asked for: one frozen record, filled by the command line."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from xds_server.admin.auth import Scope
    from xds_server.ha.security import StoreSecurity


@dataclass(frozen=True)
class ServeOptions:
    spec_path: Path | None
    """None only with `store_url` (the spec is then the store's)."""
    xds_address: str = "127.0.0.1:18000"
    state_dir: Path = Path("xds-state")
    prometheus_url: str = "http://127.0.0.1:9090"
    metrics_address: tuple[str, int] | None = ("127.0.0.1", 18002)
    """None: no /metrics."""
    admin_address: str = "127.0.0.1:18001"
    admin_tokens: Mapping[str, str] | None = None
    """Name -> bearer token (`--admin-token-file`); None: the admin API asks for none."""
    admin_auth_reads: bool = False
    """Reads need a token too, not only changes (implied when the admin API or the
    dashboard is bound off loopback without `--insecure`)."""
    admin_scopes: Mapping[str, Scope] | None = None
    """Name -> what its token may do (`NAME:TOKEN:SCOPE` lines); a name not here: all."""
    xds_tls: tuple[bytes, bytes] | None = None
    """(certificate chain, private key) in PEM."""
    xds_client_ca: bytes | None = None
    """Require client certificates signed by this CA (PEM), whose identity names the
    node's region and id (mTLS)."""
    xds_trust_domain: str | None = None
    admin_tls: tuple[bytes, bytes] | None = None
    follow_interval: float = 0.5
    """How often a follower reads the committed state."""
    ui_address: str = "127.0.0.1:18080"
    """The web dashboard; "" turns it off."""
    ui_tls: tuple[bytes, bytes] | None = None
    """The dashboard over HTTPS: (certificate chain, private key) in PEM."""
    store_url: str | None = None
    """`etcd://HOST:PORT[,...]`: run as one replica of several on etcd (replicas);
    None: one process on SQLite under `state_dir`."""
    store_prefix: str = "/xds-server/default"
    store_security: StoreSecurity | None = None
    """`etcds://` and the store's TLS files and login (`--store-ca`, `--store-cert`,
    `--store-key`, `--store-credentials`); None: as the URL's scheme says, no files."""
    leader_ttl: float = 5.0
    """The leader lease's TTL, seconds: how long a dead leader holds the rollouts up."""
    regions: tuple[str, ...] = ()
    """The regions this replica serves; (): all."""
    replica_id: str = ""
    """This replica's name in the store; "": the host name and the xDS port."""
    workers: int = 1
    """`serve --workers N`: N processes share the xDS port, one decides (`app/workers.py`)."""
    audit_retention: float = 30 * 86400.0
    """Seconds a finished rollout's audit stays in the live log before the leader moves
    it to the archive (`--audit-retention`; `rollout/archive.py`)."""
    store_retention: float = 3600.0
    """Seconds of etcd history the leader keeps (it compacts older revisions); 0: all."""
    store_quota_bytes: int = 2 * 1024**3
    """etcd's `--quota-backend-bytes`: above 90% of it the leader writes only rollbacks."""

    @property
    def replicated(self) -> bool:
        """Replicas on etcd (`--store`), rather than one process on SQLite."""
        return self.store_url is not None
