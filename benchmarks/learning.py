"""Learning of record: plain GRPO vs full DeepSynapse at equal wall-clock, paired, over seeds.

    python benchmarks/learning.py                          # plain + full, seeds 0 1 2, 60 min each
    python benchmarks/learning.py --max-minutes 60         # one hourly slice (the default)
    python benchmarks/learning.py --ablate family          # + full minus each family of parts
    python benchmarks/learning.py --budget 30m --seeds 0   # shorter
    python benchmarks/learning.py --quick                  # smoke check: tiny model, ~3 min
    make bench-learning

What it measures. Each run trains from the recipe (``--config``, default
``configs/hour-cpu.yaml``; ``configs/demo-cpu.yaml`` while that file does not exist) for the
same training budget (``train.time_budget``: ``--budget``, default the recipe's, 60m
without one): the trainer times its first steps and plans the SFT warm-up and GRPO step
counts so that its training ends within the budget. The evaluations of record and the probes
run off the clock (``train.budget_counts_evaluations=false``): they measure, and a
configuration whose model decodes slower (the hypernetwork cannot be merged into the weights)
would otherwise pay its measurement from its training time (first study, seed 0: full
DeepSynapse's three evaluations took 1,604 s of its hour, plain's 797 s; see
``results/learning-v1-seed0.md``). ``train.steps`` is set far above what fits
(``--steps``, 10 000), so the budget, not a step count, ends GRPO. *Equal wall-clock* means
this: a configuration whose steps cost more (accumulation, SFT mixing, the hypernetwork, a
verifier) gets fewer of them, and the comparison counts that against it. Runs go one at a
time with every core, so no run slows another; or, with ``--side-by-side``, as many runs as
there are configurations train at the same time, each pinned to its own equal share of the
cores (2 configurations on 2 cores: one core each, an hour each); runs that still need
training fill the slots in plan order, so a reused run's core goes to the next seed's run.
Machines differ between sessions (one has AMX, the next has not; step times differ 2x), so a
pair measured in one sitting on one machine is the fair pair, and a seed's pair fits one
session. Each training invocation records where it ran (``<run>/learning/machines.jsonl``: CPU
class, the cores it was pinned to, the runs beside it, the C allocator, the code's commit),
and the tables show it per run.

Configurations (``ablation.py`` defines them, once): ``plain`` is GRPO with the correctness
and two format rewards at static weights, no DeepSynapse part; ``full`` switches every part
on; ``--ablate family`` (or ``part``) adds ``full-<x>``, full without ``x``. Removals
chain (``full-critique-schedule``: full-critique without the schedule family), and each is
paired with the configuration it extends, so ``--configs plain full-critique
full-critique-schedule full-critique-optimisation ...`` is the ablation taken against
full-critique, the configuration the hour studies compare with plain. On top of the
recipe, every part's switch is first set to plain's value, then the configuration's parts
are switched on, so a recipe that turns parts on does not leak them into ``plain``. The
parts' schedules are shares of the run (SFT mixing's ``decay_share``; the default
curriculum's phase lengths), which the trainer scales to the GRPO steps its budget plans,
since ``train.steps`` is only a cap.

Evaluation of record, paired. Each run folder holds the trainer's own evaluations on the
fixed held-out synthetic set (``data.eval=synthetic``, split test: stratified by difficulty,
disjoint from training; ``--eval-limit`` = its first N problems): ``eval_before.json`` (the
base model), ``eval_after_sft.json`` (after the SFT warm-up, where GRPO starts) and
``eval_after.json`` (the end). The evaluation before is the untrained model's, the same for
every run of a study within a dtype (measured, answer for answer), and its rambling answers
take ~10 minutes on one core at 384 problems: a new run is given an earlier run's from the
study folder (or a restored record) where the held-out settings, the CPU class and the share
of cores are the same (``share_before``), and the trainer uses it only if it decodes in the
dtype and with the decoder that made it. For transfer, this script scores two outside sets
with ``deepsynapse eval`` at the run's start point (the checkpoint ``step-0``, saved when
the warm-up ends) and at its final checkpoint: the first ``--gsm8k-limit`` problems of GSM8K
test (default 200; 0 = all 1,319) and the first ``--svamp-limit`` of SVAMP (default 300; 0 =
all 1,000; human-written one- and two-step problems shipped with the package, at the level
where the embedded model can score: it stays at 0-4% of GSM8K whatever it is taught). Every claim is paired on the same problems (``deepsynapse.eval.stats``): a run's
GRPO gain (start -> end), full vs plain per seed (both score the same held-out problems), and
full minus a family vs full, each strict (format-valid and right) and lenient (the right
number), with Newcombe's 95% interval and the exact McNemar p-value; over two or more seeds,
also pooled (every seed's problems together, the interval resampling whole problems, the p a
sign-flip test over problems). Learning curves:
``accuracy/heldout`` (the first ``--probe-heldout`` held-out problems every ``--probe-every``
GRPO steps: the recipe's probes, or 48 problems every 10 steps where it runs none) against
the seconds of training. These probes, and the skill probes that ride along, are off the
budget's clock like the evaluations of record. Settings left open
(``--eval-limit``, ``--save-every``, the probes, the budget) are the recipe's.

Slices add up. A run folder with ``summary.json`` is finished and reused (its
``config.yaml`` must match what this command would run, else it is reported, not touched,
unless ``--fresh``); one with a checkpoint but no summary is resumed
(``deepsynapse train --resume``; the budget's elapsed time is part of the checkpoint, so an
hour stays an hour across stops); evaluations are cached in ``<run>/learning/``. After
``--max-minutes`` (default 60) nothing new starts: runs are ordered seed by seed, so a cut
leaves every configuration with the same number of seeds, and the script prints what is
left. A stop (Ctrl-C, SIGTERM) is passed to the running child, which checkpoints and exits.
Machines change between sessions and take ``runs/`` with them, so each finished and fully
evaluated run also leaves its record beside the results (``<results>.runs/<run>/``: config,
evaluations, metrics and its budget's clock, gzip, no checkpoint; commit it): on a machine
without the run folder, the record restores it as finished, checked against the command's
settings like any folder. A restored run has no checkpoint, so an evaluation it lacks (a
larger ``--gsm8k-limit``) is reported, not run.

Runtime: 3 seeds x 2 configurations x 1 h = 6 h of training, plus 2 GSM8K and 2 SVAMP
evaluations per run (3-4 minutes each on one core at 200 and 300 problems, Intel Xeon fp32), so about seven hourly slices; each
``--ablate family`` seed adds 5 runs. Results: ``benchmarks/results/learning[-quick]``
``.json``, ``.md`` (per run, across seeds, full vs plain, ablation, transfer, the machine)
and ``.png`` (the curves).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from _common import RESULTS_DIR, child_env, machine_info, markdown_table, mean_std, save_report
from ablation import (
    ABLATE,
    BASE_REWARDS,
    Study,
    active_parts,
    common_overrides,
    config_names,
    parts_for,
)
from ablation import part_overrides as ablation_part_overrides

from deepsynapse.rl.budget import parse_duration
from deepsynapse.rl.stopping import stop_signals_handled

REPO = Path(__file__).resolve().parents[1]
RECIPE = "configs/hour-cpu.yaml"
FALLBACK_RECIPE = "configs/demo-cpu.yaml"
DEEPSYNAPSE = [sys.executable, "-m", "deepsynapse.cli"]
GSM8K_TEST_SIZE = 1319
SVAMP_SIZE = 1000
# The outside sets scored beside the held-out set of record: name -> (label, size)
TRANSFER = {"gsm8k": ("GSM8K test", GSM8K_TEST_SIZE), "svamp": ("SVAMP", SVAMP_SIZE)}
SETS = ("heldout", *TRANSFER)  # every set a comparison is paired on
KEEP_ALL = 100_000  # train.keep_checkpoints: step-0 must survive rotation (pruned here after)
IGNORED_KEYS = {"train.run_name", "train.output_dir"}  # where a run lives, not what it is
EVAL_DIR = "learning"  # inside a run folder: this script's evaluations and logs


@dataclass(frozen=True)
class Learning:
    """Settings of the study (what makes its runs; evaluation sizes)."""

    recipe: str = RECIPE
    budget: str | None = None  # None: the recipe's train.time_budget, else DEFAULT_BUDGET
    seeds: tuple[int, ...] = (0, 1, 2)
    configs: tuple[str, ...] = ("plain", "full")
    steps: int = 10_000  # a cap far above what the budget fits
    # None below: the recipe's value (its probes, or DEFAULT_PROBES where it runs none)
    eval_limit: int | None = None
    probe_every: int | None = None
    probe_heldout: int | None = None
    probe_per_skill: int | None = None  # the skill probes ride along with each curve point
    gsm8k_limit: int = 200
    svamp_limit: int = 300
    save_every: int | None = None
    # The runs of record sample with our decoder (the study's first runs did, before the
    # default became auto): every run of a study must sample alike to be compared.
    backend: str = "ours"
    extra: tuple[str, ...] = ()  # overrides before all others (quick mode's small model)


DEFAULT_BUDGET = "60m"
DEFAULT_PROBES = {"probe_every": 10, "probe_heldout": 48, "probe_per_skill": 2}


def resolve(st: Learning, recipe_cfg: Any) -> Learning:
    """The settings with every value the user left open taken from the recipe."""
    probes = recipe_cfg.probes
    recipe_probes = {
        "probe_every": probes.every,
        "probe_heldout": probes.heldout,
        "probe_per_skill": probes.per_skill,
    }
    if not probes.every:  # the recipe draws no curve: ours
        recipe_probes = dict(DEFAULT_PROBES)
    budget = st.budget or recipe_cfg.train.time_budget or DEFAULT_BUDGET
    recipe_values = {
        "budget": budget,
        "eval_limit": recipe_cfg.eval.limit,
        "save_every": recipe_cfg.train.save_every,
        **recipe_probes,
    }
    return replace(st, **{k: v for k, v in recipe_values.items() if getattr(st, k) is None})


QUICK = Learning(
    budget="30s",
    seeds=(0,),
    steps=10_000,
    eval_limit=6,
    probe_every=1,
    probe_heldout=3,
    probe_per_skill=1,
    gsm8k_limit=4,
    svamp_limit=4,
    save_every=0,
    extra=(
        "model.name=tiny-random",
        "sft.steps=2",
        "sft.batch_size=2",
        "rollout.num_generations=2",
        "rollout.max_new_tokens=12",
        "grpo.prompts_per_step=2",
        "grpo.micro_batch_size=4",
        "eval.max_new_tokens=8",
        "eval.batch_size=8",
        "probes.max_new_tokens=8",
        "rewards.verifier_backbone=hashing",
        "train.report=false",
        "train.log_samples_every=0",
    ),
)


# ------------------------------------------------------------------ configurations


def resolve_recipe(path: str) -> tuple[str, str]:
    """The recipe to train from, and a note when the hour recipe is not there yet."""
    if (REPO / path).is_file() or Path(path).is_file():
        return path, ""
    if path == RECIPE and (REPO / FALLBACK_RECIPE).is_file():
        return FALLBACK_RECIPE, f"{RECIPE} does not exist yet: runs use {FALLBACK_RECIPE}"
    raise SystemExit(f"learning: recipe {path} not found")


def recipe_path(recipe: str) -> Path:
    return Path(recipe) if Path(recipe).is_file() else REPO / recipe


def override_text(key: str, value: Any) -> str:
    """``key=value`` that the config's YAML override parser reads back as ``value``."""
    if isinstance(value, str):
        try:
            same = yaml.safe_load(value) == value
        except yaml.YAMLError:
            same = False
        return f"{key}={value if same else json.dumps(value)}"
    return f"{key}={json.dumps(value)}"


