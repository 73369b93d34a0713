"""The ground truth of the LDS: retrain on random subsets of the training set and record the
retrained models' outputs on the test examples, cached on disk so that a rerun is free."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..store import write_atomic

__all__ = ["random_subsets", "subset_targets"]


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
