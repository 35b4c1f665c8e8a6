"""Every model class with every method config, and every shipped config, under 2-process
CPU (gloo) DDP: a few steps each, and both ranks end with identical parameters.

All runs share one process group (``tests/ddp_matrix.py`` under ``torch.distributed.run``),
so the matrix costs one launch. Each run trains 2 batches per task; image streams read
small files in the real on-disk formats.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, one_thread_env
from tests.test_streams import write_cifar, write_mnist, write_tiny

CONFIGS = ROOT / "configs"
METHODS = CONFIGS / "methods"
# the synthetic stream, tiny: 2 tasks of 64 samples, batch 8
TINY = ["--data.num_tasks", "2", "--data.train_per_task", "64", "--data.test_per_task", "32",
        "--data.input_dim", "8", "--data.num_classes", "4", "--data.epochs_per_task", "1",
        "--data.batch_size", "8"]
SMALL_AGENT = ["--model.net.init_args.dnc.memory_slots", "12",
               "--model.net.init_args.dnc.word_size", "8",
               "--model.net.init_args.dnc.hidden_size", "16",
               "--model.net.init_args.token_dim", "16", "--model.net.init_args.core_output", "16"]
SHORT_WARMUP = ["--trainer.callbacks.init_args.warmup_epochs", "0.5"]
LSTM = ["--model.net", "cl_lightning.models.agent.LSTMClassifier",
        "--model.net.num_tokens", "2", "--model.net.hidden_size", "16"]


def c(*files) -> list[str]:
    """``-c FILE`` for each config file (a path relative to configs/)."""
    return [arg for f in files for arg in ("-c", str(CONFIGS / f))]


def matrix_runs(roots: dict[str, str]) -> dict[str, list[str]]:
    mlp = [*c("synthetic_mlp.yaml"), *TINY, "--model.net.hidden", "[16]"]
    runs = {
        # model classes x method configs on the tiny synthetic stream
        "mlp": mlp,
        **{f"mlp+{m}": [*mlp, *c(f"methods/{m}.yaml")] for m in ("er", "per", "derpp", "joint")},
        "mlp+er+maml": [*mlp, *c("methods/er.yaml", "methods/maml.yaml")],
        "mlp+esmer": [*mlp, *c("split_mnist/esmer_200.yaml")],
        "agent": [*c("synthetic_agent.yaml"), *TINY, *SMALL_AGENT],
        "agent+derpp+maml+context": [*c("synthetic_agent.yaml"), *TINY, *SMALL_AGENT,
                                     *c("methods/derpp.yaml", "methods/maml.yaml",
                                        "methods/context.yaml")],
        "agent+esmer+maml+context": [*c("synthetic_agent.yaml"), *TINY, *SMALL_AGENT,
                                     *c("split_mnist/esmer_200.yaml", "methods/agent.yaml"),
                                     *SMALL_AGENT, *c("methods/maml.yaml", "methods/context.yaml")],
        "lstm+er+context": [*mlp, *LSTM, *c("methods/er.yaml", "methods/context.yaml")],
        # the default config: the full agent (recall, shuffled episodes, ER, MemoryMonitor)
        "default": [*c("synthetic.yaml"), *TINY, *SMALL_AGENT],
        "default+derpp": [*c("synthetic.yaml"), *TINY, *SMALL_AGENT, *c("methods/derpp.yaml")],
        "dnc_full": [*c("synthetic_dnc_full.yaml"), *TINY],
    }
    # every shipped stream config, alone and with each of its method configs, on small
    # files in the real formats: the same models and options, fewer tasks and pixels
    small_resnet = ["--model.net.init_args.width", "4"]
    small_cnn_agent = [*SMALL_AGENT, "--model.net.init_args.cnn_width", "4"]
    shrink = {
        "split_mnist": ["--data.root", roots["mnist"]],
        "permuted_mnist": ["--data.root", roots["mnist"], "--data.num_tasks", "2"],
        "rotated_mnist": ["--data.root", roots["mnist"], "--data.num_tasks", "2"],
        "split_cifar10": ["--data.root", roots["cifar10"], "--data.epochs_per_task", "1",
                          "--data.classes_per_task", "5"],
        "split_cifar100": ["--data.root", roots["cifar100"], "--data.epochs_per_task", "1",
                           "--data.classes_per_task", "50"],
        "split_tiny_imagenet": ["--data.root", roots["tiny"], "--data.epochs_per_task", "1",
                                "--data.classes_per_task", "100"],
    }
    images = ("split_cifar10", "split_cifar100", "split_tiny_imagenet")  # ResNet backbones
    for stream, small in shrink.items():
        small = [*small, "--data.download", "false"]
        runs[stream] = [*c(f"{stream}.yaml"), *small, *(small_resnet if stream in images else [])]
        for method in sorted((CONFIGS / stream).glob("*.yaml")):
            agent = "models.agent.MemoryAgent" in method.read_text()
            net = (small_cnn_agent if agent else small_resnet) if stream in images else []
            # one epoch per task: the ESMER configs' whole-epoch warm-up must shrink too
            warmup = (SHORT_WARMUP if stream in images and method.stem.startswith("esmer")
                      else [])
            runs[f"{stream}/{method.stem}"] = [*c(f"{stream}.yaml", f"{stream}/{method.name}"),
                                               *small, *net, *warmup]
    runs["split_mnist_agent"] = [*c("split_mnist_agent.yaml"), *shrink["split_mnist"],
                                 "--data.download", "false"]
    runs["split_cifar10/agent_cnn+esmer"] = [
        *c("split_cifar10.yaml", "split_cifar10/esmer_200.yaml", "methods/agent.yaml",
           "methods/agent_cnn.yaml"), *shrink["split_cifar10"], *small_cnn_agent,
        *SHORT_WARMUP, "--data.download", "false"]
    return runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.ddp
def test_every_model_and_method_and_shipped_config_runs_under_two_process_ddp(tmp_path):
    roots = {name: str(tmp_path / name) for name in ("mnist", "cifar10", "cifar100", "tiny")}
    write_mnist(roots["mnist"], train_per_class=20, test_per_class=4)
    write_cifar(roots["cifar10"], hundred=False, train_per_class=20, test_per_class=2)
    write_cifar(roots["cifar100"], hundred=True, train_per_class=2, test_per_class=1)
    write_tiny(roots["tiny"], train_per_class=1, val_per_class=1)
    runs = matrix_runs(roots)
    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps(runs))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(free_port()), "-m", "tests.ddp_matrix", str(spec), str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env=one_thread_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in runs:
        a, b = (torch.load(out / name / f"rank{r}.pt", weights_only=True) for r in (0, 1))
        assert a["parameters"], name
        for key in a["parameters"]:
            torch.testing.assert_close(a["net"][key], b["net"][key], rtol=0, atol=0,
                                       msg=f"{name}: {key}")
        results = json.loads((out / "logs" / name / "version_0" / "results.json").read_text())
        assert results["complete"], name
