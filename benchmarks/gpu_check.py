"""Throughput on one GPU: the DNC's tokens/s, and the full agent's images/s on Split-CIFAR-10.

Two parts, each printed as a markdown table (and appended to ``--out``):

1. **DNC** at the seed's sizes (T=20, N=128, W=64, R=4, controller 128, one write head) for
   every batch of ``--batches`` (default 32 and 256): forward+backward (of the mean squared
   output) and forward only, in float32 and under bf16 autocast (the controller's matmuls in
   bf16, the memory in float32), for the default DNC (``fused``) and the plain-autograd one;
   with ``--compile`` also ``compile_step`` (each time step one inductor graph: Triton
   kernels on a GPU; float32 forward+backward only, after part 2, as compiling is slow).
   With ``--graphs`` also the default DNC with ``cuda_graphs=True`` (its forward and
   backward over the sequence replayed from two CUDA graphs) against the same DNC run
   eagerly; its output and gradients are compared with the eager ones. Before that, one eager
   forward+backward runs under ``torch.cuda.set_sync_debug_mode("error")``: no operation
   of the DNC may wait for the device (a wait would also make the capture fail).
   ``tokens/s`` counts one token per sequence and time step: B / (ms per step). Variants
   are timed interleaved (:func:`dnc_speed.time_interleaved`) after two warm-up calls.
2. **Full agent on Split-CIFAR-10** (``configs/split_cifar10/agent_200.yaml``: MemoryAgent
   with a reduced ResNet-18 encoder, recall of 8 neighbours, CLS-ER 200, ER-ACE), one
   ``train.py fit`` subprocess per row on random images written in CIFAR-10's on-disk format
   (the pixels do not change the arithmetic). ``img/s`` is the stream's batch over the
   median wall time between consecutive training steps (:class:`StepTimer`: forward,
   backward, optimizer, replay draw, buffer insert and data fetch; not the task-end
   evaluation, nor the first step of a task); ``avg acc`` is the run's final average
   accuracy (on random images: a check that two rows compute alike, not a result). Rows:
   float32 (the DNC replayed from CUDA graphs, its default), the eager DNC,
   ``--trainer.precision bf16-mixed``, one-GPU DDP (``--trainer.strategy ddp
   --trainer.devices 1``), the agent without its read
   (``recall_slots 0``), and, for scale, the stream's reduced ResNet-18 alone with ER 200.

Nothing here is needed by the tests; it runs on a CPU too (``--device cpu``, small sizes,
to check the script). Command (about 5 minutes on one H200)::

    python benchmarks/gpu_check.py --compile --out gpu_check.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from dnc_speed import build, step_fn, time_interleaved  # noqa: E402

from tests.test_streams import write_cifar  # noqa: E402  (the real on-disk format)

# train.py, with torchvision's md5 check of the CIFAR files off (the files are random).
UNCHECKED_TRAIN = ("from datamodules.cifar import SplitCIFAR10; "
                   "from tests.test_streams import UncheckedCIFAR10; "
                   "SplitCIFAR10.dataset_cls = UncheckedCIFAR10; "
                   "from cl_lightning.cli import main; main()")
STREAM = ("configs/split_cifar10.yaml", "configs/split_cifar10/agent_200.yaml")
AGENT_ROWS = {  # label: extra CLI args over STREAM
    "agent, float32": [],
    "agent, float32, eager DNC (cuda_graphs false)": [
        "--model.net.init_args.dnc.cuda_graphs=false"],
    "agent, bf16-mixed (eager DNC: no graphs under autocast)": [
        "--trainer.precision=bf16-mixed"],
    "agent, float32, DDP on 1 device": ["--trainer.strategy=ddp", "--trainer.devices=1"],
    "agent without its read (recall_slots 0), float32": [
        "--model.net.init_args.recall_slots=0"],
    "reduced ResNet-18 + ER 200 (no agent), float32": [
        "--model.net=cl_lightning.models.resnet.ResNet18", "--model.net.init_args.width=20",
        "--model.ace=false", "--trainer.callbacks=callbacks.replay.ExperienceReplay",
        "--trainer.callbacks.init_args.capacity=200",
        "--trainer.callbacks.init_args.replay_batch_size=32"],
}


def emit(text: str, out: Path | None) -> None:
    print(text, flush=True)
    if out is not None:
        with out.open("a") as f:
            f.write(text + "\n")


def dnc_table(args: argparse.Namespace, compiled: bool) -> str:
    """ms per time step and tokens/s of the DNC variants at every batch size."""
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sizes = argparse.Namespace(hidden=128, memory_slots=args.memory_slots, word_size=64,
                               read_heads=4, write_heads=1, input_size=16, output_size=16)
    kinds = ["fused"] if compiled else ["fused", "autograd"]
    rows = ["| variant | B | precision | pass | ms/step | tokens/s |",
            "|---|---:|---|---|---:|---:|"]
    for batch in args.batches:
        x = torch.randn(batch, args.steps, sizes.input_size, device=device)
        runs, labels = {}, {}
        for kind in kinds:
            model = build(sizes, kind, compiled).to(device)
            for precision in ("float32",) if compiled else ("float32", "bf16"):
                for backward in (True,) if compiled else (True, False):
                    run = step_fn(model, x, backward, False)
                    if precision == "bf16":
                        run = autocast(run, device.type)
                    name = f"{kind}/{precision}/{backward}"
                    runs[name] = run
                    labels[name] = (("compile_step, " if compiled else "") + kind, precision,
                                    "fwd+bwd" if backward else "fwd")
        t0 = time.perf_counter()
        for run in runs.values():
            run()
            run()
        sync()
        warm = time.perf_counter() - t0
        stats = time_interleaved(runs, args.repeats, args.steps, sync)
        for name, (label, precision, pass_) in labels.items():
            ms = stats[name]["wall"]
            rows.append(f"| {label} | {batch} | {precision} | {pass_} | {ms:.3f} | "
                        f"{batch * 1e3 / ms:,.0f} |")
        if compiled:
            rows.append(f"| (compile and warm-up of the rows above: {warm:.0f} s) | {batch} "
                        "| | | | |")
    return "\n".join(rows)


def graph_table(args: argparse.Namespace) -> str:
    """Eager against ``cuda_graphs=True`` forward+backward of the default DNC, float32."""
    device = torch.device("cuda")
    sizes = argparse.Namespace(hidden=128, memory_slots=args.memory_slots, word_size=64,
                               read_heads=4, write_heads=1, input_size=16, output_size=16)
    rows = ["| variant | B | ms/step | tokens/s | y: max abs diff to eager "
            "| gradients: max abs diff to eager |",
            "|---|---:|---:|---:|---:|---:|"]
    for batch in args.batches:
        x = torch.randn(batch, args.steps, sizes.input_size, device=device)
        eager = build(sizes, "fused").to(device)
        if batch == args.batches[0]:
            torch.cuda.set_sync_debug_mode("error")
            try:
                eager(x)[0].square().mean().backward()
                verdict = "no host synchronisation"
            except RuntimeError as error:
                verdict = f"a synchronisation: {str(error).splitlines()[0]}"
            finally:
                torch.cuda.set_sync_debug_mode("default")
            rows.insert(0, f"Eager forward+backward under sync debug mode 'error': {verdict}.\n")
        graphed = build(sizes, "fused").to(device)
        graphed.cuda_graphs = True  # build() makes eager DNCs
        graphed.load_state_dict(eager.state_dict())
        outputs = {}
        for name, model in (("eager", eager), ("graph", graphed)):
            for _ in range(2):  # the graphed model captures on the first call, replays next
                model.zero_grad(set_to_none=True)
                y = model(x)[0]
                y.square().mean().backward()
            outputs[name] = (y.detach().clone(), [p.grad.clone() for p in model.parameters()])
        y_diff = (outputs["eager"][0] - outputs["graph"][0]).abs().max().item()
        g_diff = max((a - b).abs().max().item()
                     for a, b in zip(outputs["eager"][1], outputs["graph"][1], strict=True))
        runs = {name: step_fn(model, x, True, False)
                for name, model in (("eager", eager), ("graph", graphed))}
        stats = time_interleaved(runs, args.repeats, args.steps, torch.cuda.synchronize)
        for name, label in (("eager", "fused, eager"), ("graph", "fused, `cuda_graphs=True`")):
            ms = stats[name]["wall"]
            diffs = ("| | " if name == "eager" else f"| {y_diff:.1e} | {g_diff:.1e} ")
            rows.append(f"| {label} | {batch} | {ms:.3f} | {batch * 1e3 / ms:,.0f} {diffs}|")
    return "\n".join(rows)


def autocast(run, device_type: str):
    def wrapped() -> None:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            run()
    return wrapped


class StepTimer(Callback):
    """Wall time between consecutive training batch starts of an epoch (the device
    synchronised first): one step of the training loop, data fetch and buffer insert
    included, the task-end evaluation not. Writes the list to ``path`` when fit ends."""

    def __init__(self, path: str) -> None:
        self.path, self.intervals, self.last = path, [], None

    def _now(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.last = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = self._now()
        if self.last is not None:
            self.intervals.append(now - self.last)
        self.last = now

    def on_fit_end(self, trainer, pl_module) -> None:
        Path(self.path).write_text(json.dumps(self.intervals))


def agent_row(label: str, extra: list[str], data_root: Path, args: argparse.Namespace) -> str:
    """One ``train.py fit`` of the agent on the fake Split-CIFAR-10: its training images/s
    from the median step."""
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        command = [sys.executable, "-c", UNCHECKED_TRAIN, "fit"]
        for config in STREAM:
            command += ["-c", config]
        command += [
            f"--data.root={data_root}", "--data.download=false",
            f"--data.epochs_per_task={args.epochs}", f"--data.num_workers={args.workers}",
            f"--trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={work / 'logs'}",
            f"--checkpoint.dirpath={work / 'ckpt'}", "--checkpoint.every_n_tasks=0",
            "--evaluation.few_shot_shots=[]", "--evaluation.print_table=false", *extra,
            "--trainer.callbacks+=gpu_check.StepTimer",
            f"--trainer.callbacks.path={work / 'steps.json'}",
        ]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT / "benchmarks"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
        start = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env,
                              timeout=args.run_timeout)
        run_s = time.perf_counter() - start
        if done.returncode != 0:
            return f"| {label} | failed ({done.returncode}): {done.stderr[-300:]!r} | | | | |"
        steps = json.loads((work / "steps.json").read_text())
        results = sorted((work / "logs").rglob("results.json"))
        accuracy = json.loads(results[-1].read_text())["avg_accuracy"] if results else None
    median_ms = statistics.median(steps) * 1e3
    acc = "" if accuracy is None else f"{accuracy:.2f}"
    return (f"| {label} | {args.batch_size * 1e3 / median_ms:,.0f} | {median_ms:.1f} | "
            f"{len(steps)} | {run_s:.0f} | {acc} |")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", type=int, nargs="+", default=[32, 256])
    p.add_argument("--steps", type=int, default=20, help="DNC time steps per sequence")
    p.add_argument("--memory-slots", type=int, default=128)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--compile", action="store_true", help="add compile_step rows (last)")
    p.add_argument("--graphs", action="store_true",
                   help="add the CUDA-graph rows (after the DNC table; CUDA only)")
    p.add_argument("--train-per-class", type=int, default=500,
                   help="fake CIFAR-10 training images per class (the stream's batch is 32)")
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--epochs", type=int, default=1, help="epochs per task of the agent runs")
    p.add_argument("--batch-size", type=int, default=32, help="the stream config's batch")
    p.add_argument("--workers", type=int, default=0,
                   help="data loader workers (0, the stream's default: the data are tensors)")
    p.add_argument("--rows", nargs="*", default=list(AGENT_ROWS), choices=list(AGENT_ROWS),
                   help="agent rows to run (none: `--rows` alone)")
    p.add_argument("--skip-dnc", action="store_true")
    p.add_argument("--run-timeout", type=float, default=240.0, help="seconds per agent run")
    p.add_argument("--out", type=Path, help="also append the tables to this markdown file")
    return p.parse_args()


def guarded(part, out: Path | None) -> None:
    """Run one part; a failure is reported and the next part still runs."""
    try:
        part()
    except Exception as error:  # noqa: BLE001 (a benchmark: report and go on)
        emit(f"\n(failed: {type(error).__name__}: {error})\n", out)


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    emit(f"\nCommand: python {' '.join(sys.argv)}\n\nDevice: {name}; torch {torch.__version__}"
         f", CUDA {torch.version.cuda}\n", args.out)
    if not args.skip_dnc:
        emit(f"DNC, T={args.steps}, N={args.memory_slots}, W=64, R=4, controller 128, "
             "1 write head:\n", args.out)
        guarded(lambda: emit(dnc_table(args, compiled=False) + "\n", args.out), args.out)
    if args.graphs and args.device == "cuda" and not args.skip_dnc:
        emit("DNC forward+backward as CUDA graphs (same sizes, float32):\n", args.out)
        guarded(lambda: emit(graph_table(args) + "\n", args.out), args.out)
    if args.rows:
        emit(f"Full agent on Split-CIFAR-10 (random images in CIFAR-10's format: 5 tasks of "
             f"{2 * args.train_per_class} training images, {args.epochs} epoch(s) each), "
             f"batch {args.batch_size}, {args.workers} loader workers:\n", args.out)
        emit("| run | train img/s | ms/step (median) | steps timed | run s (all in) | "
             "avg acc |\n|---|---:|---:|---:|---:|---:|", args.out)
        with tempfile.TemporaryDirectory(prefix="gpu_check_data_") as data:
            write_cifar(data, hundred=False, train_per_class=args.train_per_class,
                        test_per_class=args.test_per_class)
            for label in args.rows:
                guarded(lambda label=label: emit(
                    agent_row(label, AGENT_ROWS[label], Path(data), args), args.out), args.out)
        emit("", args.out)
    if args.compile and not args.skip_dnc:
        emit("DNC with compile_step (same sizes):\n", args.out)
        guarded(lambda: emit(dnc_table(args, compiled=True) + "\n", args.out), args.out)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
