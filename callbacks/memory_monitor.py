"""MemoryMonitor: what the DNC does with its memory, in TensorBoard, at every task end.

A fixed probe batch per task (the first ``probe_size`` test samples of each task) runs
through the agent with the DNC's trace on. Logged per task end:

- ``memory/slots``: three heatmaps of tasks x slots, side by side: total write weight, total read
  weight and final usage per slot (which slots each task writes to, and reads from);
- ``memory/task_NN``: read and write weightings over time for the task just trained;
- scalars ``memory/task_NN/{allocation_gate, write_gate, read_backward, read_content,
  read_forward}``: batch- and time-averaged gates and read modes, per task;
- scalar ``memory/write_overlap``: mean cosine similarity of two tasks' write-per-slot
  profiles (low: different tasks write to different slots).

With a recalling agent (``recall_slots > 0``) each probe query first has its neighbours
from the replay buffer written into memory (as in training), and three more scalars
measure how memory is used, averaged over the tasks' probes:

- ``memory/recall_same_label``: the primed read's mass on recalled slots that hold the
  query's label (1: reads land only on experiences of the right class);
- ``memory/read_same_label``: the same for the controller's own reads over the sequence;
- ``memory/write_on_recalled``: the share of write weight that lands on recalled slots
  (0: the query's new content goes to free slots, stored experiences are kept).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning as L
import matplotlib.pyplot as plt
import torch
from lightning.pytorch.utilities import rank_zero_warn

from callbacks.report import figure_pixels, log_image  # (report selects the Agg backend)
from cl_lightning.checks import require_at_least
from cl_lightning.models.agent import MemoryAgent
from cl_lightning.plugins import LearnerPlugin
from cl_lightning.rng import generators_untouched

if TYPE_CHECKING:
    from cl_lightning.module import ContinualLearner


class MemoryMonitor(L.Callback, LearnerPlugin):
    """TensorBoard views of the MemoryAgent's DNC on a fixed probe batch per task.

    Args:
        probe_size: test samples per task in the probe batch.
        every_n_tasks: log at every n-th task end.
    """

    plugin_order = 900

    def __init__(self, probe_size: int = 16, every_n_tasks: int = 1) -> None:
        require_at_least(1, "", probe_size=probe_size, every_n_tasks=every_n_tasks)
        self.probe_size, self.every_n_tasks = probe_size, every_n_tasks

    def traces(self, learner: ContinualLearner) -> tuple[list[Any], dict[str, float]]:
        """One DNCTrace per task, on that task's probe batch, and the recall scalars
        (empty without recall)."""
        agent = learner.net
        out, recall_stats = [], []
        store = learner.store() if learner.recalling else None
        was_training = agent.training
        agent.eval()
        with torch.no_grad():
            if store is not None:
                store = {k: v.to(learner.device) for k, v in store.items()}
                index = learner.index_store(store)
            for view in learner.trainer.datamodule.test_sets():
                n = min(self.probe_size, len(view))
                x = torch.stack([view[i]["x"] for i in range(n)]).to(learner.device)
                y = torch.as_tensor([int(view[i]["y"]) for i in range(n)], device=x.device)
                tokens, state = agent.encoder(x), None
                if store is not None:
                    recall = learner.retrieve(x, x, store, *index)
                    state, _ = agent.recall_state(x, tokens, recall)
                    primed = state.read_weights[:, 0, : recall.y.shape[1]]
                trace = agent.core(tokens, state, return_trace=True)[2]
                out.append(trace)
                if store is not None:
                    recall_stats.append(recall_usage(trace, primed, recall.y, y))
        agent.train(was_training)
        if not recall_stats:
            return out, {}
        return out, {k: sum(s[k] for s in recall_stats) / len(recall_stats)
                     for k in recall_stats[0]}

    def on_task_end(self, learner: ContinualLearner, task: int) -> None:
        trainer = learner.trainer
        if (task + 1) % self.every_n_tasks or not trainer.is_global_zero:
            return
        if not isinstance(learner.net, MemoryAgent):
            rank_zero_warn("MemoryMonitor needs model.net to be a MemoryAgent; nothing logged")
            return
        with generators_untouched():  # rank 0 only: the ranks' generators stay in step
            traces, scalars = self.traces(learner)
        writes = torch.stack([t.write_weights.sum(dim=(1, 2)).mean(0) for t in traces])
        reads = torch.stack([t.read_weights.sum(dim=(1, 2)).mean(0) for t in traces])
        usage = torch.stack([t.usage[:, -1].mean(0) for t in traces])
        scalars = {f"memory/{k}": v for k, v in scalars.items()}
        scalars["memory/write_overlap"] = write_overlap(writes)
        for j, t in enumerate(traces):
            modes = t.read_modes.mean(dim=(0, 1, 2))  # backward (Wr), forward (Wr), content
            wr = t.write_gate.shape[-1]
            scalars.update({
                f"memory/task_{j:02d}/allocation_gate": t.allocation_gate.mean().item(),
                f"memory/task_{j:02d}/write_gate": t.write_gate.mean().item(),
                f"memory/task_{j:02d}/read_backward": modes[:wr].sum().item(),
                f"memory/task_{j:02d}/read_forward": modes[wr : 2 * wr].sum().item(),
                f"memory/task_{j:02d}/read_content": modes[-1].item(),
            })
        slots = slot_maps(writes, reads, usage)
        over_time = time_maps(traces[task], task)
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)
        for tag, fig in (("memory/slots", slots), (f"memory/task_{task:02d}", over_time)):
            log_image(trainer.loggers, tag, figure_pixels(fig), step=task)
            plt.close(fig)


def recall_usage(trace: Any, primed: torch.Tensor, labels: torch.Tensor,
                 target: torch.Tensor) -> dict[str, float]:
    """How one probe batch used its recalled slots (the first ``k`` of memory).

    primed: (B, k) the primed read; labels: (B, k) the recalled labels; target: (B,)."""
    k = labels.shape[1]
    same = (labels == target[:, None]).float()  # (B, k)
    reads = trace.read_weights[..., :k]  # (B, T, R, k)
    writes = trace.write_weights.sum(2)  # (B, T, N): all write heads
    return {
        "recall_same_label": (primed * same).sum(1).mean().item(),
        "read_same_label": (reads * same[:, None, None]).sum(-1).mean().item(),
        "write_on_recalled": (writes[..., :k].sum(-1) / writes.sum(-1).clamp_min(1e-12))
        .mean().item(),
    }


def write_overlap(writes: torch.Tensor) -> float:
    """Mean cosine similarity of the rows of ``writes`` (tasks x slots) over task pairs
    (0 with a single task)."""
    if len(writes) < 2:
        return 0.0
    unit = torch.nn.functional.normalize(writes, dim=1)
    sim = unit @ unit.T
    n = len(writes)
    return ((sim.sum() - sim.diagonal().sum()) / (n * (n - 1))).item()


def slot_maps(writes: torch.Tensor, reads: torch.Tensor, usage: torch.Tensor) -> plt.Figure:
    """Three (tasks, N) heatmaps side by side: write weight, read weight and usage per
    slot. At most 8 inches high, however many tasks (drawn at every logged task end)."""
    tasks = len(writes)
    fig, axes = plt.subplots(1, 3, figsize=(13, min(2.0 + 0.22 * tasks, 8.0)), sharey=True)
    for ax, data, title in zip(axes, (writes, reads, usage),
                               ("write weight (sum over time)",
                                "read weight (sum over time and heads)",
                                "usage after the sequence"), strict=True):
        im = ax.imshow(data.cpu().numpy(), aspect="auto", cmap="magma",
                       interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("memory slot")
        fig.colorbar(im, ax=ax)
    axes[0].set_ylabel("task")
    axes[0].set_yticks(range(0, tasks, -(-tasks // 20)))  # whole tasks, at most 20 ticks
    fig.tight_layout()
    return fig


def time_maps(trace: Any, task: int) -> plt.Figure:
    """Read (mean over heads) and write weightings over time for one task's probe batch."""
    read = trace.read_weights.mean(dim=(0, 2)).cpu().numpy()  # (T, N)
    write = trace.write_weights.mean(dim=(0, 2)).cpu().numpy()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3))
    for ax, data, title in zip(axes, (write, read), ("write weighting", "read weighting"),
                               strict=True):
        im = ax.imshow(data, aspect="auto", cmap="magma")
        ax.set_title(f"task {task}: {title}", fontsize=9)
        ax.set_xlabel("memory slot")
        ax.set_ylabel("time step")
        ax.set_yticks(range(0, len(data), -(-len(data) // 20)))  # whole steps, at most 20
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig
