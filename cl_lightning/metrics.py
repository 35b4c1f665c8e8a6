"""Continual-learning summary metrics computed from an accuracy matrix.

Conventions (all accuracies in percent):

- ``matrix``: ``(rows, T)``; ``matrix[i, j]`` is the accuracy on task ``j`` after training
  phase ``i``. In a sequential stream phase ``i`` is task ``i``; in a joint run there is a
  single phase that trains on every task.
- ``initial``: ``(T,)`` or ``None``; accuracy of the model before any training (the
  "row -1" of the matrix, ``b`` in Lopez-Paz & Ranzato 2017). Needed only for FWT.
- ``seen``: how many tasks (columns) count as trained after the last row. Defaults to the
  number of rows (a sequential stream); a joint run passes ``T``.

References: average accuracy and BWT/FWT from Lopez-Paz & Ranzato (GEM, NeurIPS 2017);
forgetting from Chaudhry et al. (RWalk, ECCV 2018); average incremental accuracy from
Rebuffi et al. (iCaRL, CVPR 2017).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Summary:
    """Scalar summary of an accuracy matrix (percent points)."""

    avg_accuracy: float
    avg_incremental_accuracy: float
    forgetting: float | None
    bwt: float | None
    fwt: float | None

    def as_dict(self) -> dict[str, float | None]:
        return asdict(self)


def _as_matrix(matrix: torch.Tensor | list[list[float]]) -> torch.Tensor:
    m = torch.as_tensor(matrix, dtype=torch.float64)
    if m.dim() != 2 or m.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be 2-D with at least one row, got {tuple(m.shape)}")
    if m.shape[0] > m.shape[1]:
        raise ValueError(f"accuracy matrix has more rows ({m.shape[0]}) than tasks ({m.shape[1]})")
    return m


def average_accuracy(matrix: torch.Tensor, seen: int | None = None) -> float:
    """Mean accuracy over the seen tasks after the last phase: ``mean_j<seen R[-1, j]``."""
    m = _as_matrix(matrix)
    seen = m.shape[0] if seen is None else seen
    return m[-1, :seen].mean().item()


def average_incremental_accuracy(matrix: torch.Tensor, seen: int | None = None) -> float:
    """Mean over phases ``i`` of the average accuracy on the tasks seen after phase ``i``."""
    m = _as_matrix(matrix)
    rows = m.shape[0]
    if seen is not None and seen != rows:  # joint: every task is seen from the first phase
        return m[:, :seen].mean().item()
    return sum(m[i, : i + 1].mean().item() for i in range(rows)) / rows


def forgetting(matrix: torch.Tensor, seen: int | None = None) -> float | None:
    """Average forgetting (Chaudhry et al. 2018) over tasks ``j < last``.

    ``f_j = max_{j <= l < last} R[l, j] - R[last, j]``; ``None`` (undefined) with a single
    phase or in a joint run.
    """
    m = _as_matrix(matrix)
    last = m.shape[0] - 1
    if last == 0 or (seen is not None and seen != m.shape[0]):
        return None
    drops = [m[j:last, j].max().item() - m[last, j].item() for j in range(last)]
    return sum(drops) / len(drops)


def backward_transfer(matrix: torch.Tensor, seen: int | None = None) -> float | None:
    """BWT = mean over ``j < last`` of ``R[last, j] - R[j, j]``; ``None`` (undefined) with a
    single phase or in a joint run."""
    m = _as_matrix(matrix)
    last = m.shape[0] - 1
    if last == 0 or (seen is not None and seen != m.shape[0]):
        return None
    return sum(m[last, j].item() - m[j, j].item() for j in range(last)) / last


def forward_transfer(
    matrix: torch.Tensor, initial: torch.Tensor | None, seen: int | None = None
) -> float | None:
    """FWT = mean over ``1 <= j <= last`` of ``R[j-1, j] - b_j``; ``None`` if undefined.

    Undefined without the initial row ``b``, with a single phase, or in a joint run.
    """
    m = _as_matrix(matrix)
    last = m.shape[0] - 1
    if initial is None or last == 0 or (seen is not None and seen != m.shape[0]):
        return None
    b = torch.as_tensor(initial, dtype=torch.float64)
    if b.shape != (m.shape[1],):
        raise ValueError(f"initial row must have shape ({m.shape[1]},), got {tuple(b.shape)}")
    return sum(m[j - 1, j].item() - b[j].item() for j in range(1, last + 1)) / last


def summarize(
    matrix: torch.Tensor | list[list[float]],
    initial: torch.Tensor | list[float] | None = None,
    seen: int | None = None,
) -> Summary:
    """All summary metrics of an accuracy matrix (see the module docstring)."""
    m = _as_matrix(matrix)
    rows = m.shape[0]
    if seen is not None and seen != rows:  # joint: every seen task trains in every phase
        trained = m[:, :seen]
    else:  # R[i, j] for j <= i (a sequential stream leaves later tasks unevaluated at will)
        trained = m[:, :rows][torch.ones(rows, rows, dtype=torch.bool).tril()]
    if torch.isnan(trained).any():
        raise ValueError("accuracy matrix has NaN entries on trained tasks")
    fwt = forward_transfer(m, None if initial is None else torch.as_tensor(initial), seen)
    return Summary(
        avg_accuracy=average_accuracy(m, seen),
        avg_incremental_accuracy=average_incremental_accuracy(m, seen),
        forgetting=forgetting(m, seen),
        bwt=backward_transfer(m, seen),
        fwt=None if fwt is None or math.isnan(fwt) else fwt,
    )