def _lookup(tree: dict[str, Any], key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        node = node[part]
    return node


# Budgets a part grows from the recipe's own value (critique: + its fields' tokens): plain
# keeps the recipe's.
RECIPE_BUDGETS = ("rollout.max_new_tokens",)


def plain_reset(parts: Sequence[Any], recipe_cfg: Any, every_key: bool = False) -> list[str]:
    """Each key a part sets that the recipe holds at another value than plain's.

    Plain's values are ablation's plain (the defaults, LoRA r16). Why: a recipe may switch
    parts on (the demo recipe does); without this, ``plain`` on top of it would not be plain.
    ``every_key``: every key any part sets, for a config that is not the recipe (another
    configuration's, whose parts' keys must all be reset).
    """
    from deepsynapse.config import load_config

    plain = load_config(None, common_overrides(Study(), "tiny-random", "synthetic", 0, 1))
    ours, theirs = plain.to_dict(), recipe_cfg.to_dict()
    keys = dict.fromkeys(o.split("=", 1)[0] for p in parts for o in p.overrides)
    keys = [k for k in keys if k not in RECIPE_BUDGETS]
    return [
        override_text(k, _lookup(ours, k))
        for k in keys
        if every_key or _lookup(ours, k) != _lookup(theirs, k)
    ]


def removal_overrides(config: str, parts: Sequence[Any], recipe_cfg: Any) -> list[str]:
    """What the recipe sets that this configuration's removals leave inconsistent, mended.

    - A curriculum phase's ``reward_weights`` may name a reward of a removed part (the hour
      recipe's structure phase weights ``structure``, the Guardian's): the trainer refuses a
      phase naming a reward the run does not compute, so ``full-critique-reward_terms``
      could not start. Such names are dropped from the phases.
    - The KL-temperature loop on the recipe's ``schedule: phase`` needs the curriculum: with
      the curriculum removed (``full-curriculum``) its cosine runs over the run instead.

    Empty (the configuration's overrides unchanged) where nothing is inconsistent.
    """
    active = {p.name for p in active_parts(config, parts)}
    out = []
    if "curriculum" in active:
        known = set(BASE_REWARDS).union(*(p.rewards for p in parts if p.name in active))
        phases = recipe_cfg.to_dict()["control"]["curriculum"]["phases"] or []
        kept = [
            {
                **phase,
                "reward_weights": {
                    k: v for k, v in (phase.get("reward_weights") or {}).items() if k in known
                },
                "active_rewards": phase.get("active_rewards")
                and [k for k in phase["active_rewards"] if k in known],
            }
            for phase in phases
        ]
        if kept != phases:
            out.append(override_text("control.curriculum.phases", kept))
    elif "kl_temperature" in active and recipe_cfg.control.kl_temperature.schedule == "phase":
        out.append("control.kl_temperature.schedule=run")
    return out


def run_overrides(
    st: Learning, config: str, seed: int, out_dir: Path, recipe_cfg: Any
) -> list[str]:
    """Everything a run sets on top of the recipe (later overrides win); ``st`` resolved."""
    parts = parts_for(recipe_cfg.rollout.max_new_tokens)
    longer = sum(p.answer_tokens for p in active_parts(config, parts))  # critique's fields
    return [
        *st.extra,
        *plain_reset(parts, recipe_cfg),
        *ablation_part_overrides(config, parts),
        *removal_overrides(config, parts, recipe_cfg),
        f"eval.max_new_tokens={recipe_cfg.eval.max_new_tokens + longer}",
        f"probes.max_new_tokens={recipe_cfg.probes.max_new_tokens + longer}",
        "data.eval=synthetic",  # the fixed held-out set of record
        f"eval.limit={st.eval_limit}",
        f"train.time_budget={st.budget}",
        "train.budget_counts_evaluations=false",  # equal training time; measuring is free
        f"rollout.backend={st.backend}",
        f"train.steps={st.steps}",
        f"train.seed={seed}",
        f"train.save_every={st.save_every}",
        f"train.keep_checkpoints={KEEP_ALL}",
        f"probes.every={st.probe_every}",
        f"probes.heldout={st.probe_heldout}",
        f"probes.per_skill={st.probe_per_skill}",
        f"train.run_name={run_name(config, seed)}",
        f"train.output_dir={out_dir}",
    ]


def set_keys_overruled(
    overrides: Sequence[str],
    asked: dict[str, Any],
    runs: Sequence[Run],
    expected: dict[Path, dict[str, Any]],
) -> list[str]:
    """``--set`` keys a configuration sets otherwise (its parts' value wins over ``--set``).

    Why: a study's configurations reset the keys their parts own (plain's length budget,
    full's rank); a ``--set`` of such a key would be silently overruled in some runs only.
    """
    out = []
    for key in dict.fromkeys(o.split("=", 1)[0] for o in overrides):
        for run in runs:
            theirs = _lookup(expected[run.run_dir], key)
            if theirs != _lookup(asked, key):
                out.append(
                    f"--set {key}={_lookup(asked, key)!r}: configuration {run.config} sets "
                    f"{theirs!r} (a key its parts own)"
                )
                break
    return out


def run_name(config: str, seed: int) -> str:
    return f"{config}-seed{seed}"


def study_configs(st: Learning, ablate: str | None) -> list[str]:
    """The configurations in order: those asked for, then full minus each family or part."""
    parts = parts_for(64)
    names = list(st.configs)
    if ablate:
        names += [c for c in config_names(parts, ablate)[2:] if c not in names]
    for c in names:
        active_parts(c, parts)  # a typo fails here, before any run
    return names


# ------------------------------------------------------------------ run folders


@dataclass
class Run:
    config: str
    seed: int
    run_dir: Path
    overrides: list[str]
    state: str = ""  # finished | resumable | todo | conflict
    detail: str = ""
    actions: list[str] = field(default_factory=list)  # what this invocation did
    errors: list[str] = field(default_factory=list)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def config_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Keys whose values differ between two configs (where the runs live aside)."""
    fa, fb = _flatten(a), _flatten(b)
    keys = sorted((set(fa) | set(fb)) - IGNORED_KEYS)
    return [f"{k}: {fa.get(k)!r} vs {fb.get(k)!r}" for k in keys if fa.get(k) != fb.get(k)]


def inspect_run(run_dir: Path, expected: dict[str, Any]) -> tuple[str, str]:
    """What a run folder holds: ``finished``, ``resumable``, ``todo`` or ``conflict``.

    ``expected`` is the config this command would run (``Config.to_dict()``); a folder made
    with another one is a conflict, never silently reused, resumed or overwritten.
    """
    from deepsynapse.checkpoint import latest_checkpoint
    from deepsynapse.config import load_config

    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return "todo", ""
    try:
        theirs = load_config(saved).to_dict()
    except Exception as exc:  # an older config schema: not this run
        return "conflict", f"{saved} does not load ({exc})"
    diff = config_diff(theirs, expected)
    if diff:
        more = f" (+{len(diff) - 3} more)" if len(diff) > 3 else ""
        return "conflict", "made with other settings: " + "; ".join(diff[:3]) + more
    if (run_dir / "summary.json").is_file():
        return "finished", ""
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if ckpt is not None:
        return "resumable", f"from {ckpt.name}"
    return "todo", "no complete checkpoint (started over)"


# What decides the untrained model's held-out answers: the model, the held-out set and its
# decoding, the prompt's schema, the sampler, the parts on the forward pass from the start.
# The seed, LoRA's shape (its B starts at 0), rewards, GRPO and the warm-up cannot, nor the
# training problems' own settings (``TRAINING_ONLY``: the held-out set never follows them).
BEFORE_KEYS = (
    "model.",
    "eval.",
    "data.",
    "rewards.schema",
    "rollout.backend",
    "hypernet.enabled",
    "memory.enabled",
)
TRAINING_ONLY = (
    "data.train",
    "data.synthetic_size",
    "data.synthetic_variants",
    "data.synthetic_variant_kinds",
)


def before_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The settings an evaluation of the untrained model depends on (``BEFORE_KEYS``)."""
    return {
        k: v
        for k, v in _flatten(config).items()
        if k.startswith(BEFORE_KEYS) and k not in TRAINING_ONLY
    }


def _made_in_dtype(run_dir: Path, result: dict[str, Any]) -> str | None:
    """The dtype an evaluation was decoded in: its own record, else the run's start event."""
    if result.get("dtype"):
        return str(result["dtype"])
    for row in read_jsonl(run_dir / "events.jsonl"):
        if row.get("kind") == "start":
            return (row.get("evidence") or {}).get("dtype")
    return None


def share_before(run_dir: Path, expected: dict[str, Any], cores: Sequence[int]) -> str | None:
    """Give a new run an earlier run's evaluation before where it is this run's too.

    Every run of a study starts from the same untrained model, whose rambling answers take
    ~10 minutes on one core at 384 problems (measured: plain and full-critique, seeds 9-13,
    answered identically within a dtype). An earlier run beside this one (same study
    folder) serves if its held-out settings (``BEFORE_KEYS``) are this run's, it trained on
    this CPU class with as many cores, and its dtype is known; the copy is marked
    ``shared_from`` and the trainer uses it only if it decodes in that dtype with that
    decoder (``rollout.backend=auto`` picks at run time: never shared). Returns the source.
    """
    wanted = before_settings(expected)
    if wanted.get("rollout.backend") == "auto":
        return None
    here = machine_info().get("cpu_class")
    for path in sorted(run_dir.parent.glob("*/eval_before.json")):
        source = path.parent
        if source == run_dir:
            continue
        try:
            from deepsynapse.config import load_config

            theirs = load_config(source / "config.yaml").to_dict()
        except Exception:  # noqa: BLE001 - an older schema or a half-made folder: not a source
            continue
        machines = read_jsonl(source / EVAL_DIR / MACHINES)
        trained = [r for r in machines if r.get("action") == "trained" and r.get("cores")]
        result = read_json(path)
        if not trained or result is None or before_settings(theirs) != wanted:
            continue
        if trained[0].get("cpu_class") != here or len(trained[0]["cores"]) != len(cores):
            continue
        dtype = _made_in_dtype(source, result)
        if dtype is None:
            continue
        shared = {**result, "dtype": dtype, "shared_from": result.get("shared_from", str(source))}
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "eval_before.json").write_text(json.dumps(shared, indent=1), encoding="utf-8")
        return shared["shared_from"]
    return None


