"""Validate objects against Istio's own CRD schemas (`openAPIV3Schema`), as strictly as an
API server with strict field validation would.

The CRD files are Istio's, in manifests/istio-crds (or
$ISTIO_CRDS_DIR). The OpenAPI v3 schemas are run with jsonschema, with three changes
that bring it close to what Kubernetes enforces:
- an object schema that lists `properties` and neither `additionalProperties` nor
  `x-kubernetes-preserve-unknown-fields` rejects unknown fields (strict validation);
- integer formats (`int32`, `int64`, `uint32`) are range-checked;
- a CEL rule (`x-kubernetes-validations`) that applies to a field we set is an error,
  because nothing here can evaluate CEL: such a field must not pass untested.
`metadata` is checked against Kubernetes' rules for names, labels and annotations.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
REPO = Path(__file__).resolve().parents[1]
CRD_DIR = Path(os.environ.get("ISTIO_CRDS_DIR", REPO / "manifests" / "istio-crds"))
CRD_FILES = {"DestinationRule": "destinationrules.yaml", "VirtualService": "virtualservices.yaml"}

_DNS_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_SUBDOMAIN = re.compile(rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$")

_INT_RANGES = {
    "int32": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint32": (0, 2**32 - 1),
}


@cache
def crd(kind: str) -> dict[str, Any]:
    path = CRD_DIR / CRD_FILES[kind]
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: Istio's CRD file is missing (set ISTIO_CRDS_DIR to the folder "
            "holding destinationrules.yaml and virtualservices.yaml)"
        )
    doc: dict[str, Any] = yaml.load(path.read_text(), Loader=_Loader)
    return doc


def crd_version(kind: str, version: str) -> dict[str, Any]:
    for v in crd(kind)["spec"]["versions"]:
        if v["name"] == version:
            return dict(v)
    raise KeyError(f"{kind} has no version {version}")


def _strict(schema: Any) -> Any:
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            out.get("type") == "object"
            and "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _cel(validator: Any, rules: Any, instance: Any, schema: Any) -> Iterator[Any]:
    yield jsonschema.ValidationError(
        f"this field has CEL rules that this validator cannot evaluate: {rules}"
    )


_checker = jsonschema.FormatChecker()
for _fmt, (_lo, _hi) in _INT_RANGES.items():
    _checker.checks(_fmt)(
        lambda v, lo=_lo, hi=_hi: not isinstance(v, int) or isinstance(v, bool) or lo <= v <= hi
    )

_Validator = jsonschema.validators.extend(
    jsonschema.Draft7Validator, {"x-kubernetes-validations": _cel}
)


@cache
def _spec_validator(kind: str, version: str) -> Any:
    schema = copy.deepcopy(crd_version(kind, version)["schema"]["openAPIV3Schema"])
    return _Validator(_strict(schema), format_checker=_checker)


def _metadata_problems(meta: Any) -> list[str]:
    if not isinstance(meta, dict):
        return ["metadata: expected a mapping"]
    out = []
    unknown = set(meta) - {"name", "namespace", "labels", "annotations"}
    if unknown:
        out.append(f"metadata: fields we do not expect to set: {sorted(unknown)}")
    name = meta.get("name")
    if not isinstance(name, str) or len(name) > 253 or not _SUBDOMAIN.match(name):
        out.append(f"metadata.name: {name!r} is not a DNS subdomain")
    ns = meta.get("namespace")
    if not isinstance(ns, str) or not re.fullmatch(_DNS_LABEL, ns):
        out.append(f"metadata.namespace: {ns!r} is not a DNS label")
    for key, value in (meta.get("labels") or {}).items():
        prefix, slash, label = key.rpartition("/")
        if (
            not _LABEL_NAME.match(label)
            or (slash and (len(prefix) > 253 or not _SUBDOMAIN.match(prefix)))
            or not isinstance(value, str)
            or (value and not _LABEL_NAME.match(value))
        ):
            out.append(f"metadata.labels: {key!r}: {value!r} is not a valid label")
    annotations = meta.get("annotations") or {}
    if not all(isinstance(v, str) for v in annotations.values()):
        out.append("metadata.annotations: values must be strings")
    elif sum(len(k) + len(v) for k, v in annotations.items()) > 256 * 1024:
        out.append("metadata.annotations: more than 256 KiB")
    return out


def problems(obj: Mapping[str, Any]) -> list[str]:
    """Everything wrong with one object, as `kind/name: path: message` lines ([] when valid)."""
    kind = obj.get("kind")
    api_version = str(obj.get("apiVersion", ""))
    group, _, version = api_version.rpartition("/")
    label = f"{kind}/{(obj.get('metadata') or {}).get('name')}"
    if kind not in CRD_FILES or group != "networking.istio.io":
        return [f"{label}: not an Istio networking kind: {api_version} {kind}"]
    out = []
    versions = {v["name"]: v for v in crd(str(kind))["spec"]["versions"]}
    if version not in versions or not versions[version].get("served"):
        out.append(f"{label}: apiVersion: {api_version} is not served by the CRD")
        return out
    unknown = set(obj) - {"apiVersion", "kind", "metadata", "spec"}
    if unknown:
        out.append(f"{label}: unexpected top-level fields {sorted(unknown)}")
    out += [f"{label}: {p}" for p in _metadata_problems(obj.get("metadata"))]
    body = {k: v for k, v in obj.items() if k in ("spec", "status")}
    for err in sorted(_spec_validator(str(kind), version).iter_errors(body), key=str):
        path = ".".join(str(p) for p in err.absolute_path) or "(object)"
        out.append(f"{label}: {path}: {err.message}")
    return out
