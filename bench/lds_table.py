"""LDS tables with bootstrap intervals: one row per method and one per paired difference."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from grass.lds import bootstrap_means


def lds_tables(per_example: Mapping[str, torch.Tensor], pairs: Sequence[tuple[str, str]]
               ) -> tuple[list[dict], list[dict]]:
    """Rows (method, LDS, 95% CI, half-width) from each method's per-test-example LDS
    (n_test,), and rows (difference, mean, 95% CI, significant) for every (a, b) in ``pairs``:
    LDS(a) - LDS(b), resampled with the same test examples (paired), significant when its
    interval excludes 0."""
    diffs = {f"{a} - {b}": per_example[a] - per_example[b] for a, b in pairs}
    stats = bootstrap_means({**per_example, **diffs})

    def interval(name: str) -> str:
        return f"[{stats[name][1]:.4f}, {stats[name][2]:.4f}]"

    rows = [{"method": name, "LDS": round(stats[name][0], 4), "95% CI": interval(name),
             "CI half-width": round((stats[name][2] - stats[name][1]) / 2, 4)}
            for name in per_example]
    differences = [{"difference": name, "mean": round(stats[name][0], 4), "95% CI": interval(name),
                    "significant": "yes" if stats[name][1] > 0 or stats[name][2] < 0 else "no"}
                   for name in diffs]
    return rows, differences
