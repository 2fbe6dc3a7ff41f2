"""Forgetting metrics of any sequence of tasks, from an accuracy matrix (pure numpy, no I/O).

A[i, j] = accuracy on task j after learning tasks 0..i (rows: moments, columns: tasks); NaN where it was not
measured. The last row and the diagonal must be measured; the entries in between may be sparse (the continual
protocol measures a row every few classes).

* average accuracy: mean of the last row (Lopez-Paz & Ranzato 2017's ACC; the continual papers' curve).
* forgetting of task j < T-1: its best accuracy before the end minus its final one, max_{j<=i<T-1} A[i, j] -
  A[T-1, j] (Chaudhry et al. 2018), averaged over j; the best is taken over the measured entries.
* backward transfer: mean over j < T-1 of A[T-1, j] - A[j, j] (Lopez-Paz & Ranzato 2017's BWT): negative
  when learning later tasks hurt earlier ones.
A single task has no forgetting or backward transfer (NaN).
"""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np

from metarun.metrics import mean_ci95


def accuracy_matrix(diagonal: np.ndarray, rows: np.ndarray, ends: Sequence[int]) -> np.ndarray:
    """[K, K] from the accuracy on each class just after learning it (`diagonal` [K]) and rows measured after
    `ends[p]` classes (`rows` [P, K], entries of classes not learned yet ignored); NaN elsewhere."""
    diagonal = np.asarray(diagonal, np.float64)
    k = diagonal.shape[0]
    a = np.full((k, k), np.nan)
    for p, end in enumerate(ends):
        a[end - 1, :end] = np.asarray(rows[p])[:end]
    a[np.arange(k), np.arange(k)] = diagonal
    return a


def _check(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"an accuracy matrix is square [tasks, tasks]; got shape {a.shape}")
    if np.isnan(a[-1]).any() or np.isnan(np.diag(a)).any():
        raise ValueError("the accuracy matrix needs its last row and its diagonal measured")
    return a


def average_accuracy(a: np.ndarray) -> float:
    """Mean accuracy over all tasks after learning the last one."""
    return float(_check(a)[-1].mean())


def forgetting_per_task(a: np.ndarray) -> np.ndarray:
    """[T-1]: for each task but the last, its best measured accuracy before the end minus its final accuracy."""
    a = _check(a)
    t = a.shape[0]
    best = np.array([np.nanmax(a[j:t - 1, j]) for j in range(t - 1)])
    return best - a[-1, :t - 1]


def forgetting(a: np.ndarray) -> float:
    per_task = forgetting_per_task(a)
    return float(per_task.mean()) if per_task.size else float("nan")


def backward_transfer(a: np.ndarray) -> float:
    """Mean change of each earlier task's accuracy from just after learning it to the end."""
    a = _check(a)
    t = a.shape[0]
    return float((a[-1, :t - 1] - np.diag(a)[:t - 1]).mean()) if t > 1 else float("nan")


def summarize(matrices: Sequence[np.ndarray]) -> Dict[str, dict]:
    """Mean ± 95% CI over runs of average accuracy, forgetting and backward transfer."""
    values = {"accuracy": [average_accuracy(a) for a in matrices],
              "forgetting": [forgetting(a) for a in matrices],
              "backward_transfer": [backward_transfer(a) for a in matrices]}
    return {name: mean_ci95(v) for name, v in values.items()}  # NaN (one task): mean None, counted nonfinite
