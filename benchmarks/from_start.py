"""GRPO variants from one warm-up: rerun a run's GRPO from its start with other settings.

    python benchmarks/from_start.py runs/learning/plain-seed0 g8-mu2 \\
        rollout.num_generations=8 grpo.num_iterations=2          # GRPO again, G=8, 2 updates a batch
    python benchmarks/from_start.py runs/learning/plain-seed0 g8-mu2 --reach 96 ...
                                                                 # + sampled reach at start and end
    python benchmarks/from_start.py runs/learning/full-critique-seed4 optimisation \\
        --as full-critique-optimisation                          # a family's GRPO ablation
    python benchmarks/from_start.py runs/learning-lr/plain-seed10 shipped-no-scales \\
        --as full-critique-memory-hypernet lora.module_scales=false
                                                # the recipe's GRPO from plain's warm-up
    python benchmarks/from_start.py runs/learning-replan/full-critique-seed6 replicate \\
        train.draw_seed=1006 --as full-critique                  # the source's GRPO, other draws
    python benchmarks/from_start.py --quick                      # smoke check: tiny model, ~1 min
    python benchmarks/from_start.py --summary                    # kept variants, pooled over seeds

The hour study's warm-up takes a quarter of the hour and is the same whatever GRPO does
after it. To compare GRPO settings, each variant here starts from the source run's
``checkpoints/step-0`` (the start of GRPO): the run folder is copied up to that checkpoint
(config, the evaluations before and after the warm-up, the logs, which the trainer cuts back
to that step on resume) and resumed with the overrides. So every variant has the source's
weights, optimizer state, random stream and budget clock where its GRPO began, and its final
held-out evaluation is paired with the source's ``eval_after_sft.json`` on the same problems
(the trainer's summary prints "GRPO gave" with its interval).

A finished variant is paired with the source's end and start (strict and lenient, with
intervals: ``<variant>/from_start.json``, printed), and that result and the variant's record
(``learning.py``'s, no checkpoint) are kept in ``benchmarks/results/from-start/``.

``--reach K`` also samples the first K held-out problems x 8 at T = 0.9 at ``step-0`` and at
the end (``deepsynapse eval --mode majority``) and pairs them with the greedy evaluations:
sample accuracy, pass@8, majority vote, and the problems greedy decoding gets wrong but some
sample gets right, the headroom an RL that sharpens what the model can already sample can
convert (first measured: 15 of 96 after plain's warm-up, seed 0).
A replicate (the source's own configuration with ``train.draw_seed``: the same data, other
samples) measures how far two draws of one configuration end apart from one start: every
variant's delta against the source carries that noise, the source's draw included.
``--as CONFIG`` switches the parts as ``learning.py``'s configuration CONFIG does, from a
source that ``learning.py`` made (checked): the GRPO-phase ablation from a shared start, e.g.
``full-critique-optimisation`` from ``full-critique-seed4``. The variant is that run but for
its warm-up, which is the source's, so its end pairs with the source's end with the warm-ups'
noise taken out. A part that changes the warm-up (module scales) is refused: it needs its own
run. A variant without the neural memory or the hypernetwork (``--as full-critique-memory``,
``full-critique-hypernet``) gets the start rewritten without them, which leaves the policy's
function unchanged where both are still at identity, as at the start of GRPO
(``rebase_adaptive``; a module that moved is refused).
The variant resumes the source's resolved ``config.yaml``, which pins every key: a default
changed since the source ran does not reach it (pass the key as an override, e.g.
``control.kl_temperature.couple=false``). Every override acts from the first GRPO step, and
the trainer prints the settings that changed (until 2026-12-07 the sampling temperature, KL
beta, reward weights and lengths stayed the checkpoint's: a variant of those was its source
again). Variants live in ``runs/from-start/<source>-<name>``. A Ctrl-C or SIGTERM to this script is
passed to the trainer, which checkpoints and exits; the same command again resumes it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from _common import RESULTS_DIR, fmt, markdown_table, save_json
from learning import (
    DEEPSYNAPSE,
    QUICK,
    RECIPE,
    REPO,
    archive_run,
    run_forwarded,
    stop_forwarded,
    stop_requested,
)

from deepsynapse.checkpoint import latest_checkpoint
from deepsynapse.eval.stats import wilson_interval

COPIED = ("config.yaml", "eval_before.json", "eval_after_sft.json")
LOGS = ("metrics.jsonl", "events.jsonl", "samples.jsonl")
START = "step-0"
REACH_SAMPLES = 8
REACH_TEMPERATURE = 0.9


def branch(source: Path, dest: Path) -> None:
    """``dest`` as ``source`` was at the start of GRPO (its ``step-0`` checkpoint)."""
    start = source / "checkpoints" / START
    if not (start / "COMPLETE").is_file():
        raise SystemExit(f"{start}: no complete start-of-GRPO checkpoint (a run with a warm-up)")
    missing = [n for n in COPIED if not (source / n).is_file()]
    if missing:
        raise SystemExit(f"{source}: missing {', '.join(missing)} (a finished warm-up writes them)")
    (dest / "checkpoints").mkdir(parents=True)
    shutil.copytree(start, dest / "checkpoints" / START)
    for name in COPIED + LOGS:
        if (source / name).is_file():
            shutil.copy2(source / name, dest / name)


def rebase_rewards(dest: Path, overrides: list[str]) -> str | None:
    """Let a variant compute another set of rewards from the start of GRPO; what changed.

    The checkpoint names the rewards it was made with, and the trainer refuses another set
    on resume (rightly: mid-run, the calibration statistics, the episodic memory and the
    verifier have learned from them). At the start of GRPO they have learned nothing
    (checked, else refused), so the start is rewritten for the variant's set: the identity
    takes the variant's rewards (the weights are the variant's configuration's), and the
    states sized by the old set (the verifier where the variant has none, the weight
    allocator's) are dropped, to be built fresh as a run starting GRPO would build them.
    """
    from deepsynapse.checkpoint import load_tree, save_tree
    from deepsynapse.config import load_config

    cfg = load_config(dest / "config.yaml", overrides)
    folder = dest / "checkpoints" / START
    state = load_tree(folder, "trainer_state")
    theirs, ours = sorted(state["identity"]["rewards"]), sorted(cfg.rewards.weights)
    if theirs == ours:
        return None
    rewards = state["rewards"]
    learned = {
        "calibration statistics": (rewards.get("fusion") or {}).get("stats"),
        "episodic memory": (rewards.get("memory") or {}).get("problems"),
        "verifier updates": (rewards.get("verifier") or {}).get("updates"),
        "GRPO steps": state.get("step"),
    }
    learned = [name for name, value in learned.items() if value]
    if learned:
        raise SystemExit(
            f"{folder}: holds {', '.join(learned)}: only the start of GRPO can change the "
            f"rewards ({theirs} -> {ours})"
        )
    state["identity"]["rewards"] = ours
    if "verifier" not in cfg.rewards.weights:
        rewards.pop("verifier", None)
    state["controllers"].pop("allocator", None)
    save_tree(state, folder, "trainer_state")
    return f"rewards {', '.join(theirs)} -> {', '.join(ours)}"


ADAPTIVE_PARTS = {"memory": ("memory",), "hypernet": ("hypernet", "context")}  # -> state keys


def rebase_adaptive(dest: Path, overrides: list[str]) -> str | None:
    """Let a variant run without the neural memory or the hypernetwork from the start of GRPO.

    The checkpoint's identity names both modules, and the trainer refuses it for a run without
    them (rightly: mid-run they shape the policy's function). At the start of GRPO both are at
    identity (the memory's gate exactly 0, the hypernetwork's output layer exactly zero: the
    warm-up trains LoRA only) and have no optimizer state, so removing them leaves the policy's
    function as it was: their state, their identity entries and their optimizer groups are
    dropped. A module that has moved, or whose optimizer group is not found unambiguously
    (by its learning-rate multiple and its number of tensors), is refused.
    """
    from deepsynapse.checkpoint import load_tree, save_tree
    from deepsynapse.config import load_config

    source_cfg = load_config(dest / "config.yaml")
    cfg = load_config(dest / "config.yaml", overrides)
    folder = dest / "checkpoints" / START
    state = load_tree(folder, "trainer_state")
    dropped = [
        part
        for part in ADAPTIVE_PARTS
        if state["identity"].get(part) is not None and not getattr(cfg, part).enabled
    ]
    if not dropped:
        return None
    if state.get("step"):
        raise SystemExit(f"{folder}: step {state['step']}: only the start of GRPO drops {dropped}")
    adaptive = state["adaptive"]
    moved = {  # the modules' own identity tests (NeuralMemory.forward, HyperNetwork.is_identity)
        "memory": lambda t: bool(t["gate"].any()),
        "hypernet": lambda t: bool(t["up.weight"].any() or t["up.bias"].any()),
    }
    optimizer = load_tree(folder, "optimizer")
    groups = optimizer["param_groups"]
    for part in dropped:
        tensors = adaptive[part]
        if moved[part](tensors):
            raise SystemExit(f"{folder}: the {part} has moved off identity: it cannot be dropped")
        lr_mult = getattr(source_cfg, part).lr_mult
        found = [
            i
            for i, g in enumerate(groups)
            if g.get("lr_mult") == lr_mult and len(g["params"]) == len(tensors)
        ]
        if len(found) != 1:
            raise SystemExit(
                f"{folder}: {len(found)} optimizer groups could be the {part}'s "
                f"(lr_mult {lr_mult}, {len(tensors)} tensors): not dropped"
            )
        group = groups.pop(found[0])
        if any(i in optimizer["state"] for i in group["params"]):  # save_tree keeps int keys
            raise SystemExit(f"{folder}: the {part}'s optimizer state is not empty: not dropped")
        for key in ADAPTIVE_PARTS[part]:
            adaptive.pop(key, None)
        state["identity"][part] = None
    save_tree(optimizer, folder, "optimizer")
    save_tree(state, folder, "trainer_state")
    return f"dropped the {' and the '.join(dropped)} (at identity)"


WARM_UP_KEYS = ("model.", "lora.", "sft.")  # what the warm-up trained with, in the checkpoint


def as_learning_config(
    source: Path, config: str, st: Any = None, recipe: str = RECIPE, given: tuple[str, ...] = ()
) -> list[str]:
    """Overrides that make the variant ``learning.py``'s ``config`` at the source's seed.

    The GRPO-phase ablation from a shared start: ``--as full-critique-optimisation`` from
    ``full-critique-seed4`` is that ablation's run, except that it inherits the source's
    warm-up instead of training its own, so its end pairs with the source's end and start
    without the two warm-ups' noise. Only for a source that ``learning.py`` made with the
    settings ``st`` (default: its defaults; checked against the configuration its folder
    names) and only for a configuration with the same warm-up (model, LoRA and SFT keys);
    a part that changes the warm-up (module scales) needs a run of its own, unless the
    overrides ``given`` with it set that key back to the source's: e.g. the shipped recipe
    without module scales from plain's start, GRPO against GRPO with one warm-up.
    """
    from ablation import parts_for
    from learning import Learning, config_diff, plain_reset, recipe_path, resolve, run_overrides

    from deepsynapse.config import load_config

    base, sep, seed_text = source.name.rpartition("-seed")
    if not sep or not seed_text.isdigit():
        raise SystemExit(f"--as: {source.name} is not a learning.py run folder (<config>-seed<N>)")
    seed = int(seed_text)
    st = st or Learning()
    recipe_cfg = load_config(recipe_path(recipe), list(st.extra))
    st = resolve(st, recipe_cfg)

    def made(name: str, extra: tuple[str, ...] = ()) -> tuple[list[str], dict[str, Any]]:
        overrides = run_overrides(st, name, seed, source.parent, recipe_cfg)
        return overrides, load_config(recipe_path(recipe), [*overrides, *extra]).to_dict()

    _, theirs = made(base)
    diff = config_diff(load_config(source / "config.yaml").to_dict(), theirs)
    if diff:
        raise SystemExit(
            f"--as: {source} is not learning.py's {base} at seed {seed} with these settings "
            f"({'; '.join(diff[:3])})"
        )
    overrides, ours = made(config, given)
    warm = [d for d in config_diff(theirs, ours) if d.startswith(WARM_UP_KEYS)]
    if warm:
        raise SystemExit(
            f"--as {config}: changes the warm-up ({'; '.join(warm[:3])}): train it with "
            "learning.py instead"
        )
    # The source's parts' keys hold its values, not the recipe's: reset every one to plain's
    # before the configuration's own (learning.py resets only where the recipe differs).
    reset = plain_reset(parts_for(recipe_cfg.rollout.max_new_tokens), recipe_cfg, every_key=True)
    kept = [o for o in overrides if not o.startswith(("train.run_name=", "train.output_dir="))]
    return [*reset, *kept]


def against_source(source: Path, dest: Path) -> dict[str, Any]:
    """The variant's end paired with its start and with the source's end (same problems).

    What a variant is for: the source's GRPO and the variant's start from the same
    checkpoint, so their ends differ by the settings (and the sampling's chance) alone.
    """
    from learning import accuracy, paired, read_json, read_jsonl

    start = read_json(dest / "eval_after_sft.json")
    end, source_end = read_json(dest / "eval_after.json"), read_json(source / "eval_after.json")
    steps = {}
    for name, run in (("variant", dest), ("source", source)):
        rows = [r for r in read_jsonl(run / "metrics.jsonl") if "timing/step" in r]
        steps[name] = {"grpo_steps": len(rows), "grpo_s": sum(r["timing/step"] for r in rows)}
    return {
        "paths": {"source": str(source), "variant": str(dest)},
        "start": accuracy(start),
        "end": accuracy(end),
        "source_end": accuracy(source_end),
        "gain": paired(start, end),
        "vs_source": paired(source_end, end),
        "source_gain": paired(start, source_end),
        **steps,
    }


def summary_lines(result: dict[str, Any]) -> list[str]:
    from deepsynapse.eval.stats import format_interval

    lines = []
    for key, label in (
        ("source_gain", "source's GRPO gave"),
        ("gain", "variant's GRPO gave"),
        ("vs_source", "variant - source, end"),
    ):
        for kind in ("strict", "lenient"):
            c = (result.get(key) or {}).get(kind)
            if c:
                lines.append(
                    f"  {label} ({kind}): {format_interval(c['delta'], c['delta_ci'])} "
                    f"({c['fixed']} fixed, {c['broken']} broken, McNemar p={c['p_value']:.2g})"
                )
    v, s = result["variant"], result["source"]
    lines.append(
        f"  GRPO steps: variant {v['grpo_steps']} ({v['grpo_s']:.0f} s), "
        f"source {s['grpo_steps']} ({s['grpo_s']:.0f} s)"
    )
    return lines


def _record(record_dir: Path, name: str) -> dict[str, Any] | None:
    """One file of a kept record (gzip), or None where the record lacks it."""
    import gzip

    path = record_dir / (name + ".gz")
    return json.loads(gzip.decompress(path.read_bytes())) if path.is_file() else None


def pooled_variants(results_dir: Path, records_root: Path = RESULTS_DIR) -> list[dict[str, Any]]:
    """Each variant's change against its source's end, pooled over the sources' seeds.

    Why: one start's 384 problems give about +-4 points; a part's share is asked of every
    start it was removed from. Variants group by (study, source configuration, variant name):
    ``full-critique-seed6-sft_mixing`` and ``full-critique-seed7-sft_mixing`` from
    ``runs/learning-replan`` are one group of two seeds. Both ends are read from the kept
    records (the variant's in ``results_dir/runs``, the source's in the study's
    ``<study>.runs``), so this runs on a clean checkout. Where the study kept a plain run at
    every seed of the group, the variant's end is also pooled against plain's end.
    """
    from deepsynapse.eval.stats import pooled_paired_comparison

    groups: dict[tuple[str, str, str], list[tuple[int, dict[str, Any], ...]]] = {}
    for path in sorted(results_dir.glob("*.json")):
        result = json.loads(path.read_text())
        source = Path(result["paths"]["source"])
        config, _, seed = source.name.rpartition("-seed")
        if not seed.isdigit() or not path.stem.startswith(source.name + "-"):
            raise ValueError(f"{path}: source {source.name!r} is not <config>-seed<N>")
        study, name = source.parent.name, path.stem.removeprefix(source.name + "-")
        ends = (
            _record(records_root / f"{study}.runs" / source.name, "eval_after.json"),
            _record(results_dir / "runs" / path.stem, "eval_after.json"),
        )
        if None in ends:
            raise FileNotFoundError(f"{path}: a kept record of either end is missing")
        groups.setdefault((study, config, name), []).append((int(seed), result, *ends))
    rows = []
    for (study, config, name), members in sorted(groups.items()):
        members.sort(key=lambda m: m[0])
        pairs = [(src["records"], var["records"]) for _, _, src, var in members]
        # The study's plain run at each seed, where kept: a variant of full is then also
        # paired with plain GRPO's end (another warm-up: its noise stays in)
        plain = [
            _record(records_root / f"{study}.runs" / f"plain-seed{seed}", "eval_after.json")
            for seed, *_ in (members if config != "plain" else [])
        ]
        against_plain = None
        if plain and None not in plain:
            vs = [
                (p["records"], var["records"]) for p, (*_, var) in zip(plain, members, strict=True)
            ]
            against_plain = pooled_paired_comparison(vs, "correct")
        rows.append(
            {
                "study": study,
                "source": config,
                "variant": name,
                "seeds": [m[0] for m in members],
                "per_seed": [m[1]["vs_source"]["strict"]["delta"] for m in members],
                "strict": pooled_paired_comparison(pairs, "correct"),
                "lenient": pooled_paired_comparison(pairs, "lenient_correct"),
                "vs_plain": against_plain,
            }
        )
    return rows


def pooled_table(rows: list[dict[str, Any]]) -> str:
    """Strict and lenient apart: a format change must not pass for a reasoning one."""
    from deepsynapse.eval.stats import format_interval

    def pooled(c: dict[str, Any]) -> str:
        return (
            f"{format_interval(c['delta'], c['delta_ci'])} p={c['p_value']:.2g} "
            f"({c['fixed']} fixed, {c['broken']} broken)"
        )

    headers = ["study", "source", "variant", "seeds", "per seed (strict)"]
    headers += ["pooled (strict)", "pooled (lenient)", "against plain's end (strict)"]
    table = [
        [
            r["study"],
            r["source"],
            r["variant"],
            str(r["seeds"]),
            ", ".join(f"{100 * d:+.1f}" for d in r["per_seed"]),
            pooled(r["strict"]),
            pooled(r["lenient"]),
            pooled(r["vs_plain"]) if r["vs_plain"] else "-",
        ]
        for r in rows
    ]
    return markdown_table(headers, table)


class Stopped(Exception):
    """A Ctrl-C or SIGTERM stopped the child (which checkpointed): rerun to go on."""


def _checked(cmd: list[str], quiet: bool = False) -> None:
    """Run ``cmd``; a stop (passed to it, or asked before it began), or its failure, ends
    this script."""
    code = run_forwarded(cmd, quiet=quiet) if not stop_requested() else 0
    if stop := stop_requested():
        raise Stopped(stop)
    if code:
        raise SystemExit(f"failed (exit {code}): {' '.join(cmd)}")


def train(dest: Path, overrides: list[str]) -> None:
    cmd = [*DEEPSYNAPSE, "train", "--resume", str(dest), "--quiet"]
    cmd += [*overrides, f"train.output_dir={dest.parent}", f"train.run_name={dest.name}"]
    print(" ".join(cmd), flush=True)
    _checked(cmd)


def sample(run: Path, checkpoint: str, limit: int, out: Path) -> dict[str, Any]:
    """K samples of each of the first ``limit`` held-out problems at ``checkpoint``."""
    if not out.is_file():
        cmd = [*DEEPSYNAPSE, "eval", "--adapter", str(run), "--checkpoint", checkpoint]
        cmd += ["--data", "synthetic", "--limit", str(limit), "--mode", "majority"]
        cmd += ["--k", str(REACH_SAMPLES), "--temperature", str(REACH_TEMPERATURE)]
        cmd += ["--seed", "0", "--quiet", "-o", str(out)]
        _checked(cmd, quiet=True)
    return json.loads(out.read_text())


def reach(greedy: dict[str, Any], sampled: dict[str, Any]) -> dict[str, Any]:
    """Greedy against sampled correctness on the same problems (sampled ones a prefix)."""
    by_id = {r["id"]: r for r in greedy["records"]}
    rows = sampled["records"]
    missing = [r["id"] for r in rows if r["id"] not in by_id]
    if missing:
        raise ValueError(f"sampled problems not in the greedy evaluation: {missing[:3]}")
    rates = [sum(map(bool, r["samples_correct"])) / len(r["samples_correct"]) for r in rows]
    right = [bool(by_id[r["id"]]["correct"]) for r in rows]
    n = len(rows)
    headroom = sum(not g and rate > 0 for g, rate in zip(right, rates, strict=True))
    return {
        "n": n,
        "greedy": sum(right) / n,
        "sample_accuracy": sampled["sample_accuracy"],
        "pass_at_k": sampled["pass_at_k"],
        "majority": sampled["accuracy"],
        "headroom": headroom / n,
        "headroom_ci": wilson_interval(headroom, n),
        "signal": {g: sum(1 - p**g - (1 - p) ** g for p in rates) / n for g in (4, 8)},
    }


def main(argv: list[str] | None = None) -> int:
    """Run the variant; a Ctrl-C or SIGTERM is passed to the trainer, which checkpoints."""
    with stop_forwarded():
        try:
            return _main(argv)
        except Stopped as stop:
            print(f"{stop}: stopped; run the same command again to go on", flush=True)
            return 130


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("source", nargs="?", type=Path, help="a finished run with a warm-up")
    ap.add_argument("name", nargs="?", help="the variant's name")
    ap.add_argument("overrides", nargs="*", help="config overrides of the variant")
    ap.add_argument(
        "--as",
        dest="as_config",
        metavar="CONFIG",
        help="switch the parts as learning.py's CONFIG (e.g. full-critique-optimisation)",
    )
    ap.add_argument("--reach", type=int, default=0, help="sample the first K held-out x 8")
    ap.add_argument("--out-dir", type=Path, default=REPO / "runs" / "from-start")
    ap.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS_DIR / "from-start",
        help="where a finished variant's pairing and record are kept (committed)",
    )
    ap.add_argument("--quick", action="store_true", help="a tiny source run, then one variant")
    ap.add_argument(
        "--summary",
        action="store_true",
        help="every kept variant against its source's end, pooled over seeds (no training)",
    )
    args = ap.parse_intermixed_args(argv)  # overrides may follow --as CONFIG
    if args.summary:
        print(pooled_table(pooled_variants(args.results_dir)))
        return 0
    if args.quick:
        source = args.out_dir / "quick-source"
        if not (source / "checkpoints" / START / "COMPLETE").is_file():
            shutil.rmtree(source, ignore_errors=True)
            cmd = [*DEEPSYNAPSE, "train", "--quiet", "--config", RECIPE, *QUICK.extra]
            cmd += ["train.time_budget=", "train.steps=1", "eval.limit=3", "probes.every=0"]
            cmd += [f"train.output_dir={args.out_dir}", "train.run_name=quick-source"]
            _checked(cmd, quiet=True)
        args.source, args.name = source, "g4"
        args.overrides = ["rollout.num_generations=4", "train.steps=2", *args.overrides]
        args.reach = args.reach or 3
    if args.source is None or args.name is None:
        ap.error("give a source run and a name (or --quick)")
    if args.as_config:  # the configuration's switches first: the overrides given win
        switched = as_learning_config(args.source, args.as_config, given=tuple(args.overrides))
        args.overrides = [*switched, *args.overrides]
    dest = args.out_dir / f"{args.source.name}-{args.name}"
    if not dest.exists():
        branch(args.source, dest)
        for rebased in (
            rebase_rewards(dest, args.overrides),
            rebase_adaptive(dest, args.overrides),
        ):
            if rebased:
                print(f"start of GRPO rebased: {rebased}", flush=True)
    if not (dest / "eval_after.json").is_file():
        train(dest, args.overrides)
    if (dest / "eval_after.json").is_file() and (args.source / "eval_after.json").is_file():
        result = against_source(args.source, dest)
        save_json(dest / "from_start.json", result)
        print(f"\n{dest.name} against {args.source.name} (same start):")
        print("\n".join(summary_lines(result)))
        if not args.quick:  # kept beside the results: the run folders leave with the machine
            save_json(args.results_dir / f"{dest.name}.json", result)
            archive_run(dest, args.results_dir / "runs" / dest.name)
    if args.reach:
        points = {
            "start": (json.loads((dest / "eval_after_sft.json").read_text()), START),
            "end": (
                json.loads((dest / "eval_after.json").read_text()),
                latest_checkpoint(dest / "checkpoints").name,
            ),
        }
        table = {}
        for label, (greedy, checkpoint) in points.items():
            sampled = sample(dest, checkpoint, args.reach, dest / f"reach_{checkpoint}.json")
            table[label] = {"checkpoint": checkpoint, **reach(greedy, sampled)}
        save_json(dest / "reach.json", table)
        headers = ["", "checkpoint", "greedy", "sample acc", "pass@8", "majority", "headroom"]
        rows = [
            [label, r["checkpoint"], fmt(r["greedy"], 3), fmt(r["sample_accuracy"], 3)]
            + [fmt(r["pass_at_k"], 3), fmt(r["majority"], 3)]
            + [
                f"{fmt(r['headroom'], 3)} [{fmt(r['headroom_ci'][0], 3)}, {fmt(r['headroom_ci'][1], 3)}]"
            ]
            for label, r in table.items()
        ]
        print(f"\nfirst {args.reach} held-out problems x {REACH_SAMPLES} at T={REACH_TEMPERATURE}")
        print(markdown_table(headers, rows))
    print(f"variant: {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
