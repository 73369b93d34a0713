"""Linear datamodeling score (Park et al. 2023): how well attribution scores predict retraining.

LDS asks whether attribution scores, summed over a training subset, rank the subsets the way
actually retraining on them does: for each test example j, the Spearman correlation over
subsets s between Σ_{i∈s} scores[j, i] and the retrained model's output on j; averaged over j.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


__all__ = ["bootstrap_means", "lds", "lds_per_example", "spearman_columns"]


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