def prune_checkpoints(run_dir: Path) -> list[str]:
    """Keep the start point (``step-0``) and the final checkpoint; drop the ones between."""
    from deepsynapse.checkpoint import complete_checkpoints

    found = complete_checkpoints(run_dir / "checkpoints")
    removed = [p for p in found[:-1] if p.name != "step-0"]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return [p.name for p in removed]


def budget_elapsed(run_dir: Path) -> float | None:
    """Seconds the run's time budget counted up to its final checkpoint (resumes included)."""
    from deepsynapse.checkpoint import latest_checkpoint, load_tree

    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if ckpt is None:  # a run restored from its record keeps the clock there
        elapsed = (read_json(run_dir / RESTORED) or {}).get("budget_elapsed_s")
        return float(elapsed) if isinstance(elapsed, (int, float)) else None
    try:
        state = load_tree(ckpt, "trainer_state")
    except Exception:
        return None
    elapsed = (state.get("budget") or {}).get("elapsed")
    return float(elapsed) if isinstance(elapsed, (int, float)) else None


# A finished run's record: what ``read_run`` reads, without the checkpoints. Machines change
# between sessions and take ``runs/`` with them; the record, committed beside the results,
# lets the next session's slice reuse the run (its tables, pairing and curves) on a fresh one.
RECORD_FILES = (
    "config.yaml",
    "summary.json",
    "eval_before.json",
    "eval_after_sft.json",
    "eval_after.json",
    "metrics.jsonl",
    *(f"{EVAL_DIR}/{name}_{point}.json" for name in TRANSFER for point in ("start", "final")),
    f"{EVAL_DIR}/machines.jsonl",
)
RESTORED = f"{EVAL_DIR}/restored.json"  # in a restored run: where from, its budget's clock


