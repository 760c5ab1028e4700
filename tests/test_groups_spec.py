"""`rollout_groups:` and `after:` in the spec (issue 31): the documented shape loads into
`MeshSpec.rollout_groups` and `Service.after`; every rule of the design is one clear
line naming its field."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xds_server.spec import MeshSpec, RolloutGroup, SpecError, validate_spec

REGIONS = ["us-east", "eu-west"]


def service(name: str, port: int, **extra: Any) -> dict[str, Any]:
    def pool(version: str, offset: int) -> dict[str, Any]:
        eps = {r: [f"127.0.0.1:{port + offset + 10 * i}"] for i, r in enumerate(REGIONS)}
        return {"version": version, "endpoints": eps}

    return {
        "name": name,
        "domains": [f"{name}.local"],
        "pools": {"production": pool("v1", 0), "canary": pool("v2", 1)},
        **extra,
    }


def doc(groups: Any = None, **services: dict[str, Any]) -> dict[str, Any]:
    """A spec of `features`, `recommender` and `ranker` (each overridable by keyword),
    with `groups` as its `rollout_groups:`."""
    svcs = {
        "features": service("features", 9100),
        "recommender": service("recommender", 9200),
        "ranker": service("ranker", 9300),
    }
    for name, extra in services.items():
        svcs[name] = {**svcs[name], **extra}
    out: dict[str, Any] = {"regions": REGIONS, "services": list(svcs.values())}
    if groups is not None:
        out["rollout_groups"] = groups
    return out


def problems(document: dict[str, Any]) -> list[str]:
    with pytest.raises(SpecError) as err:
        validate_spec(document, "mesh.yaml")
    return err.value.render().splitlines()


RANKING = {"name": "ranking", "services": ["features", "recommender"], "consistent": True}


def test_groups_and_after_load_into_the_models() -> None:
    spec: MeshSpec = validate_spec(doc([RANKING], ranker={"after": ["recommender"]}))
    assert spec.rollout_groups == (RolloutGroup("ranking", ("features", "recommender"), True),)
    assert spec.group_of("recommender") == spec.group("ranking")
    assert spec.group_of("ranker") is None
    assert spec.service("ranker").after == ("recommender",)
    assert spec.service("features").after == ()
    plain = validate_spec(doc([{"name": "g", "services": ["features", "ranker"]}]))
    assert plain.rollout_groups[0].consistent is False


def test_no_groups_no_after_is_the_spec_as_before() -> None:
    spec = validate_spec(doc())
    assert spec.rollout_groups == () and all(s.after == () for s in spec.services)


@pytest.mark.parametrize(
    ("groups", "expected"),
    [
        ({"name": "ranking"}, "rollout_groups: expected a list of groups, got a mapping"),
        (
            [{"name": "Ranking!", "services": ["features", "recommender"]}],
            "rollout_groups[0].name: bad group name 'Ranking!'",
        ),
        (
            [{"services": ["features", "recommender"]}],
            "rollout_groups[0].name: bad group name None",
        ),
        (
            [RANKING, {"name": "ranking", "services": ["ranker", "features"]}],
            "rollout_groups[1].services[1]: 'features' is already in rollout group 'ranking'",
        ),
        (
            [RANKING, {"name": "ranking", "services": ["ranker", "ranker2"]}],
            "rollout_groups[1].services[1]: unknown service 'ranker2' (services: features, "
            "recommender, ranker)",
        ),
        (
            [{"name": "a", "services": ["features"]}],
            "rollout_groups[0].services: expected a list of at least 2 service names, got 1",
        ),
        (
            [{"name": "a", "services": "features"}],
            "rollout_groups[0].services: expected a list of at least 2 service names, got a string",
        ),
        (
            [{"name": "a", "services": ["features", "features"]}],
            "rollout_groups[0].services[1]: 'features' is listed twice",
        ),
        (
            [{"name": "a", "services": ["features", "ranker"], "consistent": "yes"}],
            "rollout_groups[0].consistent: expected true or false, got a string",
        ),
        (
            [{"name": "a", "services": ["features", "ranker"], "lockstep": True}],
            "rollout_groups[0].lockstep: unknown field (expected one of: consistent, name, "
            "services)",
        ),
        (["ranking"], "rollout_groups[0]: expected a mapping, got a string"),
    ],
)
def test_each_bad_group_is_one_line_naming_its_field(groups: Any, expected: str) -> None:
    assert any(line.startswith(f"mesh.yaml: {expected}") for line in problems(doc(groups))), (
        problems(doc(groups))
    )


def test_a_duplicate_group_name_is_refused() -> None:
    groups = [
        {"name": "ranking", "services": ["features", "recommender"]},
        {"name": "ranking", "services": ["ranker", "other"]},
    ]
    other = service("other", 9400)
    document = doc(groups)
    document["services"].append(other)
    assert problems(document) == [
        "mesh.yaml: rollout_groups[1].name: duplicate rollout group 'ranking'"
    ]


def test_members_need_as_many_steps() -> None:
    lines = problems(doc([RANKING], recommender={"rollout": {"steps": [5, 50, 100]}}))
    assert lines == [
        "mesh.yaml: rollout_groups[0].services[1]: recommender has 3 steps, features has 4: "
        "the members of a group advance step by step together, so they need as many steps"
    ]


def test_a_consistent_groups_members_need_the_same_steps_a_plain_one_only_as_many() -> None:
    features = {"rollout": {"steps": [5, 20, 50, 100]}}
    recommender = {"rollout": {"steps": [1, 10, 50, 100]}}
    lines = problems(doc([RANKING], features=features, recommender=recommender))
    assert lines == [
        "mesh.yaml: rollout_groups[0].services[1]: recommender's steps [1, 10, 50, 100] differ "
        "from features's [5, 20, 50, 100]: a consistent group's members need the same steps "
        "(a request keeps its arm from member to member, so each member gets the first "
        "one's split)"
    ]
    plain = {**RANKING, "consistent": False}
    spec = validate_spec(doc([plain], features=features, recommender=recommender))
    assert spec.service("recommender").rollout.steps == (1, 10, 50, 100)


def test_a_consistent_groups_members_need_a_baseline_and_a_warm_up_at_each_or_none() -> None:
    with_baseline = service("recommender", 9200)
    with_baseline["pools"] = {
        **with_baseline["pools"],
        "baseline": {"version": "v1", "endpoints": {r: ["127.0.0.1:9999"] for r in REGIONS}},
    }
    warm = {"rollout": {"warmup": {"health_check": {"interval": "1s"}}}}
    lines = problems(doc([RANKING], recommender={**with_baseline, **warm}))
    assert lines == [
        "mesh.yaml: rollout_groups[0].services[1]: recommender has a baseline pool and "
        "features has none: a consistent group's members need a baseline at each or at none "
        "(requests keep their arm from member to member)",
        "mesh.yaml: rollout_groups[0].services[1]: recommender warms up and features does "
        "not: a consistent group's members need a warm-up at each or at none (they take their "
        "first weight together)",
    ]
    # A plain group keeps its members' own pools and warm-ups.
    validate_spec(doc([{**RANKING, "consistent": False}], recommender={**with_baseline, **warm}))


def test_members_need_the_same_waves() -> None:
    waves = {"rollout": {"regions": {"waves": [["us-east"], ["eu-west"]]}}}
    lines = problems(doc([RANKING], recommender=waves))
    assert lines == [
        "mesh.yaml: rollout_groups[0].services[1]: recommender's waves [[us-east], [eu-west]] "
        "differ from features's [[us-east, eu-west]]: the members of a group need the same "
        "waves"
    ]
    assert validate_spec(doc([RANKING], recommender=waves, features=waves)).rollout_groups


@pytest.mark.parametrize(
    ("after", "expected"),
    [
        ("features", "services[2].after: expected a list of service names, got a string"),
        (["Features"], "services[2].after[0]: expected a service name, got 'Features'"),
        (["features", "features"], "services[2].after[1]: 'features' is listed twice"),
        (
            ["nope"],
            "services[2].after[0]: unknown service 'nope' (services: features, ranker, "
            "recommender)",
        ),
        (["ranker"], "services[2].after[0]: ranker cannot wait for itself"),
    ],
)
def test_each_bad_after_is_one_line_naming_its_field(after: Any, expected: str) -> None:
    lines = problems(doc(ranker={"after": after}))
    assert lines == [f"mesh.yaml: {expected}"]


def test_after_a_member_of_its_own_group_is_refused() -> None:
    lines = problems(doc([RANKING], recommender={"after": ["features"]}))
    assert lines == [
        "mesh.yaml: services[1].after[0]: features is in recommender's own rollout group "
        "(group ranking): the group moves as one, so a member cannot wait for another's "
        "promotion"
    ]


def test_a_cycle_of_after_is_refused_naming_it() -> None:
    lines = problems(doc(features={"after": ["ranker"]}, ranker={"after": ["features"]}))
    assert lines == [
        "mesh.yaml: services[0].after[0]: a cycle: features -> ranker -> features: nothing "
        "in it could start",
        "mesh.yaml: services[2].after[0]: a cycle: ranker -> features -> ranker: nothing in "
        "it could start",
    ]


def test_a_cycle_through_a_group_is_refused() -> None:
    """ranker waits for recommender (group ranking), and features (same group) waits for
    ranker: the group waits for itself."""
    lines = problems(
        doc([RANKING], ranker={"after": ["recommender"]}, features={"after": ["ranker"]})
    )
    assert "a cycle: group ranking -> ranker -> group ranking" in "\n".join(lines)
    assert all(line.startswith("mesh.yaml: services[") for line in lines)


def test_after_in_a_chain_loads() -> None:
    spec = validate_spec(
        doc(recommender={"after": ["features"]}, ranker={"after": ["recommender"]})
    )
    assert [s.after for s in spec.services] == [(), ("features",), ("recommender",)]


JUNK = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12)
    | st.sampled_from(["features", "recommender", "ranker", "ranking"]),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(["name", "services", "consistent", "x"]), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(JUNK, JUNK)
def test_any_groups_or_after_is_a_spec_or_a_spec_error(groups: Any, after: Any) -> None:
    """Whatever `rollout_groups:` and `after:` hold: a spec, or problems that each name a
    field; never another exception."""
    document = doc(ranker={"after": after})
    document["rollout_groups"] = groups
    try:
        validate_spec(document, "mesh.yaml")
    except SpecError as err:
        assert all(p.path for p in err.problems), err.render()
