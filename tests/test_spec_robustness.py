"""Whatever a spec file holds, `check` answers with one line per problem and `serve`'s
watcher keeps the last good spec and goes on watching (issue 19, finding 5)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import REGIONS, make_spec_doc
from tests.support import wait_for, wait_for_async, xds_fetch
from xds_server.app import SpecFile
from xds_server.lab.background import BackgroundServer
from xds_server.lab.procs import Process, free_port
from xds_server.spec import MeshSpec, SpecError, load_spec, parse_spec
from xds_server.xds.types import ENDPOINT, ROUTE

CLI = [sys.executable, "-m", "xds_server.cli"]
POOL_PORTS = (("production", 9100), ("canary", 9200))
EXAMPLE = (Path(__file__).parents[1] / "examples" / "mesh.yaml").read_bytes()
ROLLOUT = b"""rollout:
  steps: [5, 25, 100]
  step_duration: 5m
  guardrails: {max_error_rate: 0.05, max_p99_ms: 500, min_requests: 20}
  analysis:
    groups: {errors: 3, latency: 1}
    metrics:
      error_rate: {allowed_change: 1.2, detect_change: 3, confidence: 0.995}
  warmup:
    health_check: {path: /ready, interval: 2s, healthy_threshold: 2}
    shadow: {percent: 25, duration: 1m}
    webhooks: [{name: smoke, url: "http://127.0.0.1:8080/hook", timeout: 5s, retries: 3}]