def archive_run(run_dir: Path, record_dir: Path) -> bool:
    """Keep a finished, fully evaluated run's record as gzip files; True if it changed.

    The bytes depend on the content only (gzip without a time stamp), so archiving the same
    run again leaves git nothing to commit.
    """
    import gzip

    files = {name: run_dir / name for name in RECORD_FILES if (run_dir / name).is_file()}
    elapsed = budget_elapsed(run_dir)
    meta = json.dumps({"budget_elapsed_s": elapsed, "files": sorted(files)}, indent=1) + "\n"
    wanted = {
        name + ".gz": gzip.compress(path.read_bytes(), mtime=0) for name, path in files.items()
    }
    wanted["record.json"] = meta.encode()
    old = (
        {
            str(p.relative_to(record_dir)): p.read_bytes()
            for p in record_dir.rglob("*")
            if p.is_file()
        }
        if record_dir.is_dir()
        else {}
    )
    if old == wanted:
        return False
    tmp = record_dir.with_name(record_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for name, data in wanted.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(data)
    shutil.rmtree(record_dir, ignore_errors=True)
    tmp.rename(record_dir)
    return True


def kept_seeds(records: Path, configs: Iterable[str]) -> set[int]:
    """Seeds of which every configuration has a kept record: the study's finished slices."""
    per_config = []
    for config in configs:
        seeds = set()
        for path in records.glob(f"{config}-seed*/record.json"):
            text = path.parent.name.removeprefix(f"{config}-seed")
            if text.isdigit():
                seeds.add(int(text))
        per_config.append(seeds)
    return set.intersection(*per_config) if per_config else set()


def restore_run(record_dir: Path, run_dir: Path) -> bool:
    """Rebuild a run folder from its record where the folder has no run; True if it did.

    The restored folder reads as finished (``summary.json``) and is checked against the
    command's settings like any other; it holds no checkpoint, so an evaluation the record
    lacks cannot be added (the report says which).
    """
    import gzip

    meta = read_json(record_dir / "record.json")
    if meta is None or (run_dir / "config.yaml").exists():
        return False
    for name in meta.get("files") or []:
        out = run_dir / name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(gzip.decompress((record_dir / (name + ".gz")).read_bytes()))
    restored = {"from": str(record_dir), "budget_elapsed_s": meta.get("budget_elapsed_s")}
    (run_dir / RESTORED).parent.mkdir(parents=True, exist_ok=True)
    (run_dir / RESTORED).write_text(json.dumps(restored, indent=1) + "\n", encoding="utf-8")
    return True


def start_checkpoint(run_dir: Path) -> tuple[str | None, str]:
    """``step-0`` if it is the warm-up's end (GRPO's start point), else None and why."""
    from deepsynapse.checkpoint import load_tree

    folder = run_dir / "checkpoints" / "step-0"
    if not (folder / "COMPLETE").is_file():
        return None, "step-0 was not kept (checkpoint rotation)"
    try:
        done = bool(load_tree(folder, "trainer_state").get("sft_done"))
    except Exception as exc:
        return None, f"step-0 unreadable ({exc})"
    return ("step-0", "") if done else (None, "step-0 predates the warm-up's end")


# ------------------------------------------------------------------ child processes

# Pins itself to the CPUs in argv[1], then becomes the command after it (affinity survives exec).
_PIN = (
    "import os, sys; os.sched_setaffinity(0, map(int, sys.argv[1].split(','))); "
    "os.execvp(sys.argv[2], sys.argv[2:])"
)
_CHILDREN: set[subprocess.Popen] = set()  # running children (several with --side-by-side)
_STOP: list[str] = []  # the signal that asked this script to stop, if any


def say(text: str) -> None:
    """One line to stdout in one write: runs side by side print from their own threads."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _on_signal(signum: int, frame: Any) -> None:
    name = signal.Signals(signum).name
    _STOP.append(name)
    running = [c for c in list(_CHILDREN) if c.poll() is None]
    if running:
        print(f"\n{name}: passing it to the running child(ren) (they checkpoint, then exit)")
        for child in running:
            child.send_signal(signum)
    else:
        print(f"\n{name}: stopping after this", flush=True)


@contextlib.contextmanager
def stop_forwarded() -> Iterator[None]:
    """While inside, a Ctrl-C or SIGTERM to this script is passed to its running children.

    Each child (started by ``run_forwarded`` or ``run_logged``) runs in a session of its
    own, so the stop reaches it once, through here: a trainer finishes its step,
    checkpoints and exits, and the same command resumes it. Without this a SIGTERM killed
    the script and left its trainer running, orphaned.
    """
    with stop_signals_handled(_on_signal):
        yield


def stop_requested() -> str | None:
    """The signal that asked this script to stop (``SIGTERM``, ...), if one did."""
    return _STOP[0] if _STOP else None


def run_forwarded(cmd: list[str], quiet: bool = False) -> int:
    """Run ``cmd`` to its end in the repository, its output this script's (or dropped).

    Returns its exit code; a stop this script gets inside ``stop_forwarded`` is passed on.
    """
    child = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.DEVNULL if quiet else None,
        start_new_session=True,
    )
    _CHILDREN.add(child)
    try:
        return child.wait()
    finally:
        if child.poll() is None:
            child.kill()
        _CHILDREN.discard(child)


def run_logged(
    cmd: list[str], log: Path, echo: str = "    ", cores: Sequence[int] | None = None
) -> int:
    """Run a command with its output appended to ``log``; echo the trainer's own lines.

    The child runs in a session of its own: a Ctrl-C reaches it once, through this
    process (the trainer finishes its step and checkpoints), never twice. ``cores``: pin
    it to these CPUs, with as many torch threads (a run beside another).
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    env = child_env()
    if cores:  # pinned before exec (no preexec_fn: unsafe beside this script's threads)
        env["OMP_NUM_THREADS"] = str(len(cores))
        cmd = [sys.executable, "-c", _PIN, ",".join(map(str, cores)), *cmd]
    with log.open("a", encoding="utf-8") as out:
        out.write(f"\n[{time.strftime('%Y-%m-%d %H:%M:%S')}] $ {shlex.join(cmd)}\n")
        out.flush()
        child = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )
        _CHILDREN.add(child)
        try:
            assert child.stdout is not None
            for line in child.stdout:
                out.write(line)
                if line.startswith("[deepsynapse]") or "error" in line.lower():
                    say(echo + line.rstrip())
            return child.wait()
        finally:
            if child.poll() is None:
                child.kill()
            _CHILDREN.discard(child)


def core_shares(n_runs: int, cores: Sequence[int]) -> list[tuple[int, ...]]:
    """Each of ``n_runs`` runs side by side gets its own equal share of ``cores``.

    >>> core_shares(2, [0, 1]), core_shares(2, [0, 1, 2, 3, 4])
    ([(0,), (1,)], [(0, 1), (2, 3)])
    """
    if not 0 < n_runs <= len(cores):
        raise SystemExit(
            f"--side-by-side: {n_runs} runs a seed need a core each; this process may use "
            f"{len(cores)} ({sorted(cores)}): run fewer --configs, or without --side-by-side"
        )
    per = len(cores) // n_runs
    ordered = sorted(cores)
    return [tuple(ordered[i * per : (i + 1) * per]) for i in range(n_runs)]


MACHINES = "machines.jsonl"  # in <run>/learning/: where each training invocation ran


def record_machine(run_dir: Path, action: str, cores: Sequence[int], beside: Sequence[str]) -> None:
    """Note where this training invocation runs: a run may be resumed on another machine,
    and the C allocator its child will run on (step times differ ~20% between them)."""
    from deepsynapse.allocator import ENV, allocator_name, wanted_library

    m = machine_info()
    row = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "action": action,
        "cpu": m.get("cpu"),
        "cpu_class": m.get("cpu_class"),
        "machine_cores": m.get("cores"),
        "cores": sorted(cores),
        "beside": list(beside),
        "allocator": allocator_name(wanted_library(os.environ.get(ENV, "auto"))),
        "code": m.get("code"),
    }
    path = run_dir / EVAL_DIR / MACHINES
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def machines_text(rows: list[dict[str, Any]]) -> str:
    """Where a run trained, in a table cell: class, cores, who ran beside it.

    >>> machines_text([{"cpu_class": "bf16 (amx)", "cores": [1], "machine_cores": 2,
    ...                 "beside": ["plain-seed0"], "allocator": "glibc", "code": "4a77fa5"}])
    'bf16 (amx), 1 of 2 cores, glibc, code 4a77fa5, beside plain-seed0'
    >>> machines_text([])
    'not recorded'
    """
    seen = []
    for r in rows:
        text = (
            f"{r.get('cpu_class')}, {len(r.get('cores') or [])} of {r.get('machine_cores')} cores"
        )
        if r.get("allocator"):
            text += f", {r['allocator']}"
        if r.get("code"):
            text += f", code {r['code']}"
        if r.get("beside"):
            text += ", beside " + " ".join(r["beside"])
        if text not in seen:
            seen.append(text)
    return "; ".join(seen) or "not recorded"


def train_command(recipe: str, overrides: list[str], run_dir: Path, resume: bool) -> list[str]:
    cmd = [*DEEPSYNAPSE, "train", "--quiet", "--config", recipe]
    if resume:
        cmd += ["--resume", str(run_dir)]
    return cmd + list(overrides)


def eval_command(run_dir: Path, checkpoint: str | None, data: str, limit: int, cfg: Any, out: Path):
    """``deepsynapse eval`` of a run's checkpoint, as the run evaluates (its schema, budget,
    decoder: greedy answers from two backends can differ in the last bits)."""
    cmd = [*DEEPSYNAPSE, "eval", "--quiet", "--adapter", str(run_dir)]
    cmd += ["--backend", cfg.rollout.backend]
    if checkpoint:
        cmd += ["--checkpoint", checkpoint]
    return cmd + [
        "--data",
        data,
        "--split",
        "test",
        "--limit",
        str(limit),
        "--max-new-tokens",
        str(cfg.eval.max_new_tokens),
        "--batch-size",
        str(cfg.eval.batch_size),
        "--output",
        str(out),
    ]


@dataclass(frozen=True)
class EvalJob:
    """One evaluation this script adds to a finished run, cached as ``<run>/learning/<name>``."""

    name: str
    checkpoint: str | None  # None: the newest (the final one)
    data: str
    limit: int


def transfer_limits(st: Learning | dict[str, Any]) -> dict[str, int]:
    """Problems scored on each transfer set (a limit of 0, or none recorded: all of them)."""
    get = st.get if isinstance(st, dict) else lambda k: getattr(st, k)
    return {name: get(f"{name}_limit") or size for name, (_, size) in TRANSFER.items()}


def eval_jobs(st: Learning, run_dir: Path, cfg: Any) -> tuple[list[EvalJob], list[str]]:
    """What a finished run still needs evaluated, and notes on what cannot be."""
    jobs, notes, wanted = [], [], []
    start, why = start_checkpoint(run_dir)
    for name, n in transfer_limits(st).items():
        wanted.append(EvalJob(f"{name}_final.json", None, name, n))
        if start:
            wanted.append(EvalJob(f"{name}_start.json", start, name, n))
        else:
            notes.append(f"{TRANSFER[name][0]} at the start point: {why}")
    for job in wanted:
        cached = read_json(run_dir / EVAL_DIR / job.name)
        if cached is None or len(cached.get("records") or []) != job.limit:
            jobs.append(job)
    if (run_dir / RESTORED).is_file() and not (run_dir / "checkpoints").is_dir():
        return [], [f"{job.name} at {job.limit} problems: restored, no checkpoint" for job in jobs]
    return jobs, notes


def run_eval(
    run_dir: Path, job: EvalJob, cfg: Any, cores: Sequence[int] | None = None
) -> str | None:
    """Run one evaluation into the cache; the error's text, or None."""
    out = run_dir / EVAL_DIR / job.name
    tmp = out.with_name(out.name + ".tmp")
    cmd = eval_command(run_dir, job.checkpoint, job.data, job.limit, cfg, tmp)
    rc = run_logged(cmd, run_dir / EVAL_DIR / "eval.log", cores=cores)
    if rc != 0 or not tmp.is_file():
        return f"{job.name}: deepsynapse eval exited with {rc} (see {run_dir / EVAL_DIR}/eval.log)"
    tmp.replace(out)
    return None


