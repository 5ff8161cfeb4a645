import json

import pytest
import torch

from deepsynapse.checkpoint import (
    CheckpointError,
    complete_checkpoints,
    latest_checkpoint,
    load_tree,
    save_tree,
    write_checkpoint,
)


def test_tree_round_trip_without_pickle(tmp_path):
    tree = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.99), "params": [0]}],
        "name": None,
    }
    save_tree(tree, tmp_path, "opt")
    back = load_tree(tmp_path, "opt")
    assert back["param_groups"][0]["betas"] == (0.9, 0.99)
    assert torch.equal(back["state"][0]["exp_avg"], tree["state"][0]["exp_avg"])
    assert json.loads((tmp_path / "opt.json").read_text())  # structure is plain JSON


def test_failed_write_keeps_previous(tmp_path):
    root = tmp_path / "ckpt"
    write_checkpoint(root, 1, lambda d: (d / "x").write_text("one"), keep=2)

    def broken(d):
        (d / "x").write_text("partial")
        raise OSError("No space left on device")

    with pytest.raises(CheckpointError, match="No space left"):
        write_checkpoint(root, 2, broken, keep=2)
    assert latest_checkpoint(root).name == "step-1"
    assert not any(p.name.startswith(".tmp") for p in root.iterdir())


def test_incomplete_folder_is_ignored_and_old_ones_pruned(tmp_path):
    root = tmp_path / "ckpt"
    for s in (1, 2, 3):
        write_checkpoint(root, s, lambda d: None, keep=2)
    (root / "step-9").mkdir()  # no COMPLETE marker: a kill mid-save
    assert [p.name for p in complete_checkpoints(root)] == ["step-2", "step-3"]
    assert latest_checkpoint(root).name == "step-3"


def test_a_pinned_checkpoint_survives_rotation(tmp_path):
    """step-0 (the warm-up's end, where GRPO starts) is kept beside the newest ones."""
    root = tmp_path / "ckpt"
    for s in (0, 5, 10, 15):
        write_checkpoint(root, s, lambda d: None, keep=1, pinned=(0,))
    assert [p.name for p in complete_checkpoints(root)] == ["step-0", "step-15"]
    assert latest_checkpoint(root).name == "step-15"