"""
BIG = "1" + "0" * 399  # 400 digits: float() of it raises OverflowError


def _one_bad_byte() -> tuple[bytes, str]:
    at = EXAMPLE.index(b"v2")
    data = EXAMPLE[:at] + b"\xff" + EXAMPLE[at + 1 :]
    line = EXAMPLE.count(b"\n", 0, at) + 1
    column = at - EXAMPLE.rfind(b"\n", 0, at)
    return data, (
        f"line {line}, column {column}: not UTF-8 text: byte 0xff at offset {at} "
        "(invalid start byte); a spec is a UTF-8 YAML file"
    )


def _garbage() -> tuple[bytes, str]:
    data = random.Random(19).randbytes(4096) + b"\x00"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        at = exc.start
        line = data.count(b"\n", 0, at) + 1
        column = len(data[data.rfind(b"\n", 0, at) + 1 : at].decode()) + 1
        where = f"line {line}, column {column}"
        return data, f"{where}: not UTF-8 text: byte 0x{data[at]:02x} at offset {at} ("
    raise AssertionError("the garbage happens to be UTF-8: pick another seed")


def _metric(field: str, value: str) -> bytes:
    text = f"rollout:\n  analysis:\n    metrics:\n      error_rate: {{{field}: {value}}}\n"
    return EXAMPLE + text.encode()


def _guardrail(value: str) -> bytes:
    return EXAMPLE + f"rollout:\n  guardrails: {{max_error_rate: {value}}}\n".encode()


SHARE = "rollout.guardrails.max_error_rate: expected a share from 0 to 1 (or a percentage), got"
BAD_FILES: dict[str, tuple[bytes, str]] = {
    # name: (content, the one line `check` prints after "FILE: ", or how it starts)
    "deep.yaml": (
        b"regions: " + b"[" * 5000 + b"]" * 5000 + b"\n",
        "line 1, column 109: nesting deeper than 100 levels",
    ),
    "one-bad-byte.yaml": _one_bad_byte(),
    "garbage.bin": _garbage(),
    "control-bytes.yaml": (
        bytes(range(32)) * 4,
        "line 1, column 1: not valid YAML: character #x0000 is not allowed "
        "(special characters are not allowed)",
    ),
    "big-number.yaml": (
        _metric("confidence", BIG),
        "rollout.analysis.metrics.error_rate.confidence: expected a number from 0.5 to below 1, "
        "got 1000000000000000000000000000000000000000...0000000000 (400 digits)",
    ),
    "nan.yaml": (_guardrail(".nan"), f"{SHARE} nan"),
    "two.yaml": (_guardrail("2.0"), f"{SHARE} 2.0"),
}


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "check", "--spec", str(path)], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("name", BAD_FILES)
def test_check_gives_one_line_per_problem_and_exit_1(tmp_path: Path, name: str) -> None:
    data, expected = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(data)
    res = check(path)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    (line,) = res.stderr.splitlines()  # one problem: one line
    assert line.startswith(f"{path}: {expected}"), line
    assert res.stderr == line + "\n"


def test_other_hostile_values_get_one_line_each() -> None:
    cases = {
        # numbers no duration, weight or count can be: not finite, or beyond a float
        "rollout:\n  step_duration: .inf\n": "rollout.step_duration: bad duration inf:",
        "rollout:\n  interval: .nan\n": "rollout.interval: bad duration nan:",
        f"rollout:\n  window: {BIG}\n": "rollout.window: bad duration 1000000000",
        f"rollout:\n  analysis: {{groups: {{errors: {BIG}}}}}\n": "rollout.analysis.groups: ",
        "rollout:\n  warmup: {health_check: {healthy_threshold: 5000000000}}\n": (
            "rollout.warmup.health_check.healthy_threshold: expected a whole number from 1 "
            "to 2147483647, got 5000000000"
        ),
        # scalars PyYAML cannot build
        f"rollout:\n  failures_before_rollback: {'1' * 5000}\n": "line 12, column 29: not valid",
        "x: 2024-13-45\n": "line 11, column 4: not valid YAML: '2024-13-45' is not a valid "
        "!!timestamp (month must be in 1..12)",
        # what aliases can make of a few lines
        "x: &a [*a]\n": "line 11, column 4: an alias inside this collection refers to it",
        "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}' if i else 'x'] * 9)}]\n" for i in range(9))
        + "rollout: {steps: *l8}\n": "line 2, column 1: aliases repeat more than 1,000,000 values",
        "".join(
            f"a{i}: &a{i} {'[' * 60}{f'*a{i - 1}' if i else ''}{']' * 60}\n" for i in range(3)
        ): "line 12, column 28: nesting deeper than 100 levels (aliases followed)",
        # line breaks inside a key, and a template that reaches into its values
        'rollout: {"a\\nb\\u2028c": 1}\n': "rollout.a b c: unknown field",
        "rollout:\n  queries: {errors: '{region.x}'}\n": "rollout.queries.errors: bad template",
    }
    for extra, expected in cases.items():
        with pytest.raises(SpecError) as err:
            parse_spec(EXAMPLE.decode() + extra, "m.yaml")
        lines = err.value.render().splitlines()
        assert len(lines) == len(err.value.problems), lines
        assert any(line.startswith(f"m.yaml: {expected}") for line in lines), (extra[:80], lines)


def test_deep_nesting_is_refused_quickly() -> None:
    for text in (
        "regions: " + "[" * 5000 + "]" * 5000,
        "regions: " + "{a: " * 5000 + "}" * 5000,
        "".join("  " * i + "k:\n" for i in range(5000)),
        "".join("  " * i + "-\n" for i in range(5000)),
    ):
        start = time.monotonic()
        with pytest.raises(SpecError, match="nesting deeper than 100 levels"):
            parse_spec(text, "m.yaml")
        assert time.monotonic() - start < 3, text[:20]


# --- mutations of the example, in process -------------------------------------------------

TOKENS = [
    BIG.encode(),
    b"9" * 5000,
    b".nan",
    b".inf",
    b"-.inf",
    b"1.0e+400",
    b"2024-13-45",
    b"!!int x",
    b"!!timestamp x",
    b"!!binary ?",
    b"&a [*a]",
    b"&a",
    b"*a",
    b"<<: *a",
    b"\x00",
    b"\xff",
    b"\xc3",
    b"\t",
    b"\r",
    "\u2028".encode(),
    "\x85".encode(),
    b"'",
    b'"',
    b"{",
    b"[",
    b": ",
    b"- ",
    b"? ",
    b"---\n",
    b"%YAML 1.1\n",
    b"{region.x}",
]
_position = st.integers(0, 10**6)
MUTATION = st.one_of(
    st.tuples(st.just("flip"), _position, st.integers(0, 255)),
    st.tuples(st.just("delete"), _position, st.integers(1, 40)),
    st.tuples(st.just("duplicate"), _position, st.integers(1, 200), _position),
    st.tuples(st.just("nest"), _position, st.integers(1, 5000), st.sampled_from(["[", "{a: "])),
    st.tuples(st.just("indent"), _position, st.integers(1, 300)),
    st.tuples(
        st.just("insert"),
        _position,
        st.one_of(
            st.sampled_from(TOKENS), st.text(max_size=20).map(lambda t: t.encode()), st.binary()
        ),
    ),
)


def mutate(data: bytes, mutation: tuple[Any, ...]) -> bytes:
    kind, at = mutation[0], mutation[1] % (len(data) + 1)
    if kind == "flip" and data:
        at = min(at, len(data) - 1)
        return data[:at] + bytes([mutation[2]]) + data[at + 1 :]
    if kind == "delete":
        return data[:at] + data[at + mutation[2] :]
    if kind == "duplicate":
        to = mutation[3] % (len(data) + 1)
        return data[:to] + data[at : at + mutation[2]] + data[to:]
    if kind == "nest":
        opening: str = mutation[3]
        closing = "]" if opening == "[" else "}"
        return data[:at] + (opening * mutation[2] + closing * mutation[2]).encode() + data[at:]
    if kind == "indent":
        return (
            data[:at] + b"".join(b"\n" + b"  " * i + b"k:" for i in range(mutation[2])) + data[at:]
        )
    if kind == "insert":
        return data[:at] + mutation[2] + data[at:]
    return data


def assert_spec_or_one_line_errors(load: Callable[[], MeshSpec], source: str) -> None:
    try:
        load()
    except SpecError as exc:
        lines = exc.render().splitlines()
        assert len(lines) == len(exc.problems), lines
        assert all(line.startswith(f"{source}: ") for line in lines), lines


@settings(
    max_examples=300,
    deadline=timedelta(seconds=5),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    base=st.sampled_from([EXAMPLE, EXAMPLE + ROLLOUT]),
    mutations=st.lists(MUTATION, min_size=1, max_size=5),
)
def test_a_mutated_spec_loads_or_gives_one_line_per_problem(
    base: bytes, mutations: list[tuple[Any, ...]]
) -> None:
    data = base
    for m in mutations:
        data = mutate(data, m)
    # As text (a byte that is not UTF-8 becomes a lone surrogate YAML refuses) ...
    text = data.decode("utf-8", "surrogateescape")
    assert_spec_or_one_line_errors(lambda: parse_spec(text, "mesh.yaml"), "mesh.yaml")
    # ... and as a file, as `check` and the watcher read it.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mesh.yaml"
        path.write_bytes(data)
        assert_spec_or_one_line_errors(lambda: load_spec(path), str(path))


# --- the watcher --------------------------------------------------------------------------


def _doc(eu_west: str = "127.0.0.1:9101") -> dict[str, Any]:
    """A spec whose eu-west production endpoint is `eu_west` (made up: nothing connects)."""
    ports = {(r, pool): base + i for i, r in enumerate(REGIONS) for pool, base in POOL_PORTS}
    doc = make_spec_doc(ports)
    doc["services"][0]["pools"]["production"]["endpoints"]["eu-west"] = [eu_west]
    return doc


def write(path: Path, data: bytes, atomic: bool) -> None:
    if atomic:
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    else:
        path.write_bytes(data)


def rejected(caplog: pytest.LogCaptureFixture, path: Path, expected: str) -> bool:
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.name == "xds_server.app" and r.levelno == logging.ERROR
    ]
    prefix = f"spec rejected (spec file changed), keeping the last good one: {path}: "
    return any(line.startswith(prefix) and expected in line for line in lines)


def test_the_watcher_keeps_the_last_good_spec_then_applies_a_good_edit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.safe_dump(_doc()))
    server = BackgroundServer(load_spec(path), path)

    def served() -> tuple[str, str, str]:
        def look() -> tuple[str, str, str]:
            server.server.flush()
            snap = server.server.snapshot("eu-west")
            spec = server.server.spec
            address = str(spec.services[0].pools["production"].endpoints["eu-west"][0])
            return snap.type_version(ROUTE), snap.type_version(ENDPOINT), address

        return server.call(look)

    try:
        server.start()
        server.watch_spec(interval=0.05)
        before = served()
        assert before[2] == "127.0.0.1:9101"
        for i, (name, (data, expected)) in enumerate(BAD_FILES.items()):
            write(path, data, atomic=i % 2 == 0)
            wait_for(
                lambda e=expected: rejected(caplog, path, e),
                f"the watcher to reject {name}",
                timeout=10,
            )
            assert served() == before, name
        write(path, yaml.safe_dump(_doc(eu_west="127.0.0.1:9999")).encode(), atomic=False)
        after = wait_for(
            lambda: (s := served())[2] == "127.0.0.1:9999" and s, "the edit", timeout=10
        )
        assert after[1] != before[1]  # the endpoints sent to Envoys changed
    finally:
        server.close()


def test_the_watcher_survives_failures_outside_the_checker(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Serving a valid spec can fail too (here the callback that applies it): the watcher
    logs one line, keeps the last good spec, and applies the next edit."""
    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.safe_dump(_doc()))
    spec_file = SpecFile(path)
    first = spec_file.spec
    applied: list[MeshSpec] = []
    fail_next = ["on_change"]

    def on_change(spec: MeshSpec, reason: str) -> None:
        if fail_next and fail_next[0] == "on_change":
            fail_next.pop()
            raise RuntimeError("the publisher broke\nover two lines")
        applied.append(spec)

    def errors() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]

    async def scenario() -> None:
        watcher = asyncio.create_task(spec_file.watch(on_change, 0.01))

        # Each wait also ends if the watcher does: it must live through both.
        path.write_text(yaml.safe_dump(_doc(eu_west="127.0.0.1:9201")))
        await wait_for_async(
            lambda: watcher.done() or any("not applied" in e for e in errors()),
            "on_change's failure",
            timeout=10,
        )
        assert not watcher.done(), watcher
        assert spec_file.spec is first  # what the rest of serve still runs on
        path.write_text(yaml.safe_dump(_doc(eu_west="127.0.0.1:9203")))
        await wait_for_async(lambda: watcher.done() or applied, "the good edit", timeout=10)
        assert not watcher.done(), watcher
        watcher.cancel()

    asyncio.run(scenario())
    address = applied[0].services[0].pools["production"].endpoints["eu-west"][0]
    assert str(address) == "127.0.0.1:9203" and spec_file.spec is applied[0]
    assert not any("\n" in e for e in errors())
    assert (
        f"spec change not applied, keeping the last good spec: {path}: RuntimeError: "
        in (errors()[0])
    )


