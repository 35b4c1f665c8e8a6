"""Copy task: DNC vs a plain LSTM of similar size, trained on CPU in minutes.

Each sequence is ``L`` random 8-bit vectors, one delimiter step (channel 8), then ``L`` blank
steps during which the model must reproduce the vectors. Both models are trained with Adam
on lengths ``--min-len..--max-len`` and evaluated (bit errors per sequence, logits thresholded
at 0) on every length ``1..--eval-max-len``. Prints a markdown table and saves a PNG.

Example::

    python benchmarks/dnc_copy.py --iters 3000 --lstm-iters 20000 \\
        --out benchmarks/results/dnc_copy.png
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cl_lightning.models.dnc import DNC  # noqa: E402

BITS = 8


def copy_batch(
    batch: int, length: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """``x (B, 2L+1, BITS+1)``, ``target (B, 2L+1, BITS)``, loss ``mask (2L+1)``."""
    steps = 2 * length + 1
    bits = torch.randint(0, 2, (batch, length, BITS), generator=generator).float()
    x = torch.zeros(batch, steps, BITS + 1)
    x[:, :length, :BITS] = bits
    x[:, length, BITS] = 1.0
    target = torch.zeros(batch, steps, BITS)
    target[:, length + 1 :] = bits
    mask = torch.zeros(steps)
    mask[length + 1 :] = 1.0
    return x, target, mask


class LSTMModel(nn.Module):
    """Baseline: ``nn.LSTM`` + linear read-out, same ``forward`` signature as the DNC."""

    def __init__(self, input_size: int, output_size: int, hidden_size: int, layers: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size, num_layers=layers, batch_first=True)
        self.out = nn.Linear(hidden_size, output_size)

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        return self.out(self.lstm(x)[0]), None


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def lstm_hidden_for(params: int, layers: int) -> int:
    """Smallest hidden size whose LSTM baseline has at least ``params`` parameters."""
    for hidden in range(8, 2048):
        if n_params(LSTMModel(BITS + 1, BITS, hidden, layers)) >= params:
            return hidden
    return 2048


def masked_bce(logits: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    loss = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (loss.sum(-1) * mask).sum() / (mask.sum() * logits.shape[0])


def train(model: nn.Module, args: argparse.Namespace, name: str, iters: int) -> dict:
    gen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    start = time.perf_counter()
    max_len = args.curriculum_start if args.curriculum else args.max_len
    running, log = None, []
    it = 0
    for it in range(1, iters + 1):
        length = int(torch.randint(args.min_len, max_len + 1, (1,), generator=gen))
        x, target, mask = copy_batch(args.batch, length, gen)
        logits, _ = model(x)
        loss = masked_bce(logits, target, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if args.curriculum and max_len < args.max_len and running < args.curriculum_threshold:
            max_len += 1
            running = None
        elapsed = time.perf_counter() - start
        if it % args.log_every == 0:
            print(
                f"[{name}] it {it:5d} loss {running:.4f} max_len {max_len} {elapsed:6.1f}s",
                flush=True,
            )
            log.append((it, running))
        if elapsed > args.time_limit * 60:
            print(f"[{name}] time limit reached at iteration {it}", flush=True)
            break
    return {"iters": it, "seconds": time.perf_counter() - start, "final_max_len": max_len}


@torch.no_grad()
def evaluate(model: nn.Module, args: argparse.Namespace) -> list[float]:
    """Mean number of wrong bits per sequence for each length ``1..eval_max_len``."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    errors = []
    for length in range(1, args.eval_max_len + 1):
        x, target, mask = copy_batch(args.eval_batch, length, gen)
        logits, _ = model(x)
        wrong = ((logits > 0).float() != target).float().sum(-1) * mask
        errors.append(wrong.sum(-1).mean().item())
    return errors


