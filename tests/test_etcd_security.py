"""etcd over TLS with client certificates and users (issue 30), against a real etcd
configured so (`EtcdCluster(secure=True)`: the lab's `--ha --mtls` store): a replica
serves and commits over `etcds://` with a login; the command line's refusals are one
line naming the flag (a wrong password, a missing file, no CA, a plaintext client,
which that etcd refuses); clients log in again when etcd forgets their token, and a
watch made under a forgotten token fails rather than waiting forever. One cluster for
the module."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from aetcd import rpc

from tests.conftest import AdsClient, make_spec_doc
from tests.support import wait_for
from tests.test_ads_protocol import sync_all
from tests.test_ha_cli import one_line, run, run_processes
from tests.test_ha_replicas import start_replica
from xds_server.ha.etcd import SyncKV, async_client, check_access, parse_store_url
from xds_server.ha.security import StoreAccessError
from xds_server.ha.store import EtcdStore
from xds_server.lab.etcd import EtcdCluster
from xds_server.lab.procs import free_port
from xds_server.xds.types import ROUTE

PREFIX = "/xds-server/secure"
REGIONS = ("us-east", "eu-west")


@pytest.fixture(scope="module")
def etcds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """Three members, TLS on client and peer ports with client certificates required,
    authentication on (root, and the lab's user with readwrite on /xds-server/)."""
    with EtcdCluster(tmp_path_factory.mktemp("etcds"), secure=True) as cluster:
        yield cluster


def view(cluster: EtcdCluster) -> EtcdStore:
    store = EtcdStore(parse_store_url(cluster.url, PREFIX, cluster.security()))
    store.read()
    return store


def test_a_replica_serves_and_commits_over_etcds_with_a_login(
    tmp_path: Path, etcds: EtcdCluster
) -> None:
    """The spec pushed by the command line, a replica elected, its rollout committed
    (the fenced commit's channel, logged in), its xDS served; the store's first member
    in the URL is down, so the TLS channels move on to the next."""
    spec = tmp_path / "mesh.yaml"
    ports = {(r, p): free_port() for r in REGIONS for p in ("production", "canary")}
    spec.write_text(yaml.safe_dump(make_spec_doc(ports, regions=REGIONS)))
    flags = ["--store-prefix", PREFIX, *etcds.client_flags()]
    ((code, _, err, _),) = run_processes(
        [["spec", "push", "--spec", str(spec), "--store", etcds.url, *flags]]
    )
    assert code == 0, err
    down = etcds.url.replace("etcds://", f"etcds://127.0.0.1:{free_port()},")
    replica = start_replica(tmp_path, down, "a", *flags)
    try:
        wait_for(lambda: view(etcds).view.leader, "replica a to lead", timeout=30)
        wait_for(lambda: view(etcds).load_rollouts(), "its rollout committed", timeout=30)
        client = AdsClient(replica.xds, region="us-east", node_id="secure-1")
        routes = sync_all(client)[ROUTE]
        assert routes.version_info, routes
        client.close()
    finally:
        replica.process.stop()
    log = (tmp_path / "a.log").read_text()
    assert "Traceback" not in log, log[-3000:]


def test_the_command_lines_refusals_are_one_line_naming_the_flag(
    tmp_path: Path, etcds: EtcdCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each refusal one line on stderr, exit 2. As processes where gRPC's own C core
    would print a failed handshake (no CA) and for `serve`; the rest in this process."""
    assert etcds.tls is not None
    wrong = tmp_path / "wrong.credentials"
    wrong.write_text(f"{etcds.tls.user}:not-the-password\n")
    wrong.chmod(0o600)
    flags = etcds.client_flags()
    ca, cert, key = (flags[i] for i in (1, 3, 5))
    plain = etcds.url.replace("etcds://", "etcd://")
    login = ["--store-credentials", str(etcds.tls.credentials())]
    history = ["spec", "history", "--store-prefix", PREFIX]
    processes = {
        "no CA": (
            [*history, "--store", etcds.url, "--store-cert", cert, "--store-key", key, *login],
            "its TLS certificate is not signed by a CA this machine trusts",
            "give --store-ca",
        ),
        "serve, wrong password": (
            ["serve", "--store", etcds.url, *flags[:6], "--store-credentials", str(wrong)],
            f"--store-credentials {wrong}: etcd at ",
            "refused user 'xds-replica': wrong user name or password",
        ),
        "serve, plaintext etcd off loopback": (
            ["serve", "--store", "etcd://10.255.0.1:2379"],
            "--store etcd://10.255.0.1:2379: not loopback",
            "use etcds:// with --store-ca",
        ),
    }
    in_process = {
        "missing certificate": (
            [*history, "--store", etcds.url, *flags[:2], "--store-cert", "/nope.pem",
             "--store-key", key, *login],
            "--store-cert /nope.pem: cannot read it", "No such file",
        ),
        "no client certificate": (
            [*history, "--store", etcds.url, "--store-ca", ca, *login],
            "asks for a client certificate", "--store-cert and --store-key",
        ),
        "plaintext client": (
            [*history, "--store", plain, *login], "closed a plaintext connection", "etcds://"
        ),
        "TLS flags on etcd://": (
            [*history, "--store", plain, *flags],
            "--store-ca, --store-cert, --store-key: TLS flags", "use etcds://",
        ),
    }  # fmt: skip
    results = run_processes([argv for argv, _, _ in processes.values()], timeout=60)
    for (name, (_, first, then)), (code, _, err, _) in zip(processes.items(), results, strict=True):
        assert code == 2, f"{name}: exit {code}:\n{err}"
        line = one_line(err)
        assert first in line and then in line, f"{name}: {line}"
    for name, (argv, first, then) in in_process.items():
        code, _, err = run(argv, capsys)
        assert code == 2, f"{name}: exit {code}:\n{err}"
        line = one_line(err)
        assert first in line and then in line, f"{name}: {line}"


def test_a_plaintext_client_is_refused_by_that_etcd(etcds: EtcdCluster) -> None:
    member = etcds.members[0].client_address
    with grpc.insecure_channel(member) as channel, pytest.raises(grpc.RpcError) as refused:
        rpc.KVStub(channel).Range(rpc.RangeRequest(key=PREFIX.encode()), timeout=3)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(StoreAccessError, match="closed a plaintext connection"):
        check_access(parse_store_url(etcds.url.replace("etcds", "etcd"), PREFIX))


def test_clients_log_in_again_when_etcd_forgets_their_token(etcds: EtcdCluster) -> None:
    """A token etcd does not know (as after --auth-token-ttl unused, or a restart):
    the blocking channel and the async client log in again and the call goes through;
    a watch made under it fails (aetcd would wait on a cancelled watch forever), and
    the next one, logged in afresh, sees the write. The clients of one address share
    one login."""
    address = parse_store_url(etcds.url, PREFIX, etcds.security())
    token = address.token
    kv = SyncKV(address)
    key = f"{PREFIX}/token-test"
    try:
        assert kv.range(key).count == 0
        assert token.logins == 1
        token.value = "forgotten"
        assert kv.range(key).count == 0
        assert token.value not in ("forgotten", None) and token.logins == 2
    finally:
        kv.close()

    async def use() -> None:
        client = async_client(address)
        try:
            await client.put(key.encode(), b"1")
            assert token.logins == 2  # (the blocking channel's login serves it too)
            token.value = "forgotten"
            assert (await client.get(key.encode())).value == b"1"
            assert token.logins == 3
            token.value = "forgotten"
            with pytest.raises(Exception, match="invalid auth token"):
                await client.watch_once(key.encode(), timeout=5)
            written = await client.put(key.encode(), b"2")
            event = await client.watch_once(
                key.encode(), timeout=10, start_revision=written.header.revision
            )
            assert event.kv.value == b"2"
        finally:
            await client.close()

    asyncio.run(use())