def test_serve_keeps_serving_through_bad_files_and_applies_the_next_good_one(
    tmp_path: Path,
) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.safe_dump(_doc()))
    port = free_port()
    server = Process(
        "server",
        [
            *CLI,
            "serve",
            "--spec",
            str(path),
            "--xds-address",
            f"127.0.0.1:{port}",
            "--admin-address",
            f"127.0.0.1:{free_port()}",
            "--metrics-address",
            "127.0.0.1:0",
            "--state-dir",
            str(tmp_path / "state"),
            "--log-format",
            "json",
        ],
        tmp_path / "server.log",
    )

    def messages() -> list[str]:
        text = server.log_path.read_text(errors="replace")
        return [json.loads(line)["message"] for line in text.splitlines() if line.startswith("{")]

    def eu_west_endpoints() -> list[str]:
        res = xds_fetch(f"127.0.0.1:{port}", "eu-west", "endpoint")
        if res.returncode != 0:
            return []
        return sorted(
            str(lb["endpoint"]["address"]["socket_address"]["port_value"])
            for r in json.loads(res.stdout)["resources"]
            if r["cluster_name"] == "recommender|production"
            for e in r["endpoints"]
            for lb in e["lb_endpoints"]
        )

    try:
        assert wait_for(eu_west_endpoints, "serve to answer", timeout=20) == ["9101"]
        for i, name in enumerate(("deep.yaml", "one-bad-byte.yaml", "garbage.bin")):
            data, expected = BAD_FILES[name]
            write(path, data, atomic=i % 2 == 0)
            wait_for(
                lambda e=expected: any(
                    m.startswith("spec rejected") and f"{path}: {e}" in m for m in messages()
                ),
                f"serve to reject {name}",
                timeout=10,
            )
        assert server.alive()
        assert eu_west_endpoints() == ["9101"]
        path.write_text(yaml.safe_dump(_doc(eu_west="127.0.0.1:9999")))
        wait_for(
            lambda: eu_west_endpoints() == ["9999"], "serve to apply the good edit", timeout=20
        )
    finally:
        server.stop()
    assert "Traceback" not in server.log_path.read_text(errors="replace")
