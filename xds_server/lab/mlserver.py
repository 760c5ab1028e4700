"""Real model servers for the lab: Seldon MLServer 1.7.1 serving scikit-learn models.

`xds-server lab run --models mlserver` serves every pool of every region with an
MLServer process instead of the lab's built-in model server. MLServer needs
protobuf < 7 and cannot share a process with `tritonclient.grpc`, so it lives in its own
virtual environment (`.venv-mlserver`, made by `make mlserver` from
`hack/mlserver-requirements.txt`); this module never imports it: it runs that
environment's Python to train the models and its `mlserver start` to serve them.

The models are trained when the lab starts, on scikit-learn's own copy of the Wisconsin
breast cancer data set (`load_breast_cancer`: 569 rows, 30 features; nothing is
downloaded), each a pipeline that standardises its inputs first, so the load
generator's N(0, 1) features are inputs of the right scale:

- `v1` (production, baseline): logistic regression;
- `v2` (the canary): a ridge classifier: another estimator, the same answers mostly,
  and as cheap to call. A 30-tree random forest was not (over gRPC its p50 was 3.1 times
  production's, and the latency analysis rolled it back, rightly); nor, by a little, a
  depth-6 decision tree (p50 3.23 ms against 2.77 ms under concurrent calls on the busy
  machine; the ridge classifier 2.79 ms). Its decision is calibrated to a probability
  (Platt scaling, sklearn's `CalibratedClassifierCV`), so its scores can be compared
  with v1's, and stored as the logistic model that amounts to: the calibrated
  classifier itself took three times v1's time per call (451 us to 125 us, predict and
  predict_proba of one row), the folded one the same (143 us to 150 us). On the load
  generator's inputs its score histogram is v1's (PSI 0.007 over 4,000 rows);
- `shuffled` (drifting-canary's canary): the same, trained on shuffled labels: fast,
  200, about v1's share of each class (54%), and wrong. Calibrated on noise, its scores
  spread where v1's are sure (PSI 1.5 against v1's);
- `narrow` (bad-canary's canary): trained on the first 20 features only: every call
  with 30 fails (sklearn's ValueError, MLServer's 500 / INTERNAL);
- wrong-model-name's canary serves `v2` under another name (`recommender-v2`): MLServer
  routes by the model name in the request, so every call gets 404 / NOT_FOUND.

Every version of a pool is served under the one model name the callers use (the
service's, `recommender`) with its `parameters.version`, so the answers' `model_version`
says which version answered.

Every model is served by the lab's runtime (`lab/mlserver_runtime.py`, copied into each
model's folder): scikit-learn's, which also logs each answer's positive-class score into
a `prediction_score` histogram (MLServer's custom metrics) on its metrics port. The lab's
Prometheus scrapes that port with `region` and `pool`, and the plan's output gate
(prediction_shift) reads it (`SCORE_QUERY`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from xds_server.lab.procs import Process, http_get
from xds_server.lab.scenarios import FAST_PLAN
from xds_server.spec.rollout import SPLIT_ONLY

MODEL_NAME = "recommender"
"""The name callers ask for (the lab's service's name)."""
N_FEATURES = 30
"""The breast cancer data set's features: what every request carries."""
VENV_ENV = "XDS_MLSERVER_VENV"
"""Where MLServer's virtual environment is, when not `.venv-mlserver` of the checkout."""
REQUIREMENTS = "hack/mlserver-requirements.txt"
READY_PATH = "/v2/health/ready"
"""MLServer's readiness on its REST port: 200 once every model is loaded."""
RUNTIME = Path(__file__).with_name("mlserver_runtime.py")
"""The lab's MLServer runtime (scikit-learn's, logging each answer's score), copied
beside each model's settings; it runs in MLServer's environment, never imported here."""
IMPLEMENTATION = "mlserver_runtime.ScoredSKLearnModel"
SCORE_QUERY = (
    "sum by (le) (increase(prediction_score_bucket"
    f'{{{{region="{{region}}",pool="{{pool}}",{SPLIT_ONLY}}}}}[{{window}}]))'
)
"""prediction_shift's query on MLServer: the runtime's `prediction_score` histogram (a
custom metric: `model_name` and `model_version` from MLServer, `region` and `pool` from
the lab's scrape targets). MLServer exports no `canary_match` label, so the split-only
matcher keeps every series; it stays for a server that does."""


@dataclass(frozen=True)
class CanaryModel:
    """What a scenario's canary serves: a trained model, under a name."""

    model: str
    served_name: str = MODEL_NAME
    description: str = ""
    """What the scenario does with MLServer, when it differs from the built-in servers'."""


