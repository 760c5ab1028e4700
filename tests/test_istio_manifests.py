"""Istio manifests: valid against Istio's own CRD schemas, weights equal to what xDS
carries, names and labels that say what produced them; the spec's `istio:` section."""

from __future__ import annotations

import copy
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from tests.istio_schema import problems as schema_problems
from xds_server.render import istio
from xds_server.rollout import decide as sm
from xds_server.rollout.state import RolloutState, current_rollouts, region_split
from xds_server.rollout.store import Store
from xds_server.spec import IstioConfig, MeshSpec, SpecError, parse_spec
from xds_server.traffic import WEIGHT_TOTAL, Split

REGIONS = ("us-east", "eu-west", "ap-south")


def spec_text(istio_section: str = "", baseline: bool = True) -> str:
    def pool(name: str, version: str, port: int) -> str:
        eps = ", ".join(f'{r}: ["127.0.0.1:{port + i}"]' for i, r in enumerate(REGIONS))
        return f"      {name}: {{version: {version}, endpoints: {{{eps}}}}}\n"

    text = "regions: [us-east, eu-west, ap-south]\nservices:\n"
    text += "  - name: recommender\n    prefix: /score\n    domains: [rec]\n    pools:\n"
    text += pool("production", "v1", 9100) + pool("canary", "v2", 9110)
    if baseline:
        text += pool("baseline", "v1", 9120)
    text += "  - name: ranker\n    domains: [rank]\n    pools:\n"
    text += pool("production", "r2024.05", 9200)
    text += pool("canary", "r2024.06", 9210)
    return text + istio_section


@pytest.fixture
def spec() -> MeshSpec:
    return parse_spec(spec_text("istio: {namespace: models}\n"), "mesh.yaml")


def states(spec: MeshSpec) -> dict[str, dict[str, RolloutState]]:
    """Rollout states of the recommender in every phase a region can be in."""
    svc = spec.service("recommender")
    start = sm.start(svc.rollout, svc.name, "v2", spec.regions, 1000.0).state

    def at(**regions: sm.RegionState) -> RolloutState:
        return replace(start, regions={**start.regions, **regions})

    out = {"none": {}}
    for step in range(len(svc.rollout.steps)):
        out[f"step{step}"] = {
            svc.name: at(**{r: sm.RegionState(sm.PROGRESSING, step) for r in spec.regions})
        }
    out["mixed"] = {
        svc.name: at(
            **{
                "us-east": sm.RegionState(sm.PROGRESSING, 2),
                "eu-west": sm.RegionState(sm.PAUSED, 1, manual_canary=33.33, manual_baseline=10),
                "ap-south": sm.RegionState(sm.PENDING, -1),
            }
        )
    }
    out["promoted"] = {
        svc.name: replace(
            at(**{r: sm.RegionState(sm.PROMOTED, 3) for r in spec.regions}), phase=sm.PROMOTED
        )
    }
    out["rolled_back"] = {
        svc.name: replace(
            at(**{r: sm.RegionState(sm.ROLLED_BACK, 1) for r in spec.regions}),
            phase=sm.ROLLED_BACK,
        )
    }
    return out


