#!/usr/bin/env bash
# Compile the project's own protos (protos/) into Python with grpcio-tools.
# Output goes to the repository root, so protos/xds_server/admin/v1/admin.proto becomes
# xds_server/admin/v1/admin_pb2*.py, and the lab's Open Inference Protocol
# (protos/xds_server/lab/oip/v2/grpc_predict_v2.proto) becomes
# xds_server/lab/oip/v2/grpc_predict_v2_pb2*.py: those folders hold generated code only.
# Never edit them by hand; tests/test_protos.py::test_generated_protos_are_up_to_date
# checks that regenerating changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-.}"
PY="${PYTHON:-.venv/bin/python}"
GENERATED=(xds_server/admin/v1 xds_server/lab/oip/v2)
for dir in "${GENERATED[@]}"; do
    mkdir -p "$OUT/$dir"
    "$PY" -m grpc_tools.protoc -Iprotos --python_out="$OUT" --grpc_python_out="$OUT" \
        protos/"$dir"/*.proto
    touch "$OUT/$dir/__init__.py"
done
touch "$OUT/xds_server/admin/__init__.py"