# ------------------------------------------------------------------ reading a run


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    from deepsynapse.telemetry.run_logger import read_jsonl as read

    return read(path) if path.is_file() else []


def accuracy(result: dict[str, Any] | None) -> dict[str, Any] | None:
    """Strict and lenient accuracy of an evaluation, each with its 95% Wilson interval."""
    from deepsynapse.eval.stats import wilson_interval

    records = (result or {}).get("records")
    if not records:
        return None
    n = len(records)
    out: dict[str, Any] = {"n": n}
    for name, key in (("accuracy", "correct"), ("lenient_accuracy", "lenient_correct")):
        k = sum(bool(r.get(key)) for r in records)
        out[name], out[name + "_ci"] = k / n, list(wilson_interval(k, n))
    out["format_validity"] = sum(bool(r.get("format_valid")) for r in records) / n
    return out


def paired(before: Any, after: Any) -> dict[str, Any] | None:
    """Paired change strict and lenient, or None when either side is missing or unpaired."""
    from deepsynapse.eval.stats import paired_comparison

    ra, rb = (before or {}).get("records"), (after or {}).get("records")
    if not ra or not rb:
        return None
    try:
        return {
            "strict": paired_comparison(ra, rb, "correct"),
            "lenient": paired_comparison(ra, rb, "lenient_correct"),
        }
    except ValueError as exc:
        return {"unpaired": str(exc)}


def learning_curve(rows: list[dict[str, Any]], start: Any, final: Any, n: int) -> dict[str, Any]:
    """``accuracy/heldout`` against seconds of training, with GRPO's start and end points.

    The x axis is ``time/elapsed`` where the trainer logs it (the run's wall-clock, budget
    included), else the step times summed (``timing/sft_step`` + ``timing/step``: training,
    without the evaluations and probes). The start and end points are the evaluations of
    record on the same first ``n`` held-out problems the probes score.
    """
    t, points, grpo_start = 0.0, [], 0.0
    clock = "time/elapsed" if any("time/elapsed" in r for r in rows) else "steps"
    for r in rows:
        if clock == "time/elapsed" and isinstance(r.get("time/elapsed"), (int, float)):
            t = float(r["time/elapsed"])
        elif clock == "steps":
            t += float(r.get("timing/sft_step") or 0.0) + float(r.get("timing/step") or 0.0)
        if "timing/sft_step" in r:
            grpo_start = t
        if isinstance(r.get("accuracy/heldout"), (int, float)):
            points.append([t, float(r["accuracy/heldout"])])
    for at, result in ((grpo_start, start), (t, final)):
        records = ((result or {}).get("records") or [])[:n]
        if n and len(records) == n:
            acc = sum(bool(r.get("correct")) for r in records) / n
            points.append([at, acc])
    points.sort(key=lambda p: p[0])
    return {"clock": clock, "points": points, "grpo_start_s": grpo_start, "end_s": t}


@dataclass
class RunResult:
    """A finished run as read from its folder: numbers (kept) and records (for pairing)."""

    config: str
    seed: int
    numbers: dict[str, Any]
    records: dict[str, Any]  # {"heldout": final eval, <transfer set>: final eval}: pairing


def read_run(run: Run, st: Learning) -> RunResult:
    """Start and end of GRPO on both sets, the paired gains, the curve, the steps and time."""
    from deepsynapse.config import load_config

    d = run.run_dir
    cfg = load_config(d / "config.yaml")
    before = read_json(d / "eval_before.json")
    final = read_json(d / "eval_after.json")
    start, source = read_json(d / "eval_after_sft.json"), "eval_after_sft.json"
    if start is None and cfg.sft.steps == 0:
        start, source = before, "eval_before.json (no warm-up)"
    elif start is None:
        source = "missing (eval_after_sft.json)"
    transfer = {
        name: (
            read_json(d / EVAL_DIR / f"{name}_start.json"),
            read_json(d / EVAL_DIR / f"{name}_final.json"),
        )
        for name in TRANSFER
    }
    rows = read_jsonl(d / "metrics.jsonl")
    grpo = [r for r in rows if "timing/step" in r]
    sft = [r for r in rows if "timing/sft_step" in r]
    summary = read_json(d / "summary.json") or {}
    numbers = {
        "config": run.config,
        "seed": run.seed,
        "run_dir": str(d),
        "budget": cfg.train.time_budget,
        "sft_steps": len(sft),
        "grpo_steps": len(grpo),
        "sft_s": sum(float(r["timing/sft_step"]) for r in sft),
        "grpo_s": sum(float(r["timing/step"]) for r in grpo),
        "summary_steps": summary.get("steps"),
        "budget_elapsed_s": budget_elapsed(d),
        "heldout": {
            "problems": cfg.eval.limit,
            "before": accuracy(before),
            "start": accuracy(start),
            "start_source": source,
            "final": accuracy(final),
            "gain": paired(start, final),
            "whole_run": paired(before, final),
        },
        **{
            name: {"start": accuracy(a), "final": accuracy(b), "gain": paired(a, b)}
            for name, (a, b) in transfer.items()
        },
        "curve": learning_curve(rows, start, final, cfg.probes.heldout),
        "machines": read_jsonl(d / EVAL_DIR / MACHINES),
        "training": training_health(grpo),
    }
    records = {"heldout": final, **{name: b for name, (_, b) in transfer.items()}}
    return RunResult(run.config, run.seed, numbers, records)


# What a run's GRPO steps saw, averaged over them: the signals that explained full seed 0's
# loss (format failures tracking truncations; a hypernetwork saturated from the first step).
HEALTH = {
    "format/valid_rate": "format valid",
    "completion/truncated_rate": "truncated",
    "groups/with_signal": "groups with signal",
    "kl/mean": "KL",
    "hypernet/scale_saturated": "hypernet saturated",
}


