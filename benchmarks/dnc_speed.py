"""DNC speed per time step, as a markdown table (forward+backward, and forward only).

Rows are implementation variants at the same sizes (defaults: B=32, T=20, N=128, W=64, R=4,
LSTM controller 128, one write head) on CPU with ``torch.set_num_threads(--threads)``:

* ``naive``: a reference-style port written below (one Linear per interface field, cosine
  similarity and read vectors by broadcasting, directional weightings through a materialised
  ``B x R x N x N`` product, ``LSTMCell``, output layer every step);
* ``autograd``: :class:`~cl_lightning.models.dnc.DNC` with ``fused=False`` (fused interface
  split, batched matmuls, plain autograd);
* ``fused``: the default, with hand-written backward passes for content addressing, the
  erase/add write and the link update + directional reads;
* ``cpp-link``, ``cpp-step``: the default with ``cpp_kernels="link"`` (the link update,
  directional reads and their gradients as one C++ kernel) or ``"step"`` (the whole time
  step, controller and interface included, as one; what ``auto`` takes for these options),
  :mod:`cl_lightning.models.dnc_native`; built on first use (the first call's time is in
  ``compile s``);
* ``nolinks``: the default with ``temporal_links=False`` (content reads only, no link matrix):
  a different model, listed for what the link matrix costs;
* ``compile-*``: ``compile_step=True``, the time step compiled with inductor (one graph,
  forward and backward, serves every step); the ``compile s`` column is the first call's
  wall time, compilation included (it depends on the inductor cache: set
  ``TORCHINDUCTOR_CACHE_DIR`` to a new folder for a cold figure);
* ``*-fwd``: the forward pass only, under ``torch.no_grad()``;
* ``pytorch-dnc``, ``pytorch-dnc-fwd`` (with ``--pytorch-dnc PATH``): the DNC of
  ixaxaar/pytorch-dnc (``pip install dnc``) at the same sizes (``nr_cells=N``,
  ``cell_size=W``, ``read_heads=R``, one LSTM layer of ``--hidden`` units), imported from the
  source tree at PATH (a clone of https://github.com/ixaxaar/pytorch-dnc).

Every step of a run is a forward pass over the same ``(B, T, D)`` input and, except in the
forward-only rows, the backward pass of the mean squared output. The variants are timed
interleaved: each repeat runs every variant once, in turn, after two warm-up runs each, so a
busy machine slows all of them alike. ``ms/step`` is wall time per time step (median and min
over ``--repeats``); ``CPU ms`` is the median process CPU time per step (less sensitive to
other processes sharing the core); ``x pytorch-dnc`` is pytorch-dnc's median CPU time over the
variant's (forward-only rows against ``pytorch-dnc-fwd``). On a GPU:
``benchmarks/gpu_check.py``.

Example (one thread, pinned to one core)::

    taskset -c 1 python benchmarks/dnc_speed.py --threads 1 --repeats 10 \
        --pytorch-dnc /path/to/pytorch-dnc \
        --variants pytorch-dnc,naive,autograd,fused,nolinks,pytorch-dnc-fwd,fused-fwd,nolinks-fwd
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
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


def pytorch_dnc_class(path: str) -> type[nn.Module]:
    """``dnc.DNC`` from the pytorch-dnc source tree at ``path``. Its plain DNC needs only
    torch and numpy (the optional faiss index of its sparse memories is not imported)."""
    sys.path.insert(0, str(Path(path).resolve()))
    try:
        from dnc import DNC as PytorchDNC  # noqa: PLC0415 (third-party, found at run time)
    finally:
        sys.path.pop(0)
    return PytorchDNC


def step_fn(model: nn.Module, x: Tensor, backward: bool, pytorch_dnc: bool) -> Callable[[], None]:
    """One run over the sequence: forward (+ backward of the mean squared output)."""

    def forward() -> Tensor:
        out = model(x, None) if pytorch_dnc else model(x)
        return out[0] if isinstance(out, tuple) else out

    def run() -> None:
        if backward:
            model.zero_grad(set_to_none=True)
            forward().square().mean().backward()
        else:
            with torch.no_grad():
                forward()

    return run


def time_interleaved(runs: dict[str, Callable[[], None]], repeats: int, steps: int,
                     sync: Callable[[], None]) -> dict[str, dict]:
    """Per variant: median and min wall ms and median CPU ms per time step; each repeat runs
    every variant once, in turn."""
    walls: dict[str, list[float]] = {k: [] for k in runs}
    cpus: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            w0, c0 = time.perf_counter(), time.process_time()
            run()
            sync()
            walls[name].append((time.perf_counter() - w0) / steps * 1e3)
            cpus[name].append((time.process_time() - c0) / steps * 1e3)
    return {
        k: {"wall": statistics.median(walls[k]), "wall_min": min(walls[k]),
            "cpu": statistics.median(cpus[k])}
        for k in runs
    }


VARIANTS = {  # name: (label, kind, compiled, backward)
    "pytorch-dnc": ("pytorch-dnc DNC (ixaxaar)", "pytorch-dnc", False, True),
    "naive": ("naive reference-style port (B×R×N×N, per-field Linear)", "naive", False, True),
    "autograd": ("ours, plain autograd (`fused=False`)", "autograd", False, True),
    "fused": ("ours, fused backward passes (default)", "fused", False, True),
    "cpp-link": ("ours, `cpp_kernels=link`", "cpp-link", False, True),
    "cpp-step": ("ours, `cpp_kernels=step`", "cpp-step", False, True),
    "nolinks": ("ours, `temporal_links=False` (content reads only)", "nolinks", False, True),
    "compile-autograd": ("ours, plain autograd + torch.compile(step)", "autograd", True, True),
    "compile-fused": ("ours, fused + torch.compile(step)", "fused", True, True),
    "compile-cpp-link": ("ours, `cpp_kernels=link` + torch.compile(step)", "cpp-link", True,
                         True),
    "compile-nolinks": ("ours, `temporal_links=False` + torch.compile(step)", "nolinks", True,
                        True),
    "pytorch-dnc-fwd": ("pytorch-dnc DNC, forward only", "pytorch-dnc", False, False),
    "autograd-fwd": ("ours, plain autograd, forward only", "autograd", False, False),
    "fused-fwd": ("ours, fused (default), forward only", "fused", False, False),
    "cpp-link-fwd": ("ours, `cpp_kernels=link`, forward only", "cpp-link", False, False),
    "cpp-step-fwd": ("ours, `cpp_kernels=step`, forward only", "cpp-step", False, False),
    "nolinks-fwd": ("ours, `temporal_links=False`, forward only", "nolinks", False, False),
    "compile-fused-fwd": ("ours, fused + torch.compile(step), forward only", "fused", True,
                          False),
    "compile-cpp-link-fwd": ("ours, `cpp_kernels=link` + torch.compile(step), forward only",
                             "cpp-link", True, False),
}


def build(args: argparse.Namespace, kind: str, compiled: bool = False) -> nn.Module:
    sizes = (args.hidden, args.memory_slots, args.word_size, args.read_heads, args.write_heads)
    if kind == "naive":
        return NaiveDNC(args.input_size, args.output_size, *sizes)
    if kind == "pytorch-dnc":
        if args.write_heads != 1 or args.input_size != args.output_size:
            raise SystemExit("pytorch-dnc has one write head and output size = input size")
        return pytorch_dnc_class(args.pytorch_dnc)(
            args.input_size, args.hidden, num_hidden_layers=1, nr_cells=args.memory_slots,
            cell_size=args.word_size, read_heads=args.read_heads)
    return DNC(
        args.input_size,
        args.output_size,
        hidden_size=args.hidden,
        memory_slots=args.memory_slots,
        word_size=args.word_size,
        read_heads=args.read_heads,
        write_heads=args.write_heads,
        fused=(kind != "autograd"),
        temporal_links=(kind != "nolinks"),
        compile_step=compiled,
        cuda_graphs=False,  # eager on a GPU too (gpu_check.py times the graphs apart)
        cpp_kernels=kind[4:] if kind.startswith("cpp-") else "none",
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
    p.add_argument("--pytorch-dnc", metavar="PATH",
                   help="source tree of ixaxaar/pytorch-dnc: adds its DNC as the baseline")
    p.add_argument("--variants", default="naive,autograd,fused,fused-fwd",
                   help="comma list of: " + ", ".join(VARIANTS))
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.steps, args.input_size)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if not args.pytorch_dnc and any(VARIANTS[n][1] == "pytorch-dnc" for n in names):
        raise SystemExit("pytorch-dnc variants need --pytorch-dnc PATH")
    # Variants share the compiled step (compile_step): each gets static-shape graphs, as in a
    # process of its own, instead of a dynamic-shape graph after the first guard failure.
    torch._dynamo.config.automatic_dynamic_shapes = False
    runs, first_call = {}, {}
    for name in names:
        _, kind, compiled, backward = VARIANTS[name]
        model = build(args, kind, compiled)
        runs[name] = step_fn(model, x, backward, kind == "pytorch-dnc")
        t0 = time.perf_counter()
        runs[name]()
        first_call[name] = time.perf_counter() - t0
        runs[name]()
        print(f"{name}: first call {first_call[name]:.1f} s", file=sys.stderr, flush=True)
    stats = time_interleaved(runs, args.repeats, args.steps, lambda: None)

    print(f"\nCommand: python {' '.join(sys.argv)}")
    print(
        f"\nB={args.batch}, T={args.steps}, N={args.memory_slots}, W={args.word_size}, "
        f"R={args.read_heads}, Wr={args.write_heads}, controller {args.hidden}, "
        f"CPU threads {args.threads}, torch {torch.__version__}\n"
    )
    print("| variant | ms/step (median) | ms/step (min) | CPU ms/step | x pytorch-dnc | "
          "compile s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in names:
        label, kind, compiled, backward = VARIANTS[name]
        s = stats[name]
        base = "pytorch-dnc" if backward else "pytorch-dnc-fwd"
        ratio = f"{stats[base]['cpu'] / s['cpu']:.2f}" if base in stats else "-"
        comp = f"{first_call[name]:.0f}" if compiled or kind.startswith("cpp-") else "-"
        print(f"| {label} | {s['wall']:.2f} | {s['wall_min']:.2f} | {s['cpu']:.2f} | {ratio} | "
              f"{comp} |")


if __name__ == "__main__":
    main()
