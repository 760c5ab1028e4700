"""The lab model's signature in the Open Inference Protocol (KServe v2), and requests of
either binding (REST JSON, gRPC `ModelInferRequest`) checked against it.

One FP32 input, `features`, of shape [N, 3] (N rows of the scorer's three features, at
most MAX_ROWS); one FP32 output, `score`, of shape [N]. Pure: a request in, an
`Inference` or a `BadInput` (with the HTTP status the REST binding answers) out; the
model servers (`lab/upstream.py`) and callers share it.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

INPUT_NAME = "features"
OUTPUT_NAME = "score"
FP32 = "FP32"
N_FEATURES = 3
MAX_ROWS = 1024
"""Rows one inference may carry: a request cannot make the server work unboundedly."""
PLATFORM = "xds-lab-logistic"

Row = tuple[float, float, float]


class BadInput(Exception):
    """A request the model cannot answer; `code` is its HTTP status (400 or 404)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Inference:
    """A checked inference request, whatever protocol brought it."""

    id: str
    rows: list[Row]


def feature_rows(datatype: str, shape: Sequence[int], values: Sequence[float]) -> list[Row]:
    """The rows of a "features" tensor, checked against the model's signature."""
    if datatype != FP32:
        raise BadInput(400, f"input {INPUT_NAME}: datatype {datatype!r}, expected FP32")
    dims = list(shape)
    if len(dims) != 2 or dims[1] != N_FEATURES or not 1 <= dims[0] <= MAX_ROWS:
        raise BadInput(
            400, f"input {INPUT_NAME}: shape {dims}, expected [N, 3] with 1 <= N <= {MAX_ROWS}"
        )
    if len(values) != dims[0] * N_FEATURES:
        raise BadInput(400, f"input {INPUT_NAME}: {len(values)} values for shape {dims}")
    flat = [float(v) for v in values]
    if not all(math.isfinite(v) for v in flat):
        raise BadInput(400, f"input {INPUT_NAME}: values must be finite")
    return [(flat[i], flat[i + 1], flat[i + 2]) for i in range(0, len(flat), N_FEATURES)]


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadInput(400, f"input {INPUT_NAME}: data must be numbers")
    return float(value)


def _flat_data(data: object) -> list[float]:
    """A tensor's JSON data, flat or as rows, flattened in row-major order."""
    if not isinstance(data, list):
        raise BadInput(400, f"input {INPUT_NAME}: data must be a list")
    out: list[float] = []
    for item in data:
        out.extend(_number(v) for v in (item if isinstance(item, list) else [item]))
    return out


def _check_requested_outputs(outputs: object) -> None:
    """The request may name the outputs it wants: this model has only "score"."""
    if outputs is None:
        return
    if not isinstance(outputs, list) or any(
        not isinstance(o, dict) or o.get("name") != OUTPUT_NAME for o in outputs
    ):
        raise BadInput(400, f"outputs: this model has one output, {OUTPUT_NAME!r}")


def rest_inference(body: bytes) -> Inference:
    """An Open Inference Protocol JSON request, checked (BadInput 400 otherwise)."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise BadInput(400, "the body is not JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise BadInput(400, "expected a JSON object with an inputs list")
    ident = doc.get("id", "")
    if not isinstance(ident, str):
        raise BadInput(400, "id: expected a string")
    _check_requested_outputs(doc.get("outputs"))
    tensors = [t for t in doc["inputs"] if isinstance(t, dict) and t.get("name") == INPUT_NAME]
    if len(tensors) != 1:
        raise BadInput(400, f"expected one input named {INPUT_NAME!r}")
    tensor = tensors[0]
    shape = tensor.get("shape")
    if not isinstance(shape, list) or any(
        isinstance(d, bool) or not isinstance(d, int) for d in shape
    ):
        raise BadInput(400, f"input {INPUT_NAME}: shape must be a list of integers")
    datatype = tensor.get("datatype")
    return Inference(ident, feature_rows(str(datatype), shape, _flat_data(tensor.get("data"))))


def grpc_inference(request: Any) -> Inference:
    """A ModelInferRequest, checked: the features as `contents.fp32_contents` or as
    little-endian FP32 `raw_input_contents` (one entry per input, in their order)."""
    names = [t.name for t in request.inputs]
    if names.count(INPUT_NAME) != 1:
        raise BadInput(400, f"expected one input named {INPUT_NAME!r}")
    for out in request.outputs:
        if out.name != OUTPUT_NAME:
            raise BadInput(400, f"outputs: this model has one output, {OUTPUT_NAME!r}")
    index = names.index(INPUT_NAME)
    tensor = request.inputs[index]
    values: Sequence[float] = tensor.contents.fp32_contents
    if request.raw_input_contents:
        if len(request.raw_input_contents) != len(names) or values:
            raise BadInput(400, "raw_input_contents: one entry per input, and no contents")
        raw = request.raw_input_contents[index]
        if len(raw) % 4:
            raise BadInput(400, f"input {INPUT_NAME}: {len(raw)} raw bytes is not FP32 data")
        values = struct.unpack(f"<{len(raw) // 4}f", raw)
    return Inference(request.id, feature_rows(tensor.datatype, list(tensor.shape), values))


def model_metadata(name: str, version: str) -> dict[str, Any]:
    """The model's metadata as the protocol's JSON (the gRPC message has the same fields)."""
    return {
        "name": name,
        "versions": [version],
        "platform": PLATFORM,
        "inputs": [{"name": INPUT_NAME, "datatype": FP32, "shape": [-1, N_FEATURES]}],
        "outputs": [{"name": OUTPUT_NAME, "datatype": FP32, "shape": [-1]}],
    }
