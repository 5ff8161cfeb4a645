"""Property-based fuzzing of every input surface a user or a model controls.

Surfaces: config files and ``key=value`` overrides, the ``train`` command, dataset files,
completions (parser and every reward component that needs no model), and the JSON specs
of auto-discovered reward terms. Each property: the input is accepted, or refused with an
error that says where (key, file and line, spec field); never an unexpected exception,
never code executed, never a score outside the component's documented range.

Hypothesis runs derandomized (a fixed seed: the same examples every run) with
``DEEPSYNAPSE_FUZZ_EXAMPLES`` examples per property (default 40, so this file takes well
under 30 s). Nightly-style: ``DEEPSYNAPSE_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz_inputs.py``;
``DEEPSYNAPSE_FUZZ_REPORT=fuzz.json`` writes how many examples each surface ran.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from deepsynapse.config import ConfigError, describe_fields, load_config
from deepsynapse.data.answers import normalize_answer
from deepsynapse.data.gsm8k import load_gsm8k_jsonl
from deepsynapse.data.problems import DataError, Problem
from deepsynapse.formats import BASE_SCHEMA, DEEPSYNAPSE_SCHEMA, parse_completion
from deepsynapse.memory.episodic import EpisodicMemory
from deepsynapse.rewards.base import BUILTIN_REWARDS
from deepsynapse.rewards.critique import (
    critique_consistency_reward,
    critique_verdict,
    make_calibration_reward,
)
from deepsynapse.rewards.discovery import DEFAULT_LIBRARY, DiscoveredTerm
from deepsynapse.rewards.memory_rewards import NoveltyReward, RepeatMistakePenalty
from deepsynapse.rewards.specs import PREDICATES, SpecError, TermSpec, validate_spec
from deepsynapse.rewards.structure import LENGTH_PENALTIES, make_length_penalty, structure_reward
from deepsynapse.rewards.verifier import Verifier, VerifierReward
from deepsynapse.rl.trainer import Trainer

EXAMPLES = int(os.environ.get("DEEPSYNAPSE_FUZZ_EXAMPLES", "40"))
RUNS: Counter[str] = Counter()  # examples run per surface (for docs/reliability.md)


def fuzz(factor: float = 1.0):
    """Derandomized settings, ``factor`` x the configured number of examples."""
    return settings(
        max_examples=max(1, int(EXAMPLES * factor)),
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@pytest.fixture(scope="module", autouse=True)
def _warm_up_and_report(tmp_path_factory):
    """Trigger the lazy stdlib imports (codecs) once, so that the guard below only sees
    what the inputs cause; at the end, write the example counts if asked."""
    warm = tmp_path_factory.mktemp("warm") / "rows.jsonl"
    warm.write_bytes(b'\xef\xbb\xbf{"question": "q", "answer": "#### 1"}\n\xff\n')
    load_gsm8k_jsonl(warm, skip_malformed=True)
    yield
    target = os.environ.get("DEEPSYNAPSE_FUZZ_REPORT")
    if target:
        Path(target).write_text(json.dumps({"examples": EXAMPLES, "runs": dict(RUNS)}, indent=1))


# ----------------------------------------------------------------- no code runs from data

_FORBIDDEN_EVENTS = {
    "exec",
    "compile",
    "import",
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "subprocess.Popen",
    "pickle.find_class",
    "marshal.loads",
    "marshal.load",
    "ctypes.dlopen",
}
_guard: dict[str, Any] = {"on": False, "seen": []}


def _typing_evaluates_annotations() -> bool:
    """Whether the event comes from ``typing.get_type_hints`` reading the package's own
    (string) annotations: the config reader does this; it is source code, not data."""
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        if code.co_name in ("get_type_hints", "_evaluate") and code.co_filename.endswith(
            "typing.py"
        ):
            return True
        frame = frame.f_back
    return False


def _audit(event: str, args: tuple) -> None:
    if _guard["on"] and event in _FORBIDDEN_EVENTS:
        if event in ("compile", "exec") and _typing_evaluates_annotations():
            return
        _guard["seen"].append((event, repr(args)[:200]))


@contextlib.contextmanager
def no_code_execution():
    """Fail if anything inside compiles, executes or imports code, unpickles or spawns.

    A Python audit hook (PEP 578) sees every such event, whatever function triggers it,
    so this is stronger than patching ``eval``. The hook is installed once per process and
    is inert outside this context.
    """
    if not _guard.get("installed"):
        sys.addaudithook(_audit)
        _guard["installed"] = True
    _guard["seen"] = []
    _guard["on"] = True
    try:
        yield
    finally:
        _guard["on"] = False
    assert _guard["seen"] == [], f"code ran from data: {_guard['seen'][:3]}"


# ----------------------------------------------------------------- configs

FIELDS = [key for key, _, _ in describe_fields()]
SECTIONS = sorted({key.split(".")[0] for key in FIELDS})
FIELD_PARTS = sorted({part for key in FIELDS for part in key.split(".")})

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(),  # nan, inf, subnormals
    st.text(max_size=12),
    st.sampled_from(["1e-3", "1e400", "-1e400", ".nan", "yes", "~", "0x1F", "1_000", "[1"]),
)
config_keys = st.one_of(st.sampled_from(FIELD_PARTS), st.text(max_size=10))
config_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(config_keys, inner, max_size=4)
    ),
    max_leaves=12,
)
config_trees = st.dictionaries(
    st.one_of(st.sampled_from(SECTIONS), st.text(max_size=10)), config_values, max_size=4
)


def _keys(tree: Any) -> set[str]:
    """Every mapping key anywhere in a tree, as the config reader names them."""
    found: set[str] = set()
    if isinstance(tree, dict):
        for k, v in tree.items():
            found.add(str(k))
            found |= _keys(v)
    elif isinstance(tree, list):
        for v in tree:
            found |= _keys(v)
    return found


def _write_yaml(folder: Path, tree: Any, name: str = "config.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(tree, allow_unicode=True), encoding="utf-8")
    return path


def _flow(value: Any) -> str:
    """``value`` as one line of YAML, the way a user types an override."""
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10**9)
    return text.strip().removesuffix("...").strip()


@fuzz()
@given(config_trees)
def test_random_config_trees_are_accepted_or_refused_naming_a_key(tree):
    RUNS["config files (random trees)"] += 1
    with tempfile.TemporaryDirectory() as tmp:
        path = _write_yaml(Path(tmp), tree)
        with no_code_execution():
            try:
                load_config(path)
            except ConfigError as exc:
                message = str(exc)
                assert message.startswith(f"{path}: ")
                as_read = yaml.safe_load(path.read_text(encoding="utf-8"))  # YAML may fold keys
                assert any(k in message for k in _keys(as_read)), message


@fuzz()
@given(st.sampled_from(FIELDS), config_values)
def test_any_value_for_a_known_key_is_accepted_or_refused_naming_it(key, value):
    RUNS["overrides (known keys, random values)"] += 1
    section, leaf = key.split(".")[0], key.split(".")[-1]
    with no_code_execution():
        try:
            load_config(None, [f"{key}={_flow(value)}"])
        except ConfigError as exc:
            assert section in str(exc) and leaf in str(exc), (key, str(exc))


@fuzz()
@given(st.sampled_from(SECTIONS), st.text(min_size=1, max_size=12))
def test_unknown_and_unicode_keys_are_named(section, key):
    RUNS["unknown / unicode keys"] += 1
    assume(key not in FIELD_PARTS)
    with tempfile.TemporaryDirectory() as tmp:
        path = _write_yaml(Path(tmp), {section: {key: 1}})
        [as_read] = yaml.safe_load(path.read_text(encoding="utf-8"))[section]  # YAML folds \x85
        with pytest.raises(ConfigError) as info:
            load_config(path)
    assert f"unknown key '{section}.{as_read}'" in str(info.value)
    if "=" not in key and "." not in key and key.strip() == key and key:
        with pytest.raises(ConfigError, match="unknown key"):
            load_config(None, [f"{section}.{key}=1"])


@fuzz()
@given(st.one_of(scalars, st.lists(config_values, max_size=3)))
def test_yaml_that_is_not_a_mapping_is_refused(document):
    RUNS["non-mapping YAML"] += 1
    with tempfile.TemporaryDirectory() as tmp:
        path = _write_yaml(Path(tmp), document)
        if document is None:
            assert load_config(path) is not None  # an empty document means the defaults
            return
        with pytest.raises(ConfigError, match="expected a mapping of sections"):
            load_config(path)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n", "~\n"])
def test_empty_config_files_mean_the_defaults(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text, encoding="utf-8")
    assert load_config(path).train.steps == load_config(None).train.steps


@pytest.mark.parametrize(
    "override, words",
    [
        ("optim.lr=1e400", ["optim.lr", "finite"]),
        ("grpo.beta=.nan", ["grpo.beta", "finite"]),
        ("lora.r=1.5e3", ["lora.r", "integer"]),
        ("train.steps=-99999999999999999999999", ["train.steps", ">= 0"]),
        ("lora.r=0", ["lora.r", "> 0"]),
        ("rollout.top_p=1e308", ["rollout.top_p"]),
    ],
)
def test_huge_and_non_finite_numbers_name_the_key(override, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    for word in words:
        assert word in str(info.value)


def _nested_yaml(depth: int) -> str:
    return "model: " + "[" * depth + "]" * depth + "\n"


def test_deeply_nested_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text(_nested_yaml(5000), encoding="utf-8")
    with pytest.raises(ConfigError, match="deep.yaml"):
        load_config(path)


def test_integer_over_python_digit_limit_is_a_config_error():
    with pytest.raises(ConfigError, match="lora.r"):
        load_config(None, ["lora.r=" + "9" * 5000])


def _alias_bomb(levels: int = 8) -> str:
    lines = ["    l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"    l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "rewards:\n  allocator_options:\n" + "\n".join(lines) + "\n"


def test_yaml_alias_bomb_is_refused(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(_alias_bomb(), encoding="utf-8")
    with pytest.raises(ConfigError, match="allocator_options"):
        load_config(path)  # today it returns; never call to_dict() on the result here


# ----------------------------------------------------------------- the train command


def _main_quietly(argv: list[str]) -> tuple[int, str]:
    """``deepsynapse.cli.main`` in-process; any exception escaping it is a traceback."""
    from deepsynapse import cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(argv)
    return code, err.getvalue()


def _refuse_models(*_: Any, **__: Any) -> Any:
    raise AssertionError("a trainer was built for a config that should have been refused")


@fuzz(0.5)
@given(config_trees)
def test_train_command_refuses_bad_configs_in_one_line(tree):
    RUNS["train command (in-process)"] += 1
    with tempfile.TemporaryDirectory() as tmp:
        path = _write_yaml(Path(tmp), tree)
        try:
            load_config(path)
            assume(False)  # a valid config would start training; only bad ones here
        except ConfigError:
            pass
        with mock.patch.object(Trainer, "__init__", _refuse_models), contextlib.chdir(tmp):
            code, err = _main_quietly(["train", "--config", str(path)])
        assert code == 2
        assert err.startswith("deepsynapse: error: ") and "Traceback" not in err, err
        assert not (Path(tmp) / "runs").exists()


def generated_bad_configs(seed: int) -> dict[str, tuple[Any, str]]:
    """Three seeded bad configs, one per kind, each with the words its error must contain:
    an unknown unicode key, a known key with a value of the wrong type, a YAML list."""
    rng = random.Random(seed)
    scalar_keys = [k for k, default, _ in describe_fields() if default[:1].isdigit()]
    section = rng.choice(SECTIONS)
    key = "".join(rng.choice("åßçðéøπжλ日本") for _ in range(rng.randint(2, 6)))
    wrong_key = rng.choice(scalar_keys)
    head, *rest = wrong_key.split(".")
    wrong: Any = [rng.random()]
    for part in reversed(rest):
        wrong = {part: wrong}
    return {
        "unknown-unicode-key": ({section: {key: rng.randint(0, 9)}}, f"{section}.{key}"),
        "wrong-type": ({head: wrong}, wrong_key),
        "not-a-mapping": (rng.sample(SECTIONS, 3), "expected a mapping"),
    }


def test_cli_subprocess_fails_fast_without_traceback(tmp_path):
    """The real command, one process per generated bad config (side by side): exit 2, one
    line naming the key, and no run folder (refused before the trainer existed)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    bad = generated_bad_configs(seed=20240611)
    procs = {}
    for name, (tree, _) in bad.items():
        folder = tmp_path / name
        folder.mkdir()
        path = _write_yaml(folder, tree)
        cmd = [sys.executable, "-m", "deepsynapse.cli", "train", "--config", str(path)]
        procs[name] = subprocess.Popen(
            cmd, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (name, err[-2000:])
        assert "Traceback" not in err, (name, err)
        assert err.startswith("deepsynapse: error: ") and bad[name][1] in err, (name, err)
        assert err.strip().count("\n") == 0, err
        assert not (tmp_path / name / "runs").exists()


TINY_ZERO = {
    "model": {"name": "tiny-random", "dtype": "fp32"},
    "lora": {"r": 4, "alpha": 8},
    "rollout": {"num_generations": 2, "max_new_tokens": 4},
    "grpo": {"prompts_per_step": 2, "micro_batch_size": 2},
    "sft": {"steps": 0},
    "eval": {"limit": 0},
    "train": {"steps": 0, "save_every": 0},
}


@pytest.mark.parametrize(
    "case",
    [
        pytest.param({"rewards": {"allocator_options": {"flor": 0.1}}}, id="allocator-option"),
        pytest.param(
            {"rewards": {"allocator": "mirror", "allocator_options": {"floor": "abc"}}},
            id="allocator-option-type",
        ),
        pytest.param(
            {
                "control": {
                    "curriculum": {
                        "enabled": True,
                        "phases": [{"name": "a", "reward_weights": {"nope": 1.0}}],
                    }
                }
            },
            id="curriculum-reward",
        ),
    ],
)
def test_train_command_turns_component_config_errors_into_one_line(tmp_path, monkeypatch, case):
    tree = json.loads(json.dumps(TINY_ZERO))
    for section, values in case.items():
        tree.setdefault(section, {}).update(values)
    path = _write_yaml(tmp_path, tree)
    monkeypatch.chdir(tmp_path)
    code, err = _main_quietly(["train", "--config", str(path)])
    assert code == 2 and err.startswith("deepsynapse: error: ")


def test_train_command_refuses_deep_yaml_in_one_line(tmp_path, monkeypatch):
    path = tmp_path / "deep.yaml"
    path.write_text(_nested_yaml(5000), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    code, err = _main_quietly(["train", "--config", str(path)])
    assert code == 2 and "deep.yaml" in err


# ----------------------------------------------------------------- dataset files

ROW_KINDS = [
    "valid",
    "valid",
    "valid",
    "blank",
    "missing_question",
    "missing_answer",
    "question_not_string",
    "answer_not_string",
    "empty_question",
    "no_marker",
    "no_number",
    "bad_json",
    "not_object",
    "bad_utf8",
]


@st.composite
def dataset_lines(draw) -> list[tuple[str, bytes]]:
    """(kind, raw line bytes) per line; the kind is the oracle."""
    lines = []
    for kind in draw(st.lists(st.sampled_from(ROW_KINDS), min_size=0, max_size=8)):
        text = draw(st.text(max_size=30))
        number = draw(st.integers(min_value=-(10**6), max_value=10**12))
        ascii_only = draw(st.booleans())
        row: Any
        if kind == "valid":
            extra = draw(st.dictionaries(st.sampled_from(["id", "meta", "x"]), scalars, max_size=2))
            row = {"question": "Q " + text, "answer": f"{text}\n#### {number}", **extra}
        elif kind == "missing_question":
            row = {"answer": f"#### {number}"}
        elif kind == "missing_answer":
            row = {"question": "Q " + text}
        elif kind == "question_not_string":
            question = draw(st.one_of(st.integers(), st.none(), st.lists(st.text())))
            row = {"question": question, "answer": f"#### {number}"}
        elif kind == "answer_not_string":
            answer = draw(st.one_of(st.integers(), st.floats(), st.none()))
            row = {"question": "Q", "answer": answer}
        elif kind == "empty_question":
            row = {"question": draw(st.sampled_from(["", " ", "\n\t"])), "answer": "#### 1"}
        elif kind == "no_marker":
            row = {"question": "Q", "answer": text.replace("#", "") + str(number)}
        elif kind == "no_number":
            row = {"question": "Q", "answer": f"{number} #### " + draw(st.text("abc xyz.,-"))}
        if kind == "blank":
            raw = draw(st.sampled_from([b"", b"   ", b"\t", b" \r"]))
        elif kind == "bad_json":
            raw = draw(
                st.sampled_from([b'{"question": "a"', b"{question: a}", b"nan", b"{'a': 1}"])
            )
        elif kind == "not_object":
            raw = draw(st.sampled_from([b"[1, 2]", b'"text"', b"42", b"null", b"true"]))
        elif kind == "bad_utf8":
            raw = b'{"question": "caf\xe9 \xff", "answer": "#### 1"}'
        else:
            raw = json.dumps(row, ensure_ascii=ascii_only).encode("utf-8")
        lines.append((kind, raw))
    return lines


@fuzz()
@given(dataset_lines(), st.booleans(), st.booleans())
def test_dataset_rows_fail_with_file_and_line_or_skip_and_count(lines, skip, bom):
    RUNS["dataset files"] += 1
    malformed = [i for i, (k, _) in enumerate(lines, 1) if k not in ("valid", "blank")]
    valid = [i for i, (k, _) in enumerate(lines, 1) if k == "valid"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.jsonl"
        path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + b"\n".join(r for _, r in lines))
        with no_code_execution():
            try:
                problems, skipped = load_gsm8k_jsonl(path, skip_malformed=skip)
            except DataError as exc:
                problems, error = None, exc
    if problems is not None:
        assert [p.id for p in problems] == [f"gsm8k-rows-{i}" for i in valid]
        assert skipped == (len(malformed) if skip else 0)
        assert all(p.question.startswith("Q") and normalize_answer(p.answer) for p in problems)
        assert skip or not malformed
        return
    assert error.path == str(path)
    if malformed and not skip:
        assert error.line == malformed[0] and str(error).startswith(f"{path}:{malformed[0]}: ")
    elif malformed:  # everything malformed or blank
        assert not valid and f"{len(malformed)} malformed rows skipped" in str(error)
    else:
        assert not valid and "no rows" in str(error)
    assert len(str(error)) < 500


def test_ten_megabyte_lines(tmp_path):
    big_question = "Q " + "apples and pears " * (10 * 2**20 // 17)
    good = json.dumps({"question": big_question, "answer": "so\n#### 7"})
    garbage = "x" * (10 * 2**20)
    path = tmp_path / "big.jsonl"
    path.write_text(good + "\n" + garbage + "\n" + good + "\n", encoding="utf-8")
    start = time.perf_counter()
    with pytest.raises(DataError) as info:
        load_gsm8k_jsonl(path)
    assert info.value.line == 2 and len(str(info.value)) < 300
    problems, skipped = load_gsm8k_jsonl(path, skip_malformed=True)
    assert [p.answer for p in problems] == ["7", "7"] and skipped == 1
    assert time.perf_counter() - start < 15


def test_skipped_rows_are_counted_in_the_run_log(tmp_path):
    from deepsynapse.telemetry.run_logger import read_jsonl

    rows = [json.dumps({"question": f"Q{i}", "answer": f"#### {i}"}) for i in range(3)]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join([rows[0], "{oops", rows[1], '{"question": 1}', rows[2]]) + "\n")
    overrides = [
        f"{section}.{k}={_flow(v)}" for section, d in TINY_ZERO.items() for k, v in d.items()
    ]
    cfg = load_config(None, overrides + [f"data.train={data}", "data.skip_malformed=true"])
    trainer = Trainer(cfg, run_dir=tmp_path / "run", progress=False)
    assert len(trainer.train_problems) == 3 and trainer.skipped_rows == 2
    trainer.train()
    start = next(e for e in read_jsonl(tmp_path / "run/events.jsonl") if e["kind"] == "start")
    assert start["evidence"]["skipped_rows"] == 2


# ----------------------------------------------------------------- completions and rewards

PIECES = [
    "<reasoning>", "</reasoning>", "<answer>", "</answer>", "<critique>", "</critique>",
    "<confidence>", "</confidence>", "<reasoning", "<x>", "</y>", "<", "</", ">", "<<", ">>",
    "\x00", "\\boxed{", "\\frac{1}{", "{", "}", "1/", "0", "42", "72", "-", "\u2212", "$",
    ".", ",", "#### ", "0.5", "1.0", "nan", "1e5", "correct", "not ", "wrong", "might be",
    "no mistakes", ". ", "\n", " ", "\t", "\U0001f600", "\u202e", "\ufeff", "a b c",
]  # fmt: skip
completions = st.one_of(
    st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=16)), max_size=60).map("".join),
    st.text(max_size=200),
    st.binary(max_size=200).map(lambda b: b.decode("utf-8", "replace")),
)


