"""Command-line habits: `xdsctl`'s global options after the command too (as kubectl and
istioctl take them), and `xds-server lab` without the lab's extra packages."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support import wait_for
from xds_server import cli, ctl
from xds_server.lab.procs import Process, free_port

CLI = [sys.executable, "-m", "xds_server.cli"]
CTL = [sys.executable, "-m", "xds_server.ctl"]
TOKEN = "habits-token"


def parsed(*argv: str) -> argparse.Namespace:
    return ctl.build_parser().parse_args(list(argv))


GLOBALS = {
    "--server": ("a:1", "b:2"),
    "--token-file": ("/one", "/two"),
    "--tls-ca": ("/ca1.pem", "/ca2.pem"),
    "--output": ("json", "yaml"),
    "-o": ("json", "yaml"),
    "--actor": ("alice", "bob"),
    "--timeout": ("3", "4"),
}
DEST = {"-o": "output"}


@pytest.mark.parametrize("flag", sorted(GLOBALS))
@pytest.mark.parametrize(
    "command",
    [("status",), ("rollout", "get", "recommender"), ("audit",), ("xds", "fetch", "--region", "r")],
)
def test_a_global_option_goes_before_or_after_the_command(
    flag: str, command: tuple[str, ...]
) -> None:
    dest = DEST.get(flag, flag.lstrip("-").replace("-", "_"))
    first, second = GLOBALS[flag]
    before = getattr(parsed(flag, first, *command), dest)
    after = getattr(parsed(*command, flag, first), dest)
    assert before == after == (float(first) if flag == "--timeout" else first)
    # Given in both places, the one after the command wins.
    both = getattr(parsed(flag, first, *command, flag, second), dest)
    assert both == (float(second) if flag == "--timeout" else second)


def test_defaults_stand_when_no_global_option_is_given() -> None:
    args = parsed("rollout", "get", "recommender")
    assert (args.server, args.output, args.timeout, args.token_file) == (
        "127.0.0.1:18001",
        "table",
        10.0,
        None,
    )
    # A command under a command (xds fetch) takes them at either level too.
    assert parsed("xds", "--timeout", "2", "fetch", "--region", "r").timeout == 2.0
    assert parsed("xds", "-o", "json", "fetch", "--region", "r", "-o", "yaml").output == "yaml"


def test_help_says_where_global_options_go() -> None:
    top = " ".join(ctl.build_parser().format_help().split())
    assert "Global options may also follow the command" in top
    assert "takes the value given after it" in top
    res = subprocess.run([*CTL, "rollout", "--help"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0
    assert "global options (also before the command; given in both places" in res.stdout


def test_xds_server_has_no_global_options_to_move() -> None:
    """Every xds-server option belongs to its command and already follows it; a global
    one added to the top parser would have to be taken after the command too."""
    parser = cli.build_parser()
    top = [a for a in parser._actions if a.option_strings]
    assert [a.dest for a in top] == ["help"]


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CTL, *argv], capture_output=True, text=True, timeout=60)


def test_xdsctl_runs_with_global_options_after_the_command(spec_file: Path, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    admin, xds = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    argv = [
        *CLI, "serve", "--spec", str(spec_file), "--xds-address", xds, "--admin-address", admin,
        "--metrics-address", "127.0.0.1:0", "--ui-address", "", "--state-dir",
        str(tmp_path / "state"), "--prometheus-url", "http://127.0.0.1:1",
        "--admin-token-file", str(token), "--admin-auth-reads",
    ]  # fmt: skip
    server = Process("server", argv, tmp_path / "server.log")
    try:
        # The example, with every other global option after the command too.
        def get() -> subprocess.CompletedProcess[str] | None:
            res = run(
                "rollout", "get", "recommender", "-o", "json", "--server", admin,
                "--token-file", str(token), "--actor", "habits", "--timeout", "5",
            )  # fmt: skip
            return res if res.returncode == 0 else None

        got = wait_for(get, "xdsctl rollout get to answer", timeout=20)
        assert json.loads(got.stdout)["service"] == "recommender"

        # Before the command, as always.
        res = run("--server", admin, "--token-file", str(token), "-o", "yaml", "rollout", "list")
        assert res.returncode == 0, res.stderr
        assert [r["service"] for r in yaml.safe_load(res.stdout)] == ["recommender"]

        # In both places the later one wins: a dead server and a table before, the live
        # server and JSON after.
        res = run(
            "--server", "127.0.0.1:1", "-o", "table", "status",
            "--server", admin, "-o", "json", "--token-file", str(token),
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["server"] == admin

        # The token given after the command is the one sent: without it, reads are refused.
        res = run("status", "--server", admin)
        assert res.returncode == 1 and res.stderr.startswith("xdsctl: UNAUTHENTICATED: ")

        # A command under a command: xds fetch, its own options and global ones mixed.
        res = run(
            "xds", "fetch", "--region", "eu-west", "--type", "cluster", "--xds-server", xds,
            "-o", "yaml", "--timeout", "10",
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        names = sorted(r["name"] for r in yaml.safe_load(res.stdout)["resources"])
        assert names == ["recommender|canary", "recommender|production"]
    finally:
        server.stop()


@pytest.mark.parametrize("package", cli.LAB_EXTRA)
def test_lab_without_its_extra_says_what_to_install(tmp_path: Path, package: str) -> None:
    """A package of the lab's extra that cannot be imported (as if not installed): one
    line, exit code 2, no traceback."""
    code = (
        f"import sys; sys.modules[{package!r}] = None\n"
        "from xds_server.cli import main\n"
        f"raise SystemExit(main(['lab', 'down', '--out', {str(tmp_path)!r}]))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert res.stderr.splitlines() == [
        f"xds-server: the lab needs its extra packages (no module named {package!r}): "
        "pip install 'xds-server[lab]'"
    ]


def test_the_command_lines_import_only_what_they_need() -> None:
    """xds-server loads the lab (and its extra) only for `lab`; xdsctl never loads the
    server (the controller, the stores, the admin servicer). (grpc itself imports
    grpc_health when it is installed: that one is not ours to keep out.)"""
    code = (
        "import sys\nimport xds_server.cli, xds_server.ctl\nprint(' '.join(sorted(sys.modules)))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    loaded = set(res.stdout.split())
    for module in (
        "matplotlib", "rich", "xds_server.lab.run", "xds_server.lab.view", "xds_server.app",
        "xds_server.rollout.controller", "xds_server.admin.service", "xds_server.ha.store",
    ):  # fmt: skip
        assert module not in loaded, module
