"""DNC forward+backward speed per time step, as a markdown table.

Rows are implementation variants at the same sizes (defaults: B=32, T=20, N=128, W=64, R=4,
controller 128, one write head) on CPU with ``torch.set_num_threads(--threads)``:

* ``naive``: a reference-style port written below (one Linear per interface field, cosine
  similarity and read vectors by broadcasting, directional weightings through a materialised
  ``B x R x N x N`` product, ``LSTMCell``, output layer every step);
* ``dnc autograd``: :class:`~cl_lightning.models.dnc.DNC` with ``fused=False`` (fused
  interface split, batched matmuls, plain autograd);
* ``dnc fused``: the default, with hand-written backward passes for content addressing, the
  erase/add write and the link update + directional reads;
* ``... + torch.compile``: the per-step function compiled with inductor.

Times are medians over ``--repeats`` runs; ``cpu ms`` is process CPU time divided by the number
of steps (less sensitive to other processes on the machine than wall time). With a GPU the
script also reports tokens/s on CUDA.

Example::

    python benchmarks/dnc_speed.py --threads 2 --repeats 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cl_lightning.models.dnc import DNC  # noqa: E402

EPS = 1e-6


class NaiveDNC(nn.Module):
    """Straightforward port of the reference structure, kept simple on purpose."""

    def __init__(self, d_in: int, d_out: int, hidden: int, n: int, w: int, r: int, wr: int):
        super().__init__()
        self.n, self.w, self.r, self.wr = n, w, r, wr
        self.cell = nn.LSTMCell(d_in + r * w, hidden)
        sizes = {
            "read_keys": r * w,
            "read_strengths": r,
            "write_keys": wr * w,
            "write_strengths": wr,
            "erase": wr * w,
            "write_vectors": wr * w,
            "free": r,
            "alloc_gate": wr,
            "write_gate": wr,
            "modes": r * (1 + 2 * wr),
        }
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, v) for k, v in sizes.items()})
        self.out = nn.Linear(hidden + r * w, d_out)

    @staticmethod
    def cosine(memory: Tensor, keys: Tensor, beta: Tensor) -> Tensor:
        m, k = memory.unsqueeze(1), keys.unsqueeze(2)  # (B,1,N,W), (B,H,1,W)
        dot = (m * k).sum(-1)
        norm = torch.sqrt((m * m).sum(-1) + EPS) * torch.sqrt((k * k).sum(-1) + EPS)
        return torch.softmax(dot / (norm + EPS) * beta.unsqueeze(-1), -1)

    @staticmethod
    def allocation(usage: Tensor) -> Tensor:
        usage = EPS + (1 - EPS) * usage
        su, idx = torch.sort(usage, -1)
        prod = torch.cumprod(su, -1)
        excl = torch.cat([torch.ones_like(prod[:, :1]), prod[:, :-1]], -1)
        return torch.zeros_like(su).scatter(-1, idx, (1 - su) * excl)

    def forward(self, x: Tensor) -> Tensor:
        b, steps, _ = x.shape
        n, w, r, wr = self.n, self.w, self.r, self.wr
        h = c = x.new_zeros(b, self.cell.hidden_size)
        mem = x.new_zeros(b, n, w)
        usage, link = x.new_zeros(b, n), x.new_zeros(b, wr, n, n)
        prec, ww = x.new_zeros(b, wr, n), x.new_zeros(b, wr, n)
        rw, rv = x.new_zeros(b, r, n), x.new_zeros(b, r, w)
        off_diag = 1 - torch.eye(n, dtype=x.dtype)
        outs = []
        for t in range(steps):
            h, c = self.cell(torch.cat([x[:, t], rv.reshape(b, -1)], -1), (h, c))
            p = {k: lin(h).clamp(-20, 20) for k, lin in self.heads.items()}
            free = torch.sigmoid(p["free"])
            ag, wg = torch.sigmoid(p["alloc_gate"]), torch.sigmoid(p["write_gate"])
            written = 1 - torch.prod(1 - ww.detach(), 1)
            usage = (usage + written - usage * written) * torch.prod(1 - free.unsqueeze(-1) * rw, 1)
            wc = self.cosine(mem, p["write_keys"].view(b, wr, w), F.softplus(p["write_strengths"]))
            allocs, u = [], usage
            for i in range(wr):
                allocs.append(self.allocation(u))
                u = u + (1 - u) * (ag * wg)[:, i : i + 1] * allocs[-1]
            alloc = torch.stack(allocs, 1)
            ww = wg.unsqueeze(-1) * (ag.unsqueeze(-1) * alloc + (1 - ag.unsqueeze(-1)) * wc)
            erase = torch.sigmoid(p["erase"]).view(b, wr, 1, w)
            keep = torch.prod(1 - ww.unsqueeze(-1) * erase, 1)
            add = (ww.unsqueeze(-1) * p["write_vectors"].view(b, wr, 1, w)).sum(1)
            mem = mem * keep + add
            wi, wj = ww.unsqueeze(-1), ww.unsqueeze(-2)
            link = ((1 - wi - wj) * link + wi * prec.unsqueeze(-2)) * off_diag
            prec = (1 - ww.sum(-1, keepdim=True)) * prec + ww
            big_link = link.unsqueeze(1)  # (B,1,Wr,N,N) against (B,R,1,1,N)
            fwd = (big_link * rw[:, :, None, None, :]).sum(-1)
            bwd = (big_link * rw[:, :, None, :, None]).sum(-2)
            rc = self.cosine(mem, p["read_keys"].view(b, r, w), F.softplus(p["read_strengths"]))
            modes = torch.softmax(p["modes"].view(b, r, 1 + 2 * wr), -1)
            rw = (
                (modes[..., :wr, None] * bwd).sum(2)
                + (modes[..., wr : 2 * wr, None] * fwd).sum(2)
                + modes[..., 2 * wr :] * rc
            )
            rv = (rw.unsqueeze(-1) * mem.unsqueeze(1)).sum(2)
            outs.append(self.out(torch.cat([h, rv.reshape(b, -1)], -1)))
        return torch.stack(outs, 1)


def time_variant(model: nn.Module, x: Tensor, repeats: int, backward: bool = True) -> dict:
    """Median wall and CPU milliseconds per time step over ``repeats`` runs (after warm-up)."""

    def run() -> None:
        if backward:
            out = model(x)
            y = out[0] if isinstance(out, tuple) else out
            y.square().mean().backward()
        else:
            with torch.no_grad():
                model(x)

    run()
    run()
    walls, cpus = [], []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        w0, c0 = time.perf_counter(), time.process_time()
        run()
        if x.is_cuda:
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    steps = x.shape[1]
    return {
        "wall": statistics.median(walls) / steps * 1e3,
        "wall_min": min(walls) / steps * 1e3,
        "cpu": statistics.median(cpus) / steps * 1e3,
        "tokens": x.shape[0] * steps / statistics.median(walls),
    }


def build(args: argparse.Namespace, kind: str) -> nn.Module:
    sizes = (args.hidden, args.memory_slots, args.word_size, args.read_heads, args.write_heads)
    if kind == "naive":
        return NaiveDNC(args.input_size, args.output_size, *sizes)
    return DNC(
        args.input_size,
        args.output_size,
        hidden_size=args.hidden,
        memory_slots=args.memory_slots,
        word_size=args.word_size,
        read_heads=args.read_heads,
        write_heads=args.write_heads,
        fused=(kind == "fused"),
    )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--memory-slots", type=int, default=128)
    p.add_argument("--word-size", type=int, default=64)
    p.add_argument("--read-heads", type=int, default=4)
    p.add_argument("--write-heads", type=int, default=1)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--input-size", type=int, default=16)
    p.add_argument("--output-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument(
        "--variants",
        default="naive,autograd,fused,fused-nograd,compile-fused,compile-autograd",
        help="comma list of: naive, autograd, fused, fused-nograd, compile-fused, compile-autograd",
    )
    p.add_argument("--cuda-batch", type=int, default=32)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.steps, args.input_size)
    labels = {
        "naive": "naive reference-style (B×R×N×N, per-field Linear)",
        "autograd": "dnc autograd (fused=False)",
        "fused": "dnc fused (default)",
        "fused-nograd": "dnc fused, forward only (no_grad)",
        "compile-fused": "dnc fused + torch.compile(step)",
        "compile-autograd": "dnc autograd + torch.compile(step)",
    }
    rows = []
    for variant in args.variants.split(","):
        kind = "naive" if variant == "naive" else ("autograd" if "autograd" in variant else "fused")
        model = build(args, kind)
        compile_s = 0.0
        if variant.startswith("compile"):
            model.step = torch.compile(model.step, dynamic=False)
            t0 = time.perf_counter()
            model(x)[0].sum().backward()
            compile_s = time.perf_counter() - t0
        stats = time_variant(model, x, args.repeats, backward=(variant != "fused-nograd"))
        rows.append((labels[variant], stats, compile_s))
        print(f"{labels[variant]}: {stats['wall']:.2f} ms/step", file=sys.stderr, flush=True)

    print(f"\nCommand: python {' '.join(sys.argv)}")
    print(
        f"\nB={args.batch}, T={args.steps}, N={args.memory_slots}, W={args.word_size}, "
        f"R={args.read_heads}, Wr={args.write_heads}, controller {args.hidden}, "
        f"CPU threads {args.threads}, torch {torch.__version__}\n"
    )
    base = next((s["wall"] for label, s, _ in rows if label.startswith("naive")), None)
    print(
        "| variant | ms/step (median wall) | ms/step (min wall) | CPU ms/step | tokens/s | "
        "speed-up vs naive | compile s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, s, compile_s in rows:
        speedup = f"{base / s['wall']:.1f}x" if base else "-"
        comp = f"{compile_s:.0f}" if compile_s else "-"
        print(
            f"| {label} | {s['wall']:.2f} | {s['wall_min']:.2f} | {s['cpu']:.2f} | "
            f"{s['tokens']:.0f} | {speedup} | {comp} |"
        )

    if torch.cuda.is_available():
        print(f"\nCUDA ({torch.cuda.get_device_name()}), forward+backward, B={args.cuda_batch}:\n")
        print("| variant | ms/step | tokens/s |")
        print("|---|---:|---:|")
        xc = torch.randn(args.cuda_batch, args.steps, args.input_size, device="cuda")
        for kind in ("naive", "autograd", "fused"):
            model = build(args, kind).cuda()
            s = time_variant(model, xc, args.repeats)
            print(f"| {labels[kind]} | {s['wall']:.2f} | {s['tokens']:.0f} |")


if __name__ == "__main__":
    main()
