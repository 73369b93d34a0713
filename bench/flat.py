"""Flat compressors on the CPU against their torch baselines.

x is (N, D) fp32 with N = 32; D in {1e5, 1e6, 1e7}, k in {4096, 8192}, c in {1, 4}. Every
number in a row is measured side by side in one process, under the malloc thresholds of
``bench.timing.MALLOC_ENV`` (``python -m bench`` sets them).

Same-method sides, timed in interleaved rounds:
    sjlt        the CPU kernel, ``grass_kernels.sjlt(x, k, c=c)``
    torch_sjlt  SJLT in torch in its strongest form that never forms (N, D, c): c calls of
                ``out.index_add_(1, buckets[:, j], x * (signs[:, j] / sqrt(c)))``, one (N, D)
                temporary per copy (the reference instead builds all c signed copies at once)
    grass       the fused CPU kernel with k' = 4k random indices (GraSS's blow-up of 4)
    unfused     ``sjlt(mask(x, indices))``: the gather to (N, k'), then the CPU sjlt kernel
    read        the floor: one read of x, ``x.sum()``

Cross-method side, timed apart (it would flush every cache the others work from):
    gaussian    the dense N(0, 1/k) projection x @ M^T with M drawn beforehand. M is 1.6-32 GB
                at these sizes, so one (k, 16384) column chunk of it is drawn once and
                ``addmm_`` runs over every column block of x against it: the FLOPs and the
                memory traffic of a resident M (a chunk is far larger than the caches), none of
                the drawing. Only up to D = 1e6 (seconds per call there, minutes at 1e7).
    gaussian_gen  drawing the whole (k, D) matrix chunk by chunk (``_tables.gaussian_chunk``),
                the cost ``grass_kernels.gaussian`` adds on every call when M does not fit its
                256 MB cache; one run, its own column.
"""

from __future__ import annotations

import math

import torch

import grass_kernels as gk
from grass_kernels import _tables

from .timing import interleaved_ms, measure

N = 32
DS = (10**5, 10**6, 10**7)
KS = (4096, 8192)
CS = (1, 4)
BLOWUP = 4
GAUSSIAN_MAX_D = 10**6


def torch_sjlt(x: torch.Tensor, buckets: torch.Tensor, weights: torch.Tensor, k: int):
    """SJLT in torch, one index_add_ per copy: buckets (D, c) int64, weights (D, c) fp32 signs
    already divided by sqrt(c); x (N, D) fp32 -> (N, k)."""
    out = torch.zeros(x.shape[0], k)
    for j in range(buckets.shape[1]):
        out.index_add_(1, buckets[:, j], x * weights[:, j])
    return out


def _gaussian_ms(x: torch.Tensor, k: int) -> tuple[float, float]:
    """(projection ms with the matrix drawn beforehand, ms to draw the (k, D) matrix)."""
    d = x.shape[1]
    step = _tables.GAUSSIAN_CHUNK
    chunk = _tables.gaussian_chunk(d, k, 0, min(step, d), seed=0)  # (k, step)
    out = torch.zeros(x.shape[0], k)

    def project():
        out.zero_()
        for lo in range(0, d, step):
            hi = min(d, lo + step)
            out.addmm_(x[:, lo:hi], chunk[:, : hi - lo].T)

    def draw():
        for lo in range(0, d, step):
            _tables.gaussian_chunk(d, k, lo, min(d, lo + step), seed=0)

    repeats = 3 if d * k <= 10**9 else 1
    project_ms = 1e3 * measure(project, warmup=1, repeats=repeats)
    return project_ms, 1e3 * measure(draw, warmup=0, repeats=1)


def _row(x: torch.Tensor, k: int, c: int, gaussian: tuple | None, quick: bool) -> dict:
    d = x.shape[1]
    buckets, signs = _tables.decode_codes(gk.sjlt_codes(d, k, c=c, seed=0))
    weights = (signs / math.sqrt(c)).contiguous()
    idx = gk.random_indices(d, BLOWUP * k, seed=1)
    sides = {
        "sjlt": lambda: gk.sjlt(x, k, c=c),
        "torch_sjlt": lambda: torch_sjlt(x, buckets, weights, k),
        "grass": lambda: gk.grass(x, k, indices=idx, c=c),
        "unfused": lambda: gk.sjlt(gk.mask(x, idx), k, c=c),
        "read": lambda: x.sum(),
    }
    # The kernels are checked against their baselines before they are timed.
    assert torch.allclose(sides["sjlt"](), sides["torch_sjlt"](), rtol=1e-4, atol=1e-3)
    assert torch.allclose(sides["grass"](), sides["unfused"](), rtol=1e-4, atol=1e-3)
    # One call per side per round: every call starts from the caches the other sides left.
    ms = interleaved_ms(sides, 3 if quick or d * c > 10**7 else 9, round_s=0.0)
    row = {"D": f"{d:.0e}", "k": k, "c": c}
    row["torch_sjlt/sjlt"] = f"{ms['torch_sjlt'] / ms['sjlt']:.1f}x"
    row["unfused/grass"] = f"{ms['unfused'] / ms['grass']:.2f}x"
    row["sjlt/read"] = f"{ms['sjlt'] / ms['read']:.2f}"
    row.update({f"{side} ms": f"{t:.2f}" for side, t in ms.items()})
    if gaussian is None:
        row.update({"gaussian ms": "not run (minutes)", "gaussian_gen ms": "-",
                    "cross-method gaussian/sjlt": "-"})
    else:
        row["gaussian ms"] = f"{gaussian[0]:.0f}"
        row["gaussian_gen ms"] = f"{gaussian[1]:.0f}"
        row["cross-method gaussian/sjlt"] = f"{gaussian[0] / ms['sjlt']:.0f}x"
    return row


def table(quick: bool = False) -> list[dict]:
    """One row per (D, k, c): same-method ratios first, ms per side, then the Gaussian rows."""
    rows = []
    for d in DS[:1] if quick else DS:
        x = torch.randn(N, d, generator=torch.Generator().manual_seed(0))
        for k in KS[:1] if quick else KS:
            # gaussian does not depend on c: one measurement serves both rows.
            gaussian = _gaussian_ms(x, k) if d <= GAUSSIAN_MAX_D else None
            rows += [_row(x, k, c, gaussian, quick) for c in CS]
        del x
    return rows