def training_health(grpo_rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """The mean of each ``HEALTH`` metric over the GRPO steps (None where never logged)."""
    out: dict[str, float | None] = {}
    for key in HEALTH:
        values = [float(r[key]) for r in grpo_rows if isinstance(r.get(key), (int, float))]
        out[key] = sum(values) / len(values) if values else None
    return out


# ------------------------------------------------------------------ across runs


def _delta(gain: dict[str, Any] | None, kind: str) -> float | None:
    c = (gain or {}).get(kind)
    return c["delta"] if c else None


def _get(d: dict[str, Any] | None, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)
    return d


def across_seeds(results: list[RunResult], configs: list[str]) -> dict[str, Any]:
    """Per configuration: mean ± std over seeds, and the per-seed values, of each number."""
    measures = {
        "heldout_start": ("heldout", "start", "accuracy"),
        "heldout_final": ("heldout", "final", "accuracy"),
        "heldout_final_lenient": ("heldout", "final", "lenient_accuracy"),
        "heldout_gain_strict": ("heldout", "gain", "strict", "delta"),
        "heldout_gain_lenient": ("heldout", "gain", "lenient", "delta"),
        **{
            f"{name}_{key}": (name, *path)
            for name in TRANSFER
            for key, path in (
                ("start", ("start", "accuracy")),
                ("final", ("final", "accuracy")),
                ("gain_strict", ("gain", "strict", "delta")),
                ("gain_lenient", ("gain", "lenient", "delta")),
            )
        },
        "grpo_steps": ("grpo_steps",),
        "grpo_s": ("grpo_s",),
    }
    out: dict[str, Any] = {}
    for config in configs:
        mine = sorted((r for r in results if r.config == config), key=lambda r: r.seed)
        row: dict[str, Any] = {"seeds": [r.seed for r in mine]}
        for name, path in measures.items():
            values = [_get(r.numbers, *path) for r in mine]
            mean, std = mean_std(values)
            row[name] = {"mean": mean, "std": std, "per_seed": values}
        out[config] = row
    return out


def compare(results: list[RunResult], base: str, other: str) -> dict[str, Any]:
    """``other`` vs ``base`` per seed, paired on the same problems (final evaluations).

    ``delta`` is other minus base; the mean is over the seeds where both sides are paired,
    and ``pooled`` is the change over all those seeds' problems together, with its interval
    (``stats.pooled_paired_comparison``): the seeds' answer to "does other beat base".
    """
    from deepsynapse.eval.stats import pooled_paired_comparison

    by = {(r.config, r.seed): r for r in results}
    seeds = sorted({s for c, s in by if c == base} & {s for c, s in by if c == other})
    out: dict[str, Any] = {"base": base, "other": other, "per_seed": {}, "mean": {}, "pooled": {}}
    for seed in seeds:
        a, b = by[(base, seed)].records, by[(other, seed)].records
        out["per_seed"][seed] = {s: paired(a.get(s), b.get(s)) for s in SETS}
    for s in SETS:
        both = [
            (by[(base, seed)].records[s]["records"], by[(other, seed)].records[s]["records"])
            for seed, v in out["per_seed"].items()
            if v[s] and "unpaired" not in v[s]
        ]
        for kind, key in (("strict", "correct"), ("lenient", "lenient_correct")):
            values = [_delta(v[s], kind) for v in out["per_seed"].values()]
            values = [v for v in values if v is not None]
            mean, std = mean_std(values)
            out["mean"][f"{s}_{kind}"] = {"mean": mean, "std": std, "seeds": len(values)}
            out["pooled"][f"{s}_{kind}"] = pooled_paired_comparison(both, key) if both else None
    return out


# ------------------------------------------------------------------ tables


def _acc(a: dict[str, Any] | None, key: str = "accuracy") -> str:
    from deepsynapse.eval.stats import format_interval

    if not a:
        return "n/a"
    return format_interval(a[key], a[key + "_ci"], points=False)


def _gain(g: dict[str, Any] | None, kind: str) -> str:
    if not g:
        return "n/a"
    if "unpaired" in g:
        return "unpaired"
    return _change(g[kind])


def _mean_pts(cell: dict[str, Any]) -> str:
    if cell["mean"] is None:
        return "n/a"
    return f"{100 * cell['mean']:+.1f} ± {100 * cell['std']:.1f} pts"


def _change(cell: dict[str, Any] | None) -> str:
    """A paired change (one seed's, or pooled over seeds): points, interval, p."""
    from deepsynapse.eval.stats import format_interval

    if not cell:
        return "n/a"
    return f"{format_interval(cell['delta'], cell['delta_ci'])} p={cell['p_value']:.2g}"


# a number that a report made before it existed lacks
EMPTY = {"mean": None, "std": None, "per_seed": [], "seeds": 0}


def _fewer_seeds(cell: dict[str, Any] | None, row_seeds: int) -> str:
    """ " (N seeds)" where a set was paired on fewer seeds than its row says (SVAMP came later)."""
    n = (cell or {}).get("seeds") or 0
    return f" ({n} seeds)" if n and n != row_seeds else ""


def _mean_acc(cell: dict[str, Any]) -> str:
    if cell["mean"] is None:
        return "n/a"
    seeds = ", ".join("n/a" if v is None else f"{v:.3f}" for v in cell["per_seed"])
    return f"{cell['mean']:.3f} ± {cell['std']:.3f} ({seeds})"


def _section(title: str, headers: str, rows: list[list[str]]) -> str:
    """A titled table; empty (left out) without rows."""
    return f"### {title}\n\n" + markdown_table(headers.split("|"), rows) if rows else ""


def markdown(report: dict[str, Any]) -> str:
    st, runs = report["settings"], report["runs"]
    limits = transfer_limits(st)
    outside = "; ".join(f"{TRANSFER[k][0]} (the first {n} problems)" for k, n in limits.items())
    out = [
        f"## Learning of record: {', '.join(report['configs'])} at {st['budget']} each",
        f"Recipe `{report['recipe']}`; held-out synthetic set of record (the first "
        f"{report['heldout_problems']} problems); transfer: {outside}. "
        "Accuracy is strict (format-valid and right) with its 95% Wilson interval; gains are "
        "paired on the same problems: change in points [Newcombe 95% interval], McNemar p; "
        "*pooled over N*: every seed's problems together [95% interval resampling whole "
        "problems], sign-flip p. "
        "*train s*: the warm-up and GRPO step times summed; *budget s*: the run's budget clock "
        "at its final checkpoint (training time: evaluations and probes run off the clock).",
    ]
    if report.get("note"):
        out.append(f"*{report['note']}*")
    if not runs:
        out.append("No run has finished yet.")
    rows = [
        [
            r["config"],
            str(r["seed"]),
            f"{r['sft_steps']} + {r['grpo_steps']}",
            f"{r['sft_s'] + r['grpo_s']:.0f}",
            "n/a" if r["budget_elapsed_s"] is None else f"{r['budget_elapsed_s']:.0f}",
            _acc(r["heldout"]["start"]),
            _acc(r["heldout"]["final"]),
            _gain(r["heldout"]["gain"], "strict"),
            _gain(r["heldout"]["gain"], "lenient"),
        ]
        for r in runs
    ]
    out.append(
        _section(
            "Per run, held-out synthetic (start of GRPO -> end)",
            "config|seed|SFT + GRPO steps|train s|budget s|start|end|GRPO gain (strict)|(lenient)",
            rows,
        )
    )
    for name, n in limits.items():
        rows = [
            [r["config"], str(r["seed"]), _acc(g["start"]), _acc(g["final"])]
            + [_gain(g["gain"], kind) for kind in ("strict", "lenient")]
            for r in runs
            if (g := r.get(name)) and (g["start"] or g["final"])
        ]
        out.append(
            _section(
                f"Per run, {TRANSFER[name][0]} transfer (first {n} problems)",
                "config|seed|start|end|gain (strict)|(lenient)",
                rows,
            )
        )
    rows = [
        [r["config"], str(r["seed"])]
        + ["-" if (v := (r.get("training") or {}).get(k)) is None else f"{v:.2f}" for k in HEALTH]
        for r in runs
    ]
    out.append(
        _section(
            "Per run, what its GRPO steps saw (means over the steps)",
            "config|seed|" + "|".join(HEALTH.values()),
            rows,
        )
    )
    rows = [[r["config"], str(r["seed"]), machines_text(r.get("machines") or [])] for r in runs]
    out.append(_section("Per run, where it trained", "config|seed|CPU class, cores", rows))
    rows = [
        [config, str(len(row["seeds"]))]
        + [_mean_acc(row[k]) for k in ("heldout_start", "heldout_final")]
        + [_mean_pts(row[k]) for k in ("heldout_gain_strict", "heldout_gain_lenient")]
        + [
            cell(row.get(f"{name}_{key}") or EMPTY)
            for name in TRANSFER
            for key, cell in (("final", _mean_acc), ("gain_strict", _mean_pts))
        ]
        for config, row in report["across_seeds"].items()
    ]
    transfer_heads = "".join(
        f"|{TRANSFER[k][0]} end|{TRANSFER[k][0]} gain strict" for k in TRANSFER
    )
    out.append(
        _section(
            "Across seeds (mean ± std; per-seed values in brackets)",
            "config|seeds|held-out start|held-out end|GRPO gain strict|(lenient)" + transfer_heads,
            rows,
        )
    )
    for title, key in (
        (
            "Full (or full minus a part) vs plain, paired per seed and pooled over seeds "
            "(final evaluations)",
            "full_vs_plain",
        ),
        ("Ablation: each part or family removed vs where it was removed from", "ablation"),
    ):
        rows = []
        for name, comp in (report.get(key) or {}).items():
            for seed, v in comp["per_seed"].items():
                rows.append(
                    [name, str(seed)]
                    + [_gain(v.get(s), k) for s in SETS for k in ("strict", "lenient")]
                )
            m = comp["mean"]
            rows.append(
                [name, f"mean of {(n := m['heldout_strict']['seeds'])}"]
                + [
                    _mean_pts(c) + _fewer_seeds(c, n)
                    for s in SETS
                    for k in ("strict", "lenient")
                    for c in [m.get(f"{s}_{k}") or EMPTY]
                ]
            )
            pooled = comp.get("pooled") or {}
            if (pooled.get("heldout_strict") or {}).get("seeds", 0) > 1:
                rows.append(
                    [name, f"pooled over {(n := pooled['heldout_strict']['seeds'])}"]
                    + [
                        _change(c) + _fewer_seeds(c, n)
                        for s in SETS
                        for k in ("strict", "lenient")
                        for c in [pooled.get(f"{s}_{k}")]
                    ]
                )
        if rows:
            headers = "comparison|seed|held-out strict|held-out lenient" + "".join(
                f"|{TRANSFER[k][0]} strict|{TRANSFER[k][0]} lenient" for k in TRANSFER
            )
            out.append(_section(title, headers, rows))
    m = report["machine"]
    keys = ("cpu", "cpu_class", "cores", "torch", "torch_threads", "transformers")
    out.append(_section("Machine", "|".join(keys), [[str(m.get(k)) for k in keys]]))
    if report["left"]:
        out.append(
            f"**Partial:** {len(report['left'])} item(s) left; run the same command again "
            "to continue:\n\n" + "\n".join(f"- {x}" for x in report["left"])
        )
    return "\n\n".join(x for x in out if x)


def plot(report: dict[str, Any], path: Path) -> Path:
    """Learning curves (held-out accuracy against seconds) and the end accuracies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = report["configs"]
    colors = {c: plt.get_cmap("tab10")(i % 10) for i, c in enumerate(configs)}
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    clock = "steps"
    for r in report["runs"]:
        pts = r["curve"]["points"]
        clock = r["curve"]["clock"]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(
                [x / 60 for x in xs],
                ys,
                marker=".",
                linestyle=("-", "--", ":", "-.")[r["seed"] % 4],
                color=colors[r["config"]],
                alpha=0.8,
                label=f"{r['config']} seed {r['seed']}",
            )
    ax.set_xlabel(
        "minutes of the run (time/elapsed)"
        if clock == "time/elapsed"
        else "minutes of training (SFT + GRPO step times)"
    )
    ax.set_ylabel(f"held-out accuracy (first {report['settings']['probe_heldout']}, strict)")
    ax.set_ylim(0, 1)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    if report["runs"]:
        ax.legend(fontsize=7, ncol=2)
    labels = ["held-out start", "held-out end"]
    keys = ["heldout_start", "heldout_final"]
    for name, (label, _) in TRANSFER.items():
        labels += [f"{label.split()[0]} start", f"{label.split()[0]} end"]
        keys += [f"{name}_start", f"{name}_final"]
    width = 0.8 / max(1, len(configs))
    for i, config in enumerate(configs):
        row = report["across_seeds"].get(config)
        if not row:
            continue
        xs = [j + (i - (len(configs) - 1) / 2) * width for j in range(len(keys))]
        means = [(row.get(k) or EMPTY)["mean"] or 0.0 for k in keys]
        bx.bar(xs, means, width=width * 0.9, color=colors[config], label=config)
        for x, k in zip(xs, keys, strict=True):
            vals = [v for v in (row.get(k) or EMPTY)["per_seed"] if v is not None]
            bx.scatter([x] * len(vals), vals, color="black", s=8, zorder=3)
    bx.set_xticks(range(len(keys)), labels, fontsize=8)
    bx.set_ylim(0, 1)
    bx.set_ylabel("strict accuracy (bar: mean, dots: seeds)")
    bx.grid(axis="y", alpha=0.3)
    if report["across_seeds"]:
        bx.legend(fontsize=8)
    fig.suptitle(
        f"{report['recipe']}: {report['settings']['budget']} per run, equal wall-clock",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_report(
    st: Learning,
    recipe: str,
    configs: list[str],
    results: list[RunResult],
    left: list[str],
    note: str,
    machine: dict[str, Any],
) -> dict[str, Any]:
    """Everything the tables and the plot show, from the finished runs' folders."""
    results = sorted(results, key=lambda r: (r.seed, configs.index(r.config)))
    names = {r.config for r in results}
    # full, and full minus a part (a study may run full-critique without full), each vs plain
    full_vs_plain = {
        f"{c} - plain": compare(results, "plain", c)
        for c in configs
        if (c == "full" or c.startswith("full-")) and {"plain", c} <= names
    }
    # each removal against the configuration it was removed from: full-x against full,
    # full-critique-x against full-critique (the one-hour ablation's reference)
    parents = {c: c.rsplit("-", 1)[0] for c in configs if c.startswith("full-")}
    ablation = {
        f"{c} - {parent}": compare(results, parent, c)
        for c, parent in parents.items()
        if {parent, c} <= names
    }
    heldout_n = {r.numbers["heldout"]["problems"] for r in results}
    return {
        "benchmark": "learning",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "settings": {**asdict(st), "seeds": list(st.seeds), "configs": list(st.configs)},
        "recipe": str(recipe),
        "configs": configs,
        "heldout_problems": ", ".join(str(n) for n in sorted(heldout_n)) or "n/a",
        "note": note,
        "machine": machine,
        "runs": [r.numbers for r in results],
        "across_seeds": across_seeds(results, [c for c in configs if c in names]),
        "full_vs_plain": full_vs_plain,
        "ablation": ablation,
        "left": left,
    }


# ------------------------------------------------------------------ the study


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Learning]:
    d = Learning()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", dest="recipe", help=f"base recipe (default {RECIPE})")
    ap.add_argument(
        "--budget",
        help=f"each run's wall-clock, train.time_budget (the recipe's, or {DEFAULT_BUDGET})",
    )
    ap.add_argument("--seeds", type=int, nargs="+", help="(default 0 1 2)")
    ap.add_argument("--configs", nargs="+", help="plain, full, full-<x> (default plain full)")
    ap.add_argument("--ablate", choices=ABLATE, help="add full minus each family (or part)")
    ap.add_argument(
        "--steps", type=int, help=f"train.steps, a cap ({d.steps}: the budget ends GRPO)"
    )
    ap.add_argument("--eval-limit", type=int, help="held-out problems (default: the recipe's)")
    ap.add_argument(
        "--probe-every", type=int, help="a curve point every N GRPO steps (the recipe's, or 10)"
    )
    ap.add_argument("--probe-heldout", type=int, help="problems a point (the recipe's, or 48)")
    ap.add_argument(
        "--gsm8k-limit", type=int, help=f"the first N of GSM8K test ({d.gsm8k_limit}; 0 = all)"
    )
    ap.add_argument(
        "--svamp-limit", type=int, help=f"the first N of SVAMP ({d.svamp_limit}; 0 = all 1,000)"
    )
    ap.add_argument("--save-every", type=int, help="checkpoint every N steps (the recipe's)")
    ap.add_argument(
        "--backend",
        choices=("ours", "auto", "vllm"),
        help=f"rollout.backend of every run ({d.backend}: the runs of record's; a new study "
        "in a vLLM venv may take auto)",
    )
    ap.add_argument(
        "--max-minutes", type=float, default=60.0, help="start nothing after this (0 = no limit)"
    )
    ap.add_argument("--out-dir", type=Path, help="run folders (default runs/learning[-quick])")
    ap.add_argument("--results", type=Path, help="results stem (default benchmarks/results/...)")
    ap.add_argument(
        "--fresh", action="store_true", help="redo runs whose folders hold other settings"
    )
    ap.add_argument(
        "--side-by-side",
        action="store_true",
        help="train as many runs at a time as there are configurations, each pinned to its "
        "share of the cores (a pair measured on one machine in one sitting)",
    )
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for every run, before the configuration's own (repeatable; "
        "e.g. sft.data=gsm8k: the warm-up on GSM8K train's worked solutions). Use a study "
        "folder of its own: a kept run made without it is a conflict",
    )
    ap.add_argument("--list", action="store_true", help="print each run's command and exit")
    ap.add_argument(
        "--quick", action="store_true", help="smoke check: tiny-random, 30 s runs, 1 seed"
    )
    args = ap.parse_args(argv)
    given = {
        "recipe": args.recipe,
        "budget": args.budget,
        "seeds": tuple(args.seeds) if args.seeds else None,
        "configs": tuple(args.configs) if args.configs else None,
        "steps": args.steps,
        "eval_limit": args.eval_limit,
        "probe_every": args.probe_every,
        "probe_heldout": args.probe_heldout,
        "gsm8k_limit": args.gsm8k_limit,
        "svamp_limit": args.svamp_limit,
        "save_every": args.save_every,
        "backend": args.backend,
    }
    st = replace(QUICK if args.quick else d, **{k: v for k, v in given.items() if v is not None})
    malformed = [o for o in args.overrides if "=" not in o]
    if malformed:
        ap.error(f"--set takes KEY=VALUE, got {malformed[0]!r}")
    st = replace(st, extra=(*st.extra, *args.overrides))
    if args.out_dir is None:
        args.out_dir = Path("runs/learning-quick" if args.quick else "runs/learning")
    return args, st