def by_kind(objs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def test_every_object_is_valid_against_istios_crd_schemas(spec: MeshSpec) -> None:
    checked = 0
    for name, rollouts in states(spec).items():
        for obj in istio.all_objects(spec, rollouts):
            assert schema_problems(obj) == [], name
            checked += 1
    assert checked == len(states(spec)) * 2 * 2 * 3  # states x services x kinds x regions


def test_the_schema_check_rejects_what_istio_rejects(spec: MeshSpec) -> None:
    """The validator is not a rubber stamp: each of these breaks one rule of the CRD."""
    vs = istio.virtual_service(spec.service("recommender"), "us-east", None, spec.istio)  # type: ignore[arg-type]
    dr = istio.destination_rule(spec.service("recommender"), "us-east", None, spec.istio)  # type: ignore[arg-type]

    def broken(obj: dict[str, Any], edit: Any) -> list[str]:
        obj = copy.deepcopy(obj)
        edit(obj)
        return schema_problems(obj)

    assert broken(vs, lambda o: o["spec"]["http"][0]["route"][0].update(weight="ten"))
    assert broken(vs, lambda o: o["spec"]["http"][0]["route"][0].update(weight=2**40))
    assert broken(vs, lambda o: o["spec"]["http"][0]["route"][0]["destination"].pop("host"))
    assert broken(vs, lambda o: o["spec"]["http"][0].update(weights=[1]))
    assert broken(vs, lambda o: o.update(apiVersion="networking.istio.io/v2"))
    assert broken(dr, lambda o: o["spec"].pop("host"))
    assert broken(dr, lambda o: o["spec"]["subsets"][0].pop("name"))
    assert broken(dr, lambda o: o["metadata"]["labels"].update({"xds-server/phase": "-bad"}))
    assert broken(dr, lambda o: o["metadata"].update(name="Recommender_US"))


def test_weights_are_the_split_xds_carries_in_whole_percent(spec: MeshSpec) -> None:
    for name, rollouts in states(spec).items():
        for region in spec.regions:
            objs = istio.region_objects(spec, region, rollouts)
            for svc in spec.services:
                vs = by_kind(objs, "VirtualService")[f"{svc.name}-{region}"]
                weights = istio.route_weights(vs)
                assert sum(weights.values()) == 100, (name, region)
                assert list(weights) == list(svc.pool_names())
                rollout = rollouts.get(svc.name)
                rs = rollout.regions[region] if rollout else None
                exact = (
                    region_split(svc.rollout, rs, svc.has_baseline).percent()
                    if rs
                    else Split().percent()
                )
                for pool, w in weights.items():
                    assert abs(w - exact[pool]) < 1, (name, region, pool)
    step1 = istio.region_objects(spec, "eu-west", states(spec)["step1"])
    vs = by_kind(step1, "VirtualService")["recommender-eu-west"]
    assert istio.route_weights(vs) == {"production": 60, "canary": 20, "baseline": 20}
    mixed = istio.region_objects(spec, "eu-west", states(spec)["mixed"])
    vs = by_kind(mixed, "VirtualService")["recommender-eu-west"]
    assert istio.route_weights(vs) == {"production": 57, "canary": 33, "baseline": 10}


def test_routes_name_only_subsets_their_destination_rule_defines(spec: MeshSpec) -> None:
    objs = istio.region_objects(spec, "ap-south", states(spec)["step2"])
    rules = by_kind(objs, "DestinationRule")
    for name, vs in by_kind(objs, "VirtualService").items():
        dr = rules[name]
        subsets = {s["name"]: s["labels"] for s in dr["spec"]["subsets"]}
        for route in vs["spec"]["http"][0]["route"]:
            assert route["destination"]["host"] == dr["spec"]["host"] == vs["spec"]["hosts"][0]
            assert route["destination"]["subset"] in subsets
    assert rules["recommender-ap-south"]["spec"]["host"] == "recommender.models.svc.cluster.local"
    assert {s["name"]: s["labels"] for s in rules["recommender-ap-south"]["spec"]["subsets"]} == {
        "production": {"version": "v1", "xds-server/pool": "production"},
        "canary": {"version": "v2", "xds-server/pool": "canary"},
        "baseline": {"version": "v1", "xds-server/pool": "baseline"},
    }
    # the service's HTTP prefix is the route's match
    vs = by_kind(objs, "VirtualService")["recommender-ap-south"]
    assert vs["spec"]["http"][0]["match"] == [{"uri": {"prefix": "/score"}}]


def test_destination_rules_come_before_the_routes_that_use_them(spec: MeshSpec) -> None:
    kinds = [o["kind"] for o in istio.region_objects(spec, "us-east", {})]
    assert kinds == ["DestinationRule"] * 2 + ["VirtualService"] * 2


def test_names_labels_and_annotations_say_what_produced_them(spec: MeshSpec) -> None:
    objs = istio.region_objects(spec, "us-east", states(spec)["step1"])
    vs = by_kind(objs, "VirtualService")["recommender-us-east"]
    meta = vs["metadata"]
    assert meta["namespace"] == "models"
    assert meta["labels"] == {
        "app.kubernetes.io/managed-by": "xds-server",
        "xds-server/instance": "default",
        "xds-server/service": "recommender",
        "xds-server/region": "us-east",
        "xds-server/canary-version": "v2",
        "xds-server/phase": "progressing",
    }
    assert meta["annotations"]["xds-server/rollout"] == "recommender canary v2: progressing"
    assert meta["annotations"]["xds-server/step"] == "1 (20%)"
    assert meta["annotations"]["xds-server/weights"] == ("production=60%, baseline=20%, canary=20%")
    idle = by_kind(objs, "VirtualService")["ranker-us-east"]["metadata"]
    assert idle["annotations"]["xds-server/rollout"] == "none"
    assert "xds-server/canary-version" not in idle["labels"]
    manual = istio.region_objects(spec, "eu-west", states(spec)["mixed"])
    meta = by_kind(manual, "VirtualService")["recommender-eu-west"]["metadata"]
    assert meta["annotations"]["xds-server/step"] == "1 (20%) set by hand"


def test_only_the_current_canary_versions_stored_rollout_counts(spec: MeshSpec) -> None:
    current = states(spec)["step2"]["recommender"]
    old = replace(current, canary_version="v0")
    other = replace(current, service="gone")
    assert current_rollouts(spec, [old, other, current]) == {"recommender": current}
    assert current_rollouts(spec, [old]) == {}


def test_a_pool_removed_from_the_spec_gives_its_share_to_production(spec: MeshSpec) -> None:
    rollouts = states(spec)["step1"]
    svc = replace(spec.service("recommender"))
    pools = {k: v for k, v in svc.pools.items() if k != "baseline"}
    svc = replace(svc, pools=pools)
    vs = istio.virtual_service(svc, "us-east", rollouts["recommender"], IstioConfig())
    assert istio.route_weights(vs) == {"production": 80, "canary": 20}


@given(
    st.integers(0, WEIGHT_TOTAL).flatmap(
        lambda c: st.tuples(st.just(c), st.integers(0, WEIGHT_TOTAL - c))
    )
)
def test_whole_percent_weights_sum_to_100_and_stay_within_one_point(cb: tuple[int, int]) -> None:
    canary, baseline = cb
    split = Split(WEIGHT_TOTAL - canary - baseline, baseline, canary)
    weights = istio.percent_weights(split, ("production", "baseline", "canary"))
    assert sum(weights.values()) == 100
    for pool, w in weights.items():
        assert abs(w - split.get(pool) / 100) < 1
    if split.production % 100 == split.canary % 100 == 50:
        assert weights["canary"] == split.canary // 100  # ties go to production


def test_yaml_stream_round_trips(spec: MeshSpec) -> None:
    objs = istio.all_objects(spec, states(spec)["mixed"], regions=["eu-west"])
    assert list(yaml.safe_load_all(istio.to_yaml(objs))) == objs


# ---- the spec's istio: section ----


def spec_problems(section: str, baseline: bool = True) -> list[str]:
    with pytest.raises(SpecError) as err:
        parse_spec(spec_text(section, baseline), "/etc/xds/mesh.yaml")
    return err.value.render().splitlines()


def test_istio_section_defaults_and_per_region_clusters() -> None:
    spec = parse_spec(
        spec_text(
            "istio:\n  apply: true\n  namespace: models\n  retry: {initial: 250ms, max: 10s}\n"
            "  regions:\n"
            "    us-east: {context: kind-us-east, kubeconfig: kube/us.yaml}\n"
            "    eu-west: {context: eu, kubeconfig: /abs/eu.yaml}\n"
            "    ap-south: {in_cluster: true}\n"
        ),
        "/etc/xds/mesh.yaml",
    )
    cfg = spec.istio
    assert cfg is not None and cfg.apply and cfg.namespace == "models"
    assert (cfg.retry_initial, cfg.retry_max, cfg.resync) == (0.25, 10.0, 300.0)
    assert (cfg.instance, cfg.prune) == ("default", True)
    assert cfg.clusters["us-east"].context == "kind-us-east"
    assert cfg.clusters["us-east"].kubeconfig == "/etc/xds/kube/us.yaml"  # next to the spec
    assert cfg.clusters["eu-west"].kubeconfig == "/abs/eu.yaml"
    assert cfg.clusters["ap-south"].in_cluster
    assert parse_spec(spec_text()).istio is None


def test_istio_section_mistakes_are_all_reported_at_once() -> None:
    lines = spec_problems(
        "istio:\n  apply: yes-please\n  namespace: Models\n  version_label: 'bad key!'\n"
        "  retry: {initial: 10s, max: 1s}\n  resync: never\n  color: blue\n"
        "  instance: 'team a'\n  prune: sometimes\n"
        "  regions:\n"
        "    us-east: {context: one}\n"
        "    eu-west: {context: one}\n"
        "    mars: {context: red}\n"
        "    ap-south: {kubeconfig: k.yaml}\n"
    )
    m = "/etc/xds/mesh.yaml: istio"
    expected = [
        f"{m}.color: unknown field",
        f"{m}.namespace: bad namespace 'Models'",
        f"{m}.version_label: bad label key 'bad key!'",
        f"{m}.apply: expected true or false, got a string",
        f"{m}.prune: expected true or false, got a string",
        f"{m}.instance: bad instance 'team a'",
        f"{m}.resync: bad duration 'never'",
        f"{m}.retry.max: must be at least istio.retry.initial",
        f"{m}.regions.eu-west: same cluster as region 'us-east'",
        f"{m}.regions.mars: unknown region 'mars'",
        f"{m}.regions.ap-south.context: required",
    ]
    for want in expected:
        assert any(line.startswith(want) for line in lines), (want, lines)
    assert len(lines) == len(expected), lines


def test_apply_needs_a_cluster_for_every_region() -> None:
    lines = spec_problems("istio:\n  apply: true\n  regions:\n    us-east: {context: a}\n")
    assert lines == [
        "/etc/xds/mesh.yaml: istio.regions: no cluster for region 'eu-west' "
        "(apply: true needs one per region)",
        "/etc/xds/mesh.yaml: istio.regions: no cluster for region 'ap-south' "
        "(apply: true needs one per region)",
    ]


def test_subsets_must_select_different_pods() -> None:
    lines = spec_problems("istio: {pool_label: ''}\n")
    assert lines == [
        "/etc/xds/mesh.yaml: istio.pool_label: empty, so subsets select by version only, but "
        "service 'recommender' has baseline and production both at 'v1': their subsets would "
        "select the same pods"
    ]
    spec = parse_spec(spec_text("istio: {pool_label: ''}\n", baseline=False))
    dr = istio.destination_rule(spec.service("ranker"), "us-east", None, spec.istio)  # type: ignore[arg-type]
    assert dr["spec"]["subsets"][0]["labels"] == {"version": "r2024.05"}


def test_versions_must_be_label_values(tmp_path: Path) -> None:
    text = spec_text("istio: {}\n").replace("version: v2,", "version: v2-,")
    with pytest.raises(SpecError) as err:
        parse_spec(text, "mesh.yaml")
    assert err.value.render() == (
        "mesh.yaml: services[0].pools.canary.version: version 'v2-' cannot be a Kubernetes "
        "label value (the istio section selects pods by it): it must end with a letter or digit"
    )


# ---- xds-server manifests istio ----

CLI = [sys.executable, "-m", "xds_server.cli"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60)


def test_manifests_command_prints_every_region_production_only_without_state(
    tmp_path: Path,
) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(spec_text())
    out = run_cli("manifests", "istio", "--spec", str(path))
    assert out.returncode == 0, out.stderr
    objs = list(yaml.safe_load_all(out.stdout))
    assert len(objs) == 2 * 2 * 3
    assert all(schema_problems(o) == [] for o in objs)
    for vs in (o for o in objs if o["kind"] == "VirtualService"):
        assert istio.route_weights(vs)["production"] == 100
        assert vs["metadata"]["namespace"] == "default"


def test_manifests_command_reads_the_state_store_read_only(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(spec_text())
    spec = parse_spec(spec_text())
    store = Store.in_dir(tmp_path / "state")
    store.record(states(spec)["mixed"]["recommender"], [])
    old = replace(states(spec)["step3"]["recommender"], canary_version="v0")
    store.record(old, [])  # an earlier canary: not the spec's, ignored
    store.close()
    db = tmp_path / "state" / "rollouts.sqlite3"
    before = db.read_bytes()
    out = run_cli(
        "manifests", "istio", "--spec", str(path), "--state-dir", str(tmp_path / "state"),
        "--region", "eu-west", "--namespace", "ml",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    objs = list(yaml.safe_load_all(out.stdout))
    assert {o["metadata"]["labels"]["xds-server/region"] for o in objs} == {"eu-west"}
    vs = by_kind(objs, "VirtualService")["recommender-eu-west"]
    assert istio.route_weights(vs) == {"production": 57, "canary": 33, "baseline": 10}
    assert vs["spec"]["hosts"] == ["recommender.ml.svc.cluster.local"]
    assert db.read_bytes() == before


def test_manifests_command_mistakes_get_one_line(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(spec_text().replace("version: v2,", "version: v2-,"))
    out = run_cli("manifests", "istio", "--spec", str(path))
    assert out.returncode == 1
    assert out.stderr.startswith(f"{path}: services[0].pools.canary.version: version 'v2-'")
    path.write_text(spec_text())
    out = run_cli("manifests", "istio", "--spec", str(path), "--state-dir", str(tmp_path))
    assert (out.returncode, out.stderr) == (
        2,
        f"xds-server: --state-dir: {tmp_path}/rollouts.sqlite3 does not exist "
        "(is it serve's --state-dir?)\n",
    )
    out = run_cli("manifests", "istio", "--spec", str(path), "--region", "mars")
    assert out.returncode == 2 and "unknown region 'mars'" in out.stderr


def test_warmup_shadow_traffic_renders_as_mirrors_that_istio_accepts() -> None:
    warm = "rollout: {warmup: {shadow: {percent: 20, duration: 10s}}}\n"
    spec = parse_spec(spec_text("istio: {namespace: models}\n" + warm), "mesh.yaml")
    svc = spec.service("recommender")
    start = sm.start(svc.rollout, svc.name, "v2", spec.regions, 1000.0).state
    shadowing = sm.RegionState(sm.WARMING, sm.WARMUP_STEP, shadowing=True)
    rollout = replace(start, regions={**start.regions, "eu-west": shadowing})
    objs = istio.all_objects(spec, {svc.name: rollout})
    assert all(schema_problems(o) == [] for o in objs)
    vs = by_kind(objs, "VirtualService")
    (http,) = vs["recommender-eu-west"]["spec"]["http"]
    assert istio.route_weights(vs["recommender-eu-west"])["production"] == 100
    assert {(m["destination"]["subset"], m["percentage"]["value"]) for m in http["mirrors"]} == {
        ("canary", 20.0),
        ("baseline", 20.0),
    }
    # Regions still waiting for healthy pools mirror nothing.
    assert "mirrors" not in vs["recommender-us-east"]["spec"]["http"][0]


def test_a_grpc_service_asks_istio_for_http2_to_its_pods() -> None:
    text = spec_text("istio: {namespace: models}\n").replace(
        "  - name: ranker\n", "  - name: ranker\n    protocol: grpc\n"
    )
    grpc_spec = parse_spec(text, "mesh.yaml")
    rules = [o for o in istio.all_objects(grpc_spec, {}) if o["kind"] == "DestinationRule"]
    assert rules and all(schema_problems(o) == [] for o in rules)
    policy = {o["spec"]["host"]: o["spec"].get("trafficPolicy") for o in rules}
    h2 = {"connectionPool": {"http": {"h2UpgradePolicy": "UPGRADE"}}}
    assert {h: p for h, p in policy.items() if "ranker" in h} == dict.fromkeys(
        [h for h in policy if "ranker" in h], h2
    )
    assert all(p is None for h, p in policy.items() if "recommender" in h)
