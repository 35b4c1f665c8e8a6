"""MAML and memory as context through the CLI: few-shot results, replay, DDP."""

import os

import pytest
import torch

from tests.conftest import read_results

AGENT = ["--model.net", "cl_lightning.models.agent.MemoryAgent",
         "--model.net.dnc.memory_slots", "8", "--model.net.dnc.word_size", "4",
         "--model.net.dnc.read_heads", "1", "--model.net.dnc.hidden_size", "12",
         "--model.net.core_output", "12", "--model.net.token_dim", "8",
         "--model.net.num_tokens", "2"]
META = ["--model.meta", "cl_lightning.meta.MetaLearning", "--model.meta.steps", "2",
        "--model.meta.lr", "0.1", "--model.meta.learn_lr", "true"]
ER = ["--trainer.callbacks+=callbacks.replay.ExperienceReplay",
      "--trainer.callbacks.capacity", "60", "--trainer.callbacks.replay_batch_size", "8"]


def test_meta_context_and_replay_give_few_shot_results_for_every_task(tiny_run):
    cli = tiny_run(*AGENT, *META, "--model.context", "true", *ER,
                   "--evaluation.few_shot_shots", "[2, 5]")
    res = read_results(cli)
    fs = res["few_shot"]
    assert fs["after_task"] == 2 and fs["shots"] == [2, 5]
    assert fs["examples_from"] == "replay buffer"
    tasks = fs["tasks"]["domain_il"]
    # "before" is the model as evaluated for the accuracy matrix's last row
    assert tasks["before"] == pytest.approx(res["accuracy_matrix"][-1])
    assert set(tasks) == {"before"} | {f"{m}/{n}" for m in ("inner", "context", "both")
                                       for n in (2, 5)}
    assert all(a is not None and 0 <= a <= 100 for accs in tasks.values() for a in accs)
    held = fs["heldout"]["domain_il"]
    assert set(held) == set(tasks) and all(a is not None for a in held.values())
    # the learned inner step sizes trained, and are in the checkpoint
    ckpt = torch.load(os.path.join(cli.trainer.log_dir, "checkpoints", "last.ckpt"),
                      weights_only=True)
    lrs = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("meta.step_lrs.")}
    assert lrs and any(not torch.allclose(v, torch.full_like(v, 0.1)) for v in lrs.values())


def test_without_kept_samples_trained_tasks_have_no_adapted_accuracy(tiny_run):
    cli = tiny_run("--evaluation.few_shot_shots", "[3]")
    fs = read_results(cli)["few_shot"]
    tasks = fs["tasks"]["domain_il"]
    assert fs["examples_from"] is None
    assert set(tasks) == {"before", "inner/3"}  # an MLP reads no context
    assert tasks["inner/3"] == [None, None, None]
    assert fs["heldout"]["domain_il"]["inner/3"] is not None  # its own training set
