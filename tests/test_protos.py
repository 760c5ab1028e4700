"""The committed generated code is exactly what `hack/gen-protos.sh` generates.

Every folder of generated code (the admin API, the lab's Open Inference Protocol) is
compared file by file with a fresh generation, both ways: a file that differs, that is
missing, or that the script no longer generates fails the test. That covers the code
(`*_pb2.py`, grpcio-tools) and its type stubs (`*_pb2.pyi`, mypy-protobuf), which mypy
checks the package against.
"""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
GENERATED = ("xds_server/admin/v1", "xds_server/lab/oip/v2")
"""The folders hack/gen-protos.sh writes: generated code only, never edited by hand."""


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gen")
    subprocess.run(
        ["bash", "hack/gen-protos.sh", str(out)],
        check=True,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
        cwd=ROOT,
        timeout=120,
    )
    return out


def generated_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.suffix in (".py", ".pyi")}


@pytest.mark.parametrize("folder", GENERATED)
def test_generated_protos_are_up_to_date(fresh: Path, folder: str) -> None:
    committed, regenerated = ROOT / folder, fresh / folder
    names = generated_files(regenerated)
    for kind in ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi", "_pb2_grpc.pyi"):
        assert any(n.endswith(kind) for n in names), f"no *{kind} generated into {folder}"
    assert generated_files(committed) == names, (
        f"{folder} holds other files than hack/gen-protos.sh generates: run it and commit"
    )
    for name in sorted(names):
        assert filecmp.cmp(committed / name, regenerated / name, shallow=False), (
            f"{folder}/{name} differs from what hack/gen-protos.sh generates: run it and commit"
        )
