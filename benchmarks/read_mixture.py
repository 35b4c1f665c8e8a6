"""What the read mixture (:mod:`cl_lightning.read_mixture`) changes, post hoc, on finished
runs of a recalling agent: each evaluated model read without it, with the store-wide
weight and with the per-query gate, next to the memory's vote alone.

Two stores per run (each a log directory with ``config.yaml`` and ``checkpoints/last.ckpt``):

* the stream's test sets read from the final replay buffer (the stream's own accuracy, as
  the evaluation after the last task measures it, in the stream's own scenario);
* for a domain-IL stream, its held-out task read from ``--per-class`` of its training items
  per class, over ``--draws`` draws (the few-shot metric's ``recall/n``, averaged).

    python benchmarks/read_mixture.py --runs logs/synthetic/version_0 --per-class 5 --draws 5

Prints a markdown table: run, model, store, then accuracy (%) of the memory's vote alone,
the model without the mixture, with ``gate store``, with ``gate local``, and with ``gate
store`` without the jackknife correction.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from read_ceiling import load_run  # noqa: E402

from cl_lightning.few_shot import pick_shots  # noqa: E402
from cl_lightning.read_mixture import ReadMixture  # noqa: E402

GATES = {"none": None, "store": ReadMixture("store"), "local": ReadMixture("local"),
         "store, no jackknife": ReadMixture("store", jackknife=False)}


@torch.no_grad()
def scores(learner, model, store: dict, x: torch.Tensor, y: torch.Tensor,
           task: torch.Tensor) -> dict[str, float]:
    """Accuracy (%) in the stream's own scenario of the vote alone and of ``model`` read
    from ``store`` under each gate."""
    mode = learner.eval_modes()[0]
    out = {}
    index = learner.index_store(store)
    for name, mixture in GATES.items():
        learner.read_mixture = mixture
        read = learner.reader(model, store=store, index=index)
        logits = torch.cat([read(x[i:i + 1000]) for i in range(0, len(x), 1000)])
        shown = learner.mode_logits(logits, task, mode)
        out[name] = 100.0 * float((shown.argmax(1) == y).float().mean())
    votes = []
    for i in range(0, len(x), 1000):
        part = x[i:i + 1000]
        recall = learner.retrieve(part, part, store, *index)
        votes.append(learner.votes_of(model)(part, recall))
    shown = learner.mode_logits(torch.cat(votes), task, mode)
    out["vote"] = 100.0 * float((shown.argmax(1) == y).float().mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", required=True, help="run log directories")
    ap.add_argument("--data-root", default=None, help="the stream's data.root, if it has one")
    ap.add_argument("--per-class", type=int, default=5)
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--models", nargs="+", default=None,
                    help="score only these models (working, stable, plastic, ...); default all")
    args = ap.parse_args()
    lines = ["| run | model | store | vote alone | no mixture | gate store | gate local "
             "| gate store, no jackknife |", "|---|---|---|---|---|---|---|---|"]
    for run in map(Path, args.runs):
        cli = load_run(run, args.data_root)
        learner, dm = cli.model, cli.datamodule
        if not learner.recalling:
            raise SystemExit(f"{run}: the agent does not recall (recall_slots 0)")
        dm.setup("fit")
        test = [v.__getitems__(list(range(len(v)))) for v in dm.test_sets()]
        x, y, task = (torch.cat([b[k] for b in test]) for k in ("x", "y", "task"))
        buffer = {k: v.to(learner.device) for k, v in learner.store().items()}
        heldout = dm.heldout_task() if learner.stream.scenario == "domain-il" else None
        models = {"working": learner.net}
        for plugin in learner.plugins():
            models.update(plugin.eval_models(learner))
        label = f"{run.parent.name}/{run.name}"
        for name, model in models.items():
            if args.models is not None and name not in args.models:
                continue
            model.eval()
            rows = [("final buffer, every task", scores(learner, model, buffer, x, y, task))]
            if heldout is not None:
                hx, hy = (torch.cat(t) for t in zip(*DataLoader(heldout.test, batch_size=1000),
                                                   strict=True))
                draws = []
                for draw in range(args.draws):
                    g = torch.Generator().manual_seed(draw)
                    idx = pick_shots(heldout.train_targets, args.per_class, g)
                    items = [heldout.train[int(i)] for i in idx]
                    store = {"x": torch.stack([torch.as_tensor(a) for a, _ in items]),
                             "y": torch.as_tensor([int(b) for _, b in items])}
                    draws.append(scores(learner, model, store, hx, hy, torch.zeros_like(hy)))
                mean = {k: sum(d[k] for d in draws) / len(draws) for k in draws[0]}
                rows.append((f"held-out task, {args.per_class} per class, "
                             f"{args.draws} draws", mean))
            for where, s in rows:
                lines.append(f"| {label} | {name} | {where} | {s['vote']:.1f} | {s['none']:.1f} "
                             f"| {s['store']:.1f} | {s['local']:.1f} "
                             f"| {s['store, no jackknife']:.1f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
