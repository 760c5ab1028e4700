#!/usr/bin/env bash
# Compile the project's own protos (protos/) into Python with grpcio-tools.
# Output goes to the repository root, so protos/xds_server/admin/v1/admin.proto becomes
# xds_server/admin/v1/admin_pb2*.py: that folder holds generated code only. Never edit
# it by hand; tests/test_admin.py::test_generated_protos_are_up_to_date checks that
# regenerating changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-.}"
PY="${PYTHON:-.venv/bin/python}"
mkdir -p "$OUT/xds_server/admin/v1"
"$PY" -m grpc_tools.protoc -Iprotos --python_out="$OUT" --grpc_python_out="$OUT" \
    protos/xds_server/admin/v1/admin.proto
touch "$OUT/xds_server/admin/__init__.py" "$OUT/xds_server/admin/v1/__init__.py"
