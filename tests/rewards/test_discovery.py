"""Auto-discovered reward terms: hand-made rollout streams, the spec schema, hypothesis."""

from __future__ import annotations

import builtins
import contextlib
import json
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepsynapse.control.knobs import Knobs
from deepsynapse.data.problems import Problem
from deepsynapse.formats import BASE_SCHEMA, parse_completion
from deepsynapse.memory import EpisodicMemory
from deepsynapse.rewards.base import call_components
from deepsynapse.rewards.discovery import DEFAULT_LIBRARY, DiscoveredTerm, RewardDiscovery
from deepsynapse.rewards.specs import (
    PREDICATES,
    SpecError,
    evaluate_predicate,
    record_features,
    records_from_columns,
    validate_spec,
)

Q = "Tom has 3 apples and buys 4 more bags of 5 apples. How many apples does he have?"
GOLD = "23"
DISTRACTORS = [
    {"type": "numeric", "value": "24"},
    {"type": "semantic", "value": "20"},
    {"type": "unit", "value": "2300"},
]


def xml(answer: str, reasoning: str = "3 + 4 * 5 = 23") -> str:
    return f"<reasoning>{reasoning}</reasoning>\n<answer>{answer}</answer>"


def columns(texts: list[str], pid: str = "p1", gold: str = GOLD, distractors=DISTRACTORS) -> dict:
    prob = Problem(pid, Q, gold, "", 2, "synthetic", {"distractors": distractors})
    return {
        "answer": [gold] * len(texts),
        "question": [Q] * len(texts),
        "problem": [prob] * len(texts),
        "parsed": [parse_completion(t, BASE_SCHEMA) for t in texts],
        "schema": BASE_SCHEMA,
        "truncated": [False] * len(texts),
    }


def batch(step: int, texts: list[str], memory=None, **kw):
    return records_from_columns(texts, columns(texts, **kw), step, memory)


def fires(name: str, text: str, memory=None, **kw) -> bool:
    lib = {s["name"]: s for s in DEFAULT_LIBRARY}
    [r] = batch(5, [text], memory, **kw)
    return evaluate_predicate(validate_spec(lib[name]).predicate, r)


# ------------------------------------------------------------------ named patterns


def test_named_patterns_on_hand_made_completions():
    assert fires("missing_answer_tag", "<reasoning>23</reasoning>")
    assert not fires("missing_answer_tag", xml("23"))
    assert fires("unclosed_tag", "<reasoning>3+4<answer>23</answer>")
    assert fires("non_numeric_answer", xml("twenty-three"))
    assert not fires("non_numeric_answer", xml("23"))
    assert fires("distractor_chosen", xml("20"))  # the semantic distractor
    assert not fires("distractor_chosen", xml("23")) and not fires("distractor_chosen", xml("19"))
    assert fires("unit_mismatch", xml("2300"))  # x100
    assert fires("unit_mismatch", xml("1380"))  # x60
    assert fires("unit_mismatch", xml("22 apples"))  # wrong, and carries words
    assert not fires("unit_mismatch", xml("23 apples"))  # right answers are not failures
    assert fires("repetition_loop", xml("5", "so we add them " * 4))
    assert not fires("repetition_loop", xml("23"))
    assert fires("copied_from_question", xml("4"))
    assert not fires("copied_from_question", xml("9"))
    assert fires("overlong_reasoning", xml("23", "step " * 301))
    assert not fires("overlong_reasoning", xml("23", "step " * 30))


def test_repeated_mistake_reads_the_episodic_memory():
    memory = EpisodicMemory()
    memory.record(["p1"], ["19"], [False], step=2)
    assert fires("repeated_mistake", xml("19"), memory)
    assert not fires("repeated_mistake", xml("18"), memory)
    assert not fires("repeated_mistake", xml("19"), memory, pid="p2")
    # attempts recorded at the record's own step (this batch) do not count as "before"
    memory.record(["p1"], ["18"], [False], step=5)
    assert not fires("repeated_mistake", xml("18"), memory)


def test_features_of_a_record():
    [r] = batch(0, [xml("46")])
    f = record_features(r)
    assert f["tag_errors"] == 0 and f["words"] == len(xml("46").split())
    assert f["log_rel_error"] == pytest.approx(0.301, abs=1e-3)  # |46-23|/23 = 1
    [r] = batch(0, ["nothing"])
    assert record_features(r)["log_rel_error"] == 7.0 and record_features(r)["tag_errors"] >= 1


# ------------------------------------------------------------------ switching on and off


def small_discovery(**kw) -> RewardDiscovery:
    opts = dict(
        window=16, min_records=8, on_threshold=0.3, off_threshold=0.1, patience=2, cluster=False
    )
    opts.update(kw)
    return RewardDiscovery(**opts)