CANARY_MODELS: dict[str, CanaryModel] = {
    "healthy": CanaryModel("v2"),
    "bad-canary": CanaryModel(
        "narrow",
        description="the canary's model expects 20 features, the callers send 30: every "
        "call fails (500 / INTERNAL), from the first mirrored request: every region rolls "
        "back",
    ),
    "drifting-canary": CanaryModel(
        "shuffled",
        description="the canary's model was trained on shuffled labels: fast, 200, wrong, "
        "and unsure of every answer: its scores' histogram shifts from the baseline's, and "
        "the output gate (prediction_shift) rolls every region back",
    ),
    "wrong-model-name": CanaryModel(
        "v2",
        f"{MODEL_NAME}-v2",
        description=f"the canary serves its model as {MODEL_NAME}-v2, the callers ask for "
        f"{MODEL_NAME}: every call 404 / NOT_FOUND: every region rolls back",
    ),
    "leader-failover": CanaryModel("v2"),
    "etcd-member-loss": CanaryModel("v2"),
}
"""The scenarios that run with `--models mlserver`, and their canary's model. The
others inject a knob of the built-in server (latency, a tenant's latency, stalls) that a
real server has not, or count an instance's requests on its `/stats`
(canary-instance-loss)."""

POOL_MODELS = {"production": "v1", "baseline": "v1"}

TRAIN_SCRIPT = """
import sys
import joblib
import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

out = sys.argv[1]
X, y = load_breast_cancer(return_X_y=True)
def ridge():
    return make_pipeline(StandardScaler(), RidgeClassifier())
def calibrated(labels):
    # Platt scaling of the ridge classifier's decision (cross-validated), folded into
    # the logistic model it amounts to: p = 1 / (1 + exp(a d + b)) with d = w x + c.
    cal = CalibratedClassifierCV(ridge(), method="sigmoid", ensemble=False).fit(X, labels)
    fitted = cal.calibrated_classifiers_[0]
    scaler, clf, platt = fitted.estimator[0], fitted.estimator[-1], fitted.calibrators[0]
    folded = LogisticRegression()
    folded.coef_ = -platt.a_ * clf.coef_
    folded.intercept_ = -(platt.a_ * clf.intercept_ + platt.b_)
    folded.classes_ = clf.classes_
    folded.n_features_in_ = X.shape[1]
    return make_pipeline(scaler, folded)
models = {
    "v1": make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(X, y),
    "v2": calibrated(y),
    "shuffled": calibrated(np.random.default_rng(0).permutation(y)),
    "narrow": ridge().fit(X[:, :20], y),
}
for name, model in models.items():
    joblib.dump(model, f"{out}/{name}.joblib")
"""


class MLServerMissing(RuntimeError):
    """MLServer's virtual environment is not there: what to run to make it."""


def venv_dir() -> Path:
    """MLServer's virtual environment: $XDS_MLSERVER_VENV, else `.venv-mlserver` beside
    this checkout's `pyproject.toml` (or in the current directory)."""
    if os.environ.get(VENV_ENV):
        return Path(os.environ[VENV_ENV])
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").exists():
        return checkout / ".venv-mlserver"
    return Path(".venv-mlserver").resolve()


def find_venv() -> Path:
    """MLServer's virtual environment, or MLServerMissing saying how to make it."""
    venv = venv_dir()
    if not (venv / "bin" / "mlserver").exists():
        raise MLServerMissing(
            f"MLServer is not installed in {venv}: run `make mlserver` (a virtual "
            f"environment from {REQUIREMENTS}), or set {VENV_ENV}"
        )
    return venv


def train(venv: Path, out: Path) -> None:
    """Train every model (`TRAIN_SCRIPT`) into `out/NAME.joblib`, with the environment's
    scikit-learn (the one that will load them)."""
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [str(venv / "bin" / "python"), "-c", TRAIN_SCRIPT, str(out)],
        check=True,
        capture_output=True,
        timeout=120,
    )


@dataclass(frozen=True)
class MLServerSlot:
    """One MLServer process: its name, ports and the one model it serves."""

    name: str
    http_port: int
    grpc_port: int
    metrics_port: int | None
    """Its metrics server's port (`/metrics`: the scores' histogram, MLServer's own
    series); None: no metrics server."""
    model_path: Path
    version: str
    served_name: str = MODEL_NAME


