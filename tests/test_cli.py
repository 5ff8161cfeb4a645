"""The `deepsynapse` subcommands on the tiny model, in-process."""

from __future__ import annotations

import json

from conftest import EXTRA_REWARDS, TINY

from deepsynapse.cli import main
from deepsynapse.config import load_config
from deepsynapse.rl.trainer import Trainer

TINY_EVAL = ["--model", "tiny-random", "--dtype", "fp32", "--limit", "2", "--max-new-tokens", "4"]


def test_eval_modes_compare_and_probe(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["eval", *TINY_EVAL, "--quiet", "-o", str(a)]) == 0
    greedy = json.loads(capsys.readouterr().out)
    assert greedy["n"] == 2 and greedy["mode"] == "greedy"
    assert (
        main(["eval", *TINY_EVAL, "--quiet", "--mode", "majority", "--k", "2", "-o", str(b)]) == 0
    )
    majority = json.loads(capsys.readouterr().out)
    assert majority["mode"] == "majority" and majority["samples_per_item"] == 2
    assert main(["compare", str(a), str(b)]) == 0
    assert "accuracy" in capsys.readouterr().out
    out = tmp_path / "probe.json"
    args = ["probe", "--model", "tiny-random", "--dtype", "fp32", "--per-skill", "1"]
    assert main([*args, "--max-new-tokens", "4", "-o", str(out)]) == 0
    assert set(json.loads(out.read_text())["skills"]) >= {"arithmetic", "units", "format"}


def test_report_of_a_run(tmp_path, capsys):
    cfg = load_config(None, TINY + ["train.steps=1", "sft.steps=0", "eval.limit=0"])
    Trainer(cfg, run_dir=tmp_path / "run", progress=False, reward_fns=EXTRA_REWARDS).train()
    assert main(["report", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "report.html").is_file()
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no such run folder" in capsys.readouterr().err


def test_bad_input_is_one_line_and_exit_two(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("grpo:\n  betta: 0.1\n")
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'grpo.betta'; did you mean 'grpo.beta'" in err and "Traceback" not in err