def test_stream_switches_a_term_on_then_retires_it():
    d = small_discovery()
    k = Knobs(1.0, 0.0, {"correctness": 1.0}, 8)
    bad = ["<reasoning>3 + 4 * 5</reasoning>"] * 4 + [xml("23")] * 4  # half miss <answer>
    good = [xml("23")] * 8
    kinds = []
    for step in range(3):
        d.observe_rollouts(batch(step, bad))
        events = d.observe(step, {})
        kinds.append([e.kind for e in events])
    assert kinds == [[], ["reward_discovered"], []]  # patience 2: second observation
    assert [t.name for t in d.active_components()] == ["discovered_missing_answer_tag"]
    on_event = None
    d2 = small_discovery()
    for step in range(2):
        d2.observe_rollouts(batch(step, bad))
        on_event = d2.observe(step, {}) or on_event
    ev = on_event[0].evidence
    assert (
        ev["frequency"] == 0.5
        and ev["window"] == 16
        and ev["term"] == "discovered_missing_answer_tag"
    )
    assert ev["examples"] and all(i.split(":")[1] in {"0", "1", "2", "3"} for i in ev["examples"])
    assert ev["spec"]["weight"] < 0
    d.apply(k)
    assert k.reward_weights["discovered_missing_answer_tag"] == -0.5
    assert k.reward_weights["correctness"] == 1.0
    # The term scores like any component, through the isolation wrapper
    texts = bad[:2] + good[:2]
    scores, failures = call_components(d.active_components(), [""] * 4, texts, columns(texts))
    assert not failures and scores["discovered_missing_answer_tag"] == [1.0, 1.0, 0.0, 0.0]
    # the failure goes away: frequency falls below off_threshold, the term retires
    retired = []
    for step in range(3, 6):
        d.observe_rollouts(batch(step, good))
        retired += [e for e in d.observe(step, {}) if e.kind == "reward_retired"]
    assert len(retired) == 1 and retired[0].evidence["frequency"] < 0.1
    assert d.active_components() == []
    d.apply(k)
    assert "discovered_missing_answer_tag" not in k.reward_weights


def test_hysteresis_streak_resets_and_no_decision_before_min_records():
    d = small_discovery(min_records=20, patience=2)
    bad = [xml("20")] * 4  # distractor chosen, 100%
    d.observe_rollouts(batch(0, bad))
    assert d.observe(0, {}) == [] and d.frequencies == {}  # window not full enough yet
    d = small_discovery(patience=2)
    mixed = [xml("20")] * 4 + [xml("23")] * 4
    d.observe_rollouts(batch(0, mixed))
    assert d.streaks["distractor_chosen"] == 1  # 4/8 = 0.5 >= on
    d.observe_rollouts(batch(1, [xml("23")] * 8))  # 4/16 = 0.25 < on: the streak resets
    assert d.streaks["distractor_chosen"] == 0
    d.observe_rollouts(batch(2, mixed))  # still 4/16
    d.observe_rollouts(batch(3, mixed))  # 8/16: streak 1 of 2
    assert "distractor_chosen" not in d.active
    d.observe_rollouts(batch(4, mixed))
    assert "distractor_chosen" in d.active


def test_max_active_caps_switched_on_terms():
    d = small_discovery(max_active=1, patience=1, on_threshold=0.2)
    texts = [xml("20"), xml("4"), "<reasoning>x</reasoning>", xml("23")] * 2  # 3 patterns, 2/8 each
    d.observe_rollouts(batch(0, texts))
    assert len(d.active) == 1
    assert len(d.observe(0, {})) == 1


def test_unexplained_wrong_answers_become_a_cluster_term():
    d = small_discovery(cluster=True, patience=2)
    odd = [xml("9999", "add them")] * 6 + [xml("23")] * 2  # wrong, far off, no named pattern
    events = []
    for step in range(3):
        d.observe_rollouts(batch(step, odd))
        events += d.observe(step, {})
    kinds = [e.kind for e in events]
    assert kinds[0] == "reward_candidate" and "reward_discovered" in kinds
    name = events[0].evidence["term"]
    assert name.startswith("discovered_cluster_")
    spec = events[0].evidence["spec"]
    assert spec["predicate"]["type"] == "feature_box" and spec["weight"] == -0.2
    [term] = d.active_components()
    texts = [xml("9999", "add them"), xml("23"), xml("20")]
    assert term([""] * 3, texts, **columns(texts)) == [1.0, 0.0, 0.0]