def is_quick_run(run_dir: Path) -> bool:
    """A folder --quick may clear: absent, or a run of the tiny model (never a real run)."""
    from deepsynapse.config import load_config

    if not (run_dir / "config.yaml").is_file():
        return True
    try:
        return load_config(run_dir / "config.yaml").model.name == "tiny-random"
    except Exception:
        return False


def plan_runs(st: Learning, configs: list[str], out_dir: Path, recipe_cfg: Any) -> list[Run]:
    """Seed by seed, every configuration: a time cut leaves them all with equal seeds."""
    return [
        Run(c, s, out_dir / run_name(c, s), run_overrides(st, c, s, out_dir, recipe_cfg))
        for s in st.seeds
        for c in configs
    ]


def left_text(run: Run, st: Learning, jobs: Iterable[EvalJob] = ()) -> str:
    what = {
        "todo": f"train ({st.budget})",
        "resumable": f"resume {run.detail}".strip(),
        "finished": "evaluate " + ", ".join(j.name.removesuffix(".json") for j in jobs),
        "conflict": f"conflict: {run.detail} (--fresh redoes it)",
    }.get(run.state, run.state)
    return f"{run_name(run.config, run.seed)}: {what}"


def advance(
    run: Run,
    st: Learning,
    recipe: str,
    expected: dict[str, Any],
    deadline: float | None,
    cores: Sequence[int] | None = None,
    beside: Sequence[str] = (),
    evaluate: bool = True,
) -> None:
    """Train (or resume) the run if it is not finished, then run its missing evaluations.

    ``cores``/``beside``: the run's share of the machine and the runs sharing it
    (``--side-by-side``); its children are pinned there. ``evaluate=False``: train only.
    """
    from deepsynapse.config import load_config

    def out_of_time() -> bool:
        return bool(_STOP) or (deadline is not None and time.time() > deadline)

    run.state, run.detail = inspect_run(run.run_dir, expected)
    if run.state == "conflict":
        return
    if run.state == "finished" and not run.actions:
        say(f"{run_name(run.config, run.seed)}: reused (finished earlier)")
    if run.state in ("todo", "resumable"):
        if out_of_time():
            return
        resume = run.state == "resumable"
        if not resume:
            shutil.rmtree(run.run_dir, ignore_errors=True)  # holds no checkpoint
        run.actions.append("resumed" if resume else "trained")
        stamp = time.strftime("%H:%M:%S")
        say(f"[{stamp}] {run_name(run.config, run.seed)}: {'resuming' if resume else 'training'}")
        began = time.perf_counter()
        cmd = train_command(recipe, run.overrides, run.run_dir, resume)
        used = cores or sorted(os.sched_getaffinity(0))
        shared = None if resume else share_before(run.run_dir, expected, used)
        if shared:
            say(f"    evaluation before: shared from {shared} (same held-out settings and CPU)")
        record_machine(run.run_dir, run.actions[-1], used, beside)
        rc = run_logged(cmd, run.run_dir / EVAL_DIR / "train.log", cores=cores)
        took = time.perf_counter() - began
        run.state, run.detail = inspect_run(run.run_dir, expected)
        say(
            f"[{time.strftime('%H:%M:%S')}] {run_name(run.config, run.seed)}: "
            f"exit {rc} after {took / 60:.1f} min, {run.state} {run.detail}".rstrip()
        )
        if run.state != "finished":
            if rc != 0:
                run.errors.append(f"train exited with {rc} (see {run.run_dir}/{EVAL_DIR})")
            return
    if not evaluate:
        return
    removed = prune_checkpoints(run.run_dir)
    if removed:
        run.actions.append(f"pruned {len(removed)} checkpoint(s)")
    cfg = load_config(run.run_dir / "config.yaml")
    jobs, _ = eval_jobs(st, run.run_dir, cfg)
    for job in jobs:
        if out_of_time():
            return
        say(
            f"[{time.strftime('%H:%M:%S')}] {run_name(run.config, run.seed)}: eval {job.name} "
            f"({job.data}, {job.limit} problems, {job.checkpoint or 'final checkpoint'})"
        )
        error = run_eval(run.run_dir, job, cfg, cores)
        run.actions.append(f"evaluated {job.name}")
        if error:
            run.errors.append(error)


