"""A real Prometheus (Debian's `prometheus`) scraping the mesh's Envoys, model servers and
the server."""

from __future__ import annotations

import json
import shutil
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from xds_server.lab.polling import wait_for
from xds_server.lab.procs import Process, http_get

INSTALL_HINT = "sudo apt-get install -y prometheus   (make demo and make test do it for you)"


def prometheus_binary() -> str:
    found = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
    )
    if not found:
        raise FileNotFoundError(f"prometheus not found; install Debian's package: {INSTALL_HINT}")
    return found


@dataclass(frozen=True)
class ScrapeTarget:
    address: str
    """HOST:PORT."""
    metrics_path: str
    labels: dict[str, str]
    """Target labels every series scraped from it gets (`region`, and `pool` for a
    model server); the exporter must not set them itself."""
    job: str = ""
    """The scrape job; by default "envoy" for Envoy's stats, else "xds-server"."""

    @property
    def job_name(self) -> str:
        if self.job:
            return self.job
        return "envoy" if self.metrics_path == "/stats/prometheus" else "xds-server"


def write_config(path: Path, targets: list[ScrapeTarget], interval: str = "1s") -> None:
    jobs: dict[str, list[ScrapeTarget]] = {}
    for t in targets:
        jobs.setdefault(t.job_name, []).append(t)
    for job, ts in jobs.items():
        if len({t.metrics_path for t in ts}) > 1:
            raise ValueError(f"scrape job {job}: one metrics path per job")
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [
            {
                "job_name": job,
                "metrics_path": ts[0].metrics_path,
                "scrape_timeout": interval,
                "static_configs": [{"targets": [t.address], "labels": t.labels} for t in ts],
            }
            for job, ts in jobs.items()
        ],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))


class Prometheus(Process):
    def __init__(
        self,
        workdir: Path,
        port: int,
        targets: list[ScrapeTarget],
        interval: str = "1s",
        host: str = "127.0.0.1",
        wrap: Sequence[str] = (),
    ) -> None:
        """`host`: the address it listens on; `wrap`: its command's prefix (a lab's
        namespace, `Process`)."""
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.host = host
        self.workdir = workdir
        self.config_path = workdir / "prometheus.yml"
        write_config(self.config_path, targets, interval)
        argv = [
            prometheus_binary(),
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address={host}:{port}",
            "--storage.tsdb.retention.time=1d",
            "--log.level=warn",
        ]
        super().__init__("prometheus", argv, workdir / "prometheus.log", wrap=wrap)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def rescrape(self, targets: list[ScrapeTarget], interval: str = "1s") -> None:
        """Scrape these targets from now on: the configuration rewritten, then reloaded
        (SIGHUP, as an operator's `kill -HUP`), until Prometheus's configuration API
        serves the new one. Targets left out stop being scraped: their series turn
        stale (what a scrape config gone wrong does to a region)."""
        write_config(self.config_path, targets, interval)
        wanted = {t.address for t in targets}
        self.signal(signal.SIGHUP)

        def reloaded() -> bool:
            status, body, _ = http_get(self.url + "/api/v1/status/config")
            if status != 200:
                return False
            config = yaml.safe_load(json.loads(body)["data"]["yaml"]) or {}
            seen = {
                address
                for job in config.get("scrape_configs") or []
                for static in job.get("static_configs") or []
                for address in static.get("targets") or []
            }
            return seen == wanted

        wait_for(reloaded, "prometheus to load its new scrape configuration", timeout=20)

    def wait_ready(self, timeout: float = 30) -> None:
        def ready() -> bool:
            if not self.alive():
                raise RuntimeError(f"prometheus exited:\n{self.tail()}")
            return http_get(self.url + "/-/ready")[0] == 200

        wait_for(ready, "prometheus to be ready", timeout=timeout)