def test_state_round_trip_continues_identically():
    memory = EpisodicMemory()
    a = small_discovery(cluster=True, memory=memory)
    stream = [
        [xml("20")] * 3 + [xml("9999", "hm")] * 3 + [xml("23")] * 2,
        ["<reasoning>r</reasoning>"] * 5 + [xml("23")] * 3,
        [xml("23")] * 8,
        [xml("23")] * 8,
    ]
    for step in range(2):
        a.observe_rollouts(batch(step, stream[step], memory))
    b = small_discovery(cluster=True, memory=memory)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for step in (2, 3):
        for d in (a, b):
            d.observe_rollouts(batch(step, stream[step], memory))
    ea, eb = a.observe(3, {}), b.observe(3, {})
    assert [(e.kind, e.evidence) for e in ea] == [(e.kind, e.evidence) for e in eb]
    assert a.state_dict() == b.state_dict()
    assert a.metrics() == b.metrics() and "discovery/active" in a.metrics()


# ------------------------------------------------------------------ the schema


VALID = {"name": "t", "predicate": {"type": "repetition", "n": 3}, "weight": -0.5}


@pytest.mark.parametrize(
    "spec, field, words",
    [
        ([], "<root>", "object"),
        ({**VALID, "code": "import os"}, "code", "unknown key"),
        ({"name": "t", "predicate": {"type": "repetition"}}, "weight", "required"),
        ({**VALID, "weight": "-1"}, "weight", "finite number"),
        ({**VALID, "weight": float("nan")}, "weight", "finite number"),
        ({**VALID, "weight": True}, "weight", "finite number"),
        ({**VALID, "weight": 0.5}, "weight", "penalty"),
        ({**VALID, "name": "Bad Name"}, "name", "identifier"),
        ({**VALID, "predicate": "repetition"}, "predicate", "object"),
        ({**VALID, "predicate": {"type": "os.system"}}, "predicate.type", "unknown predicate type"),
        ({**VALID, "predicate": {"type": "repetition", "n": "3"}}, "predicate.n", "integer"),
        ({**VALID, "predicate": {"type": "repetition", "n": 99}}, "predicate.n", "[1, 16]"),
        (
            {**VALID, "predicate": {"type": "repetition", "fn": 1}},
            "predicate.fn",
            "not a parameter",
        ),
        ({**VALID, "predicate": {"type": "format_error"}}, "predicate.category", "required"),
        (
            {**VALID, "predicate": {"type": "format_error", "category": "__import__('os')"}},
            "predicate.category",
            "category",
        ),
        (
            {**VALID, "predicate": {"type": "unit_mismatch", "factors": [60, "x"]}},
            "predicate.factors[1]",
            "number",
        ),
        (
            {**VALID, "predicate": {"type": "feature_box", "bounds": {"words": [5, 1]}}},
            "predicate.bounds.words",
            "lo <= hi",
        ),
        (
            {
                **VALID,
                "predicate": {
                    "type": "any_of",
                    "predicates": [{"type": "repetition"}, {"type": "x"}],
                },
            },
            "predicate.predicates[1].type",
            "unknown predicate type",
        ),
    ],
)
def test_malformed_specs_are_rejected_naming_the_field(spec, field, words):
    with pytest.raises(SpecError, match=words) as info:
        validate_spec(spec)
    assert info.value.path == field
    assert f"'{field}'" in str(info.value)


def test_huge_nesting_is_rejected_before_recursing():
    pred: dict = {"type": "answer_not_numeric"}
    for _ in range(5000):  # deeper than Python's recursion limit if we walked it all
        pred = {"type": "not", "predicate": pred}
    with pytest.raises(SpecError, match="nest deeper"):
        validate_spec({**VALID, "predicate": pred})
    wide = {
        "type": "any_of",
        "predicates": [{"type": "any_of", "predicates": [{"type": "repetition"}] * 8}] * 8,
    }
    with pytest.raises(SpecError, match="more than 32"):
        validate_spec({**VALID, "predicate": wide})


def test_combinators_and_canonical_form():
    spec = validate_spec(
        {
            "name": "wrong_and_long",
            "predicate": {
                "type": "all_of",
                "predicates": [
                    {"type": "not", "predicate": {"type": "format_error", "category": "missing"}},
                    {"type": "overlong_reasoning", "max_words": 5},
                ],
            },
            "weight": -1,
            "description": "long reasoning with both tags",
        }
    )
    assert spec.predicate["predicates"][1] == {"type": "overlong_reasoning", "max_words": 5}
    assert validate_spec(spec.to_dict()) == spec  # canonical forms are fixed points
    term = DiscoveredTerm(spec)
    texts = [xml("1", "a b c d e f g"), xml("1", "a b"), "<reasoning>a b c d e f g</reasoning>"]
    assert term([""] * 3, texts, **columns(texts)) == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="repeats a term name"):
        RewardDiscovery([VALID, VALID])
    with pytest.raises(SpecError):
        RewardDiscovery([{**VALID, "weight": 2}])