def side_by_side_groups(runs: list[Run], per_group: int) -> list[list[Run]]:
    """The runs that still train, ``per_group`` at a time, in plan order (seed by seed).

    A finished run takes no core: with plain seed 0 reused, full seed 0 trains beside the next
    run that needs training (plain seed 1), so every run still trains beside one, as its pair
    did, and no core idles for an hour.
    """
    to_train = [r for r in runs if r.state in ("todo", "resumable")]
    return [to_train[i : i + per_group] for i in range(0, len(to_train), per_group)]


def run_side_by_side(
    runs: list[Run],
    st: Learning,
    recipe: str,
    expected: dict[Path, dict[str, Any]],
    deadline: float | None,
    per_group: int,
) -> None:
    """Runs train ``per_group`` at a time, each on its own share of the cores; after each
    group, its evaluations (off every clock) run one at a time on all of them."""
    import threading

    def train(run: Run, **kwargs: Any) -> None:
        try:
            advance(run, st, recipe, expected[run.run_dir], deadline, **kwargs)
        except Exception as e:  # noqa: BLE001 - reported with the run, like a failed child
            run.errors.append(f"{type(e).__name__}: {e}")

    for run in runs:
        run.state, run.detail = inspect_run(run.run_dir, expected[run.run_dir])
    groups = side_by_side_groups(runs, per_group)
    for group in groups:
        shares = core_shares(len(group), sorted(os.sched_getaffinity(0)))
        names = [run_name(r.config, r.seed) for r in group]
        threads = [
            threading.Thread(
                target=train,
                args=(run,),
                kwargs={
                    "cores": share,
                    "beside": [n for n in names if n != name],
                    "evaluate": False,
                },
                name=name,
            )
            for run, share, name in zip(group, shares, names, strict=True)
        ]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():  # a timed join lets the main thread take Ctrl-C
                t.join(timeout=1.0)
        for run in group:
            if _STOP:
                return
            advance(run, st, recipe, expected[run.run_dir], deadline)
    trained = {id(r) for g in groups for r in g}
    for run in runs:  # the reused runs' missing evaluations (never a training on all cores)
        if id(run) not in trained:
            if _STOP:
                return
            advance(run, st, recipe, expected[run.run_dir], deadline)


def main(argv: list[str] | None = None) -> int:
    from deepsynapse.config import load_config

    args, st = parse_args(argv)
    recipe, note = resolve_recipe(st.recipe)
    st = replace(st, recipe=recipe)
    if note:
        print(f"learning: {note}", flush=True)
    configs = study_configs(st, args.ablate)
    out_dir = args.out_dir.resolve()
    recipe_cfg = load_config(recipe_path(recipe), list(st.extra))
    st = resolve(st, recipe_cfg)
    stem = args.results or RESULTS_DIR / ("learning-quick" if args.quick else "learning")
    records = stem.with_name(stem.name + ".runs")  # committed: a fresh machine reuses them
    if not args.quick:
        more = sorted(kept_seeds(records, configs) - set(st.seeds))
        if more:  # slices add up: a slice of one seed must not write the others out of the report
            print(f"learning: the report also covers seeds {more}, kept in {records}", flush=True)
            st = replace(st, seeds=tuple(sorted({*st.seeds, *more})))
    runs = plan_runs(st, configs, out_dir, recipe_cfg)
    if not args.quick:
        for run in runs:
            if restore_run(records / run.run_dir.name, run.run_dir):
                print(f"{run.run_dir.name}: restored from {records / run.run_dir.name}")
    expected = {}
    for run in runs:  # every configuration must load before anything runs
        expected[run.run_dir] = load_config(recipe_path(recipe), run.overrides).to_dict()
    overruled = set_keys_overruled(args.overrides, recipe_cfg.to_dict(), runs, expected)
    if overruled:
        raise SystemExit("learning: " + "; ".join(overruled))
    if args.list:
        for run in runs:
            print(shlex.join(train_command(recipe, run.overrides, run.run_dir, False)))
        return 0
    for run in runs:
        if args.quick and is_quick_run(run.run_dir):  # a smoke check starts from nothing
            shutil.rmtree(run.run_dir, ignore_errors=True)
        elif args.fresh and inspect_run(run.run_dir, expected[run.run_dir])[0] == "conflict":
            shutil.rmtree(run.run_dir, ignore_errors=True)
    started = time.time()
    deadline = started + 60 * args.max_minutes if args.max_minutes else None
    print(
        f"learning: {len(configs)} configurations x {len(st.seeds)} seeds = {len(runs)} runs of "
        f"{st.budget} ({recipe}); runs in {out_dir}"
        + (f"; nothing starts after {args.max_minutes:g} min" if deadline else ""),
        flush=True,
    )
    with stop_forwarded():
        if args.side_by_side:
            run_side_by_side(runs, st, recipe, expected, deadline, len(configs))
        else:
            for run in runs:
                advance(run, st, recipe, expected[run.run_dir], deadline)

    results, left = [], []
    for run in runs:
        run.state, run.detail = inspect_run(run.run_dir, expected[run.run_dir])
        if run.state == "finished":
            results.append(read_run(run, st))
            jobs, _ = eval_jobs(st, run.run_dir, load_config(run.run_dir / "config.yaml"))
            if jobs:
                left.append(left_text(run, st, jobs))
            elif not args.quick and archive_run(run.run_dir, records / run.run_dir.name):
                run.actions.append(f"record kept in {records / run.run_dir.name}")
        else:
            left.append(left_text(run, st))
    report = build_report(st, recipe, configs, results, left, note, machine_info())
    report["seconds"] = time.time() - started
    report["invocation"] = [
        {
            "run": run_name(r.config, r.seed),
            "state": r.state,
            "actions": r.actions,
            "errors": r.errors,
        }
        for r in runs
    ]
    text = markdown(report)
    print("\n" + text, flush=True)
    save_report(stem, report, text)
    png = plot(report, stem.with_suffix(".png"))
    print(f"\nsaved {stem.with_suffix('.json')}, {stem.with_suffix('.md')}, {png}")
    if left:
        to_train = sum(r.state in ("todo", "resumable") for r in runs)
        seconds = to_train * parse_duration(st.budget)
        took = f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"
        print(
            f"left: {len(left)} item(s), {to_train} run(s) to train or finish (at most "
            f"{took} at {st.budget} each, plus evaluations); run the same command again"
        )
        for item in left:
            print(f"  {item}")
    failed = [r for r in runs if r.errors or r.state == "conflict"]
    for r in failed:
        for e in r.errors or [r.detail]:
            print(f"{run_name(r.config, r.seed)}: {e}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
