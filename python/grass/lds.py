"""Linear datamodeling score (Park et al. 2023) and the harness that produces its ground truth.

LDS asks whether attribution scores, summed over a training subset, rank the subsets the way
actually retraining on them does: for each test example j, the Spearman correlation over
subsets s between Σ_{i∈s} scores[j, i] and the retrained model's output on j; averaged over j.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .store import write_atomic

__all__ = ["lds", "random_subsets", "spearman_columns", "subset_targets"]


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks along the last dim, ties sharing their average rank (as Spearman's rho needs)."""
    s = x.sort(dim=-1).values.contiguous()
    x = x.contiguous()
    lo = torch.searchsorted(s, x, right=False)
    hi = torch.searchsorted(s, x, right=True)
    return (lo + hi - 1).to(torch.float64) / 2


def spearman_columns(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman correlation of a[:, j] with b[:, j] for every column j: (n, m), (n, m) -> (m,).
    A column with no variation on either side gives NaN."""
    ra = _average_ranks(a.double().T)
    rb = _average_ranks(b.double().T)
    ra = ra - ra.mean(dim=1, keepdim=True)
    rb = rb - rb.mean(dim=1, keepdim=True)
    denom = ra.norm(dim=1) * rb.norm(dim=1)
    return torch.where(denom > 0, (ra * rb).sum(dim=1) / denom, torch.nan)


def lds(scores: torch.Tensor, subsets: torch.Tensor, targets: torch.Tensor) -> float:
    """Linear datamodeling score.

    scores: (n_test, n_train) attribution scores; subsets: (n_subsets, n_train) bool, the
    training rows each retrained model saw; targets: (n_subsets, n_test), that model's output
    (e.g. the margin) on each test example. Returns the mean over test examples of the Spearman
    correlation between predicted (scores summed over the subset) and actual targets; test
    examples whose targets or predictions do not vary are left out of the mean.
    """
    for name, t, dims in (("scores", scores, 2), ("subsets", subsets, 2), ("targets", targets, 2)):
        if not isinstance(t, torch.Tensor) or t.dim() != dims:
            raise ValueError(f"{name} must be a 2-D tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if subsets.dtype != torch.bool:
        raise TypeError(f"subsets must be a bool tensor, got {subsets.dtype}")
    n_test, n_train = scores.shape
    if subsets.shape[1] != n_train:
        raise ValueError(f"subsets must be (n_subsets, n_train={n_train}), got {tuple(subsets.shape)}")
    if targets.shape != (subsets.shape[0], n_test):
        raise ValueError(f"targets must be (n_subsets={subsets.shape[0]}, n_test={n_test}), "
                         f"got {tuple(targets.shape)}")
    if subsets.shape[0] < 3:
        raise ValueError(f"need at least 3 subsets for a rank correlation, got {subsets.shape[0]}")
    if not torch.isfinite(scores).all():
        raise ValueError("scores must be finite")
    predicted = subsets.double() @ scores.double().T  # (n_subsets, n_test)
    return float(spearman_columns(predicted, targets).nanmean())


def random_subsets(n_train: int, n_subsets: int, *, fraction: float = 0.5, seed: int = 0) -> torch.Tensor:
    """(n_subsets, n_train) bool: each row a uniform random subset of round(fraction·n_train)."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    size = round(fraction * n_train)
    gen = torch.Generator().manual_seed(seed)
    out = torch.zeros(n_subsets, n_train, dtype=torch.bool)
    for s in range(n_subsets):
        out[s, torch.randperm(n_train, generator=gen)[:size]] = True
    return out


def _load_cache(path: str, meta: str, subsets: torch.Tensor) -> list[torch.Tensor]:
    """Targets already computed for these subsets by an identical configuration, else []."""
    if not os.path.exists(path):
        return []
    with np.load(path, allow_pickle=False) as f:
        if str(f["meta"]) != meta or not np.array_equal(f["subsets"], subsets[: len(f["targets"])].numpy()):
            return []  # another configuration: recompute rather than return wrong ground truth
        return [torch.from_numpy(row.copy()) for row in f["targets"]]


def subset_targets(
    evaluate: Callable[[torch.Tensor, list[int]], torch.Tensor],
    n_train: int,
    *,
    n_subsets: int = 50,
    fraction: float = 0.5,
    seed: int = 0,
    batch: int = 10,
    cache: str | os.PathLike | None = None,
    config: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Retrain on random subsets and record the outputs: the ground truth of `lds`.

    evaluate(subsets (m, n_train) bool, seeds list[int] of m) -> (m, n_test): trains one model
        per subset (init from its seed; subset s gets seed `seed + s`) and returns each model's
        output on every test example. It is called with up to `batch` subsets at a time.
    cache: an .npz file (no pickle) holding the targets, rewritten after every batch, so that a
        rerun is free and an interrupted one resumes; it is used only when `config` (a JSON-able
        description of the task and recipe) and the subsets match.
    Returns subsets (n_subsets, n_train) bool and targets (n_subsets, n_test) fp32.
    """
    if n_subsets < 3:
        raise ValueError(f"n_subsets must be at least 3, got {n_subsets}")
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    subsets = random_subsets(n_train, n_subsets, fraction=fraction, seed=seed)
    meta = json.dumps({"config": config or {}, "fraction": fraction, "seed": seed}, sort_keys=True)
    path = os.fspath(cache) if cache is not None else None
    rows = (_load_cache(path, meta, subsets) if path else [])[:n_subsets]
    bar = tqdm(total=n_subsets, initial=len(rows), desc="LDS ground truth (retraining)",
               disable=not progress, leave=False)
    while len(rows) < n_subsets:
        lo, hi = len(rows), min(len(rows) + batch, n_subsets)
        out = evaluate(subsets[lo:hi], [seed + s for s in range(lo, hi)]).detach().float().cpu()
        if out.dim() != 2 or out.shape[0] != hi - lo:
            raise ValueError(f"evaluate must return ({hi - lo}, n_test), got {tuple(out.shape)}")
        rows.extend(out)
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            buf = io.BytesIO()
            np.savez(buf, meta=np.array(meta), subsets=subsets[:hi].numpy(),
                     targets=torch.stack(rows).numpy())
            write_atomic(path, buf.getvalue())
        bar.update(hi - lo)
    bar.close()
    return subsets, torch.stack(rows)
