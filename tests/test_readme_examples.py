"""The documented code examples run as printed: a user's own stream and a user's own
strategy, each taken from docs/extending.md, written to a module and used through the CLI."""

from __future__ import annotations

import re

import pytest
import torch

from cl_lightning.cli import main
from tests.conftest import QUIET_CPU, ROOT, read_results, run_cli, tensorboard_logger

DOC = ROOT / "docs" / "extending.md"  # where the examples live


def doc_python_block(after: str) -> str:
    """The first ```python block of docs/extending.md after the line containing ``after``."""
    text = DOC.read_text()
    start = text.index(after)
    match = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert match, f"no python block after {after!r} in {DOC.name}"
    return match.group(1)


@pytest.fixture
def module_from_docs(tmp_path, monkeypatch):
    """Write a documented block to ``tmp_path/NAME.py`` and make it importable."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def _write(name: str, after: str) -> None:
        (tmp_path / f"{name}.py").write_text(doc_python_block(after))
    return _write


def test_documented_own_stream_trains_through_the_cli(tmp_path, module_from_docs):
    module_from_docs("my_doc_stream", "## Your own stream")
    g = torch.Generator().manual_seed(0)
    y = torch.arange(6).repeat_interleave(500)
    prototypes = 3 * torch.randn(6, 32, generator=g)
    x = prototypes[y] + torch.randn(len(y), 32, generator=g)
    order = torch.randperm(len(y), generator=g)
    torch.save((x[order], y[order]), tmp_path / "my_data.pt")
    cli = main(["fit", *QUIET_CPU,
                "--model.net", "cl_lightning.models.backbones.MLP", "--model.net.hidden", "[32]",
                "--model.optimizer", "torch.optim.Adam", "--model.optimizer.lr", "0.01",
                "--data", "my_doc_stream.MyStream",
                "--data.path", str(tmp_path / "my_data.pt"), "--data.epochs_per_task", "1",
                "--data.batch_size", "32", "--evaluation.heatmap", "false",
                *tensorboard_logger(tmp_path, "own")])
    res = read_results(cli)
    assert res["num_tasks"] == 3 and res["complete"]
    assert res["stream"]["stream"] == "MyStream" and res["stream"]["path"].endswith("my_data.pt")
    matrix = res["accuracy_matrix"]
    # each pair of well-separated clusters is learned right after its task ...
    assert all(matrix[t][t] > 95 for t in range(3))
    # ... and the 200 held-out samples of each task are scored: percentages in steps of 0.5
    assert all((2 * a) == int(2 * a) for row in matrix for a in row)


def test_documented_strategy_plugs_in_and_anchors_the_weights(tmp_path, module_from_docs):
    module_from_docs("my_doc_strategy", "## Your own strategy")
    plain = read_results(run_cli(tmp_path / "plain"))
    anchored = read_results(run_cli(tmp_path / "anchored",
                                    "--trainer.callbacks+=my_doc_strategy.L2Anchor",
                                    "--trainer.callbacks.strength", "1.0"))
    # pulled towards the previous task's weights, the model forgets less of it
    assert anchored["forgetting"] < plain["forgetting"] - 20  # measured: 6.3 vs 42.2
