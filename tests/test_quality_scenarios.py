"""The model-quality gate's lab scenarios, run as a user runs them (`xds-server lab run`):
real Envoys, Prometheus scraping Envoys and model servers, steady load with tenants.
Each must end as expected and name what rolled it back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from xds_server.rollout.store import Store

LAB = [sys.executable, "-m", "xds_server.cli", "lab"]


@pytest.mark.parametrize(
    ("scenario", "cause"),
    [
        ("drifting-canary", "prediction_shift"),
        ("tenant-regression", "tenant gold"),
        ("stalling-canary", "throughput_ratio"),
    ],
)
def test_a_quality_regression_rolls_back_naming_its_cause(
    tmp_path: Path, scenario: str, cause: str
) -> None:
    out = tmp_path / scenario
    res = subprocess.run(
        [
            *(*LAB, "run", "--scenario", scenario),
            *("--regions", "2", "--envoys-per-region", "1", "--out", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and summary["expected"] == "rolled_back"
    assert summary["cause"].startswith(cause), summary["cause"]
    store = Store.in_dir(out / "state")
    try:
        final = [e for e in store.audit(kind="transition") if e.region is None][-1]
    finally:
        store.close()
    assert final.phase_to == "rolled_back"
    verdict = final.verdict
    failed = [c.metric for c in verdict.failed()] if verdict else []
    judged = {m.name: m for m in verdict.metrics} if verdict else {}
    if scenario == "drifting-canary":
        # By the output gate alone: fast, 200, within every guardrail.
        assert failed == []
        shift = judged["prediction_shift"]
        assert shift.classification == "high"
        assert shift.p_value is not None and shift.p_value <= shift.alpha
        assert "PSI" in shift.detail
        assert [n for n, m in judged.items() if m.classification == "high"] == ["prediction_shift"]
    elif scenario == "tenant-regression":
        assert failed == ["tenant gold p99_ms"]  # the aggregate p99 stayed in budget
    else:
        # Stalled requests are in neither the canary's error rate nor its latency.
        assert failed == ["throughput_ratio"]
    assert summary["requests"]["by_status"].get("500", 0) == 0