# ------------------------------------------------------------------ random JSON (hypothesis)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=True)
    | st.text(max_size=12)
    | st.sampled_from(list(PREDICATES) + ["eval", "exec", "__import__"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "type",
                    "name",
                    "weight",
                    "predicate",
                    "predicates",
                    "category",
                    "n",
                    "min_repeats",
                    "max_words",
                    "factors",
                    "words",
                    "bounds",
                    "description",
                    "code",
                    "words",
                ]
            )
            | st.text(max_size=6),
            children,
            max_size=5,
        )
    ),
    max_leaves=20,
)


# Mostly valid parameter values per predicate type, with some invalid ones mixed in.
PARAM_VALUES = {
    "format_error": {
        "category": st.sampled_from(["missing", "unclosed:answer", "order", "rm -rf"])
    },
    "unit_mismatch": {
        "factors": st.lists(st.floats(1.5, 100) | st.integers(0, 100), min_size=1, max_size=3),
        "words": st.booleans() | st.just(1),
    },
    "repetition": {"n": st.integers(1, 17), "min_repeats": st.integers(1, 5)},
    "overlong_reasoning": {"max_words": st.integers(0, 50)},
    "feature_box": {
        "bounds": st.dictionaries(
            st.sampled_from(["words", "digit_ratio", "tag_errors", "log_rel_error", "x"]),
            st.tuples(st.floats(-1, 10), st.floats(10, 500)).map(list) | st.just([1]),
            min_size=1,
            max_size=3,
        )
    },
}


def near_valid_leaf():
    def params(kind: str):
        optional = dict(PARAM_VALUES.get(kind, {}))
        optional["extra"] = st.just("x")  # an unknown key, sometimes
        return st.fixed_dictionaries({"type": st.just(kind)}, optional=optional)

    simple = [k for k in PREDICATES if k not in {"all_of", "any_of", "not"}]
    return st.sampled_from(simple).flatmap(params)


def near_valid_predicates():
    return st.recursive(
        near_valid_leaf(),
        lambda kids: (
            st.fixed_dictionaries({"type": st.just("not"), "predicate": kids})
            | st.fixed_dictionaries(
                {
                    "type": st.sampled_from(["all_of", "any_of"]),
                    "predicates": st.lists(kids, max_size=3),
                }
            )
        ),
        max_leaves=6,
    )


near_valid_specs = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["ok", "ok_2", "ok_3", "Bad"]),
        "predicate": near_valid_predicates(),
        "weight": st.floats(-10, -0.01) | st.floats(-10, -0.01) | st.sampled_from(["-1", None, 1]),
    },
    optional={"description": st.text(max_size=5)},
)

SAMPLE_TEXTS = [
    xml("23"),
    xml("20"),
    xml("2300 apples"),
    "<reasoning>oops",
    xml("x", "a a a a a a a a"),
]


@contextlib.contextmanager
def no_code_execution():
    """eval, exec and compile refuse to run while a spec is validated and interpreted."""

    def refuse(*args, **kwargs):
        raise AssertionError("a spec reached eval/exec/compile")

    with contextlib.ExitStack() as stack:
        for fn in ("eval", "exec", "compile"):
            stack.enter_context(mock.patch.object(builtins, fn, refuse))
        yield


def check_never_executed(spec) -> None:
    with no_code_execution():
        try:
            validated = validate_spec(spec)
        except SpecError as exc:
            message = str(exc)
            validated = None
        if validated is not None:
            term = DiscoveredTerm(validated)
            scores = term([""] * len(SAMPLE_TEXTS), SAMPLE_TEXTS, **columns(SAMPLE_TEXTS))
    if validated is None:
        assert message.startswith("reward spec: field '")
        return
    assert json.loads(json.dumps(validated.to_dict())) == validated.to_dict()
    assert set(scores) <= {0.0, 1.0}


@settings(
    max_examples=300,
    derandomize=True,
    database=None,
    deadline=None,
)
@given(json_values)
def test_random_json_is_rejected_or_interpreted_never_executed(spec):
    check_never_executed(spec)


@settings(
    max_examples=300,
    derandomize=True,
    database=None,
    deadline=None,
)
@given(near_valid_specs)
def test_near_valid_specs_are_rejected_or_interpreted_never_executed(spec):
    check_never_executed(spec)


def test_distractors_in_any_shape_the_data_gives():
    from deepsynapse.data.distractors import Distractor

    shapes = [
        ["24", "20", "2300"],  # what attach_distractors stores
        [Distractor("20", "semantic", "penultimate_step", False)],
        {"numeric": "24", "semantic": "20"},
        "20",
    ]
    for shape in shapes:
        [r] = batch(0, [xml("20")], distractors=shape)
        assert "20" in r.distractors
        assert fires("distractor_chosen", xml("20"), distractors=shape)
    [r] = batch(0, [xml("20")], distractors=None)
    assert r.distractors == () and not fires("distractor_chosen", xml("20"), distractors=None)
