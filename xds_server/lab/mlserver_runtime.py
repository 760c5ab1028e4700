"""The lab's MLServer runtime: scikit-learn's, plus a histogram of the scores it answers.

This module runs inside MLServer's own virtual environment (`.venv-mlserver`), never in
the project's: nothing of `xds_server` imports it, and it imports nothing of
`xds_server` (which is not installed there). `lab/mlserver.py` copies it into each
model repository, whose folder `mlserver start` puts on `sys.path`, and names
`mlserver_runtime.ScoredSKLearnModel` as the model's implementation.

Why: the analysis's output gate (`prediction_shift`) compares the canary's histogram of
scores with its comparator's by the population stability index, and MLServer exports no
such histogram of its own. A model that was trained on noise answers fast, with 200,
and with the usual share of each class: only its scores show it. So on every prediction
this runtime logs the positive class's score through MLServer's custom metrics
(`mlserver.log`), labelled `model_name` and `model_version` as MLServer labels them;
Prometheus adds the `region` and `pool` of the scrape target.

Two things of MLServer 1.7.1 shape it:

- `mlserver.register` makes a histogram with prometheus_client's default buckets (0.005
  to 10: four of them between 0.1 and 1). The runtime registers the histogram itself
  first, on buckets of its own (`SCORE_BUCKETS`); `mlserver.log` then finds it by name.
- Custom metrics live in `mlserver.metrics.REGISTRY`, which its metrics server exports
  only with parallel workers (prometheus_client's multiprocess mode); with
  `parallel_workers: 0` (the lab's: one process, ready in 2 s) it serves
  prometheus_client's default registry alone. So the histogram is registered there too.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import mlserver  # type: ignore[import-not-found]
import prometheus_client
from mlserver.codecs import NumpyRequestCodec  # type: ignore[import-not-found]
from mlserver.metrics import REGISTRY  # type: ignore[import-not-found]
from mlserver_sklearn import SKLearnModel  # type: ignore[import-not-found]

SCORE_METRIC = "prediction_score"
"""The histogram's name: `prediction_score_bucket` in Prometheus (MLServer adds no
prefix to custom metrics)."""
SCORE_BUCKETS: tuple[float, ...] = (1e-5, 1e-3, 0.02, 0.12, 0.5, 0.88, 0.98, 0.999, 0.99999, 1.0)
"""Upper bounds about evenly spaced in log-odds (-11.5, -6.9, -3.9, -2, 0, 2, ...), where
a classifier's probabilities live. The lab's v1 is sure of most of its answers (96% of
its scores beyond 1e-5 of 0 or 1), a model calibrated on shuffled labels of few (6%).
On the built-in servers' twenty 0.05-wide buckets the two differ by a PSI of 1.5, yet
that difference sits in the two end buckets, and the gate's test of "same outputs" did
not reject it on 200 scores a side (20 buckets cost a sample its evidence); on these ten
it rejects it on 40 to 60 (simulated, 300 draws each), and never the healthy v2's."""
LABELS = ("model_name", "model_version")
"""What `mlserver.log` labels an observation with (from the model's context)."""


def score_histogram() -> prometheus_client.Histogram:
    """The scores' histogram, on the gate's buckets, in MLServer's custom-metrics
    registry (where `mlserver.log` looks) and in prometheus_client's default one (what a
    metrics server without parallel workers exports). Made once per process."""
    if SCORE_METRIC in REGISTRY:
        histogram: prometheus_client.Histogram = REGISTRY[SCORE_METRIC]
    else:
        histogram = prometheus_client.Histogram(
            SCORE_METRIC,
            "The positive class's score of each prediction (predict_proba; else a "
            "logistic of decision_function)",
            labelnames=LABELS,
            buckets=SCORE_BUCKETS,
            registry=REGISTRY,
        )
    with contextlib.suppress(ValueError):  # (already there: a second model of the server)
        prometheus_client.REGISTRY.register(histogram)
    return histogram


def positive_scores(model: Any, rows: Any) -> list[float]:
    """Each row's score for the positive (last) class, in [0, 1]: `predict_proba` where
    the estimator has it, else a logistic of its `decision_function`."""
    if hasattr(model, "predict_proba"):
        return [float(p) for p in model.predict_proba(rows)[:, -1]]
    decisions = model.decision_function(rows).ravel()
    return [1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, float(d))))) for d in decisions]


class ScoredSKLearnModel(SKLearnModel):  # type: ignore[misc]
    """MLServer's scikit-learn runtime, answering as it does, logging each answer's score."""

    async def load(self) -> bool:
        loaded: bool = await super().load()
        # The model's series exist from the start, at zero: a series that appears with
        # the first prediction would lose its first scrape's counts to increase().
        score_histogram().labels(self.name, self.version or "")
        return loaded

    async def predict(self, payload: Any) -> Any:
        """The answer first (a model that cannot predict fails as it does without this
        runtime), then each row's score."""
        response = await super().predict(payload)
        rows = self.decode_request(payload, default_codec=NumpyRequestCodec)
        for score in positive_scores(self._model, rows):
            mlserver.log(**{SCORE_METRIC: score})
        return response