def plot(results: dict[str, list[float]], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = list(range(1, args.eval_max_len + 1))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, errs in results.items():
        ax.plot(lengths, errs, marker="o", label=name)
    ax.axvspan(args.min_len - 0.5, args.max_len + 0.5, color="grey", alpha=0.15, label="train")
    ax.set_xticks(lengths[:: 2 if len(lengths) > 12 else 1])
    ax.set_xlabel("sequence length")
    ax.set_ylabel("bit errors per sequence")
    ax.set_title("Copy task (8-bit vectors)")
    ax.legend()
    ax.grid(alpha=0.3)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"saved {out}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--iters", type=int, default=3000, help="DNC training iterations")
    p.add_argument("--lstm-iters", type=int, default=0, help="LSTM iterations (0: same as --iters)")
    p.add_argument("--time-limit", type=float, default=8.0, help="minutes per model")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--clip", type=float, default=10.0, help="gradient norm clipping")
    p.add_argument("--min-len", type=int, default=1)
    p.add_argument("--max-len", type=int, default=10)
    p.add_argument("--curriculum", action="store_true", help="grow max length as loss drops")
    p.add_argument("--curriculum-start", type=int, default=3)
    p.add_argument("--curriculum-threshold", type=float, default=0.05)
    p.add_argument("--eval-max-len", type=int, default=20)
    p.add_argument("--eval-batch", type=int, default=100)
    p.add_argument("--memory-slots", type=int, default=32)
    p.add_argument("--word-size", type=int, default=16)
    p.add_argument("--read-heads", type=int, default=1)
    p.add_argument("--hidden", type=int, default=64, help="DNC controller size")
    p.add_argument("--strength", default="oneplus", choices=["softplus", "oneplus"])
    p.add_argument("--dnc-options", default="", help="e.g. 'masking,dealloc,sharpness'")
    p.add_argument("--lstm-layers", type=int, default=1)
    p.add_argument("--lstm-hidden", type=int, default=0, help="0: match DNC parameter count")
    p.add_argument("--models", default="dnc,lstm")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=250)
    p.add_argument("--out", default="benchmarks/results/dnc_copy.png")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    options = {k: True for k in args.dnc_options.split(",") if k}
    dnc = DNC(
        BITS + 1,
        BITS,
        hidden_size=args.hidden,
        memory_slots=args.memory_slots,
        word_size=args.word_size,
        read_heads=args.read_heads,
        strength_activation=args.strength,
        **options,
    )
    hidden = args.lstm_hidden or lstm_hidden_for(n_params(dnc), args.lstm_layers)
    lstm = LSTMModel(BITS + 1, BITS, hidden, args.lstm_layers)
    models = {"DNC": dnc, f"LSTM({hidden}x{args.lstm_layers})": lstm}
    wanted = args.models.split(",")
    models = {k: m for k, m in models.items() if k.split("(")[0].lower() in wanted}

    results, info = {}, {}
    for name, model in models.items():
        print(f"== {name}: {n_params(model)} parameters", flush=True)
        iters = args.lstm_iters if name.startswith("LSTM") and args.lstm_iters else args.iters
        info[name] = train(model, args, name, iters)
        results[name] = evaluate(model, args)

    print("\nCommand: python " + " ".join(sys.argv))
    print(f"\ntrain lengths {args.min_len}-{args.max_len}, batch {args.batch}, lr {args.lr}\n")
    print(
        "| model | params | iters | train time (s) | mean err, train lengths | mean err, longer |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, errs in results.items():
        inside = errs[args.min_len - 1 : args.max_len]
        outside = errs[args.max_len :]
        out_mean = sum(outside) / len(outside) if outside else math.nan
        print(
            f"| {name} | {n_params(models[name])} | {info[name]['iters']} | "
            f"{info[name]['seconds']:.0f} | {sum(inside) / len(inside):.3f} | {out_mean:.3f} |"
        )
    print("\nBit errors per sequence by length:\n")
    names = list(results)
    print("| length | " + " | ".join(names) + " |")
    print("|---:|" + "---:|" * len(names))
    for i in range(args.eval_max_len):
        print(f"| {i + 1} | " + " | ".join(f"{results[n][i]:.2f}" for n in names) + " |")
    plot(results, args)


if __name__ == "__main__":
    main()
