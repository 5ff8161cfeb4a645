from pathlib import Path

import pytest

from deepsynapse.config import Config, ConfigError, load_config


def test_defaults_and_overrides():
    cfg = load_config(
        None, ["grpo.beta=0.1", "rollout.num_generations=8", "lora.target_modules=[q_proj, v_proj]"]
    )
    assert cfg.grpo.beta == 0.1 and cfg.rollout.num_generations == 8
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert isinstance(cfg, Config)


def test_unknown_key_names_nearest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'grpo.betta'; did you mean 'grpo.beta'"):
        load_config(None, ["grpo.betta=0.1"])
    f = tmp_path / "c.yaml"
    f.write_text("rollout:\n  temprature: 0.5\n")
    with pytest.raises(
        ConfigError, match=r"c.yaml: unknown key 'rollout.temprature'.*rollout.temperature"
    ):
        load_config(f)


@pytest.mark.parametrize(
    "override, message",
    [
        ("grpo.beta=abc", r"grpo.beta: got 'abc', expected a number"),
        ("train.steps=1.5", r"train.steps: got 1.5, expected an integer"),
        (
            "grpo.advantage=ppo",
            r"grpo.advantage: got 'ppo', expected one of 'grpo', 'dr_grpo', 'batch'",
        ),
        ("model.gradient_checkpointing=3", r"expected true or false"),
        ("rollout.num_generations=1", r"rollout.num_generations: got 1, expected >= 2"),
        ("grpo=3", r"grpo: got int, expected a mapping"),
        ("novalue", r"expected key.sub=value"),
        (
            "data.eval_difficulty=[3, 1]",
            r"data.eval_difficulty: got \[3, 1\], expected \[min, max\] with 1 <= min <= max",
        ),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_yaml_that_is_not_a_mapping(tmp_path):
    f = tmp_path / "list.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="list.yaml: expected a mapping"):
        load_config(f)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty).grpo.beta == Config().grpo.beta


def test_batch_plan_refuses_and_suggests():
    cfg = load_config(None, ["grpo.prompts_per_step=5"])
    with pytest.raises(
        ConfigError,
        match=r"prompts_per_step=5 does not divide over 2 processes; use grpo.prompts_per_step=4 or 6",
    ):
        cfg.batch_plan(2)
    cfg = load_config(None, ["grpo.prompts_per_step=4", "grpo.micro_batch_size=3"])
    plan = cfg.batch_plan(2)
    assert (plan.prompts_per_process, plan.completions_per_process, plan.micro_batches) == (2, 8, 3)
    assert "4 prompts x 4 completions = 16 completions over 2 process(es)" in plan.describe()


def test_shipped_recipes_load():
    for name in ("configs/demo-cpu.yaml", "configs/hour-cpu.yaml", "configs/gsm8k-gpu.yaml"):
        load_config(Path(__file__).resolve().parents[1] / name)


def test_default_ranks_beside_explicit_phases_must_agree():
    """default_ranks shapes only the derived phases: beside explicit ones it would be ignored."""
    recipe = Path(__file__).resolve().parents[1] / "configs/hour-cpu.yaml"
    load_config(recipe, ["control.curriculum.default_ranks=[16, 24, 32]"])  # the phases' ranks
    with pytest.raises(
        ConfigError,
        match=r"default_ranks: \[8, 12, 16\] applies to the default phases.*"
        r"lora_rank \[16, 24, 32\]",
    ):
        load_config(recipe, ["control.curriculum.default_ranks=[8, 12, 16]"])


def test_config_is_frozen_after_validation():
    import dataclasses

    import pytest

    cfg = load_config(None, ["grpo.beta=0.02"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.grpo.beta = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.grpo = None


def test_training_difficulty_leaves_the_held_out_set_of_record_alone():
    """Training on harder problems must not change what the run is evaluated on: with
    ``data.eval_difficulty`` the held-out set stays the default's while training draws change."""
    from deepsynapse.rl.setup import build_problems

    def ids(cfg: Config, split: str) -> list[str]:
        return [p.question for p in build_problems("synthetic", split, cfg)[0][:300]]

    default = load_config(None, [])
    harder = load_config(None, ["data.synthetic_difficulty=[2, 3]"])
    pinned_overrides = ["data.synthetic_difficulty=[2, 3]", "data.eval_difficulty=[1, 3]"]
    pinned = load_config(None, pinned_overrides)
    assert ids(pinned, "test") == ids(default, "test")
    assert ids(harder, "test") != ids(default, "test")  # without it the set follows training
    assert ids(pinned, "train") == ids(harder, "train") != ids(default, "train")

    # the model card names the set it was scored on, not the training draw's
    from deepsynapse.export import _data_line

    synthetic = ["data.train=synthetic", "data.eval=synthetic", "sft.steps=0"]
    card = _data_line(load_config(None, [*synthetic, *pinned_overrides]))
    assert "GRPO on synthetic arithmetic word problems (2-3 steps)" in card
    assert "evaluated on synthetic arithmetic word problems (1-3 steps)" in card


def test_synthetic_variants_vary_training_draws_and_never_the_held_out_set():
    from deepsynapse.rl.setup import build_problems

    default = load_config(None, [])
    varied = load_config(None, ["data.synthetic_variants=0.5"])

    def problems(cfg: Config, split: str):
        return build_problems("synthetic", split, cfg)[0][:300]

    assert problems(varied, "test") == problems(default, "test")
    train = problems(varied, "train")
    share = sum("variant" in p.columns for p in train) / len(train)
    assert 0.4 < share < 0.6
    unvaried = {p.id: p for p in build_problems("synthetic", "train", default)[0]}
    assert all(unvaried[p.id] == p for p in train if "variant" not in p.columns)
    from deepsynapse.export import _data_line

    synthetic = ["data.train=synthetic", "data.eval=synthetic", "sft.data=synthetic", "sft.steps=9"]
    card = _data_line(load_config(None, [*synthetic, "data.synthetic_variants=0.5"]))
    assert card.count("(1-3 steps, 50% varied as SVAMP varies problems)") == 2  # warm-up, GRPO
    assert "evaluated on synthetic arithmetic word problems (1-3 steps) (test split)" in card
    with pytest.raises(ConfigError, match="data.synthetic_variants: got 1.5"):
        load_config(None, ["data.synthetic_variants=1.5"])
    compare = load_config(
        None, ["data.synthetic_variants=0.5", "data.synthetic_variant_kinds=[compare]"]
    )
    assert {p.columns.get("variant") for p in problems(compare, "train")} == {None, "compare"}
    assert problems(compare, "test") == problems(default, "test")
    card = _data_line(
        load_config(
            None,
            [*synthetic, "data.synthetic_variants=0.1", "data.synthetic_variant_kinds=[compare]"],
        )
    )
    assert "(1-3 steps, 10% varied as SVAMP varies problems (compare))" in card
    with pytest.raises(ConfigError, match="data.synthetic_variant_kinds: variant kinds must be"):
        load_config(None, ["data.synthetic_variant_kinds=[compared]"])
