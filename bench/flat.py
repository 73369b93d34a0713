"""Flat compressors on the CPU against their torch baselines (issue 2).

x is (N, D) fp32 with N = 32; D in {1e5, 1e6, 1e7}, k in {4096, 8192}, c in {1, 4}. Every
number in a row is measured side by side in one process, under the malloc thresholds of
``bench.timing.MALLOC_ENV`` (``python -m bench`` sets them).

Sides:
    sjlt        the CPU kernel, ``grass_kernels.sjlt(x, k, c=c)``
    index_add   the torch reference (``reference.sjlt``: signed copies, then ``index_add_``)
    read        the floor: one read of x, ``x.sum()``
    gaussian    the dense N(0, 1/k) projection, ``grass_kernels.gaussian`` (it draws the k x D
                matrix chunk by chunk on every call: 16 GB at D = 1e6, k = 4096); one run, and
                only up to D = 1e6 (at D = 1e7 it is ~10x the D = 1e6 time, minutes per call)
    grass       the fused CPU kernel with k' = 4k random indices (GraSS's blow-up of 4)
    unfused     ``sjlt(mask(x, indices))``: the gather to (N, k'), then the CPU sjlt kernel
"""

from __future__ import annotations


import torch

import grass_kernels as gk
from grass_kernels import _tables, reference

from .timing import interleaved_ms, measure

N = 32
DS = (10**5, 10**6, 10**7)
KS = (4096, 8192)
CS = (1, 4)
BLOWUP = 4
GAUSSIAN_MAX_D = 10**6


def _gaussian_ms(x: torch.Tensor, k: int) -> float:
    return 1e3 * measure(lambda: gk.gaussian(x, k), warmup=0, repeats=1)


def _row(x: torch.Tensor, k: int, c: int, gaussian_ms: float | None, quick: bool) -> dict:
    d = x.shape[1]
    codes = _tables.sjlt_codes(d, k, c, 0)
    idx = gk.random_indices(d, BLOWUP * k, seed=1)
    sides = {
        "sjlt": lambda: gk.sjlt(x, k, c=c),
        "index_add": lambda: reference.sjlt(x, codes, k),
        "read": lambda: x.sum(),
        "grass": lambda: gk.grass(x, k, indices=idx, c=c),
        "unfused": lambda: gk.sjlt(gk.mask(x, idx), k, c=c),
    }
    # The kernels are checked against their baselines before they are timed.
    assert torch.allclose(sides["sjlt"](), sides["index_add"](), rtol=1e-4, atol=1e-3)
    assert torch.allclose(sides["grass"](), sides["unfused"](), rtol=1e-4, atol=1e-3)
    # One call per side per round: every call starts from the caches the other sides left.
    ms = interleaved_ms(sides, 3 if quick or d * c > 10**7 else 9, round_s=0.0)
    row = {"D": f"{d:.0e}", "k": k, "c": c}
    row.update({f"{side} ms": f"{t:.2f}" for side, t in ms.items()})
    row["gaussian ms"] = f"{gaussian_ms:.0f}" if gaussian_ms else "not run (minutes)"
    row["index_add/sjlt"] = f"{ms['index_add'] / ms['sjlt']:.1f}x"
    row["sjlt/read"] = f"{ms['sjlt'] / ms['read']:.2f}"
    row["gaussian/sjlt"] = f"{gaussian_ms / ms['sjlt']:.0f}x" if gaussian_ms else "-"
    row["unfused/grass"] = f"{ms['unfused'] / ms['grass']:.2f}x"
    return row


def table(quick: bool = False) -> list[dict]:
    """One row per (D, k, c): ms per side and the ratios issue 2 sets targets for."""
    rows = []
    for d in DS[:1] if quick else DS:
        x = torch.randn(N, d, generator=torch.Generator().manual_seed(0))
        for k in KS[:1] if quick else KS:
            # gaussian does not depend on c: one measurement serves both rows.
            gaussian_ms = _gaussian_ms(x, k) if d <= GAUSSIAN_MAX_D else None
            rows += [_row(x, k, c, gaussian_ms, quick) for c in CS]
        del x
    return rows
