"""Two-process DDP on CPU (gloo) through the real CLI."""

import glob
import json
import os

import pytest
import torch

from tests.conftest import run_train


@pytest.mark.slow
@pytest.mark.ddp
def test_two_process_ddp_run_with_replay_checkpoints_both_shards(tmp_path):
    proc = run_train("--trainer.callbacks+=callbacks.replay.ExperienceReplay",
                     "--trainer.callbacks.capacity", "60",
                     "--trainer.callbacks.replay_batch_size", "8",
                     "--trainer.logger.save_dir", str(tmp_path),
                     # rank 0's progress bar reads the epoch's metrics before the other
                     # rank's epoch-end collectives: no metric read there may communicate
                     "--trainer.enable_progress_bar", "true", ddp_devices=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = glob.glob(os.path.join(str(tmp_path), "*", "version_0"))
    with open(os.path.join(run_dir, "results.json")) as f:
        res = json.load(f)
    assert len(res["accuracy_matrix"]) == 3 and res["complete"]
    state = torch.load(os.path.join(run_dir, "checkpoints", "last.ckpt"), weights_only=True)
    (replay,) = [v for k, v in state["callbacks"].items() if "Replay" in k]
    buf = replay["buffer"]
    # each rank holds capacity // 2 = 30 items: 60 only if both shards are in the checkpoint
    # (the same sample may sit in both shards: the ranks see different halves each epoch)
    assert buf["shards"] == 2 and buf["size"] == 60 and len(buf["data"]["x"]) == 60
