#!/usr/bin/env bash
# Compile the project's own protos (protos/) into Python with grpcio-tools, and their
# type stubs (.pyi) with mypy-protobuf (both pinned in pyproject's dev extra).
# Output goes to the repository root, so protos/xds_server/admin/v1/admin.proto becomes
# xds_server/admin/v1/admin_pb2*.py and admin_pb2*.pyi, and the lab's Open Inference
# Protocol (protos/xds_server/lab/oip/v2/grpc_predict_v2.proto) becomes
# xds_server/lab/oip/v2/grpc_predict_v2_pb2*.py(i): those folders hold generated code only.
# Never edit them by hand; tests/test_protos.py::test_generated_protos_are_up_to_date
# checks that regenerating changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-.}"
PY="${PYTHON:-.venv/bin/python}"
# mypy-protobuf's protoc plugins are scripts installed beside the interpreter.
BIN="$(dirname "$PY")"
GENERATED=(xds_server/admin/v1 xds_server/lab/oip/v2)
for dir in "${GENERATED[@]}"; do
    mkdir -p "$OUT/$dir"
    "$PY" -m grpc_tools.protoc -Iprotos \
        --plugin=protoc-gen-mypy="$BIN/protoc-gen-mypy" \
        --plugin=protoc-gen-mypy_grpc="$BIN/protoc-gen-mypy_grpc" \
        --python_out="$OUT" --grpc_python_out="$OUT" \
        --mypy_out=quiet:"$OUT" --mypy_grpc_out=quiet:"$OUT" \
        protos/"$dir"/*.proto
    touch "$OUT/$dir/__init__.py"
done
touch "$OUT/xds_server/admin/__init__.py"
