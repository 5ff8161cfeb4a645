"""The batch contract: select and concat are generic over its fields, none can be dropped."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from deepsynapse.data.problems import Problem
from deepsynapse.rl.batch import GROUP, META, ROW, GroupBatch, concat_batches, select_groups
from deepsynapse.rollout.hf import RolloutOutput

PAD = 7


def _batch(b: int, g: int, p_len: int, t_len: int, tag: int) -> GroupBatch:
    n = b * g
    rows = torch.arange(n) + 100 * tag
    return GroupBatch(
        problems=[Problem(f"{tag}-{i}", "q", "1", "s", 1, "test") for i in range(b)],
        prompts=[f"prompt {tag}-{i}" for i in range(b)],
        rollout=RolloutOutput(
            prompt_ids=rows[:, None].repeat(1, p_len),
            prompt_mask=torch.ones(n, p_len, dtype=torch.long),
            completion_ids=torch.cat(
                [rows[:, None].repeat(1, t_len - 1), torch.full((n, 1), PAD)], 1
            ),
            completion_mask=torch.cat(
                [torch.ones(n, t_len - 1, dtype=torch.long), torch.zeros(n, 1, dtype=torch.long)], 1
            ),
            texts=[f"c{r}" for r in rows.tolist()],
            truncated=rows % 2 == 0,
        ),
        scores={"a": [float(r) for r in rows.tolist()]},
        correct=(rows % 3 == 0).float(),
        reward=rows.float(),
        parsed=[f"parsed{r}" for r in rows.tolist()],
        advantages=rows.float() / 10,
        calibrated={"a": [float(r) / 2 for r in rows.tolist()]},
        ref_logp=-rows[:, None].float().repeat(1, t_len),
        sampler_logp=-rows[:, None].float().repeat(1, t_len) / 2,
        reward_metrics={"m": float(tag)},
    )


def test_every_field_declares_its_axis():
    for f in dataclasses.fields(GroupBatch):
        assert f.metadata.get("axis") in (GROUP, ROW, META), f.name


def test_select_keeps_every_field_ref_logp_included():
    batch = _batch(3, 2, 4, 5, tag=0)
    out = select_groups(batch, torch.tensor([True, False, True]), 2)
    assert [p.id for p in out.problems] == ["0-0", "0-2"]
    assert out.rollout.texts == ["c0", "c1", "c4", "c5"]
    for f in dataclasses.fields(GroupBatch):
        value = getattr(out, f.name)
        assert value is not None, f"{f.name} dropped"
    assert out.ref_logp[:, 0].tolist() == [0.0, -1.0, -4.0, -5.0]
    assert out.advantages.tolist() == pytest.approx([0.0, 0.1, 0.4, 0.5])
    assert out.calibrated["a"] == [0.0, 0.5, 2.0, 2.5]
    assert out.parsed == ["parsed0", "parsed1", "parsed4", "parsed5"]
    assert out.reward_metrics == {"m": 0.0}


def test_concat_pads_each_field_on_its_side():
    a, b = _batch(1, 2, 3, 4, tag=1), _batch(1, 2, 5, 6, tag=2)
    out = concat_batches([a, b])
    r = out.rollout
    assert r.prompt_ids.shape == (4, 5) and r.completion_ids.shape == (4, 6)
    assert r.prompt_mask[0].tolist() == [0, 0, 1, 1, 1]  # prompts pad on the left
    assert r.prompt_ids[0, :2].tolist() == [PAD, PAD]  # with the rollout's pad id
    assert r.completion_mask[0].tolist() == [1, 1, 1, 0, 0, 0]  # completions on the right
    assert out.ref_logp.shape == (4, 6) and out.ref_logp[0, -1] == 0
    assert out.reward.tolist() == [100.0, 101.0, 200.0, 201.0]
    assert out.scores["a"] == [100.0, 101.0, 200.0, 201.0]
    assert [p.id for p in out.problems] == ["1-0", "2-0"]
    assert out.reward_metrics == {"m": 2.0}


def test_concat_refuses_a_field_set_in_only_some_parts():
    a, b = _batch(1, 2, 3, 4, tag=1), _batch(1, 2, 3, 4, tag=2)
    b.ref_logp = None
    with pytest.raises(ValueError, match="some parts"):
        concat_batches([a, b])


def test_to_moves_nested_tensors_and_keeps_the_rest():
    batch = _batch(1, 2, 3, 4, tag=0)
    moved = batch.to("cpu")
    assert moved.rollout.texts == batch.rollout.texts and moved.problems == batch.problems
    assert moved.ref_logp.device.type == "cpu"