def write_repository(directory: Path, slot: MLServerSlot) -> Path:
    """A model repository of one model (`model-settings.json`, served by the lab's
    runtime, copied beside it: MLServer imports a model's implementation from its
    folder) and the server's `settings.json`, in `directory`."""
    import json

    model_dir = directory / slot.served_name
    model_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(RUNTIME, model_dir / RUNTIME.name)
    settings: dict[str, Any] = {
        "name": slot.served_name,
        "implementation": IMPLEMENTATION,
        "parameters": {"uri": str(slot.model_path), "version": slot.version},
    }
    (model_dir / "model-settings.json").write_text(json.dumps(settings, indent=2))
    server: dict[str, Any] = {
        "http_port": slot.http_port,
        "grpc_port": slot.grpc_port,
        "host": "127.0.0.1",
        # One process, no inference pool of worker processes: ready in about 2 s.
        "parallel_workers": 0,
    }
    if slot.metrics_port is None:
        server["metrics_endpoint"] = None
    else:
        server["metrics_port"] = slot.metrics_port
    (directory / "settings.json").write_text(json.dumps(server, indent=2))
    return directory


def start_mlserver(venv: Path, directory: Path, slot: MLServerSlot) -> Process:
    """`mlserver start` on a repository written for `slot` (one process: it stops with
    its process group)."""
    write_repository(directory, slot)
    return Process(
        f"mlserver-{slot.name}",
        [str(venv / "bin" / "mlserver"), "start", str(directory)],
        directory.parent / f"{slot.name}.log",
        env={"MLSERVER_PARALLEL_WORKERS": "0"},
    )


def ready(http_port: int) -> Callable[[], bool]:
    """Does the MLServer on this REST port say it is ready (every model loaded)?"""
    return lambda: http_get(health_url(http_port))[0] == 200


def health_url(http_port: int) -> str:
    return f"http://127.0.0.1:{http_port}{READY_PATH}"


def scraped_twice(prometheus_url: str, servers: int) -> Callable[[], bool]:
    """Has Prometheus scraped every MLServer's metrics (job "model") twice? The output
    gate's query is an increase(), which has no value before a series' second sample,
    and a rollout's start checks that it answers for production: a lab that started its
    rollout within Prometheus's first scrape interval paused on "returns no data"."""
    query = quote('count(sum_over_time(up{job="model"}[1m]) >= 2)')

    def done() -> bool:
        status, body, _ = http_get(f"{prometheus_url}/api/v1/query?query={query}")
        result = json.loads(body)["data"]["result"] if status == 200 else []
        return bool(result) and float(result[0]["value"][1]) >= servers

    return done


def lab_plan(base: Mapping[str, Any], protocol: str, registered: bool) -> dict[str, Any]:
    """A scenario's plan for MLServer pools: the rollout tests' fast steps (nine
    MLServers share the machine with the rest of the lab). MLServer exports none of the
    lab's per-tenant series, so the tenants' budgets go; the output gate
    (prediction_shift) reads the lab runtime's score histogram (`SCORE_QUERY`). The
    warm-up checks MLServer's readiness, `/v2/health/ready` on its REST port (over gRPC
    too: MLServer serves no grpc.health.v1, so the check goes to each endpoint's
    `health_port`, its REST port), then the canary ramps up over a short slow start.
    Registered gRPC instances (`registered`) carry no health port: no check then (their
    registration is gated on the same readiness).

    Its steps stop at 50% before 100%, where canary and baseline take equal shares
    (75% is 0/25/75): an MLServer is one process, and on a busy machine its latency
    grows with the calls it gets. At 75% the canary's p50 was 3 to 11 times the
    baseline's (load average 13-16 on 2 cores) while each answers in 0.9 ms alone, and
    the latency analysis rolled healthy canaries back."""
    plan = {**base, **{k: FAST_PLAN[k] for k in ("step_duration", "window")}}
    plan["steps"] = [5, 20, 50, 100]
    guardrails = {k: v for k, v in plan.get("guardrails", {}).items() if k != "tenants"}
    plan["guardrails"] = guardrails
    analysis = dict(plan.get("analysis", {}))
    metrics = dict(analysis.get("metrics", {}))
    if "prediction_shift" in metrics:
        metrics["prediction_shift"] = {**metrics["prediction_shift"], "query": SCORE_QUERY}
    plan["analysis"] = {**analysis, "metrics": metrics}
    check: dict[str, Any] = {"path": READY_PATH, "interval": "500ms", "timeout": "500ms"}
    if protocol == "grpc":
        check["type"] = "http"
    warmup: dict[str, Any] = {"slow_start": "3s"}
    if not (protocol == "grpc" and registered):
        warmup["health_check"] = check
    plan["warmup"] = warmup
    return plan
