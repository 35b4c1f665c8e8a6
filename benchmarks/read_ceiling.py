"""How much could any nearest-neighbour read of the replay buffer add to a trained model?

For finished runs (each a log directory with ``config.yaml`` and ``checkpoints/last.ckpt``)
the script scores, on every task's test set after the stream, each evaluated model (the
working net and a strategy's EMA models) alone, a k-nearest-neighbour vote over the final
replay buffer alone, and the product of the two (the model's log-softmax plus ``lambda``
times the vote's log-odds, :func:`~cl_lightning.models.recall.recall_log_votes`, as the
recall agent's head combines them) for every ``lambda``. The best product over ``lambda``,
chosen on the test set itself, is an upper bound on what a read of that buffer adds to the
model by voting:

    python benchmarks/read_ceiling.py --data-root data --runs logs/split_mnist/version_0 \
        --keys input features --k 8 20

Prints a markdown table per key: run, model, model alone, vote alone, the product for each
lambda, and the best product's gain. Works for the class-IL (all classes) scenario's logits
as the stream defines them; the buffer must hold inputs and labels (every replay strategy).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from knn_vote import knn_votes  # noqa: E402

from cl_lightning.cli import ContinualCLI  # noqa: E402
from cl_lightning.models.recall import recall_log_votes  # noqa: E402

FIT_ONLY = ("ckpt_path", "weights_only")


def load_run(run: Path, data_root: str | None) -> ContinualCLI:
    """The run's learner, stream and callbacks rebuilt from its config, with the last
    checkpoint's weights and strategy state loaded (``data_root``: the stream's
    ``data.root``, None for a stream without one)."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    for key in FIT_ONLY:
        config.pop(key, None)
    with tempfile.TemporaryDirectory() as tmp:  # validate's own outputs go there
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        cli = ContinualCLI(
            args=["-c", str(path),
                  *([] if data_root is None else ["--data.root", data_root,
                                                  "--data.download", "false"]),
                  "--trainer.logger", "false", "--trainer.default_root_dir", tmp,
                  "--evaluation.print_table", "false", "--evaluation.heatmap", "false"],
            run=False, save_config_callback=None)
        ckpt = run / "checkpoints" / "last.ckpt"
        # validate restores the weights and every strategy's state (buffer, EMA models)
        cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path=str(ckpt),
                             verbose=False)
    return cli


@torch.no_grad()
def batched(fn, x: torch.Tensor, size: int = 1000) -> torch.Tensor:
    return torch.cat([fn(x[i:i + size]) for i in range(0, len(x), size)])


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * (logits.argmax(1) == y).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", required=True, help="run log directories")
    ap.add_argument("--data-root", required=True, help="the stream's data.root")
    ap.add_argument("--keys", nargs="+", default=["input", "features"],
                    choices=["input", "features"],
                    help="search by the raw input or by each model's own features")
    ap.add_argument("--k", type=int, nargs="+", default=[8])
    ap.add_argument("--sharpness", type=float, default=10.0)
    ap.add_argument("--models", nargs="+", default=None,
                    help="score only these models (working, stable, plastic, ...); default all")
    ap.add_argument("--lambdas", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0])
    args = ap.parse_args()

    rows: dict[str, list[str]] = {key: [] for key in args.keys}
    for run in map(Path, args.runs):
        cli = load_run(run, args.data_root)
        learner, dm = cli.model, cli.datamodule
        dm.setup("fit")
        test = [v.__getitems__(list(range(len(v)))) for v in dm.test_sets()]
        x = torch.cat([b["x"] for b in test])
        y = torch.cat([b["y"] for b in test])
        store = learner.store()
        if store is None:
            raise SystemExit(f"{run}: the run keeps no replay buffer to read")
        sx, sy = store["x"].float(), store["y"]
        models: dict[str, nn.Module] = {"working": learner.net}
        for plugin in learner.plugins():
            models.update(plugin.eval_models(learner))
        classes = learner.stream.num_classes
        label = f"{run.parent.name}/{run.name}"
        for name, model in models.items():
            if args.models is not None and name not in args.models:
                continue
            model.eval()
            logits = batched(model, x).log_softmax(1)
            alone = accuracy(logits, y)
            for key in args.keys:
                if key == "input":
                    q, keys = x.flatten(1).float(), sx.flatten(1)
                else:
                    q, keys = batched(model.features, x), batched(model.features, sx)
                for k in args.k:
                    votes = recall_log_votes(knn_votes(keys, sy, q, k, args.sharpness, classes))
                    products = [accuracy(logits + lam * votes, y) for lam in args.lambdas]
                    rows[key].append(
                        f"| {label} | {name} | {k} | {alone:.1f} | {accuracy(votes, y):.1f} | "
                        + " | ".join(f"{p:.1f}" for p in products)
                        + f" | {max(products) - alone:+.1f} |")
    lam_cols = " | ".join(f"λ {lam:g}" for lam in args.lambdas)
    for key, lines in rows.items():
        print(f"\nkey: {key}\n")
        print(f"| run | model | k | model alone | vote alone | {lam_cols} | best gain |")
        print("|---|---|---|---|---|" + "---|" * len(args.lambdas) + "---|")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
