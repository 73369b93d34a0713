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

__all__ = ["bootstrap_means", "lds", "lds_per_example", "random_subsets", "spearman_columns",
           "subset_targets"]


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
    return float(lds_per_example(scores, subsets, targets).nanmean())


def lds_per_example(scores: torch.Tensor, subsets: torch.Tensor, targets: torch.Tensor
                    ) -> torch.Tensor:
    """The Spearman correlation of each test example, (n_test,) fp64, whose mean is `lds`
    (same arguments); NaN where the targets or predictions of that example do not vary."""
    for name, t in (("scores", scores), ("subsets", subsets), ("targets", targets)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
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
    return spearman_columns(predicted, targets)


def bootstrap_means(per_example: Mapping[str, torch.Tensor], *, n_boot: int = 2000,
                    level: float = 0.95, seed: int = 0) -> dict[str, tuple[float, float, float]]:
    """Mean and percentile bootstrap interval over test examples of each method's per-example
    values (e.g. `lds_per_example`): name -> (mean, low, high).

    Every method is resampled with the same test indices, so an entry that the caller makes as
    per_example[a] - per_example[b] gets the paired interval of that difference. Examples that
    are NaN for any method are left out of all of them.
    """
    if not per_example:
        raise ValueError("per_example must hold at least one method")
    names = list(per_example)
    values = torch.stack([per_example[n].double().reshape(-1) for n in names])  # (methods, n)
    values = values[:, ~values.isnan().any(0)]
    if values.shape[1] < 2:
        raise ValueError("need at least 2 test examples with finite values for every method")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, values.shape[1], (n_boot, values.shape[1]), generator=gen)
    means = values[:, idx].mean(-1)  # (methods, n_boot)
    tail = (1 - level) / 2
    low, high = means.quantile(tail, dim=1), means.quantile(1 - tail, dim=1)
    return {n: (float(values[i].mean()), float(low[i]), float(high[i])) for i, n in enumerate(names)}


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