def _memory() -> EpisodicMemory:
    """A memory with history on p0 (wrong answers 7 and 8) and p1 (solved)."""
    memory = EpisodicMemory()
    memory.record(["p0", "p0", "p1"], ["7", "8", "72"], [False, False, True], step=0)
    return memory


def reward_components() -> dict[str, tuple[Any, float, float, bool]]:
    """Every component that needs no model: name -> (component, low, high, may be None).

    Ranges are the ones each component's docstring promises.
    """
    memory = _memory()
    table: dict[str, tuple[Any, float, float, bool]] = {
        "correctness": (BUILTIN_REWARDS["correctness"], 0.0, 1.0, False),
        "strict_format": (BUILTIN_REWARDS["strict_format"], 0.0, 1.0, False),
        "soft_format": (BUILTIN_REWARDS["soft_format"], 0.0, 1.0, False),
        "structure": (structure_reward, 0.0, 1.0, False),
        "calibration": (make_calibration_reward(), -1.0, 0.0, True),
        "calibration+penalty": (make_calibration_reward(0.5), -1.5, 0.0, True),
        "critique_consistency": (critique_consistency_reward, -1.0, 1.0, True),
        "repeat_mistake": (RepeatMistakePenalty(memory), -1.0, 0.0, True),
        "novelty": (NoveltyReward(memory), 0.0, 1.0, True),
        "verifier": (VerifierReward(Verifier("hashing", seed=0), min_examples=0), -1.0, 1.0, True),
    }
    assert set(BUILTIN_REWARDS) <= set(table)  # a new builtin must be added here
    for kind in LENGTH_PENALTIES:
        table[f"length_penalty:{kind}"] = (make_length_penalty(kind, 8), -1.0, 0.0, False)
    for spec in DEFAULT_LIBRARY:
        table[f"discovered_{spec['name']}"] = (
            DiscoveredTerm(validate_spec(spec), memory),
            0.0,
            1.0,
            False,
        )
    box = {"type": "feature_box", "bounds": {"words": [0, 60], "tag_errors": [0.5, 100]}}
    table["discovered_box"] = (
        DiscoveredTerm(validate_spec({"name": "box", "predicate": box, "weight": -0.2}), memory),
        0.0,
        1.0,
        False,
    )
    return table


COMPONENTS = reward_components()


def reward_columns(texts: list[str], schema: Any, gold: str, parsed: bool) -> dict[str, Any]:
    """The columns the trainer passes (see rl.collect.score_batch), for one batch of completions."""
    question = "Natalia sold 48 clips, then 24. How many?"
    extra = {"distractors": ["24", "48", "7200"]}
    problems = [
        Problem(f"p{i % 3}", question, gold, "", 2, "gsm8k", extra) for i in range(len(texts))
    ]
    columns: dict[str, Any] = {
        "answer": [gold] * len(texts),
        "question": [p.question for p in problems],
        "problem": problems,
        "schema": schema,
        "truncated": [i % 2 == 1 for i in range(len(texts))],
        "step": 5,
    }
    if parsed:
        columns["parsed"] = [parse_completion(t, schema) for t in texts]
        columns["completion_lengths"] = [len(t) // 4 for t in texts]
    return columns


def check_scores(name: str, scores: Any, n: int) -> None:
    _, low, high, may_be_none = COMPONENTS[name]
    assert isinstance(scores, list) and len(scores) == n, name
    for s in scores:
        if s is None:
            assert may_be_none, f"{name} returned None"
            continue
        assert isinstance(s, float) and math.isfinite(s), (name, s)
        assert low - 1e-9 <= s <= high + 1e-9, (name, s)


@fuzz()
@given(
    st.lists(completions, min_size=1, max_size=4),
    st.sampled_from([BASE_SCHEMA, DEEPSYNAPSE_SCHEMA, "base", "deepsynapse"]),
    st.sampled_from(["72", "7", "0", "-3", "1.5"]),
    st.booleans(),
)
def test_every_component_scores_in_its_range_or_none(texts, schema, gold, parsed):
    RUNS["completions x components"] += 1
    for text in texts:
        p = parse_completion(text, schema)
        assert isinstance(p.valid, bool) and p.valid == (not p.errors)
        assert all(isinstance(v, str) for v in p.fields.values())
        assert p.confidence is None or 0.0 <= p.confidence <= 1.0
        assert critique_verdict(text) in (True, False, None)
        value = normalize_answer(text)
        assert value is None or normalize_answer(value) == value  # canonical is a fixed point
    columns = reward_columns(texts, schema, gold, parsed)
    with no_code_execution():
        for name, (component, *_) in COMPONENTS.items():
            scores = component(prompts=["q"] * len(texts), completions=texts, **columns)
            check_scores(name, scores, len(texts))


def _repeat(piece: str, n: int) -> str:
    return piece * (n // len(piece))


ADVERSARIAL = {
    "'<' * n": lambda n: _repeat("<", n),
    "'<answer>' * n": lambda n: _repeat("<answer>", n),
    "nested open/close": lambda n: (
        _repeat("<reasoning><answer>", n // 2) + _repeat("</answer></reasoning>", n // 2)
    ),
    "'1/' * n": lambda n: _repeat("1/", n),
    "NUL * n": lambda n: _repeat("\x00", n),
    "digits in <answer>": lambda n: (
        "<reasoning>r</reasoning><answer>" + _repeat("0123456789", n) + "</answer>"
    ),
    "verdicts in <critique>": lambda n: (
        "<reasoning>r</reasoning><answer>72</answer><critique>"
        + _repeat("is not correct, maybe. ", n)
        + "</critique><confidence>0.5</confidence>"
    ),
    "words in <reasoning>": lambda n: (
        "<reasoning>" + _repeat("48 apples a b ", n) + "</reasoning><answer>1</answer>"
    ),
}
# Number-extraction patterns, timed on normalize_answer itself: every component that reads
# an answer calls it, so it is the one place a regex could backtrack.
NUMBER_ADVERSARIAL = {
    "'1/' * n": "1/",
    "'$-' * n": "$-",
    "'\\boxed{' * n": "\\boxed{",
    "'1,' * n": "1,",
    "'1.' * n": "1.",
    "'- ' * n": "- ",
    "'\\frac{1}{' * n": "\\frac{1}{",
}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _ratio(fn_small, fn_big) -> tuple[float, float]:
    """Time at 1 MB over best time at 100 KB; a suspicious ratio is measured once more, so
    that a preemption on a busy machine is not taken for backtracking."""
    ratio, big = 0.0, 0.0
    for _ in range(2):
        small = min(_timed(fn_small) for _ in range(3))
        big = _timed(fn_big)
        ratio = big / max(small, 1e-4)
        if ratio <= 30 or big <= 0.5:
            break
    return ratio, big


def test_megabyte_adversarial_inputs_score_in_linear_time():
    """100 KB vs 1 MB of each pattern: a linear scan takes ~10x; backtracking takes ~100x."""
    slow = []

    def everything(text: str) -> None:
        for schema in (BASE_SCHEMA, DEEPSYNAPSE_SCHEMA):
            columns = reward_columns([text], schema, "72", parsed=True)
            for name, (component, *_) in COMPONENTS.items():
                check_scores(name, component(prompts=["q"], completions=[text], **columns), 1)
        critique_verdict(text)

    for label, make in ADVERSARIAL.items():
        small, big = make(100_000), make(1_000_000)
        ratio, seconds = _ratio(lambda s=small: everything(s), lambda b=big: everything(b))
        if ratio > 30 and seconds > 0.5:
            slow.append((label, round(ratio, 1), round(seconds, 2)))
    for label, piece in NUMBER_ADVERSARIAL.items():
        small, big = _repeat(piece, 100_000), _repeat(piece, 1_000_000)
        ratio, seconds = _ratio(
            lambda s=small: normalize_answer(s), lambda b=big: normalize_answer(b)
        )
        if ratio > 30 and seconds > 0.5:
            slow.append((label, round(ratio, 1), round(seconds, 2)))
    assert slow == [], "super-linear time (pattern, 1MB/100KB ratio, seconds at 1 MB)"


# ----------------------------------------------------------------- reward specs

json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(),
        st.text(max_size=20),
        st.sampled_from(
            [
                "__import__('os').system('touch /tmp/pwned')",
                "lambda r: True",
                "os.system",
                "eval",
                "{{7*7}}",
                "${HOME}",
            ]
        ),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=16,
)
predicate_types = st.one_of(st.sampled_from(sorted(PREDICATES)), st.text(max_size=12))


@st.composite
def near_valid_specs(draw) -> Any:
    """A library spec with one part replaced, removed or added: close to the schema's edge."""
    spec = json.loads(json.dumps(draw(st.sampled_from(DEFAULT_LIBRARY))))
    how = draw(st.sampled_from(["replace", "drop", "add", "predicate", "nest", "param"]))
    if how == "replace":
        spec[draw(st.sampled_from(sorted(spec)))] = draw(json_values)
    elif how == "drop":
        spec.pop(draw(st.sampled_from(sorted(spec))))
    elif how == "add":
        spec[draw(st.text(max_size=10))] = draw(json_values)
    elif how == "predicate":
        params = draw(st.dictionaries(st.text(max_size=8), json_values, max_size=2))
        spec["predicate"] = {"type": draw(predicate_types), **params}
    elif how == "nest":
        depth = draw(st.integers(min_value=1, max_value=7))
        for _ in range(depth):
            spec["predicate"] = draw(
                st.sampled_from(
                    [
                        {"type": "not", "predicate": spec["predicate"]},
                        {"type": "all_of", "predicates": [spec["predicate"]] * 2},
                        {"type": "any_of", "predicates": [spec["predicate"]]},
                    ]
                )
            )
    else:
        spec["predicate"][draw(st.text(max_size=10))] = draw(json_values)
    if draw(st.booleans()):
        spec["weight"] = draw(st.one_of(st.floats(), st.integers(), st.just(-0.5)))
    return spec


SPEC_TEXTS = [
    "<reasoning>48 + 24 = 72</reasoning>\n<answer>72</answer>",
    "<reasoning>a a a a a a a a a a a a a a a a a a</reasoning><answer>24</answer>",
    "<answer>48 apples</answer>",
    "no tags at all",
    "<reasoning>unclosed",
]


def check_spec(spec: Any) -> None:
    with no_code_execution():
        try:
            term = validate_spec(spec)
        except SpecError as exc:
            message = str(exc)
            assert message.startswith("reward spec: field '") and len(message) < 1000
            return
        assert isinstance(term, TermSpec)
        canonical = term.to_dict()
        assert json.loads(json.dumps(canonical)) == canonical
        assert validate_spec(canonical) == term  # canonical form is a fixed point
        component = DiscoveredTerm(term, _memory())
        columns = reward_columns(SPEC_TEXTS, BASE_SCHEMA, "72", parsed=True)
        scores = component(prompts=["q"] * len(SPEC_TEXTS), completions=SPEC_TEXTS, **columns)
    assert set(scores) <= {0.0, 1.0}


@fuzz()
@given(json_values)
def test_random_json_specs_are_refused_or_interpreted_never_run(spec):
    RUNS["reward specs (random JSON)"] += 1
    check_spec(spec)


@fuzz()
@given(near_valid_specs())
def test_near_valid_specs_are_refused_or_interpreted_never_run(spec):
    RUNS["reward specs (near-valid)"] += 1
    check_spec(spec)


def test_the_guard_sees_code_compilation():
    """Positive control: the audit guard sees a compile (so the properties can fail).

    ``ast.parse`` raises the same ``compile`` audit event as ``eval``/``exec`` do, without
    running anything.
    """
    import ast

    with pytest.raises(AssertionError, match="code ran from data"):
        with no_code_execution():
            ast.parse("x = 1")
